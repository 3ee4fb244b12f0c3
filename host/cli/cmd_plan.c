/* cmd_plan.c — the `kvhost plan` command: parses its options, reads a config.json when given one,
 * runs the arithmetic in plan.c and prints a table (stdout) and, with --json FILE, one JSON object
 * (written to FILE.tmp, then renamed). Owns: option parsing, formatting, the JSON layout, the sweeps.
 * Does not own: any formula (plan.c). Errors go to stderr and give a non-zero exit code. */
#define _POSIX_C_SOURCE 200809L
#include "plan/plan.h"

#include "cli/cli.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define GIB 1073741824.0

static const char *const usage =
    "usage: kvhost plan [MODEL] [options]\n"
    "\n"
    "Sizes a deployment: parameters, weight memory, KV cache per token / request, batch capacity (with\n"
    "tensor parallelism and KV policies), attention arithmetic intensity vs the roofline ridge.\n"
    "\n"
    "Model (one of):\n"
    "  --model NAME|PATH     preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-3-8b; a random:\n"
    "                        prefix is accepted), a config.json, or a directory holding one\n"
    "  --layers N --heads N --hidden N --ffn N --vocab N   explicit shape (also override a preset)\n"
    "  --kv-heads N          KV heads (GQA); default = --heads\n"
    "  --head-dim N          default hidden / heads\n"
    "  --positions N         learned position rows (GPT-2 wpe); default 1024 for --family gpt2\n"
    "  --family gpt2|llama   parameter-count family for explicit shapes (default llama)\n"
    "  --tied-head yes|no    LM head shares the token embedding (default: gpt2 yes, llama no)\n"
    "Deployment:\n"
    "  --gpu-mem GB          memory per GPU, GB = 2^30 bytes (default 80)\n"
    "  --weight-prec P       fp32|fp16|bf16|int8|int4 (default fp16)\n"
    "  --kv-prec P           fp32|fp16|bf16|int8|int4 (default fp16)\n"
    "  --act-prec P          activations in the AI figures: fp32|fp16|bf16 (default fp16)\n"
    "  --group-size G        int8/int4: one fp16 scale per G elements (default 32)\n"
    "  --asymmetric          int8/int4: plus one fp16 zero-point per group\n"
    "  --context N           tokens per request (default 1024)\n"
    "  --batch N             requests, for the fit check and decode-step AI (default 1)\n"
    "  --tp N                tensor-parallel degree (default 1)\n"
    "KV plugin stack:\n"
    "  --policy SPEC         window:N | sink:S+W | h2o:HEAVY+RECENT | pyramid:AVG | none\n"
    "  --beta B              pyramid: top layer budget = AVG/B (default 20, as PyramidKV)\n"
    "  --minicache R         fraction of layers merged in pairs from the middle layer up (0..0.5)\n"
    "Roofline:\n"
    "  --peak-tflops T       dense peak (default 989.4: H100 SXM fp16/bf16 tensor cores)\n"
    "  --bandwidth-gbs B     memory bandwidth, 1e9 B/s (default 3350: H100 SXM HBM3)\n"
    "Output:\n"
    "  --json FILE           also write one JSON object to FILE (atomically)\n"
    "  --sweep               add AI vs context (prefill, decode) and vs batch (decode) to the JSON\n"
    "  -h, --help            this text\n"
    "\n"
    "Formulas and conventions: docs/plan.md.\n";

typedef struct opts {
    const char *model, *json, *family, *tied;
    int64_t layers, heads, kv_heads, hidden, ffn, vocab, head_dim, positions;
    int sweep;
    kvh_plan_inputs in;
} opts;

static int parse_i64(const char *opt, const char *s, int64_t *out, kvh_err *err)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (!*s || *end || errno) return kvh_fail(err, "%s '%s': not an integer", opt, s);
    if (v < 1) return kvh_fail(err, "%s %lld: must be >= 1", opt, v);
    *out = v;
    return 0;
}

static int parse_f64(const char *opt, const char *s, double *out, kvh_err *err)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (!*s || *end || errno || !isfinite(v)) return kvh_fail(err, "%s '%s': not a number", opt, s);
    if (v < 0) return kvh_fail(err, "%s %g: must not be negative", opt, v);
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, opts *o, int *help, kvh_err *err)
{
    memset(o, 0, sizeof *o);
    kvh_plan_inputs_default(&o->in);
    *help = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *val = NULL;
        char name[64];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            *help = 1;
            return 0;
        }
        if (strncmp(a, "--", 2)) {
            if (o->model) return kvh_fail(err, "unexpected argument '%s' (model already given as '%s')", a, o->model);
            o->model = a;
            continue;
        }
        const char *eq = strchr(a, '=');
        size_t n = eq ? (size_t)(eq - a) : strlen(a);
        if (n >= sizeof name) return kvh_fail(err, "unknown option '%s' (see kvhost plan --help)", a);
        memcpy(name, a, n);
        name[n] = 0;
        if (!strcmp(name, "--asymmetric") || !strcmp(name, "--sweep")) {
            if (eq) return kvh_fail(err, "%s takes no value", name);
            if (!strcmp(name, "--asymmetric")) o->in.weight_prec.asymmetric = o->in.kv_prec.asymmetric = 1;
            else o->sweep = 1;
            continue;
        }
        static const char *const with_value[] = {
            "--model", "--layers", "--heads", "--kv-heads", "--hidden", "--ffn", "--vocab", "--head-dim",
            "--positions", "--family", "--tied-head", "--gpu-mem", "--weight-prec", "--kv-prec", "--act-prec",
            "--group-size", "--context", "--batch", "--tp", "--policy", "--beta", "--minicache",
            "--peak-tflops", "--bandwidth-gbs", "--json", NULL};
        int known = 0;
        for (int k = 0; with_value[k]; k++) known |= !strcmp(name, with_value[k]);
        /* names other tools use for the same thing: point at ours rather than accept two spellings */
        static const char *const hints[][2] = {{"--kv-dtype", "--kv-prec"}, {"--dtype", "--weight-prec"},
                                               {"--weight-dtype", "--weight-prec"}, {"--seq-len", "--context"}};
        for (size_t k = 0; !known && k < sizeof hints / sizeof hints[0]; k++)
            if (!strcmp(name, hints[k][0]))
                return kvh_fail(err, "unknown option '%s' (did you mean %s?)", name, hints[k][1]);
        if (!known) return kvh_fail(err, "unknown option '%s' (see kvhost plan --help)", name);
        if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc) return kvh_fail(err, "%s needs a value", name);
            val = argv[++i];
        }
        int rc = 0;
        if (!strcmp(name, "--model")) o->model = val;
        else if (!strcmp(name, "--layers")) rc = parse_i64(name, val, &o->layers, err);
        else if (!strcmp(name, "--heads")) rc = parse_i64(name, val, &o->heads, err);
        else if (!strcmp(name, "--kv-heads")) rc = parse_i64(name, val, &o->kv_heads, err);
        else if (!strcmp(name, "--hidden")) rc = parse_i64(name, val, &o->hidden, err);
        else if (!strcmp(name, "--ffn")) rc = parse_i64(name, val, &o->ffn, err);
        else if (!strcmp(name, "--vocab")) rc = parse_i64(name, val, &o->vocab, err);
        else if (!strcmp(name, "--head-dim")) rc = parse_i64(name, val, &o->head_dim, err);
        else if (!strcmp(name, "--positions")) rc = parse_i64(name, val, &o->positions, err);
        else if (!strcmp(name, "--family")) o->family = val;
        else if (!strcmp(name, "--tied-head")) o->tied = val;
        else if (!strcmp(name, "--gpu-mem")) rc = parse_f64(name, val, &o->in.gpu_mem_gb, err);
        else if (!strcmp(name, "--weight-prec")) rc = kvh_plan_prec_parse(val, &o->in.weight_prec.kind, err);
        else if (!strcmp(name, "--kv-prec")) rc = kvh_plan_prec_parse(val, &o->in.kv_prec.kind, err);
        else if (!strcmp(name, "--act-prec")) rc = kvh_plan_prec_parse(val, &o->in.act_prec, err);
        else if (!strcmp(name, "--group-size")) {
            rc = parse_i64(name, val, &o->in.kv_prec.group, err);
            o->in.weight_prec.group = o->in.kv_prec.group;
        } else if (!strcmp(name, "--context")) rc = parse_i64(name, val, &o->in.context, err);
        else if (!strcmp(name, "--batch")) rc = parse_i64(name, val, &o->in.batch, err);
        else if (!strcmp(name, "--tp")) rc = parse_i64(name, val, &o->in.tp, err);
        else if (!strcmp(name, "--policy")) rc = kvh_plan_policy_parse(val, &o->in.policy, err);
        else if (!strcmp(name, "--beta")) rc = parse_f64(name, val, &o->in.policy.beta, err);
        else if (!strcmp(name, "--minicache")) rc = parse_f64(name, val, &o->in.policy.minicache, err);
        else if (!strcmp(name, "--peak-tflops")) rc = parse_f64(name, val, &o->in.peak_tflops, err);
        else if (!strcmp(name, "--bandwidth-gbs")) rc = parse_f64(name, val, &o->in.bandwidth_gbs, err);
        else if (!strcmp(name, "--json")) o->json = val;
        if (rc) return -1;
    }
    if (o->sweep && !o->json) return kvh_fail(err, "--sweep adds to the JSON output: give --json FILE too");
    return 0;
}

/* build_model's status for a config.json that cannot be read or parsed (exit 1, an input error) as
 * opposed to -1 for options that do not make a model (exit 2, a usage error). */
#define FILE_ERROR (-3)

/* Resolves the model: preset / config.json / explicit dims, then explicit overrides. */
static int build_model(opts *o, kvh_err *err)
{
    kvh_plan_model *m = &o->in.model;
    memset(m, 0, sizeof *m);
    if (o->model) {
        const char *spec = o->model;
        if (!strncmp(spec, "random:", 7)) spec += 7;
        struct stat st;
        if (strchr(spec, '/') || strstr(spec, ".json") || stat(spec, &st) == 0) {
            char path[4096];
            if (stat(spec, &st) == 0 && S_ISDIR(st.st_mode)) snprintf(path, sizeof path, "%s/config.json", spec);
            else snprintf(path, sizeof path, "%s", spec);
            char *text = NULL;
            size_t len = 0;
            if (kvh_read_file(path, 16u << 20, &text, &len, err)) return FILE_ERROR;
            int rc = kvh_plan_model_from_json(text, path, m, err);
            free(text);
            if (rc) return FILE_ERROR;
        } else if (kvh_plan_model_preset(spec, m, err)) {
            return -1;
        }
    } else {
        const char *miss = !o->layers ? "--layers" : !o->heads ? "--heads" : !o->hidden ? "--hidden"
                         : !o->ffn    ? "--ffn"    : !o->vocab ? "--vocab" : NULL;
        if (miss) return kvh_fail(err, "no model: give --model NAME|config.json, or an explicit shape (missing %s)", miss);
        snprintf(m->name, sizeof m->name, "custom");
        m->family = KVH_PLAN_LLAMA;
        m->tied_head = -1;
    }
    if (o->family) {
        if (!strcmp(o->family, "gpt2")) m->family = KVH_PLAN_GPT2;
        else if (!strcmp(o->family, "llama")) m->family = KVH_PLAN_LLAMA;
        else return kvh_fail(err, "--family '%s': expected gpt2 or llama", o->family);
    }
    int base_mha = m->n_kv_head == m->n_head;
    int reshape = !o->model || o->heads || o->hidden; /* head_dim must be re-derived */
    if (o->layers) m->n_layer = o->layers;
    if (o->hidden) m->hidden = o->hidden;
    if (o->heads) m->n_head = o->heads;
    if (o->ffn) m->ffn = o->ffn;
    if (o->vocab) m->vocab = o->vocab;
    if (o->positions) m->n_positions = o->positions;
    if (o->kv_heads) m->n_kv_head = o->kv_heads;
    else if (!o->model || base_mha) m->n_kv_head = m->n_head; /* no GQA unless told */
    if (o->head_dim) {
        m->head_dim = o->head_dim;
    } else if (reshape) {
        if (m->hidden % m->n_head)
            return kvh_fail(err, "heads = %lld does not divide hidden = %lld (give --head-dim if the model "
                                 "really has that shape)", (long long)m->n_head, (long long)m->hidden);
        m->head_dim = m->hidden / m->n_head;
    }
    if (m->family == KVH_PLAN_GPT2 && m->n_positions == 0) m->n_positions = 1024;
    if (m->family == KVH_PLAN_LLAMA && !o->positions) m->n_positions = 0;
    if (o->tied) {
        if (!strcmp(o->tied, "yes")) m->tied_head = 1;
        else if (!strcmp(o->tied, "no")) m->tied_head = 0;
        else return kvh_fail(err, "--tied-head '%s': expected yes or no", o->tied);
    } else if (m->tied_head == -1) {
        m->tied_head = m->family == KVH_PLAN_GPT2;
    }
    return kvh_plan_model_check(m, err);
}

/* ---- formatting -------------------------------------------------------------------------------- */

static const char *commas(uint64_t v, char *buf, size_t n)
{
    char tmp[32];
    int len = snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)v);
    size_t j = 0;
    for (int i = 0; i < len && j + 2 < n; i++) {
        if (i && (len - i) % 3 == 0) buf[j++] = ',';
        buf[j++] = tmp[i];
    }
    buf[j] = 0;
    return buf;
}

static const char *family_text(const kvh_plan_model *m)
{
    return m->family == KVH_PLAN_GPT2 ? "gpt2 family: LayerNorm + biases, learned positions, 2-matrix GELU MLP"
                                      : "llama family: RMSNorm, no biases, GQA k/v, 3-matrix SwiGLU MLP";
}

static const char *policy_text(const kvh_plan_policy *p, char *buf, size_t n)
{
    switch (p->kind) {
    case KVH_POLICY_WINDOW: snprintf(buf, n, "window:%lld", (long long)p->a); break;
    case KVH_POLICY_SINK: snprintf(buf, n, "sink:%lld+%lld", (long long)p->a, (long long)p->b); break;
    case KVH_POLICY_H2O: snprintf(buf, n, "h2o:%lld+%lld", (long long)p->a, (long long)p->b); break;
    case KVH_POLICY_PYRAMID: snprintf(buf, n, "pyramid:%lld (beta %g)", (long long)p->a, p->beta); break;
    default: snprintf(buf, n, "none"); break;
    }
    return buf;
}

static const char *bound(double ai, double ridge) { return ai < ridge ? "memory-bound" : "compute-bound"; }

static void print_table(const opts *o, const kvh_plan_result *r)
{
    const kvh_plan_inputs *in = &o->in;
    const kvh_plan_model *m = &in->model;
    char a[32], b[32], pol[64];
    const char *wp = kvh_plan_prec_name(in->weight_prec.kind), *kp = kvh_plan_prec_name(in->kv_prec.kind);
    printf("kvhost plan: %s (%s)\n", m->name, family_text(m));
    printf("  layers %lld, hidden %lld, heads %lld (KV heads %lld, head_dim %lld), ffn %lld, vocab %lld",
           (long long)m->n_layer, (long long)m->hidden, (long long)m->n_head, (long long)m->n_kv_head,
           (long long)m->head_dim, (long long)m->ffn, (long long)m->vocab);
    if (m->n_positions) printf(", positions %lld", (long long)m->n_positions);
    printf(", %s head\n", m->tied_head ? "tied" : "untied");
    if (m->n_positions && in->context > m->n_positions)
        printf("  NOTE: context %lld is past the %lld learned positions: this model cannot run it (sizes shown "
               "as if it could)\n", (long long)in->context, (long long)m->n_positions);
    printf("\n");

    printf("%-28s %22s %22s\n", "parameters", "exact (checkpoint)", "simplified");
    const kvh_plan_params *e = &r->exact, *s = &r->simplified;
    printf("  %-26s %22s %22s\n", "attention", commas(e->attention, a, 32), commas(s->attention, b, 32));
    printf("  %-26s %22s %22s\n", "ffn", commas(e->ffn, a, 32), commas(s->ffn, b, 32));
    printf("  %-26s %22s %22s\n", m->family == KVH_PLAN_GPT2 ? "embeddings (wte + wpe)" : "embeddings",
           commas(e->embeddings, a, 32), commas(s->embeddings, b, 32));
    printf("  %-26s %22s %22s\n", m->tied_head ? "lm_head (tied: 0)" : "lm_head (untied)", commas(e->lm_head, a, 32),
           commas(s->lm_head, b, 32));
    printf("  %-26s %22s %22s\n", "norms / biases", commas(e->norms_biases, a, 32), commas(s->norms_biases, b, 32));
    printf("  %-26s %22s %22s\n", "total", commas(e->total, a, 32), commas(s->total, b, 32));
    printf("  %-26s %21.3fB %21.3fB\n", "", e->total / 1e9, s->total / 1e9);
    printf("  exact = every tensor of the checkpoint (the right count); simplified = L*(4h^2 + 2*h*F) + V*h\n\n");

    printf("%-28s %22s %22s\n", "weights (GB = 2^30 B)", "exact", "simplified");
    printf("  %-26s %22.3f %22.3f\n", wp, r->weight_bytes_exact / GIB, r->weight_bytes_simplified / GIB);
    if (in->tp > 1)
        printf("  %-26s %22.3f %22.3f\n", "per GPU at TP", r->weight_bytes_gpu_exact / GIB,
               r->weight_bytes_gpu_simplified / GIB);
    printf("\n");

    char hdr_e[48], hdr_s[48];
    snprintf(hdr_e, sizeof hdr_e, "%lld KV heads (right)", (long long)m->n_kv_head);
    snprintf(hdr_s, sizeof hdr_s, "all %lld heads, full", (long long)m->n_head);
    printf("KV cache %-4s, context %-7lld %22s %22s\n", kp, (long long)in->context, hdr_e, hdr_s);
    printf("  %-26s %22s %22s\n", "bytes per token", commas(r->kv_exact.bytes_per_token, a, 32),
           commas(r->kv_simplified.bytes_per_token, b, 32));
    printf("  %-26s %22.4f %22.4f\n", "GB per request", r->kv_exact.bytes_per_request / GIB,
           r->kv_simplified.bytes_per_request / GIB);
    char mb[48];
    snprintf(mb, sizeof mb, "max batch, 1 GPU %.4g GB", in->gpu_mem_gb);
    printf("  %-26s %22lld %22lld\n", mb, (long long)r->kv_exact.max_batch, (long long)r->kv_simplified.max_batch);
    if (in->tp > 1) {
        snprintf(mb, sizeof mb, "max batch at TP=%lld", (long long)in->tp);
        printf("  %-26s %22lld %22lld\n", mb, (long long)r->kv_exact.max_batch_tp,
               (long long)r->kv_simplified.max_batch_tp);
        printf("  %-26s %22lld %22lld\n", "  vs TP GPUs as replicas", (long long)(in->tp * r->kv_exact.max_batch),
               (long long)(in->tp * r->kv_simplified.max_batch));
        printf("  (each GPU holds 1/%lld of the weights and %lld of the %lld KV heads of every request%s)\n",
               (long long)in->tp, (long long)r->kv_heads_per_gpu, (long long)m->n_kv_head,
               in->tp > m->n_kv_head ? "; KV heads replicated" : "");
    }
    if (m->n_kv_head != m->n_head)
        printf("  the simplified column counts every query head as a KV head; with GQA the right figure is the\n"
               "  %lld-KV-head column (%lldx smaller)\n", (long long)m->n_kv_head,
               (long long)(m->n_head / m->n_kv_head));
    else
        printf("  no GQA: both conventions agree on the KV cache (the weights differ)\n");
    printf("\n");

    if (in->policy.kind != KVH_POLICY_NONE || r->minicache_merged) {
        printf("KV under the plugin stack: policy %s", policy_text(&in->policy, pol, sizeof pol));
        if (r->minicache_merged)
            printf(", minicache %g (%lld layers merged in pairs from layer %lld)", in->policy.minicache,
                   (long long)r->minicache_merged, (long long)(m->n_layer / 2));
        printf("\n");
        printf("  %-26s %22s  (per head, sum over layers; full cache %s)\n", "tokens kept",
               commas(r->policy_tokens, a, 32), commas((uint64_t)(m->n_layer * in->context), b, 32));
        printf("  %-26s %22.4f  (%.1f%% of the full cache)\n", "GB per request", r->kv_policy.bytes_per_request / GIB,
               100.0 * (double)r->kv_policy.bytes_per_request / (double)r->kv_exact.bytes_per_request);
        printf("  %-26s %22lld\n", "max batch, 1 GPU", (long long)r->kv_policy.max_batch);
        if (in->tp > 1) printf("  %-26s %22lld\n", "max batch at TP", (long long)r->kv_policy.max_batch_tp);
        printf("\n");
    }
    printf("batch %lld: %.3f GB per GPU (weights + KV, exact) of %.4g GB: %s\n\n", (long long)in->batch,
           r->batch_bytes_gpu / GIB, in->gpu_mem_gb, r->batch_bytes_gpu <= r->gpu_mem_bytes ? "fits" : "DOES NOT FIT");

    printf("attention arithmetic intensity (one head, non-fused, N=%lld, d=%lld, activations %s, KV %s)\n",
           (long long)in->context, (long long)m->head_dim, kvh_plan_prec_name(in->act_prec), kp);
    printf("  %-26s %16s %16s %10s\n", "", "FLOPs", "bytes", "FLOP/B");
    const struct { const char *name; const kvh_plan_ai *x; } rows[] = {
        {"prefill (N queries)", &r->prefill},
        {"decode (1 query)", &r->decode},
        {"decode, K/V shared in GQA", &r->decode_gqa},
        {"decode step: matmuls", &r->decode_linear},
        {"decode step: total", &r->decode_step},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        printf("  %-26s %16.6g %16.6g %10.2f  %s\n", rows[i].name, rows[i].x->flops, rows[i].x->bytes, rows[i].x->ai,
               bound(rows[i].x->ai, r->ridge));
    printf("  (decode step = all layers, heads and the %lld requests of the batch; matmuls include the LM head)\n",
           (long long)in->batch);
    int defaults = in->peak_tflops == KVH_PLAN_DEFAULT_TFLOPS && in->bandwidth_gbs == KVH_PLAN_DEFAULT_BW_GBS;
    printf("ridge point: %.1f FLOP/B = %.1f TFLOP/s / %.0f GB/s%s\n", r->ridge, in->peak_tflops, in->bandwidth_gbs,
           defaults ? " (defaults: H100 SXM dense fp16 tensor peak, HBM3 bandwidth)" : "");
}

/* ---- JSON -------------------------------------------------------------------------------------- */

static cJSON *ai_json(const kvh_plan_ai *x, double ridge)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "flops", x->flops);
    cJSON_AddNumberToObject(o, "bytes", x->bytes);
    cJSON_AddNumberToObject(o, "ai", x->ai);
    cJSON_AddStringToObject(o, "bound", bound(x->ai, ridge));
    return o;
}

static cJSON *params_json(const kvh_plan_params *p)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "attention", (double)p->attention);
    cJSON_AddNumberToObject(o, "ffn", (double)p->ffn);
    cJSON_AddNumberToObject(o, "embeddings", (double)p->embeddings);
    cJSON_AddNumberToObject(o, "lm_head", (double)p->lm_head);
    cJSON_AddNumberToObject(o, "norms_biases", (double)p->norms_biases);
    cJSON_AddNumberToObject(o, "total", (double)p->total);
    return o;
}

static cJSON *kv_json(const kvh_plan_kv *k)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "bytes_per_token", (double)k->bytes_per_token);
    cJSON_AddNumberToObject(o, "bytes_per_request", (double)k->bytes_per_request);
    cJSON_AddNumberToObject(o, "gb_per_request", k->bytes_per_request / GIB);
    cJSON_AddNumberToObject(o, "bytes_per_request_per_gpu", (double)k->bytes_per_request_gpu);
    cJSON_AddNumberToObject(o, "max_batch", (double)k->max_batch);
    cJSON_AddNumberToObject(o, "max_batch_tp", (double)k->max_batch_tp);
    return o;
}

static int add_sweep(cJSON *root, const opts *o, const kvh_plan_result *r, kvh_err *err)
{
    const kvh_plan_inputs *in = &o->in;
    double act = kvh_plan_prec_bits(in->act_prec) / 8.0;
    double kvvec = (double)kvh_plan_vec_bytes(&in->kv_prec, in->model.head_dim);
    cJSON *sw = cJSON_AddObjectToObject(root, "sweep");
    cJSON *pc = cJSON_AddArrayToObject(sw, "vs_context");
    for (int64_t n = 16; n <= 131072; n *= 2) {
        kvh_plan_ai p, d;
        kvh_plan_ai_prefill(n, in->model.head_dim, act, &p);
        kvh_plan_ai_decode(n, in->model.head_dim, act, kvvec, &d);
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "context", (double)n);
        cJSON_AddNumberToObject(e, "prefill_flops", p.flops);
        cJSON_AddNumberToObject(e, "prefill_bytes", p.bytes);
        cJSON_AddNumberToObject(e, "prefill_ai", p.ai);
        cJSON_AddNumberToObject(e, "decode_ai", d.ai);
        cJSON_AddItemToArray(pc, e);
    }
    cJSON *db = cJSON_AddArrayToObject(sw, "vs_batch");
    for (int64_t bsz = 1; bsz <= 4096; bsz *= 2) {
        kvh_plan_ai lin, at, st;
        if (kvh_plan_decode_step(in, bsz, &lin, &at, &st, err)) return -1;
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "batch", (double)bsz);
        cJSON_AddNumberToObject(e, "attention_ai", at.ai);
        cJSON_AddNumberToObject(e, "linear_ai", lin.ai);
        cJSON_AddNumberToObject(e, "step_ai", st.ai);
        cJSON_AddNumberToObject(e, "step_flops", st.flops);
        cJSON_AddNumberToObject(e, "step_bytes", st.bytes);
        cJSON_AddBoolToObject(e, "fits_tp", bsz <= r->kv_policy.max_batch_tp);
        cJSON_AddItemToArray(db, e);
    }
    return 0;
}

static int write_json(const opts *o, const kvh_plan_result *r, kvh_err *err)
{
    const kvh_plan_inputs *in = &o->in;
    const kvh_plan_model *m = &in->model;
    char pol[64];
    cJSON *root = cJSON_CreateObject();
    cJSON *jm = cJSON_AddObjectToObject(root, "model");
    cJSON_AddStringToObject(jm, "name", m->name);
    cJSON_AddStringToObject(jm, "family", m->family == KVH_PLAN_GPT2 ? "gpt2" : "llama");
    cJSON_AddNumberToObject(jm, "layers", (double)m->n_layer);
    cJSON_AddNumberToObject(jm, "hidden", (double)m->hidden);
    cJSON_AddNumberToObject(jm, "heads", (double)m->n_head);
    cJSON_AddNumberToObject(jm, "kv_heads", (double)m->n_kv_head);
    cJSON_AddNumberToObject(jm, "head_dim", (double)m->head_dim);
    cJSON_AddNumberToObject(jm, "ffn", (double)m->ffn);
    cJSON_AddNumberToObject(jm, "vocab", (double)m->vocab);
    cJSON_AddNumberToObject(jm, "positions", (double)m->n_positions);
    cJSON_AddBoolToObject(jm, "tied_head", m->tied_head);

    cJSON *ji = cJSON_AddObjectToObject(root, "inputs");
    cJSON_AddNumberToObject(ji, "gpu_mem_gb", in->gpu_mem_gb);
    cJSON_AddStringToObject(ji, "gb", "2^30 bytes");
    cJSON_AddStringToObject(ji, "weight_prec", kvh_plan_prec_name(in->weight_prec.kind));
    cJSON_AddStringToObject(ji, "kv_prec", kvh_plan_prec_name(in->kv_prec.kind));
    cJSON_AddStringToObject(ji, "act_prec", kvh_plan_prec_name(in->act_prec));
    cJSON_AddNumberToObject(ji, "group_size", (double)in->kv_prec.group);
    cJSON_AddBoolToObject(ji, "asymmetric", in->kv_prec.asymmetric);
    cJSON_AddNumberToObject(ji, "context", (double)in->context);
    cJSON_AddNumberToObject(ji, "batch", (double)in->batch);
    cJSON_AddNumberToObject(ji, "tp", (double)in->tp);
    cJSON_AddStringToObject(ji, "policy", policy_text(&in->policy, pol, sizeof pol));
    cJSON_AddNumberToObject(ji, "minicache", in->policy.minicache);
    cJSON_AddNumberToObject(ji, "peak_tflops", in->peak_tflops);
    cJSON_AddNumberToObject(ji, "bandwidth_gbs", in->bandwidth_gbs);

    cJSON *jp = cJSON_AddObjectToObject(root, "params");
    cJSON_AddItemToObject(jp, "exact", params_json(&r->exact));
    cJSON_AddItemToObject(jp, "simplified", params_json(&r->simplified));
    cJSON_AddStringToObject(jp, "right", "exact");

    cJSON *jw = cJSON_AddObjectToObject(root, "weights");
    cJSON_AddNumberToObject(jw, "bytes_exact", (double)r->weight_bytes_exact);
    cJSON_AddNumberToObject(jw, "bytes_simplified", (double)r->weight_bytes_simplified);
    cJSON_AddNumberToObject(jw, "gb_exact", r->weight_bytes_exact / GIB);
    cJSON_AddNumberToObject(jw, "gb_simplified", r->weight_bytes_simplified / GIB);
    cJSON_AddNumberToObject(jw, "bytes_per_gpu_exact", (double)r->weight_bytes_gpu_exact);
    cJSON_AddNumberToObject(jw, "bytes_per_gpu_simplified", (double)r->weight_bytes_gpu_simplified);
    cJSON_AddBoolToObject(jw, "fit_one_gpu", r->weight_bytes_gpu_exact < r->gpu_mem_bytes);

    cJSON *jk = cJSON_AddObjectToObject(root, "kv");
    cJSON_AddItemToObject(jk, "exact", kv_json(&r->kv_exact));
    cJSON_AddItemToObject(jk, "simplified", kv_json(&r->kv_simplified));
    cJSON_AddItemToObject(jk, "policy", kv_json(&r->kv_policy));
    cJSON_AddStringToObject(jk, "right", "exact");
    cJSON_AddNumberToObject(jk, "kv_heads_per_gpu", (double)r->kv_heads_per_gpu);
    cJSON_AddNumberToObject(jk, "policy_tokens_per_head", (double)r->policy_tokens);
    cJSON_AddNumberToObject(jk, "minicache_merged_layers", (double)r->minicache_merged);
    cJSON_AddNumberToObject(jk, "batch_bytes_per_gpu", (double)r->batch_bytes_gpu);
    cJSON_AddBoolToObject(jk, "batch_fits", r->batch_bytes_gpu <= r->gpu_mem_bytes);

    cJSON *ja = cJSON_AddObjectToObject(root, "attention_ai");
    cJSON_AddItemToObject(ja, "prefill", ai_json(&r->prefill, r->ridge));
    cJSON_AddItemToObject(ja, "decode", ai_json(&r->decode, r->ridge));
    cJSON_AddItemToObject(ja, "decode_gqa_shared", ai_json(&r->decode_gqa, r->ridge));
    cJSON_AddItemToObject(ja, "decode_step_linear", ai_json(&r->decode_linear, r->ridge));
    cJSON_AddItemToObject(ja, "decode_step", ai_json(&r->decode_step, r->ridge));
    cJSON_AddNumberToObject(root, "ridge", r->ridge);

    if (o->sweep && add_sweep(root, o, r, err)) {
        cJSON_Delete(root);
        return -1;
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return kvh_fail(err, "out of memory formatting JSON");
    size_t n = strlen(o->json) + 5;
    char *tmp = malloc(n);
    if (!tmp) {
        free(text);
        return kvh_fail(err, "out of memory");
    }
    snprintf(tmp, n, "%s.tmp", o->json);
    int rc = 0;
    FILE *f = fopen(tmp, "w");
    if (!f) {
        rc = kvh_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    } else {
        int bad = fputs(text, f) < 0 || fputc('\n', f) == EOF;
        bad |= fclose(f) != 0;
        if (bad) rc = kvh_fail(err, "%s: write failed: %s", tmp, strerror(errno));
        else if (rename(tmp, o->json)) rc = kvh_fail(err, "rename %s -> %s: %s", tmp, o->json, strerror(errno));
        if (rc) remove(tmp);
    }
    free(tmp);
    free(text);
    return rc;
}

int kvh_cmd_plan(int argc, char **argv)
{
    kvh_err err = {{0}};
    opts o;
    int help = 0;
    /* exit 2: usage (options, values, a model the options do not make); 1: an unreadable config.json, a
     * failed write, an infeasible plan (docs/plan.md) */
    if (parse_args(argc, argv, &o, &help, &err)) {
        fprintf(stderr, "kvhost plan: %s\n", err.msg);
        return 2;
    }
    if (help) {
        fputs(usage, stdout);
        return 0;
    }
    /* before any output: a --json path that cannot be written is reported first, and nothing is created */
    if (o.json && kvh_cli_check_output("--json", o.json, true, &err)) {
        fprintf(stderr, "kvhost plan: %s\n", err.msg);
        return 2;
    }
    kvh_plan_result r;
    int brc = build_model(&o, &err);
    if (brc || kvh_plan_compute(&o.in, &r, &err)) {
        fprintf(stderr, "kvhost plan: %s\n", err.msg);
        return brc == FILE_ERROR ? 1 : 2;
    }
    print_table(&o, &r);
    if (o.json && write_json(&o, &r, &err)) {
        fprintf(stderr, "kvhost plan: %s\n", err.msg);
        return 1;
    }
    /* an infeasible plan is reported in full above, then fails the command */
    if (r.weight_bytes_gpu_exact >= r.gpu_mem_bytes) {
        fprintf(stderr, "kvhost plan: max batch 0: the weights (%.3f GB per GPU at %s, TP=%lld) do not fit in "
                        "%.4g GB; use a larger --tp, a lower --weight-prec or a bigger --gpu-mem\n",
                r.weight_bytes_gpu_exact / GIB, kvh_plan_prec_name(o.in.weight_prec.kind), (long long)o.in.tp,
                o.in.gpu_mem_gb);
        return 1;
    }
    if (r.kv_policy.max_batch_tp == 0) {
        fprintf(stderr, "kvhost plan: max batch 0: the weights fit (%.3f GB per GPU) but not one request's KV "
                        "cache (%.4f GB per GPU) in the %.3f GB left; shorten --context, add --tp, a KV policy or "
                        "a lower --kv-prec\n", r.weight_bytes_gpu_exact / GIB,
                r.kv_policy.bytes_per_request_gpu / GIB, (r.gpu_mem_bytes - r.weight_bytes_gpu_exact) / GIB);
        return 1;
    }
    return 0;
}
