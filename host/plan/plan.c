/* plan.c — the arithmetic behind `kvhost plan`: model shapes (presets, config.json text), exact and
 * simplified parameter counts, weight/KV bytes at each precision, KV need under window/sink/h2o/pyramid
 * budgets and MiniCache merging, batch capacity under tensor parallelism, attention FLOP/byte counts.
 * Owns: only pure calculations (no I/O, no printing, no allocation beyond cJSON's parse tree).
 * Does not own: reading files or printing (cmd_plan.c). Conventions: docs/plan.md. */
#include "plan/plan.h"

#include "util/json_scan.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Limits that keep every byte count below 2^63 (checked again where products are formed). */
#define MAX_LAYERS 100000
#define MAX_HIDDEN 10000000
#define MAX_VOCAB 100000000
#define MAX_POSITIONS 100000000

/* ---- model shape ------------------------------------------------------------------------------- */

static void gpt2_shape(kvh_plan_model *m, const char *name, int64_t L, int64_t C, int64_t NH)
{
    memset(m, 0, sizeof *m);
    snprintf(m->name, sizeof m->name, "%s", name);
    m->family = KVH_PLAN_GPT2;
    m->n_layer = L;
    m->hidden = C;
    m->n_head = NH;
    m->n_kv_head = NH;
    m->head_dim = C / NH;
    m->ffn = 4 * C;
    m->vocab = 50257;
    m->n_positions = 1024;
    m->tied_head = 1;
}

int kvh_plan_model_preset(const char *name, kvh_plan_model *m, kvh_err *err)
{
    if (!strcmp(name, "gpt2")) {
        gpt2_shape(m, name, 12, 768, 12);
    } else if (!strcmp(name, "gpt2-medium")) {
        gpt2_shape(m, name, 24, 1024, 16);
    } else if (!strcmp(name, "gpt2-large")) {
        gpt2_shape(m, name, 36, 1280, 20);
    } else if (!strcmp(name, "gpt2-xl")) {
        gpt2_shape(m, name, 48, 1600, 25);
    } else if (!strcmp(name, "llama-3-8b")) {
        memset(m, 0, sizeof *m);
        snprintf(m->name, sizeof m->name, "%s", name);
        m->family = KVH_PLAN_LLAMA;
        m->n_layer = 32;
        m->hidden = 4096;
        m->n_head = 32;
        m->n_kv_head = 8;
        m->head_dim = 128;
        m->ffn = 14336;
        m->vocab = 128256;
        m->n_positions = 0;
        m->tied_head = 0;
    } else {
        return kvh_fail(err, "unknown model preset '%s' (known: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                             "llama-3-8b; or give a config.json path)", name);
    }
    return 0;
}

/* Reads an integer key; `required` = 0 leaves *out alone when the key is absent or null. */
static int json_int(const cJSON *root, const char *key, int required, int64_t *out, const char *where,
                    kvh_err *err)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) {
        if (required) return kvh_fail(err, "%s: missing key \"%s\"", where, key);
        return 0;
    }
    if (!cJSON_IsNumber(it)) return kvh_fail(err, "%s: key \"%s\" is not a number", where, key);
    double v = it->valuedouble;
    if (v != floor(v) || v < 1 || v > 9e15)
        return kvh_fail(err, "%s: key \"%s\" = %g: must be a positive integer", where, key, v);
    *out = (int64_t)v;
    return 0;
}

int kvh_plan_model_from_json(const char *text, const char *where, kvh_plan_model *m, kvh_err *err)
{
    memset(m, 0, sizeof *m);
    cJSON *root = cJSON_Parse(text);
    if (!root) return kvh_fail(err, "%s: not valid JSON (near '%.20s')", where, cJSON_GetErrorPtr() ? cJSON_GetErrorPtr() : "?");
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        kvh_fail(err, "%s: top level is not a JSON object", where);
        goto done;
    }
    const char *dup = NULL; /* refused as in model_config.c: HF keeps the last value, cJSON the first */
    if (kvh_json_duplicate_key(root, &dup) != 0 || dup) {
        kvh_fail(err, "%s: key '%.64s' appears more than once (refused; keep one)", where, dup ? dup : "?");
        goto done;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const char *base = strrchr(where, '/');
    snprintf(m->name, sizeof m->name, "%s", cJSON_IsString(mt) ? mt->valuestring : (base ? base + 1 : where));
    if (cJSON_HasObjectItem(root, "n_embd")) {
        m->family = KVH_PLAN_GPT2;
        m->tied_head = 1;
        if (json_int(root, "n_embd", 1, &m->hidden, where, err) ||
            json_int(root, "n_layer", 1, &m->n_layer, where, err) ||
            json_int(root, "n_head", 1, &m->n_head, where, err) ||
            json_int(root, "vocab_size", 1, &m->vocab, where, err))
            goto done;
        m->ffn = 4 * m->hidden; /* n_inner: null means 4 * n_embd */
        if (json_int(root, "n_inner", 0, &m->ffn, where, err)) goto done;
        if (json_int(root, "n_ctx", 0, &m->n_positions, where, err) ||
            json_int(root, "n_positions", 0, &m->n_positions, where, err))
            goto done;
        if (m->n_positions == 0) {
            kvh_fail(err, "%s: missing key \"n_positions\" (GPT-2 learned position table size)", where);
            goto done;
        }
        m->n_kv_head = m->n_head;
        if (m->hidden % m->n_head) {
            kvh_fail(err, "%s: n_head = %lld does not divide n_embd = %lld", where, (long long)m->n_head,
                     (long long)m->hidden);
            goto done;
        }
        m->head_dim = m->hidden / m->n_head;
    } else if (cJSON_HasObjectItem(root, "hidden_size")) {
        m->family = KVH_PLAN_LLAMA;
        if (json_int(root, "hidden_size", 1, &m->hidden, where, err) ||
            json_int(root, "num_hidden_layers", 1, &m->n_layer, where, err) ||
            json_int(root, "num_attention_heads", 1, &m->n_head, where, err) ||
            json_int(root, "intermediate_size", 1, &m->ffn, where, err) ||
            json_int(root, "vocab_size", 1, &m->vocab, where, err))
            goto done;
        m->n_kv_head = m->n_head; /* HF: absent num_key_value_heads means multi-head attention */
        if (json_int(root, "num_key_value_heads", 0, &m->n_kv_head, where, err)) goto done;
        m->head_dim = 0;
        if (json_int(root, "head_dim", 0, &m->head_dim, where, err)) goto done;
        if (m->head_dim == 0) {
            if (m->hidden % m->n_head) {
                kvh_fail(err, "%s: num_attention_heads = %lld does not divide hidden_size = %lld", where,
                         (long long)m->n_head, (long long)m->hidden);
                goto done;
            }
            m->head_dim = m->hidden / m->n_head;
        }
        const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
        if (tie && !cJSON_IsBool(tie) && !cJSON_IsNull(tie)) {
            kvh_fail(err, "%s: key \"tie_word_embeddings\" is not true/false", where);
            goto done;
        }
        m->tied_head = cJSON_IsTrue(tie) ? 1 : 0; /* LlamaConfig default: false */
    } else {
        kvh_fail(err, "%s: neither GPT-2 keys (n_embd, n_layer, n_head, vocab_size) nor LLaMA keys "
                      "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)",
                 where);
        goto done;
    }
    rc = kvh_plan_model_check(m, err);
    if (rc) kvh_fail_prefix(err, "%s", where);
done:
    cJSON_Delete(root);
    return rc;
}

int kvh_plan_model_check(const kvh_plan_model *m, kvh_err *err)
{
    struct { const char *name; int64_t v, max; } f[] = {
        {"layers", m->n_layer, MAX_LAYERS},     {"hidden", m->hidden, MAX_HIDDEN},
        {"heads", m->n_head, MAX_HIDDEN},       {"kv-heads", m->n_kv_head, MAX_HIDDEN},
        {"head-dim", m->head_dim, MAX_HIDDEN},  {"ffn", m->ffn, 10 * (int64_t)MAX_HIDDEN},
        {"vocab", m->vocab, MAX_VOCAB},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        if (f[i].v <= 0) return kvh_fail(err, "%s = %lld: must be >= 1", f[i].name, (long long)f[i].v);
        if (f[i].v > f[i].max)
            return kvh_fail(err, "%s = %lld: larger than the planner's limit %lld", f[i].name,
                            (long long)f[i].v, (long long)f[i].max);
    }
    if (m->family != KVH_PLAN_GPT2 && m->family != KVH_PLAN_LLAMA)
        return kvh_fail(err, "unknown model family %d", m->family);
    if (m->n_positions < 0 || m->n_positions > MAX_POSITIONS)
        return kvh_fail(err, "positions = %lld: must be in 0..%d", (long long)m->n_positions, MAX_POSITIONS);
    if (m->family == KVH_PLAN_GPT2 && m->n_positions == 0)
        return kvh_fail(err, "GPT-2 family needs the learned position count (n_positions)");
    if (m->n_kv_head > m->n_head || m->n_head % m->n_kv_head)
        return kvh_fail(err, "kv-heads = %lld must divide heads = %lld", (long long)m->n_kv_head,
                        (long long)m->n_head);
    if (m->n_head * m->head_dim > 16 * m->hidden)
        return kvh_fail(err, "heads * head-dim = %lld is implausibly larger than hidden = %lld",
                        (long long)(m->n_head * m->head_dim), (long long)m->hidden);
    if (m->family == KVH_PLAN_GPT2 && m->n_head * m->head_dim != m->hidden)
        return kvh_fail(err, "GPT-2 family: heads (%lld) * head-dim (%lld) must equal hidden (%lld)",
                        (long long)m->n_head, (long long)m->head_dim, (long long)m->hidden);
    if (m->family == KVH_PLAN_GPT2 && m->n_kv_head != m->n_head)
        return kvh_fail(err, "GPT-2 family has no grouped-query attention: kv-heads must equal heads");
    return 0;
}

/* ---- parameter counts -------------------------------------------------------------------------- */

void kvh_plan_params_exact(const kvh_plan_model *m, kvh_plan_params *p)
{
    memset(p, 0, sizeof *p);
    uint64_t L = (uint64_t)m->n_layer, C = (uint64_t)m->hidden, F = (uint64_t)m->ffn;
    uint64_t V = (uint64_t)m->vocab, q = (uint64_t)(m->n_head * m->head_dim);
    uint64_t kv = (uint64_t)(m->n_kv_head * m->head_dim);
    if (m->family == KVH_PLAN_GPT2) {
        /* per layer: ln_1 (2C), c_attn C x 3C + 3C, c_proj C x C + C, ln_2 (2C), c_fc C x F + F,
         * c_proj F x C + C; then ln_f (2C); wte V x C, wpe P x C; head tied to wte. */
        p->attention = L * (C * (q + 2 * kv) + q * C);
        p->ffn = L * (2 * C * F);
        p->norms_biases = L * (2 * C + (q + 2 * kv) + C + 2 * C + F + C) + 2 * C;
        p->embeddings = V * C + (uint64_t)m->n_positions * C;
    } else {
        /* per layer: input_layernorm (C), q C x q, k C x kv, v C x kv, o q x C, post_attention_layernorm
         * (C), gate C x F, up C x F, down F x C; final norm (C); embed_tokens V x C; lm_head V x C. */
        p->attention = L * (C * q + 2 * C * kv + q * C);
        p->ffn = L * (3 * C * F);
        p->norms_biases = L * (2 * C) + C;
        p->embeddings = V * C;
    }
    p->lm_head = m->tied_head ? 0 : V * C;
    p->total = p->attention + p->ffn + p->norms_biases + p->embeddings + p->lm_head;
}

void kvh_plan_params_simplified(const kvh_plan_model *m, kvh_plan_params *p)
{
    memset(p, 0, sizeof *p);
    uint64_t L = (uint64_t)m->n_layer, C = (uint64_t)m->hidden, F = (uint64_t)m->ffn;
    p->attention = L * 4 * C * C;
    p->ffn = L * 2 * C * F;
    p->embeddings = (uint64_t)m->vocab * C;
    p->total = p->attention + p->ffn + p->embeddings;
}

/* ---- precisions -------------------------------------------------------------------------------- */

static const char *const prec_names[] = {"fp32", "fp16", "bf16", "int8", "int4"};

int kvh_plan_prec_parse(const char *s, int *kind, kvh_err *err)
{
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, prec_names[i])) {
            *kind = i;
            return 0;
        }
    return kvh_fail(err, "unknown precision '%s' (fp32, fp16, bf16, int8, int4)", s);
}

const char *kvh_plan_prec_name(int kind) { return kind >= 0 && kind < 5 ? prec_names[kind] : "?"; }

int kvh_plan_prec_bits(int kind)
{
    static const int bits[] = {32, 16, 16, 8, 4};
    return kind >= 0 && kind < 5 ? bits[kind] : 0;
}

uint64_t kvh_plan_vec_bytes(const kvh_plan_prec *p, int64_t n)
{
    uint64_t un = (uint64_t)n;
    uint64_t bytes = (un * (uint64_t)kvh_plan_prec_bits(p->kind) + 7) / 8;
    if (p->kind == KVH_PREC_INT8 || p->kind == KVH_PREC_INT4) {
        uint64_t g = (uint64_t)(p->group > 0 ? p->group : 1);
        uint64_t groups = (un + g - 1) / g;
        bytes += groups * 2 * (p->asymmetric ? 2 : 1);
    }
    return bytes;
}

/* ---- KV policies ------------------------------------------------------------------------------- */

/* Strict positive integer: digits only, 1..1e12. */
static int parse_count(const char *s, const char *what, const char *spec, int64_t *out, kvh_err *err)
{
    char *end = NULL;
    if (!*s || *s == '-' || *s == '+')
        return kvh_fail(err, "policy '%s': %s '%s' must be a positive integer", spec, what, s);
    long long v = strtoll(s, &end, 10);
    if (*end || v < 1 || v > 1000000000000LL)
        return kvh_fail(err, "policy '%s': %s '%s' must be a positive integer", spec, what, s);
    *out = v;
    return 0;
}

int kvh_plan_policy_parse(const char *spec, kvh_plan_policy *p, kvh_err *err)
{
    char buf[128];
    if (strlen(spec) >= sizeof buf) return kvh_fail(err, "policy spec too long");
    snprintf(buf, sizeof buf, "%s", spec);
    p->a = p->b = 0;
    if (!strcmp(buf, "none")) {
        p->kind = KVH_POLICY_NONE;
        return 0;
    }
    char *colon = strchr(buf, ':');
    if (!colon) return kvh_fail(err, "policy '%s': expected window:N, sink:S+W, h2o:HEAVY+RECENT or pyramid:AVG", spec);
    *colon = 0;
    char *arg = colon + 1;
    char *plus = strchr(arg, '+');
    if (!strcmp(buf, "window") || !strcmp(buf, "pyramid")) {
        p->kind = !strcmp(buf, "window") ? KVH_POLICY_WINDOW : KVH_POLICY_PYRAMID;
        if (plus) return kvh_fail(err, "policy '%s': %s takes one number", spec, buf);
        return parse_count(arg, "budget", spec, &p->a, err);
    }
    if (!strcmp(buf, "sink") || !strcmp(buf, "h2o")) {
        int sink = !strcmp(buf, "sink");
        p->kind = sink ? KVH_POLICY_SINK : KVH_POLICY_H2O;
        if (!plus) return kvh_fail(err, "policy '%s': expected %s", spec, sink ? "sink:S+W" : "h2o:HEAVY+RECENT");
        *plus = 0;
        if (parse_count(arg, sink ? "sink count" : "heavy count", spec, &p->a, err)) return -1;
        return parse_count(plus + 1, sink ? "window" : "recent count", spec, &p->b, err);
    }
    return kvh_fail(err, "policy '%s': unknown policy '%s' (window, sink, h2o, pyramid, none)", spec, buf);
}

int kvh_plan_pyramid_budgets(int64_t avg, double beta, int64_t L, int64_t *out, kvh_err *err)
{
    if (avg < 1) return kvh_fail(err, "pyramid: average budget %lld must be >= 1", (long long)avg);
    if (!(beta >= 1.0) || !isfinite(beta)) return kvh_fail(err, "pyramid: beta = %g must be >= 1", beta);
    if (L < 1) return kvh_fail(err, "pyramid: need at least one layer");
    if (L == 1) {
        out[0] = avg;
        return 0;
    }
    double top = (double)avg / beta, bottom = 2.0 * (double)avg - top;
    int64_t sum = 0;
    for (int64_t l = 0; l < L; l++) {
        /* exact value bottom - (bottom - top) * l / (L - 1); the tiny epsilon keeps integers integral */
        double v = bottom - (bottom - top) * (double)l / (double)(L - 1);
        out[l] = (int64_t)floor(v + 1e-9);
        sum += out[l];
    }
    int64_t rem = L * avg - sum; /* floors lose < 1 per layer: 0 <= rem < L */
    for (int64_t l = 0; l < L && rem > 0; l++, rem--) out[l] += 1;
    return 0;
}

int kvh_plan_layer_tokens(const kvh_plan_policy *p, int64_t L, int64_t context, int64_t *out, kvh_err *err)
{
    int64_t budget = context;
    switch (p->kind) {
    case KVH_POLICY_NONE: budget = context; break;
    case KVH_POLICY_WINDOW: budget = p->a; break;
    case KVH_POLICY_SINK:
    case KVH_POLICY_H2O: budget = p->a + p->b; break;
    case KVH_POLICY_PYRAMID:
        if (kvh_plan_pyramid_budgets(p->a, p->beta, L, out, err)) return -1;
        for (int64_t l = 0; l < L; l++) out[l] = out[l] < context ? out[l] : context;
        return 0;
    default: return kvh_fail(err, "unknown policy kind %d", p->kind);
    }
    for (int64_t l = 0; l < L; l++) out[l] = budget < context ? budget : context;
    return 0;
}

int kvh_plan_minicache_layers(double ratio, int64_t L, int64_t *merged, kvh_err *err)
{
    *merged = 0;
    if (!(ratio >= 0.0 && ratio <= 1.0)) return kvh_fail(err, "minicache ratio %g must be in [0, 1]", ratio);
    if (ratio == 0.0) return 0;
    int64_t m = (int64_t)floor(ratio * (double)L + 1e-9);
    m -= m % 2;
    if (m == 0)
        return kvh_fail(err, "minicache ratio %g merges no layer pair in %lld layers (need >= %.4g)", ratio,
                        (long long)L, 2.0 / (double)L);
    if (m > L - L / 2)
        return kvh_fail(err, "minicache ratio %g merges %lld layers but only the deeper half (%lld layers, "
                             "from layer %lld) is merged", ratio, (long long)m, (long long)(L - L / 2),
                        (long long)(L / 2));
    *merged = m;
    return 0;
}

/* ---- arithmetic intensity ---------------------------------------------------------------------- */

void kvh_plan_ai_prefill(int64_t N, int64_t d, double act_bytes, kvh_plan_ai *out)
{
    double n = (double)N, dd = (double)d;
    out->flops = 4.0 * n * n * dd; /* QK^T: 2*N*N*d, PV: 2*N*N*d */
    out->bytes = act_bytes * (3.0 * n * dd + 2.0 * n * n + 2.0 * n * n + n * dd);
    out->ai = out->flops / out->bytes;
}

void kvh_plan_ai_decode(int64_t N, int64_t d, double act_bytes, double kv_vec_bytes, kvh_plan_ai *out)
{
    double n = (double)N, dd = (double)d;
    out->flops = 4.0 * n * dd; /* q.K^T: 2*N*d, p.V: 2*N*d */
    out->bytes = act_bytes * dd + 2.0 * n * kv_vec_bytes + act_bytes * 4.0 * n + act_bytes * dd;
    out->ai = out->flops / out->bytes;
}

/* ---- the whole plan ---------------------------------------------------------------------------- */

void kvh_plan_inputs_default(kvh_plan_inputs *in)
{
    memset(in, 0, sizeof *in);
    in->weight_prec.kind = KVH_PREC_FP16;
    in->weight_prec.group = 32;
    in->kv_prec.kind = KVH_PREC_FP16;
    in->kv_prec.group = 32;
    in->act_prec = KVH_PREC_FP16;
    in->gpu_mem_gb = 80.0;
    in->context = 1024;
    in->batch = 1;
    in->tp = 1;
    in->policy.kind = KVH_POLICY_NONE;
    in->policy.beta = 20.0;
    in->peak_tflops = KVH_PLAN_DEFAULT_TFLOPS;
    in->bandwidth_gbs = KVH_PLAN_DEFAULT_BW_GBS;
}

static int mul64(uint64_t a, uint64_t b, uint64_t *out, const char *what, kvh_err *err)
{
    if (a != 0 && b > UINT64_MAX / 4 / a) return kvh_fail(err, "%s overflows 64-bit byte counts", what);
    *out = a * b;
    return 0;
}

/* Weight bytes as kvhost's weight formats hold them (docs/weights.md): the matrices — attention, MLP, token
 * embedding / tied head, an untied head — at the weight precision (int8/int4 with one fp16 scale, and zero
 * when asymmetric, per group of inputs), everything else (position embeddings, norms, biases) in fp32. */
static uint64_t weight_bytes(const kvh_plan_prec *p, const kvh_plan_params *pp, const kvh_plan_model *m)
{
    const uint64_t tok = (uint64_t)m->vocab * (uint64_t)m->hidden;
    const uint64_t mats = pp->attention + pp->ffn + pp->lm_head + (pp->embeddings < tok ? pp->embeddings : tok);
    return kvh_plan_vec_bytes(p, (int64_t)mats) + 4 * (pp->total - mats);
}

static int64_t fit(uint64_t mem, uint64_t weights, uint64_t per_request)
{
    if (weights >= mem || per_request == 0) return 0;
    return (int64_t)((mem - weights) / per_request);
}

static int check_inputs(const kvh_plan_inputs *in, kvh_err *err)
{
    if (kvh_plan_model_check(&in->model, err)) return -1;
    const kvh_plan_model *m = &in->model;
    if (!(in->gpu_mem_gb > 0) || !isfinite(in->gpu_mem_gb) || in->gpu_mem_gb > 1e6)
        return kvh_fail(err, "gpu-mem = %g GB: must be > 0 (and < 1e6)", in->gpu_mem_gb);
    if (in->context < 1 || in->context > 100000000)
        return kvh_fail(err, "context = %lld: must be in 1..1e8", (long long)in->context);
    if (in->batch < 1 || in->batch > 100000000)
        return kvh_fail(err, "batch = %lld: must be in 1..1e8", (long long)in->batch);
    if (in->tp < 1 || in->tp > 4096) return kvh_fail(err, "tp = %lld: must be in 1..4096", (long long)in->tp);
    if (m->n_head % in->tp)
        return kvh_fail(err, "tp = %lld must divide the query heads (%lld)", (long long)in->tp, (long long)m->n_head);
    if (m->n_kv_head % in->tp && in->tp % m->n_kv_head)
        return kvh_fail(err, "tp = %lld and kv-heads = %lld: one must divide the other (KV heads are split, "
                             "or replicated when tp > kv-heads)", (long long)in->tp, (long long)m->n_kv_head);
    const kvh_plan_prec *ps[2] = {&in->weight_prec, &in->kv_prec};
    for (int i = 0; i < 2; i++) {
        if (kvh_plan_prec_bits(ps[i]->kind) == 0) return kvh_fail(err, "unknown precision %d", ps[i]->kind);
        if (ps[i]->group < 1 || ps[i]->group > 1000000)
            return kvh_fail(err, "group-size = %lld: must be >= 1", (long long)ps[i]->group);
    }
    if (in->act_prec != KVH_PREC_FP32 && in->act_prec != KVH_PREC_FP16 && in->act_prec != KVH_PREC_BF16)
        return kvh_fail(err, "activation precision must be fp32, fp16 or bf16");
    if (!(in->peak_tflops > 0) || !isfinite(in->peak_tflops))
        return kvh_fail(err, "peak-tflops = %g: must be > 0", in->peak_tflops);
    if (!(in->bandwidth_gbs > 0) || !isfinite(in->bandwidth_gbs))
        return kvh_fail(err, "bandwidth-gbs = %g: must be > 0", in->bandwidth_gbs);
    if (in->policy.kind == KVH_POLICY_PYRAMID && !(in->policy.beta >= 1.0 && isfinite(in->policy.beta)))
        return kvh_fail(err, "beta = %g: must be >= 1", in->policy.beta);
    return 0;
}

/* Bytes one KV head of one request holds over all layers under the policy (+ MiniCache), and the
 * total of tokens kept per head over all layers. */
static int policy_head_bytes(const kvh_plan_inputs *in, uint64_t *bytes, uint64_t *tokens, int64_t *merged,
                             kvh_err *err)
{
    const kvh_plan_model *m = &in->model;
    int64_t L = m->n_layer;
    int64_t *t = malloc((size_t)L * sizeof *t);
    if (!t) return kvh_fail(err, "out of memory for %lld layer budgets", (long long)L);
    if (kvh_plan_layer_tokens(&in->policy, L, in->context, t, err) ||
        kvh_plan_minicache_layers(in->policy.minicache, L, merged, err)) {
        free(t);
        return -1;
    }
    uint64_t vec = kvh_plan_vec_bytes(&in->kv_prec, m->head_dim);
    int64_t start = L / 2, stop = L / 2 + *merged;
    uint64_t b = 0, tok = 0;
    for (int64_t l = 0; l < L; l++) {
        tok += (uint64_t)t[l];
        if (l >= start && l < stop) {
            /* merged pair (l, l+1): K and V each keep one direction vector per token at the KV precision
             * plus one fp16 magnitude per token per layer of the pair */
            int64_t tp = t[l] > t[l + 1] ? t[l] : t[l + 1];
            tok += (uint64_t)t[l + 1];
            b += 2 * (uint64_t)tp * (vec + 2 * 2);
            l++;
        } else {
            b += 2 * (uint64_t)t[l] * vec;
        }
    }
    free(t);
    *bytes = b;
    *tokens = tok;
    return 0;
}

/* Sum over the decode step's weight matrices of in*out and of in+out (per layer times L, + LM head). */
static void linear_shapes(const kvh_plan_model *m, double *mac, double *io)
{
    double C = (double)m->hidden, F = (double)m->ffn, V = (double)m->vocab;
    double q = (double)(m->n_head * m->head_dim), kv = (double)(m->n_kv_head * m->head_dim);
    double L = (double)m->n_layer;
    double mac_l, io_l;
    if (m->family == KVH_PLAN_GPT2) {
        mac_l = C * (q + 2 * kv) + q * C + 2 * C * F;
        io_l = (C + q + 2 * kv) + (q + C) + (C + F) + (F + C);
    } else {
        mac_l = C * q + 2 * C * kv + q * C + 3 * C * F;
        io_l = (C + q) + 2 * (C + kv) + (q + C) + 2 * (C + F) + (F + C);
    }
    *mac = L * mac_l + C * V;
    *io = L * io_l + C + V;
}

int kvh_plan_decode_step(const kvh_plan_inputs *in, int64_t batch, kvh_plan_ai *linear, kvh_plan_ai *attn,
                         kvh_plan_ai *step, kvh_err *err)
{
    if (check_inputs(in, err)) return -1;
    if (batch < 1) return kvh_fail(err, "batch = %lld: must be >= 1", (long long)batch);
    const kvh_plan_model *m = &in->model;
    double act = kvh_plan_prec_bits(in->act_prec) / 8.0;
    double B = (double)batch;
    double mac, io;
    linear_shapes(m, &mac, &io);
    kvh_plan_ai lin = {0}, at = {0}, st = {0};
    lin.flops = 2.0 * B * mac;
    lin.bytes = (double)kvh_plan_vec_bytes(&in->weight_prec, (int64_t)mac) + B * io * act;
    lin.ai = lin.flops / lin.bytes;
    int64_t *t = malloc((size_t)m->n_layer * sizeof *t);
    if (!t) return kvh_fail(err, "out of memory for %lld layer budgets", (long long)m->n_layer);
    if (kvh_plan_layer_tokens(&in->policy, m->n_layer, in->context, t, err)) {
        free(t);
        return -1;
    }
    double kvvec = (double)kvh_plan_vec_bytes(&in->kv_prec, m->head_dim);
    for (int64_t l = 0; l < m->n_layer; l++) {
        kvh_plan_ai h;
        kvh_plan_ai_decode(t[l], m->head_dim, act, kvvec, &h);
        at.flops += h.flops * (double)m->n_head * B;
        at.bytes += h.bytes * (double)m->n_head * B;
    }
    free(t);
    at.ai = at.flops / at.bytes;
    st.flops = lin.flops + at.flops;
    st.bytes = lin.bytes + at.bytes;
    st.ai = st.flops / st.bytes;
    if (linear) *linear = lin;
    if (attn) *attn = at;
    if (step) *step = st;
    return 0;
}

int kvh_plan_compute(const kvh_plan_inputs *in, kvh_plan_result *r, kvh_err *err)
{
    memset(r, 0, sizeof *r);
    if (check_inputs(in, err)) return -1;
    const kvh_plan_model *m = &in->model;
    uint64_t tp = (uint64_t)in->tp, ctx = (uint64_t)in->context, L = (uint64_t)m->n_layer;

    kvh_plan_params_exact(m, &r->exact);
    kvh_plan_params_simplified(m, &r->simplified);
    r->weight_bytes_exact = weight_bytes(&in->weight_prec, &r->exact, m);
    r->weight_bytes_simplified = weight_bytes(&in->weight_prec, &r->simplified, m);
    r->weight_bytes_gpu_exact = (r->weight_bytes_exact + tp - 1) / tp;
    r->weight_bytes_gpu_simplified = (r->weight_bytes_simplified + tp - 1) / tp;
    r->gpu_mem_bytes = (uint64_t)(in->gpu_mem_gb * 1073741824.0);

    /* KV: bytes per token = 2 (K, V) * L * heads * bytes(one head_dim vector) */
    uint64_t vec = kvh_plan_vec_bytes(&in->kv_prec, m->head_dim);
    uint64_t nh = (uint64_t)m->n_head, nkv = (uint64_t)m->n_kv_head;
    r->kv_heads_per_gpu = (int64_t)((nkv + tp - 1) / tp);
    struct { kvh_plan_kv *kv; uint64_t heads, heads_gpu, weights, weights_gpu; } conv[2] = {
        {&r->kv_simplified, nh, nh / tp, r->weight_bytes_simplified, r->weight_bytes_gpu_simplified},
        {&r->kv_exact, nkv, (uint64_t)r->kv_heads_per_gpu, r->weight_bytes_exact, r->weight_bytes_gpu_exact},
    };
    for (int i = 0; i < 2; i++) {
        kvh_plan_kv *kv = conv[i].kv;
        uint64_t per_tok_gpu = 0;
        if (mul64(2 * L * conv[i].heads, vec, &kv->bytes_per_token, "KV bytes per token", err) ||
            mul64(kv->bytes_per_token, ctx, &kv->bytes_per_request, "KV bytes per request", err) ||
            mul64(2 * L * conv[i].heads_gpu, vec, &per_tok_gpu, "KV bytes per token", err) ||
            mul64(per_tok_gpu, ctx, &kv->bytes_per_request_gpu, "KV bytes per request", err))
            return -1;
        kv->max_batch = fit(r->gpu_mem_bytes, conv[i].weights, kv->bytes_per_request);
        kv->max_batch_tp = fit(r->gpu_mem_bytes, conv[i].weights_gpu, kv->bytes_per_request_gpu);
    }

    /* under the policy stack: exact KV heads, tokens per layer from the budgets */
    uint64_t head_bytes = 0;
    if (policy_head_bytes(in, &head_bytes, &r->policy_tokens, &r->minicache_merged, err)) return -1;
    kvh_plan_kv *pk = &r->kv_policy;
    pk->bytes_per_token = r->kv_exact.bytes_per_token; /* per token before eviction; budgets cap tokens */
    if (mul64(head_bytes, nkv, &pk->bytes_per_request, "KV bytes per request", err) ||
        mul64(head_bytes, (uint64_t)r->kv_heads_per_gpu, &pk->bytes_per_request_gpu, "KV bytes per request", err))
        return -1;
    pk->max_batch = fit(r->gpu_mem_bytes, r->weight_bytes_exact, pk->bytes_per_request);
    pk->max_batch_tp = fit(r->gpu_mem_bytes, r->weight_bytes_gpu_exact, pk->bytes_per_request_gpu);
    uint64_t bkv = 0;
    if (mul64(pk->bytes_per_request_gpu, (uint64_t)in->batch, &bkv, "KV bytes of the batch", err)) return -1;
    r->batch_bytes_gpu = r->weight_bytes_gpu_exact + bkv;

    /* arithmetic intensity, one head */
    double act = kvh_plan_prec_bits(in->act_prec) / 8.0;
    kvh_plan_ai_prefill(in->context, m->head_dim, act, &r->prefill);
    kvh_plan_ai_decode(in->context, m->head_dim, act, (double)vec, &r->decode);
    kvh_plan_ai_decode(in->context, m->head_dim, act, (double)vec / (double)(m->n_head / m->n_kv_head),
                       &r->decode_gqa);
    if (kvh_plan_decode_step(in, in->batch, &r->decode_linear, NULL, &r->decode_step, err)) return -1;
    r->ridge = in->peak_tflops * 1e12 / (in->bandwidth_gbs * 1e9);
    return 0;
}
