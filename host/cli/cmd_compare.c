/* cmd_compare.c — the quick comparison: `kvhost --plugins h2o.so,int8.so` (no command) or
 * `kvhost compare ...` runs the same prompt under the baseline (no plugins) and under the given stack, in
 * one process, alternating, and prints them side by side with the agreement of the greedy tokens.
 * Owns: the command's options, the default budget of a quick comparison, the alternating run schedule,
 * the token-agreement measure, the side-by-side table and its two JSON Lines records.
 * Does not own: the decode loop (generate.c), the session/plugins (session.c), record writing (metrics.c),
 * sweeps over many configurations (bench/kvbench.py). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/generate.h"
#include "util/metrics.h"
#include "runtime/session.h"

#define COMPARE_DEFAULT_PROMPT_TOKENS 128
#define COMPARE_DEFAULT_MAX_NEW 32
#define COMPARE_DEFAULT_WARMUP 1
#define COMPARE_DEFAULT_REPEATS 2

static const char *const compare_usage =
    "usage: kvhost --plugins A.so[,B.so] [options]          (or: kvhost compare --plugins ... | --config FILE)\n"
    "\n"
    "Quick comparison: runs one prompt under the baseline (plain cache, no plugins) and under the given\n"
    "plugin stack, in this process, alternating (warm-up of both first), and prints them side by side:\n"
    "decode tokens/s, prefill ms, KV bytes held (exact), process peak RSS, and how many greedy tokens of\n"
    "the stack agree with the baseline. With --no-cache the other side is the recompute baseline instead.\n"
    "\n"
    "Options:\n"
    "  --prompt-tokens N     synthetic prompt of N ids (default " "128" ")\n"
    "  --prompt TEXT         a text prompt instead\n"
    "  --max-new N           greedy tokens generated (default 32)\n"
    "  --warmup N            untimed runs of each side first (default 1)\n"
    "  --repeats N           timed runs of each side, alternating (default 2)\n"
    "If the stack sets no [cache] budget, the comparison uses half the prompt (at least 16) so a policy\n"
    "actually evicts; give --set cache.budget=N to choose.\n"
    "\n";

typedef struct compare_args {
    kvh_cli_common common;
    const char *prompt;
    int prompt_tokens;
    int max_new;
    int warmup;
    int repeats;
} compare_args;

void kvh_compare_agreement(const int32_t *base, int n_base, const int32_t *other, int n_other, kvh_agreement *out) {
    int n_min = n_base < n_other ? n_base : n_other;
    out->n_compared = n_base > n_other ? n_base : n_other;
    out->n_identical = 0;
    out->first_divergence = -1;
    for (int i = 0; i < n_min; i++) {
        if (base[i] == other[i]) {
            out->n_identical++;
        } else if (out->first_divergence < 0) {
            out->first_divergence = i;
        }
    }
    /* a shorter output diverges where it ends */
    if (out->first_divergence < 0 && n_base != n_other) out->first_divergence = n_min;
}

static int parse_args(int argc, char **argv, compare_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->prompt_tokens = 0;
    a->max_new = COMPARE_DEFAULT_MAX_NEW;
    a->warmup = COMPARE_DEFAULT_WARMUP;
    a->repeats = COMPARE_DEFAULT_REPEATS;
    /* argv[0] is "compare" or, for `kvhost --plugins ...`, "kvhost": options start at 1 either way */
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (o[0] != '-') return kvh_fail(err, "unknown argument '%s' (see kvhost compare --help)", o);
        if (!v) return kvh_fail(err, "option %s needs a value (see kvhost compare --help)", o);
        if (strcmp(o, "--prompt-tokens") == 0) {
            if (kvh_cli_parse_int(v, 1, 1 << 20, &n)) return kvh_fail(err, "--prompt-tokens '%s': expected a whole number >= 1", v);
            a->prompt_tokens = (int)n;
        } else if (strcmp(o, "--prompt") == 0) {
            a->prompt = v;
        } else if (strcmp(o, "--max-new") == 0) {
            if (kvh_cli_parse_int(v, 1, 1 << 20, &n)) return kvh_fail(err, "--max-new '%s': expected a whole number >= 1", v);
            a->max_new = (int)n;
        } else if (strcmp(o, "--warmup") == 0) {
            if (kvh_cli_parse_int(v, 0, 1000, &n)) return kvh_fail(err, "--warmup '%s': expected 0..1000", v);
            a->warmup = (int)n;
        } else if (strcmp(o, "--repeats") == 0) {
            if (kvh_cli_parse_int(v, 1, 1000, &n)) return kvh_fail(err, "--repeats '%s': expected 1..1000", v);
            a->repeats = (int)n;
        } else {
            return kvh_fail(err, "unknown option '%s' (see kvhost compare --help)", o);
        }
        i += 2;
    }
    if (a->prompt && a->prompt_tokens) return kvh_fail(err, "give one of --prompt or --prompt-tokens");
    if (!a->prompt && !a->prompt_tokens) a->prompt_tokens = COMPARE_DEFAULT_PROMPT_TOKENS;
    if (!a->common.plugins && !a->common.config_path && !a->common.no_cache)
        return kvh_fail(err, "nothing to compare: give --plugins A.so[,B.so], --config FILE or --no-cache");
    if (a->common.no_cache && (a->common.plugins || a->common.config_path))
        return kvh_fail(err, "--no-cache compares the recompute baseline with the plain cache; it takes no plugins");
    return 0;
}

/* One side of the comparison: its session and what its timed runs measured. */
typedef struct side {
    const char *label;
    kvh_session *sess;
    double *steps;      /* pooled decode step ms of the timed runs */
    int n_steps, cap_steps;
    double prefill[1000]; /* per timed run */
    int n_runs;
    size_t kv_held, kv_peak;
    uint64_t rss_peak;  /* largest VmHWM seen after a run, the mark reset before each run */
    double hooks_ms, total_ms;
    kvh_phase_times times;
    int32_t *out;       /* greedy ids of the last timed run (sequence 0) */
    int n_out;
} side;

/* Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next reading is the peak of one
 * run. Linux >= 4.0; where it fails the reading stays the process-lifetime peak (said in the table). */
static bool reset_peak_rss(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return false;
    bool ok = fputs("5", f) >= 0;
    if (fclose(f) != 0) ok = false;
    return ok;
}

static int run_once(side *sd, const kvh_generate_request *req, bool timed, bool *rss_reset, kvh_err *err) {
    if (kvh_session_reset_seq(sd->sess, 0, err) != 0) return -1;
    if (!reset_peak_rss()) *rss_reset = false;
    kvh_generate_result r;
    if (kvh_generate(sd->sess, req, &r, err) != 0) return kvh_fail_prefix(err, "%s", sd->label);
    if (timed) {
        if (sd->n_steps + r.n_steps > sd->cap_steps) {
            int cap = (sd->n_steps + r.n_steps) * 2 + 16;
            double *p = realloc(sd->steps, (size_t)cap * sizeof *p);
            if (!p) {
                kvh_generate_result_free(&r);
                return kvh_fail(err, "out of memory");
            }
            sd->steps = p;
            sd->cap_steps = cap;
        }
        memcpy(sd->steps + sd->n_steps, r.step_ms, (size_t)r.n_steps * sizeof(double));
        sd->n_steps += r.n_steps;
        sd->prefill[sd->n_runs++] = r.prefill_ms;
        sd->hooks_ms += r.hooks_ms;
        sd->total_ms += r.total_ms;
        sd->times.embed += r.times.embed;
        sd->times.attn_proj += r.times.attn_proj;
        sd->times.attn_core += r.times.attn_core;
        sd->times.mlp += r.times.mlp;
        sd->times.lm_head += r.times.lm_head;
        sd->kv_held = r.kv_bytes_held;
        if (r.kv_bytes_peak > sd->kv_peak) sd->kv_peak = r.kv_bytes_peak;
        if (r.peak_rss > sd->rss_peak) sd->rss_peak = r.peak_rss;
        free(sd->out);
        sd->out = malloc((size_t)(r.n_out[0] > 0 ? r.n_out[0] : 1) * sizeof(int32_t));
        if (!sd->out) {
            kvh_generate_result_free(&r);
            return kvh_fail(err, "out of memory");
        }
        memcpy(sd->out, r.out[0], (size_t)r.n_out[0] * sizeof(int32_t));
        sd->n_out = r.n_out[0];
    }
    kvh_generate_result_free(&r);
    return 0;
}

static double mib(double bytes) { return bytes / 1048576.0; }

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* Median of the timed runs' prefill times. */
static double prefill_median(side *sd) {
    double tmp[1000];
    memcpy(tmp, sd->prefill, (size_t)sd->n_runs * sizeof(double));
    qsort(tmp, (size_t)sd->n_runs, sizeof(double), cmp_double);
    return kvh_percentile(tmp, sd->n_runs, 0.5);
}

static double tokens_per_s(const side *sd) {
    double sum = 0;
    for (int i = 0; i < sd->n_steps; i++) sum += sd->steps[i];
    return sum > 0 ? (double)sd->n_steps / (sum / 1e3) : 0;
}

static void print_row(const char *name, const char *base, const char *other, const char *note) {
    printf("  %-30s %-22s %-22s %s\n", name, base, other, note);
}

static int write_record(const char *path, const char *role, const side *sd, const side *base,
                        const kvh_model *model, const kvh_run_config *cfg, const char *backend, int threads,
                        int prompt_len, const compare_args *a, const kvh_agreement *ag, kvh_err *err) {
    cJSON *rec = kvh_record_new("generate");
    if (!rec) return kvh_fail(err, "out of memory");
    if (kvh_add_run_fields(rec, model, sd->sess, sd == base ? NULL : cfg, backend, threads) != 0) {
        cJSON_Delete(rec);
        return kvh_fail(err, "%s: out of memory building the record (nothing written)", path);
    }
    cJSON_AddNumberToObject(rec, "batch", 1);
    cJSON *tags = cJSON_AddObjectToObject(rec, "tags");
    cJSON_AddStringToObject(tags, "compare", role);
    cJSON_AddStringToObject(tags, "config", role);
    cJSON *pl = cJSON_AddArrayToObject(rec, "prompt_tokens");
    cJSON_AddItemToArray(pl, cJSON_CreateNumber(prompt_len));
    cJSON *gl = cJSON_AddArrayToObject(rec, "generated_tokens");
    cJSON_AddItemToArray(gl, cJSON_CreateNumber(sd->n_out));
    cJSON *first = cJSON_AddArrayToObject(rec, "first_tokens");
    for (int i = 0; i < sd->n_out && i < 16; i++) cJSON_AddItemToArray(first, cJSON_CreateNumber(sd->out[i]));
    double tmp_prefill = prefill_median((side *)sd);
    cJSON_AddNumberToObject(rec, "prefill_ms", tmp_prefill);
    kvh_latency_stats st;
    kvh_latency_stats_compute(sd->steps, sd->n_steps, &st);
    kvh_record_add_latency(rec, "decode_step", &st);
    cJSON_AddNumberToObject(rec, "decode_tokens_per_s", tokens_per_s(sd));
    cJSON_AddNumberToObject(rec, "warmup_runs", a->warmup);
    cJSON_AddNumberToObject(rec, "repeats", a->repeats);
    cJSON_AddNumberToObject(rec, "kv_bytes_held", (double)sd->kv_held);
    cJSON_AddNumberToObject(rec, "kv_bytes_peak", (double)sd->kv_peak);
    cJSON_AddNumberToObject(rec, "peak_rss_bytes", (double)sd->rss_peak);
    kvh_phase_times t = sd->times;
    uint64_t R = (uint64_t)a->repeats;
    t.embed /= R;
    t.attn_proj /= R;
    t.attn_core /= R;
    t.mlp /= R;
    t.lm_head /= R;
    kvh_record_add_phases(rec, &t, sd->hooks_ms / a->repeats, sd->total_ms / a->repeats);
    cJSON_AddNumberToObject(rec, "total_ms", sd->total_ms / a->repeats);
    cJSON *agr = cJSON_AddObjectToObject(rec, "agreement_with_baseline");
    cJSON_AddNumberToObject(agr, "compared", ag->n_compared);
    cJSON_AddNumberToObject(agr, "identical", ag->n_identical);
    cJSON_AddNumberToObject(agr, "first_divergence", ag->first_divergence);
    int rc = kvh_jsonl_append(path, rec, err);
    cJSON_Delete(rec);
    return rc;
}

int kvh_cmd_compare(int argc, char **argv) {
    kvh_err err = {{0}};
    compare_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "compare", compare_usage, &err);
    if (outcome >= 0) return outcome;
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    int n_ids = 0;
    side base = {.label = "baseline"}, other = {.label = a.common.no_cache ? "no-cache" : "stack"};
    if (kvh_cli_start_config("compare", &a.common, &cfg) != 0) return 2;
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    int threads = kvh_cli_threads(&a.common, &cfg);
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;

    if (a.prompt) {
        size_t n = 0;
        if (kvh_tokenizer_encode(tok, a.prompt, strlen(a.prompt), 1, &ids, &n, &err) != 0) goto fail;
        if (n == 0) {
            free(ids);
            ids = malloc(sizeof(int32_t));
            if (!ids) {
                kvh_fail(&err, "out of memory");
                goto fail;
            }
            ids[0] = kvh_tokenizer_eot(tok) >= 0 ? kvh_tokenizer_eot(tok) : model.cfg.bos_id;
            n = 1;
        }
        n_ids = (int)n;
    } else {
        n_ids = a.prompt_tokens;
        ids = malloc((size_t)n_ids * sizeof(int32_t));
        if (!ids) {
            kvh_fail(&err, "out of memory");
            goto fail;
        }
        /* the same synthetic prompt as `kvhost generate --prompt-tokens` */
        kvh_cli_synthetic_prompt(ids, n_ids, model.cfg.n_vocab);
    }
    if (n_ids + a.max_new > model.cfg.n_positions) {
        kvh_fail(&err, "prompt %d tokens + --max-new %d exceeds n_positions %d of %s", n_ids, a.max_new,
                 model.cfg.n_positions, model.name);
        goto fail;
    }
    bool budget_defaulted = false;
    if (cfg.budget == 0 && cfg.n_sections > 0) {
        char set[64];
        int b = n_ids / 2 < 16 ? 16 : n_ids / 2;
        snprintf(set, sizeof set, "cache.budget=%d", b);
        if (kvh_config_set(&cfg, set, &err) != 0) goto fail;
        budget_defaulted = true;
    }

    kvh_session_options so = kvh_cli_session_options(&a.common, &cfg, 1);
    so.no_cache = false; /* compare's baseline is the plain cache */
    if (kvh_session_create(&base.sess, &model, NULL, &so, &err) != 0) {
        kvh_fail_prefix(&err, "baseline session");
        goto fail;
    }
    so.no_cache = a.common.no_cache;
    if (kvh_session_create(&other.sess, &model, a.common.no_cache ? NULL : &cfg, &so, &err) != 0) {
        kvh_fail_prefix(&err, "%s session", other.label);
        goto fail;
    }

    /* what the stack is, as the record describes it (one line) */
    char stack_desc[512];
    if (a.common.no_cache) {
        snprintf(stack_desc, sizeof stack_desc, "--no-cache (recompute the prefix every step)");
    } else {
        size_t off = 0;
        stack_desc[0] = '\0';
        if (a.common.config_path) off += (size_t)snprintf(stack_desc + off, sizeof stack_desc - off, "%s ", a.common.config_path);
        if (a.common.plugins && off < sizeof stack_desc)
            off += (size_t)snprintf(stack_desc + off, sizeof stack_desc - off, "%s ", a.common.plugins);
        if (off < sizeof stack_desc)
            snprintf(stack_desc + off, sizeof stack_desc - off, "(cache.budget=%u%s)", cfg.budget,
                     budget_defaulted ? ", defaulted: half the prompt" : "");
    }
    printf("kvhost quick comparison: %s, %s backend, %d threads\n", model.name, backend, threads);
    if (model.is_random) printf("  (seeded random weights: speed and memory are real, the text is meaningless)\n");
    printf("  prompt %d tokens%s, %d greedy new tokens, batch 1; %d warm-up + %d timed runs per side, alternating\n",
           n_ids, a.prompt ? "" : " (synthetic)", a.max_new, a.warmup, a.repeats);
    printf("  stack: %s\n", stack_desc);
    fflush(stdout);

    kvh_sampler_params sp = kvh_sampler_default_params();
    sp.temperature = 0;
    const int32_t *prompts[1] = {ids};
    kvh_generate_request req = {
        .n_prompts = 1,
        .prompts = prompts,
        .prompt_len = &n_ids,
        .max_new = a.max_new,
        .sampling = sp,
        .stop_at_eot = false,
        .eot_id = kvh_tokenizer_eot(tok),
        .stream = NULL,
        .tok = tok,
    };
    bool rss_reset = true;
    for (int r = 0; r < a.warmup; r++) {
        if (run_once(&base, &req, false, &rss_reset, &err) != 0) goto fail;
        if (run_once(&other, &req, false, &rss_reset, &err) != 0) goto fail;
    }
    for (int r = 0; r < a.repeats; r++) {
        /* alternate which side goes first, so neither always runs right after the other's warm caches */
        side *first = r % 2 == 0 ? &base : &other, *second = r % 2 == 0 ? &other : &base;
        if (run_once(first, &req, true, &rss_reset, &err) != 0) goto fail;
        if (run_once(second, &req, true, &rss_reset, &err) != 0) goto fail;
    }

    kvh_agreement ag;
    kvh_compare_agreement(base.out, base.n_out, other.out, other.n_out, &ag);
    kvh_latency_stats bs, os;
    kvh_latency_stats_compute(base.steps, base.n_steps, &bs);
    kvh_latency_stats_compute(other.steps, other.n_steps, &os);
    double btps = tokens_per_s(&base), otps = tokens_per_s(&other);
    double bpf = prefill_median(&base), opf = prefill_median(&other);
    char b1[64], o1[64], note[96];
    printf("\n");
    print_row("", "baseline", other.label, "");
    snprintf(b1, sizeof b1, "%.2f", btps);
    snprintf(o1, sizeof o1, "%.2f", otps);
    snprintf(note, sizeof note, "%.2fx baseline", btps > 0 ? otps / btps : 0);
    print_row("decode tokens/s", b1, o1, note);
    snprintf(b1, sizeof b1, "%.2f (%.2f-%.2f)", bs.median, bs.p10, bs.p90);
    snprintf(o1, sizeof o1, "%.2f (%.2f-%.2f)", os.median, os.p10, os.p90);
    print_row("decode ms/step p50 (p10-p90)", b1, o1, "");
    snprintf(b1, sizeof b1, "%.1f", bpf);
    snprintf(o1, sizeof o1, "%.1f", opf);
    snprintf(note, sizeof note, "%.2fx baseline (median of runs)", bpf > 0 ? opf / bpf : 0);
    print_row("prefill ms", b1, o1, note);
    snprintf(b1, sizeof b1, "%.3f MiB", mib((double)base.kv_held));
    snprintf(o1, sizeof o1, "%.3f MiB", mib((double)other.kv_held));
    snprintf(note, sizeof note, "%.2fx baseline (exact, at the end)", base.kv_held ? (double)other.kv_held / (double)base.kv_held : 0);
    print_row("KV bytes held", b1, o1, note);
    snprintf(b1, sizeof b1, "%.3f MiB", mib((double)base.kv_peak));
    snprintf(o1, sizeof o1, "%.3f MiB", mib((double)other.kv_peak));
    print_row("KV bytes peak", b1, o1, "(exact, largest during a run)");
    snprintf(b1, sizeof b1, "%.0f MiB", mib((double)base.rss_peak));
    snprintf(o1, sizeof o1, "%.0f MiB", mib((double)other.rss_peak));
    print_row("peak RSS (whole process)", b1, o1,
              rss_reset ? "(per run; includes weights and both sessions)" : "(process lifetime: could not reset VmHWM)");
    snprintf(b1, sizeof b1, "%d tokens", base.n_out);
    if (ag.first_divergence < 0)
        snprintf(o1, sizeof o1, "%d/%d (100%%)", ag.n_identical, ag.n_compared);
    else
        snprintf(o1, sizeof o1, "%d/%d (%.1f%%)", ag.n_identical, ag.n_compared,
                 ag.n_compared ? 100.0 * ag.n_identical / ag.n_compared : 0.0);
    if (ag.first_divergence < 0)
        snprintf(note, sizeof note, "identical greedy tokens");
    else
        snprintf(note, sizeof note, "first divergence at new token %d", ag.first_divergence);
    print_row("greedy tokens = baseline", b1, o1, note);
    if (budget_defaulted)
        printf("\n  note: no [cache] budget was given; used %u (half the prompt). --set cache.budget=N to choose.\n",
               cfg.budget);
    if (a.common.json_path) {
        kvh_agreement self = {.n_compared = base.n_out, .n_identical = base.n_out, .first_divergence = -1};
        if (write_record(a.common.json_path, "baseline", &base, &base, &model, &cfg, backend, threads, n_ids, &a,
                         &self, &err) != 0)
            goto fail;
        if (write_record(a.common.json_path, a.common.no_cache ? "no-cache" : "stack", &other, &base, &model, &cfg,
                         backend, threads, n_ids, &a, &ag, &err) != 0)
            goto fail;
        printf("  records appended to %s\n", a.common.json_path);
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost compare: %s\n", err.msg);
    status = 1;
done:
    kvh_session_free(base.sess);
    kvh_session_free(other.sess);
    free(base.steps);
    free(other.steps);
    free(base.out);
    free(other.out);
    free(ids);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
}
