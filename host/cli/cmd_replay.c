/* cmd_replay.c — `kvhost replay TRACE`: runs the continuous-batching engine over a request trace in real
 * time and reports throughput, latency and memory as one JSON Lines record.
 * Owns: the command's options, submitting each request when its arrival time comes, the per-request
 * timings (time to first token, time per output token), the progress line, the --timeline file (one line
 * per engine step) and the record. The engine (host/engine/engine.c) does the scheduling. */
#define _DEFAULT_SOURCE /* getloadavg */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/engine_args.h"
#include "engine/engine.h"
#include "engine/trace.h"
#include "util/metrics.h"

static const char *const replay_usage =
    "usage: kvhost replay TRACE [options]\n"
    "\n"
    "Replays a request trace (JSON Lines, docs/trace.md; `kvhost trace` writes synthetic ones) through the\n"
    "continuous-batching engine: each request is submitted at its arrival time, every engine step admits\n"
    "waiting requests while the budgets allow, prefills prompt chunks, decodes one token per running\n"
    "request and retires finished ones. Prints a summary and appends one JSON record with --json.\n"
    "\n"
    "  --max-seqs N       requests running at once (default [engine] max_seqs, 64)\n"
    "  --max-tokens N     global budget: KV tokens held by all requests together (default none)\n"
    "  --step-tokens N    prompt tokens prefilled per step, all requests together (default 256)\n"
    "  --block-size N     KV block size in slots (default [cache] block_size, else 16; 0 = contiguous)\n"
    "  --no-prefix-sharing  compute every prompt in full\n"
    "  --time-scale X     arrivals happen X times faster than the trace says (default 1)\n"
    "  --timeline FILE    one JSON line per engine step: t_s, running, waiting, kv_bytes, kv_tokens\n"
    "  --quiet            no progress line\n"
    "  --mem-limit BYTES  (common option) the KV memory the engine may use, K/M/G suffixes\n";

typedef struct replay_args {
    kvh_cli_common common;
    kvh_cli_engine_args engine;
    const char *trace, *timeline;
    bool quiet;
    double time_scale;
} replay_args;

static int parse_args(int argc, char **argv, replay_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    kvh_cli_engine_args_init(&a->engine);
    a->time_scale = 1.0;
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        if ((r = kvh_cli_engine_args_parse(&a->engine, argc, argv, &i, err)) < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (strcmp(o, "--quiet") == 0) { a->quiet = true; i++; continue; }
        if (o[0] != '-') {
            if (a->trace) return kvh_fail(err, "one trace only (got '%s' and '%s')", a->trace, o);
            a->trace = o;
            i++;
            continue;
        }
        if (!v) return kvh_fail(err, "%s: missing value (see kvhost replay --help)", o);
        if (strcmp(o, "--time-scale") == 0) {
            char *end = NULL;
            errno = 0;
            a->time_scale = strtod(v, &end);
            if (errno || end == v || *end || !(a->time_scale > 0) || !isfinite(a->time_scale))
                return kvh_fail(err, "--time-scale '%s': expected a number > 0", v);
        } else if (strcmp(o, "--timeline") == 0) {
            a->timeline = v;
        } else {
            return kvh_fail(err, "replay: unknown option '%s' (see kvhost replay --help)", o);
        }
        i += 2;
    }
    if (!a->trace) return kvh_fail(err, "no trace: give a trace file (kvhost trace --out FILE writes one)");
    if (a->common.no_cache) return kvh_fail(err, "--no-cache: the engine always keeps a cache (use generate for the baseline)");
    return 0;
}

/* ---- per-request timings ------------------------------------------------------------------------------ */

typedef struct req_times {
    uint64_t arrival_ns, first_ns, last_ns;
    int n_tokens;
    bool done;
} req_times;

typedef struct replay_state {
    req_times *t;
    int n_done;
} replay_state;

static void on_token(void *ctx, uint64_t id, void *user, int index, int32_t token, uint64_t t_ns) {
    (void)id;
    (void)token;
    replay_state *st = ctx;
    req_times *rt = &st->t[(intptr_t)user];
    if (index == 0) rt->first_ns = t_ns;
    rt->last_ns = t_ns;
    rt->n_tokens = index + 1;
}

static void on_finish(void *ctx, uint64_t id, void *user, kvh_finish_reason why, uint64_t t_ns) {
    (void)id;
    (void)why;
    (void)t_ns;
    replay_state *st = ctx;
    st->t[(intptr_t)user].done = true;
    st->n_done++;
}

static volatile sig_atomic_t g_interrupted;
static void on_signal(int sig) {
    (void)sig;
    g_interrupted = 1;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile (the peers' benchmark scripts use the same definition). */
static double nearest_rank(const double *sorted, int n, double pct) {
    int k = (int)ceil(pct / 100.0 * n);
    if (k < 1) k = 1;
    if (k > n) k = n;
    return sorted[k - 1];
}

static cJSON *dist(double *v, int n) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    if (n == 0) {
        cJSON_AddNullToObject(o, "p50");
        cJSON_AddNullToObject(o, "p90");
        cJSON_AddNullToObject(o, "p99");
        cJSON_AddNullToObject(o, "mean");
        return o;
    }
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    cJSON_AddNumberToObject(o, "p50", nearest_rank(v, n, 50));
    cJSON_AddNumberToObject(o, "p90", nearest_rank(v, n, 90));
    cJSON_AddNumberToObject(o, "p99", nearest_rank(v, n, 99));
    cJSON_AddNumberToObject(o, "mean", sum / n);
    return o;
}

static void sleep_ns(uint64_t ns) {
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

int kvh_cmd_replay(int argc, char **argv) {
    kvh_err err = {{0}};
    replay_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "replay", replay_usage, &err);
    if (outcome >= 0) return outcome;
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_trace trace = {0};
    kvh_engine *eng = NULL;
    replay_state st = {0};
    FILE *tl = NULL;
    char tl_tmp[4096] = "";
    double *ttft = NULL, *tpot = NULL;
    cJSON *rec = NULL;

    if (kvh_cli_build_config(&a.common, &cfg, &err) != 0) goto fail_cfg;
    if (a.common.json_path && kvh_cli_check_output("--json", a.common.json_path, false, &err) != 0) goto fail;
    if (a.timeline && kvh_cli_check_output("--timeline", a.timeline, true, &err) != 0) goto fail;
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    const int threads = kvh_cli_threads(&a.common, &cfg);
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    if (kvh_trace_load(&trace, a.trace, tok, model.cfg.n_vocab, model.cfg.n_positions, &err) != 0) goto fail;
    if (trace.n == 0) {
        kvh_fail(&err, "%s: the trace holds no request", a.trace);
        goto fail;
    }

    kvh_engine_options eo;
    if (kvh_cli_engine_create(&eng, &model, &a.common, &cfg, &a.engine, &eo, &err) != 0) goto fail;
    kvh_session *sess = kvh_engine_session(eng);
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: timings and memory are real, the text is not.\n",
                model.name);
    if (eo.prefix_sharing && kvh_engine_sharing_reason(eng)[0] && !a.quiet)
        fprintf(stderr, "kvhost replay: prefix sharing is off: %s\n", kvh_engine_sharing_reason(eng));

    st.t = calloc((size_t)trace.n, sizeof *st.t);
    ttft = malloc((size_t)trace.n * sizeof *ttft);
    tpot = malloc((size_t)trace.n * sizeof *tpot);
    if (!st.t || !ttft || !tpot) {
        kvh_fail(&err, "out of memory");
        goto fail;
    }
    if (a.timeline) {
        snprintf(tl_tmp, sizeof tl_tmp, "%s.tmp", a.timeline);
        tl = fopen(tl_tmp, "w");
        if (!tl) {
            kvh_fail(&err, "--timeline %s: cannot write %s: %s", a.timeline, tl_tmp, strerror(errno));
            goto fail;
        }
    }
    kvh_engine_callbacks cb = {.on_token = on_token, .on_finish = on_finish, .ctx = &st};
    kvh_engine_set_callbacks(eng, &cb);

    struct sigaction sa, old_int, old_term;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);

    double load_start[1] = {0}, load_end[1] = {0};
    if (getloadavg(load_start, 1) != 1) load_start[0] = -1;
    const uint64_t start = kvh_now_ns();
    uint64_t last_progress = start;
    int next = 0;
    double frag_sum = 0;
    uint64_t frag_n = 0;
    int rc = 0;
    while (!g_interrupted && (next < trace.n || !kvh_engine_idle(eng))) {
        const uint64_t now = kvh_now_ns();
        while (next < trace.n) {
            const uint64_t at = start + (uint64_t)(trace.req[next].arrival_s / a.time_scale * 1e9);
            if (at > now) break;
            const kvh_trace_request *q = &trace.req[next];
            kvh_engine_request er = {.prompt = q->prompt,
                                     .n_prompt = q->n_prompt,
                                     .max_tokens = q->max_tokens,
                                     .sampling = {.temperature = q->temperature, .top_k = q->top_k, .top_p = q->top_p,
                                                  .seed = q->seed},
                                     .ignore_eos = q->ignore_eos,
                                     .user = (void *)(intptr_t)next};
            st.t[next].arrival_ns = at;
            if (kvh_engine_submit(eng, &er, NULL, &err) != 0) {
                kvh_fail_prefix(&err, "%s:%d: request '%s'", a.trace, q->line, q->id);
                rc = -1;
                break;
            }
            next++;
        }
        if (rc) break;
        if (kvh_engine_idle(eng)) {
            if (next < trace.n) {
                const uint64_t at = start + (uint64_t)(trace.req[next].arrival_s / a.time_scale * 1e9);
                const uint64_t now2 = kvh_now_ns();
                if (at > now2) sleep_ns(at - now2 < 50000000ull ? at - now2 : 50000000ull);
            }
            continue;
        }
        if (kvh_engine_step(eng, &err) != 0) {
            rc = -1;
            break;
        }
        kvh_engine_stats es;
        kvh_engine_get_stats(eng, &es);
        kvh_kvcache_paging_stats ps;
        kvh_kvcache_paging_stats_get(&sess->cache, &ps);
        if (ps.slots_total) {
            frag_sum += (double)ps.slots_unused / (double)ps.slots_total;
            frag_n++;
        }
        const uint64_t t = kvh_now_ns();
        if (tl)
            fprintf(tl, "{\"t_s\":%.6f,\"running\":%u,\"waiting\":%u,\"kv_bytes\":%zu,\"kv_tokens\":%zu,"
                    "\"blocks_shared\":%zu,\"generated\":%llu}\n", (double)(t - start) / 1e9, es.running, es.waiting,
                    es.kv_bytes_held, es.tokens_held, ps.blocks_shared, (unsigned long long)es.generated_tokens);
        if (!a.quiet && t - last_progress > 1000000000ull) {
            last_progress = t;
            fprintf(stderr, "\rreplay: %d/%d done, %u running, %u waiting, %llu tokens, %.1f tok/s, KV %.1f MiB   ",
                    st.n_done, trace.n, es.running, es.waiting, (unsigned long long)es.generated_tokens,
                    (double)es.generated_tokens / ((double)(t - start) / 1e9), (double)es.kv_bytes_held / 1048576.0);
            fflush(stderr);
        }
    }
    const uint64_t end = kvh_now_ns();
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    if (!a.quiet) fputc('\n', stderr);
    if (rc) goto fail;

    /* ---- the record ---- */
    kvh_engine_stats es;
    kvh_engine_get_stats(eng, &es);
    int n_ttft = 0, n_tpot = 0, completed = 0;
    long long prompt_tokens = 0;
    double last_finish = 0;
    cJSON *rows = cJSON_CreateArray();
    for (int i = 0; i < trace.n; i++) {
        const req_times *rt = &st.t[i];
        if (!rt->done || !rt->n_tokens) continue;
        completed++;
        prompt_tokens += trace.req[i].n_prompt;
        const double tt = (double)(rt->first_ns - rt->arrival_ns) / 1e6;
        ttft[n_ttft++] = tt;
        double tp = -1;
        if (rt->n_tokens > 1) tpot[n_tpot++] = tp = (double)(rt->last_ns - rt->first_ns) / 1e6 / (rt->n_tokens - 1);
        const double fin = (double)(rt->last_ns - start) / 1e9;
        if (fin > last_finish) last_finish = fin;
        cJSON *row = cJSON_CreateObject();
        cJSON_AddStringToObject(row, "id", trace.req[i].id);
        cJSON_AddNumberToObject(row, "arrival_s", (double)(rt->arrival_ns - start) / 1e9);
        cJSON_AddNumberToObject(row, "ttft_ms", tt);
        if (tp >= 0) cJSON_AddNumberToObject(row, "tpot_ms", tp);
        else cJSON_AddNullToObject(row, "tpot_ms");
        cJSON_AddNumberToObject(row, "finish_s", fin);
        cJSON_AddNumberToObject(row, "tokens", rt->n_tokens);
        cJSON_AddItemToArray(rows, row);
    }
    const double dur = last_finish > 0 ? last_finish : (double)(end - start) / 1e9;
    if (getloadavg(load_end, 1) != 1) load_end[0] = -1;
    rec = kvh_record_new("replay");
    cJSON *mach = cJSON_GetObjectItemCaseSensitive(rec, "machine");
    if (mach) { /* other load on the machine while the replay ran (the peers' records carry the same) */
        cJSON_AddNumberToObject(mach, "load1_start", load_start[0]);
        cJSON_AddNumberToObject(mach, "load1_end", load_end[0]);
    }
    cJSON_AddStringToObject(rec, "command", "replay");
    cJSON_AddNullToObject(rec, "peer");
    cJSON_AddStringToObject(rec, "trace", a.trace);
    cJSON_AddBoolToObject(rec, "interrupted", g_interrupted != 0);
    cJSON_AddNumberToObject(rec, "requests", trace.n);
    cJSON_AddNumberToObject(rec, "completed", completed);
    cJSON_AddNumberToObject(rec, "duration_s", dur);
    cJSON_AddNumberToObject(rec, "generated_tokens", (double)es.generated_tokens);
    cJSON_AddNumberToObject(rec, "prompt_tokens", (double)prompt_tokens);
    cJSON_AddNumberToObject(rec, "tokens_per_s", dur > 0 ? (double)es.generated_tokens / dur : 0);
    cJSON_AddNumberToObject(rec, "requests_per_s", dur > 0 ? completed / dur : 0);
    cJSON_AddItemToObject(rec, "ttft_ms", dist(ttft, n_ttft));
    cJSON_AddItemToObject(rec, "tpot_ms", dist(tpot, n_tpot));
    cJSON_AddNumberToObject(rec, "max_concurrent", es.max_running);
    cJSON_AddNumberToObject(rec, "threads", threads);
    cJSON_AddNumberToObject(rec, "kv_bytes_peak", (double)es.kv_bytes_peak);
    cJSON_AddNumberToObject(rec, "kv_bytes_active_peak", (double)es.kv_bytes_active_peak);
    cJSON_AddNumberToObject(rec, "kv_tokens_peak", (double)es.tokens_peak);
    cJSON_AddNumberToObject(rec, "kv_fragmentation_mean", frag_n ? frag_sum / (double)frag_n : 0);
    cJSON_AddNumberToObject(rec, "prefix_hit_rate",
                            es.prefix_blocks_looked_up ? (double)es.prefix_blocks_hit / (double)es.prefix_blocks_looked_up : 0);
    cJSON_AddNumberToObject(rec, "prompt_tokens_shared", (double)es.prompt_tokens_shared);
    cJSON_AddNumberToObject(rec, "prompt_tokens_computed", (double)es.prompt_tokens_computed);
    cJSON_AddNumberToObject(rec, "preemptions", (double)es.preemptions);
    cJSON_AddNumberToObject(rec, "cow_copies", (double)es.cow_copies);
    cJSON_AddNumberToObject(rec, "steps", (double)es.steps);
    cJSON_AddNumberToObject(rec, "forward_s", (double)es.forward_ns / 1e9);
    cJSON *eng_o = cJSON_AddObjectToObject(rec, "engine");
    cJSON_AddNumberToObject(eng_o, "max_seqs", eo.max_seqs);
    cJSON_AddNumberToObject(eng_o, "max_tokens", eo.max_tokens);
    cJSON_AddNumberToObject(eng_o, "step_tokens", eo.step_tokens);
    cJSON_AddNumberToObject(eng_o, "block_size", sess->cache.block_slots);
    cJSON_AddNumberToObject(eng_o, "kv_mem_limit", (double)a.common.mem_limit);
    cJSON_AddBoolToObject(eng_o, "prefix_sharing", kvh_engine_prefix_cache(eng) != NULL);
    cJSON_AddStringToObject(eng_o, "prefix_sharing_off", kvh_engine_sharing_reason(eng));
    cJSON_AddNumberToObject(eng_o, "time_scale", a.time_scale);
    cJSON_AddStringToObject(eng_o, "preemption", "recompute");
    if (kvh_add_run_fields(rec, &model, sess, &cfg, backend, threads) != 0) {
        cJSON_Delete(rows);
        kvh_fail(&err, "out of memory building the record");
        goto fail;
    }
    cJSON_AddItemToObject(rec, "per_request", rows);

    printf("replay %s: %d/%d requests in %.2f s: %.2f req/s, %.1f tok/s; TTFT p50 %.0f ms p99 %.0f ms; "
           "TPOT p50 %.1f ms p99 %.1f ms; max %u running; KV peak %.1f MiB, %zu tokens; prefix hits %.0f%%; "
           "%llu preemptions%s\n",
           a.trace, completed, trace.n, dur, dur > 0 ? completed / dur : 0,
           dur > 0 ? (double)es.generated_tokens / dur : 0,
           n_ttft ? nearest_rank(ttft, n_ttft, 50) : 0, n_ttft ? nearest_rank(ttft, n_ttft, 99) : 0,
           n_tpot ? nearest_rank(tpot, n_tpot, 50) : 0, n_tpot ? nearest_rank(tpot, n_tpot, 99) : 0, es.max_running,
           (double)es.kv_bytes_peak / 1048576.0, es.tokens_peak,
           es.prefix_blocks_looked_up ? 100.0 * (double)es.prefix_blocks_hit / (double)es.prefix_blocks_looked_up : 0,
           (unsigned long long)es.preemptions, g_interrupted ? " (interrupted)" : "");
    if (tl) {
        if (fclose(tl) != 0 || rename(tl_tmp, a.timeline) != 0) {
            tl = NULL;
            kvh_fail(&err, "--timeline %s: %s", a.timeline, strerror(errno));
            goto fail;
        }
        tl = NULL;
    }
    if (a.common.json_path && kvh_jsonl_append(a.common.json_path, rec, &err) != 0) goto fail;
    status = g_interrupted ? 130 : 0;
    goto done;
fail:
    fprintf(stderr, "kvhost replay: %s\n", err.msg);
done:
    if (tl) {
        fclose(tl);
        unlink(tl_tmp);
    }
    cJSON_Delete(rec);
    free(ttft);
    free(tpot);
    free(st.t);
    kvh_engine_free(eng);
    kvh_trace_free(&trace);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
fail_cfg:
    fprintf(stderr, "kvhost replay: %s\n", err.msg);
    kvh_config_free(&cfg);
    return 2;
}
