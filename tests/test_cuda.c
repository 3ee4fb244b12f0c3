/* test_cuda.c — the CUDA backend against the CPU backend (the reference): logits of kvh_sessions with
 * backend "cuda" and "cpu" on the same inputs (prefill + decode, ragged batches, all-logits prefill, long and
 * uneven contexts up to n_positions), on
 * small random configs (both attention code paths: head size a multiple of 8 and not), on
 * random:gpt2-medium and on the tiny trained model when ../shared has it; eviction (window, sink) keeps
 * exactly the same positions per head on both backends; attention-score accumulators (h2o: decode +
 * prefill sums, pyramid: observation window) agree. Quantized stores (int8.so / int4.so, kvq_format.h):
 * the GPU encoder writes exactly kvq_encode's bytes for random rows (int8 / int4, symmetric / asymmetric,
 * several group sizes, edge rows); logits with int8 / int4 against the CPU running the same plugin;
 * eviction over packed slots (window + int8: identical positions; h2o + int8: see eviction_run); KIVI mode
 * and other stores are refused with a clear message. Score-report policies (ABI 1.3): the reports
 * tova.so / scissorhands.so receive (decode rows; prefill column sums and last rows) match the CPU's
 * within fp16 tolerance, with and without the CUDA graph; tp_report.so's contract checks (insert, slot
 * metadata through compaction, rows, column sums) pass on the device; tova / scissorhands evict and pick
 * tokens like the CPU on the tiny model; a layer whose policy did not ask moves no report bytes. Without a usable device (or without CUDA in the
 * build) every GPU test skips with the reason, and the no-device error message is checked instead. With or
 * without one, a `--backend auto` run record names the backend that ran.
 *
 * Tolerance (fp16 weights and activations, fp32 accumulation, vs fp32 on the CPU): per step the normalized
 * error ||cuda - cpu||_2 / ||cpu||_2 must stay below 3e-2 (NMSE < 1e-3), and the argmax must agree on at
 * least 90% of the steps (random models produce near-ties, so exact agreement is not promised). Inputs
 * never diverge: both backends are fed the CPU's greedy tokens. With a quantized store both backends
 * quantize, but from K/V rows that differ by the fp16 activations, so a code can land one step apart
 * (one scale: 1/254 of a group's range for int8, 1/14 for int4): int8 keeps the dense tolerance, int4
 * gets 8e-2 and 80% argmax agreement. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "backend/backend.h"
#include "helpers/model_fixture.h"
#include "runtime/config.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "runtime/router.h"
#include "runtime/session.h"
#include "util/util.h"

#include "../plugins/quant/kvq_format.h"

#ifdef KVH_HAVE_CUDA
#include "backend/cuda/graph_stats.h"
#include "backend/cuda/quant_format.h"
#include "backend/cuda/report.h"
int kvh_backend_cuda_available(char *why, size_t cap);
#endif

#define NRMSE_TOL 3e-2
#define ARGMAX_AGREE 0.9

/* True when CUDA tests can run; otherwise why[] says why not. */
static bool cuda_usable(char *why, size_t cap) {
#ifdef KVH_HAVE_CUDA
    return kvh_backend_cuda_available(why, cap) != 0;
#else
    snprintf(why, cap, "this build has no CUDA backend (KVH_CUDA off or no nvcc)");
    return false;
#endif
}

#define REQUIRE_CUDA()                                                     \
    do {                                                                   \
        char why_[256] = "";                                               \
        if (!cuda_usable(why_, sizeof why_)) cr_skip_test("no usable CUDA device: %s", why_); \
    } while (0)

static kvh_model_config small_config(int C, int NH, int L) {
    kvh_model_config c = {.n_vocab = 211, .n_positions = 320, .n_embd = C, .n_head = NH, .n_layer = L,
                          .n_inner = 4 * C, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static kvh_session *open_session(const kvh_model *m, const char *backend, int n_seq, const char *ini,
                                 kvh_run_config *cfg) {
    kvh_session_options o = kvh_session_default_options();
    o.backend = backend;
    o.n_seq = n_seq;
    o.threads = 4;
    kvh_err err = {{0}};
    if (ini) {
        kvh_config_defaults(cfg);
        cr_assert_eq(kvh_config_load_string(cfg, ini, "test.ini", &err), 0, "%s", err.msg);
    }
    kvh_session *s = NULL;
    cr_assert_eq(kvh_session_create(&s, m, ini ? cfg : NULL, &o, &err), 0, "session (%s): %s", backend, err.msg);
    cr_assert_str_eq(s->backend->ops->name, backend);
    return s;
}

static void forward(kvh_session *s, int B, const int *seq, const int32_t *const *toks, const int *n, bool all,
                    float *out) {
    kvh_err err = {{0}};
    kvh_batch b = {.n = B, .seq = seq, .tokens = toks, .n_tokens = n, .all_logits = all};
    cr_assert_eq(kvh_session_forward(s, &b, out, &err), 0, "forward (%s): %s", s->backend->ops->name, err.msg);
}

static double nrmse(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * (double)ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Compares one logits block (normalized error below tol); returns 1 when the argmax of every row agrees. */
static int check_logits_tol(const char *what, int step, const float *gpu, const float *cpu, int rows, int V,
                            double tol) {
    double e = nrmse(gpu, cpu, (size_t)rows * V);
    if (e >= tol) {
        double mx = 0;
        int at = 0;
        for (int i = 0; i < rows * V; i++)
            if (fabs(gpu[i] - cpu[i]) > mx) {
                mx = fabs(gpu[i] - cpu[i]);
                at = i;
            }
        cr_assert_fail("%s step %d: normalized error %.3g >= %.3g (max |diff| %.4g at row %d col %d: cuda %.5g cpu %.5g)",
                       what, step, e, tol, mx, at / V, at % V, gpu[at], cpu[at]);
    }
    int agree = 1;
    for (int r = 0; r < rows; r++) agree &= argmax(gpu + (size_t)r * V, V) == argmax(cpu + (size_t)r * V, V);
    return agree;
}

static int check_logits(const char *what, int step, const float *gpu, const float *cpu, int rows, int V) {
    return check_logits_tol(what, step, gpu, cpu, rows, V, NRMSE_TOL);
}

static void fill_tokens(int32_t *t, int n, int V, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        t[i] = (int32_t)((seed >> 8) % (unsigned)V);
    }
}

/* The decode steps ran as CUDA graph replays (every one of `steps`, the first capturing), unless
 * KVH_CUDA_GRAPH=0 (or KVH_CUDA_PHASES=1) asked for none: a capture that fails falls back to plain launches, and the tests "with
 * the graph" must not pass on that path unnoticed. */
static void expect_graphs(const kvh_session *gpu, const char *what, int steps) {
#ifdef KVH_HAVE_CUDA
    kvh_cuda_graph_stats gs;
    cr_assert_eq(kvh_cuda_graph_stats_get(gpu->backend, &gs), 0);
    const char *env = getenv("KVH_CUDA_GRAPH"), *phases = getenv("KVH_CUDA_PHASES"); /* phase timing: no graphs */
    if ((env && strcmp(env, "0") == 0) || (phases && strcmp(phases, "1") == 0)) {
        cr_assert_eq(gs.captures + gs.replays, 0, "%s: graphs off, yet %llu captures", what,
                     (unsigned long long)gs.captures);
        return;
    }
    cr_assert_eq(gs.fallbacks, 0, "%s: CUDA graph fell back to plain launches: %s", what, gs.fallback_reason);
    cr_assert_geq(gs.replays, (uint64_t)steps, "%s: %llu graph replays for %d decode steps", what,
                  (unsigned long long)gs.replays, steps);
#else
    (void)gpu, (void)what, (void)steps;
#endif
}

/* Prefill `prompt` tokens, then `steps` greedy decode steps (CPU's choice fed to both), comparing logits
 * (normalized error below tol every step, argmax agreeing on at least a fraction `agree_min` of them). */
static void compare_decode_tol(const kvh_model *m, const char *what, int prompt, int steps, const char *ini,
                               double tol, double agree_min) {
    const int V = m->cfg.n_vocab;
    kvh_run_config c1, c2;
    kvh_session *cpu = open_session(m, "cpu", 1, ini, &c1);
    kvh_session *gpu = open_session(m, "cuda", 1, ini, &c2);
    float *lc = malloc((size_t)V * sizeof(float)), *lg = malloc((size_t)V * sizeof(float));
    int32_t *toks = malloc((size_t)prompt * sizeof(int32_t));
    fill_tokens(toks, prompt, V, 7u);
    int seq = 0, n = prompt, agree = 0;
    const int32_t *tp = toks;
    forward(cpu, 1, &seq, &tp, &n, false, lc);
    forward(gpu, 1, &seq, &tp, &n, false, lg);
    agree += check_logits_tol(what, 0, lg, lc, 1, V, tol);
    for (int st = 1; st <= steps; st++) {
        int32_t next = argmax(lc, V);
        const int32_t *np = &next;
        int one = 1;
        forward(cpu, 1, &seq, &np, &one, false, lc);
        forward(gpu, 1, &seq, &np, &one, false, lg);
        agree += check_logits_tol(what, st, lg, lc, 1, V, tol);
    }
    cr_assert_geq(agree, (int)ceil(agree_min * (steps + 1)), "%s: argmax agreed on %d of %d steps", what, agree,
                  steps + 1);
    printf("%s: argmax agreed on %d of %d steps\n", what, agree, steps + 1);
    expect_graphs(gpu, what, steps);
    free(lc);
    free(lg);
    free(toks);
    kvh_session_free(cpu);
    kvh_session_free(gpu);
    if (ini) {
        kvh_config_free(&c1);
        kvh_config_free(&c2);
    }
}

static void compare_decode(const kvh_model *m, const char *what, int prompt, int steps, const char *ini) {
    compare_decode_tol(m, what, prompt, steps, ini, NRMSE_TOL, ARGMAX_AGREE);
}

static void random_model(kvh_model *m, kvh_model_config cfg, const char *name) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(m, &cfg, 99, name, &err), 0, "%s", err.msg);
}

/* ---- without a device ---------------------------------------------------------------------------- */

Test(cuda, no_device_message) {
    char why[256] = "";
    if (cuda_usable(why, sizeof why)) cr_skip_test("a CUDA device is present: the no-device message is checked elsewhere");
    kvh_model m;
    random_model(&m, small_config(32, 2, 1), "small");
    kvh_backend *be = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_backend_create(&be, "cuda", &m, 1, &err), -1);
    cr_assert_null(be);
    cr_assert(strstr(err.msg, "backend 'cuda'") && strstr(err.msg, "HINT"), "unclear message: %s", err.msg);
    printf("no device: %s\n", err.msg);
    /* auto falls back to the CPU */
    cr_assert_eq(kvh_backend_create(&be, "auto", &m, 1, &err), 0, "%s", err.msg);
    cr_assert_str_eq(be->ops->name, "cpu");
    kvh_backend_destroy(be);
    kvh_model_free(&m);
}

/* A run record says which backend ran, not which was asked for: `--backend auto` resolves to cuda where a
 * device is usable and to cpu elsewhere (backend_requested keeps "auto"); an explicit cpu has no
 * backend_requested. Runs with and without a device. */
static cJSON *generate_record(const char *dir, const char *backend, int n) {
    char json[600];
    snprintf(json, sizeof json, "%s/backend_record_%d.jsonl", kvh_test_tmpdir(), n);
    const char *argv[] = {"generate", "--model", dir, "--prompt-tokens", "12", "--max-new", "3", "--threads", "1",
                          "--backend", backend, "--quiet", "--json", json, NULL};
    return kvh_test_generate_record(argv, json);
}

static const char *str_field(const cJSON *rec, const char *name) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(rec, name);
    return cJSON_IsString(x) ? x->valuestring : NULL;
}

Test(cuda, record_names_the_backend_that_ran) {
    char why[256] = "", dir[512];
    const char *expect = cuda_usable(why, sizeof why) ? "cuda" : "cpu";
    snprintf(dir, sizeof dir, "%s/backend_record_model", kvh_test_tmpdir());
    kvh_fx_shape shape = {.V = 257, .P = 64, .C = 32, .NH = 2, .L = 2};
    kvh_fx_write_model(dir, shape, "F32", NULL, NULL, NULL);
    kvh_fx_write_byte_tokenizer(dir);
    cJSON *a = generate_record(dir, "auto", 0);
    cr_assert_str_eq(str_field(a, "backend"), expect, "auto ran %s", str_field(a, "backend"));
    cr_assert_str_eq(str_field(a, "backend_requested"), "auto");
    /* K/V slots in device memory are also counted as the device holds them (pool regions), never less
     * than the cache's slot bytes */
    const cJSON *reserved = cJSON_GetObjectItemCaseSensitive(a, "kv_device_reserved_bytes");
    const cJSON *peak = cJSON_GetObjectItemCaseSensitive(a, "kv_bytes_peak");
    if (strcmp(expect, "cuda") == 0) {
        cr_assert(cJSON_IsNumber(reserved) && cJSON_IsNumber(peak), "no kv_device_reserved_bytes on cuda");
        cr_assert_geq(reserved->valuedouble, peak->valuedouble);
    } else {
        cr_assert_null(reserved, "host slots have no device reservation");
    }
    cJSON *c = generate_record(dir, "cpu", 1);
    cr_assert_str_eq(str_field(c, "backend"), "cpu");
    cr_assert_null(str_field(c, "backend_requested"), "an explicit backend needs no backend_requested");
    cr_assert_null(cJSON_GetObjectItemCaseSensitive(c, "kv_device_reserved_bytes"));
    cJSON_Delete(a);
    cJSON_Delete(c);
}

/* ---- logits against the CPU --------------------------------------------------------------------- */

Test(cuda, small_model_decode) {
    REQUIRE_CUDA();
    kvh_model m;
    random_model(&m, small_config(96, 6, 3), "small-hs16");
    compare_decode(&m, "small (HS 16)", 40, 32, NULL);
    kvh_model_free(&m);
}

Test(cuda, odd_head_size_long_prompt) {
    REQUIRE_CUDA();
    kvh_model m;
    random_model(&m, small_config(60, 5, 2), "small-hs12");
    /* 260 > two tiles of 128 keys, so prefill and decode run several tiles and several splits */
    compare_decode(&m, "small (HS 12)", 260, 16, NULL);
    kvh_model_free(&m);
}

Test(cuda, gpt2_medium_decode) {
    REQUIRE_CUDA();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, "random:gpt2-medium", &err), 0, "%s", err.msg);
    compare_decode(&m, "random:gpt2-medium", 64, 32, NULL);
    kvh_model_free(&m);
}

Test(cuda, tiny_model_decode) {
    REQUIRE_CUDA();
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    compare_decode(&m, "gpt2-tiny-wt", 48, 32, NULL);
    kvh_model_free(&m);
}

/* Three sequences of different lengths in one prefill call, then batched decode; and all-logits rows. */
Test(cuda, ragged_batch_and_all_logits) {
    REQUIRE_CUDA();
    kvh_model m;
    random_model(&m, small_config(64, 4, 2), "small-batch");
    const int V = m.cfg.n_vocab, B = 3;
    kvh_session *cpu = open_session(&m, "cpu", B, NULL, NULL);
    kvh_session *gpu = open_session(&m, "cuda", B, NULL, NULL);
    int seq[3] = {0, 1, 2}, n[3] = {5, 17, 1};
    int32_t t0[5], t1[17], t2[1];
    fill_tokens(t0, 5, V, 1u);
    fill_tokens(t1, 17, V, 2u);
    fill_tokens(t2, 1, V, 3u);
    const int32_t *tp[3] = {t0, t1, t2};
    const int R = 5 + 17 + 1;
    float *lc = malloc((size_t)R * V * sizeof(float)), *lg = malloc((size_t)R * V * sizeof(float));
    forward(cpu, B, seq, tp, n, true, lc);
    forward(gpu, B, seq, tp, n, true, lg);
    (void)check_logits("ragged all-logits prefill", 0, lg, lc, R, V);
    int agree = 0, total = 0;
    for (int st = 1; st <= 16; st++) {
        int32_t next[3];
        for (int b = 0; b < B; b++) next[b] = (int32_t)((st * 31 + b * 7) % V);
        const int32_t *np[3] = {&next[0], &next[1], &next[2]};
        int one[3] = {1, 1, 1};
        forward(cpu, B, seq, np, one, false, lc);
        forward(gpu, B, seq, np, one, false, lg);
        agree += check_logits("ragged decode", st, lg, lc, B, V);
        total++;
    }
    cr_assert_geq(agree, (int)ceil(ARGMAX_AGREE * total));
    /* a sequence restarts while the others continue */
    kvh_err err = {{0}};
    cr_assert_eq(kvh_session_reset_seq(cpu, 1, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_session_reset_seq(gpu, 1, &err), 0, "%s", err.msg);
    int one = 9;
    int s1 = 1;
    const int32_t *p1 = t1;
    forward(cpu, 1, &s1, &p1, &one, false, lc);
    forward(gpu, 1, &s1, &p1, &one, false, lg);
    (void)check_logits("after reset", 0, lg, lc, 1, V);
    free(lc);
    free(lg);
    kvh_session_free(cpu);
    kvh_session_free(gpu);
    kvh_model_free(&m);
}

/* Long and very uneven contexts in one batch (prompts of 1000, 700, 300 and 3 tokens, then 24 decode steps
 * that end at 1024 positions): prefill over many key tiles, and decode steps whose split count is fixed by
 * n_ctx for the graph, so the short sequences' splits are mostly empty and the long ones' are full — the
 * index arithmetic the small tests never reach. Every step's logits compared, and the decode steps replays. */
Test(cuda, long_uneven_contexts_many_splits) {
    REQUIRE_CUDA();
    kvh_model m;
    kvh_model_config cfg = small_config(64, 4, 2);
    cfg.n_positions = 1024;
    random_model(&m, cfg, "small-long");
    const int V = m.cfg.n_vocab, B = 4, steps = 24;
    kvh_session *cpu = open_session(&m, "cpu", B, NULL, NULL);
    kvh_session *gpu = open_session(&m, "cuda", B, NULL, NULL);
    int seq[4] = {0, 1, 2, 3}, n[4] = {1000, 700, 300, 3};
    int32_t *t[4];
    for (int b = 0; b < B; b++) {
        t[b] = malloc((size_t)n[b] * sizeof(int32_t));
        fill_tokens(t[b], n[b], V, 40u + (unsigned)b);
    }
    const int32_t *tp[4] = {t[0], t[1], t[2], t[3]};
    float *lc = malloc((size_t)B * V * sizeof(float)), *lg = malloc((size_t)B * V * sizeof(float));
    forward(cpu, B, seq, tp, n, false, lc);
    forward(gpu, B, seq, tp, n, false, lg);
    int agree = check_logits("long uneven prefill", 0, lg, lc, B, V), total = 1;
    for (int st = 1; st <= steps; st++) {
        int32_t next[4];
        for (int b = 0; b < B; b++) next[b] = argmax(lc + (size_t)b * V, V);
        const int32_t *np[4] = {&next[0], &next[1], &next[2], &next[3]};
        int one[4] = {1, 1, 1, 1};
        forward(cpu, B, seq, np, one, false, lc);
        forward(gpu, B, seq, np, one, false, lg);
        agree += check_logits("long uneven decode", st, lg, lc, B, V);
        total++;
    }
    cr_assert_geq(agree, (int)ceil(ARGMAX_AGREE * total), "argmax of every row agreed on %d of %d steps", agree, total);
    expect_graphs(gpu, "long uneven contexts", steps);
    for (int b = 0; b < B; b++) free(t[b]);
    free(lc);
    free(lg);
    kvh_session_free(cpu);
    kvh_session_free(gpu);
    kvh_model_free(&m);
}

/* ---- eviction and scores -------------------------------------------------------------------------- */

/* True when every plugin of the comma list `files` is built. */
static bool plugin_built(const char *files, char *why, size_t cap) {
    char list[256];
    snprintf(list, sizeof list, "%s", files);
    for (char *save = NULL, *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save)) {
        char p[1024];
        snprintf(p, sizeof p, "%.700s/plugins/%.200s", KVH_BUILD_DIR, f);
        if (access(p, R_OK) != 0) {
            snprintf(why, cap, "%.900s not built", p);
            return false;
        }
    }
    return true;
}

/* Skips the calling test unless every plugin of the comma list `files` is built (why, in the skip). */
#define REQUIRE_PLUGINS(files)                                                          \
    do {                                                                                \
        char why_[1024];                                                                \
        if (!plugin_built((files), why_, sizeof why_)) cr_skip_test("%s", why_);        \
    } while (0)

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Live counts agree in every head (budget and slack decide them, not numerics); adds the kept positions
 * both backends share to *shared and the kept positions to *total. strict: every head holds the same set. */
static void expect_same_positions_n(kvh_session *cpu, kvh_session *gpu, int step, bool strict, size_t *shared,
                                    size_t *total) {
    const kvh_kvcache *a = &cpu->cache, *b = &gpu->cache;
    int32_t *pa = malloc((size_t)a->n_ctx * sizeof(int32_t)), *pb = malloc((size_t)a->n_ctx * sizeof(int32_t));
    for (int s = 0; s < a->n_seq; s++)
        for (int l = 0; l < a->n_layer; l++)
            for (int h = 0; h < a->n_head; h++) {
                const kvh_head_cache *x = &a->heads[kvh_kvcache_head_index(a, s, l, h)];
                const kvh_head_cache *y = &b->heads[kvh_kvcache_head_index(b, s, l, h)];
                cr_assert_eq(x->n, y->n, "step %d seq %d layer %d head %d: %u live on cpu, %u on cuda", step, s, l, h,
                             x->n, y->n);
                memcpy(pa, x->pos, x->n * sizeof(int32_t));
                memcpy(pb, y->pos, y->n * sizeof(int32_t));
                qsort(pa, x->n, sizeof(int32_t), cmp_i32);
                qsort(pb, y->n, sizeof(int32_t), cmp_i32);
                if (strict)
                    for (uint32_t i = 0; i < x->n; i++)
                        cr_assert_eq(pa[i], pb[i],
                                     "step %d seq %d layer %d head %d: kept position #%u differs (%d vs %d)", step, s,
                                     l, h, i, pa[i], pb[i]);
                uint32_t i = 0, j = 0;
                while (i < x->n && j < y->n) {
                    if (pa[i] == pb[j]) {
                        (*shared)++;
                        i++;
                        j++;
                    } else if (pa[i] < pb[j]) i++;
                    else j++;
                }
                *total += x->n;
            }
    free(pa);
    free(pb);
}

/* Two sequences (prefill 40 and 23 tokens, then 60 greedy steps) on both backends with the plugins of
 * `plugin_files` (comma list) configured by `ini`; logits compared every step. strict: kept positions
 * identical in every head at every step (positional policies: window, sink). Otherwise (score-based
 * policies, h2o) the live counts must be identical and at least 90% of all kept positions (summed over the
 * run) shared: victims are the lowest accumulated scores, and probabilities that differ by fp16
 * activations can swap two nearly tied candidates, after which the sets stay different by that token.
 * The share and the number of steps with identical sets are printed. */
/* agree_min > 0: the greedy token (argmax) must also agree on at least that share of the 2 x 61 rows. */
static void eviction_run_model(const kvh_model *mp, const char *plugin_files, const char *ini, bool strict,
                               double agree_min) {
    const kvh_model m = *mp;
    const int V = m.cfg.n_vocab, B = 2;
    kvh_run_config c1, c2;
    kvh_session *cpu = open_session(&m, "cpu", B, ini, &c1);
    kvh_session *gpu = open_session(&m, "cuda", B, ini, &c2);
    float *lc = malloc((size_t)B * V * sizeof(float)), *lg = malloc((size_t)B * V * sizeof(float));
    int seq[2] = {0, 1}, n[2] = {40, 23};
    int32_t t0[40], t1[23];
    fill_tokens(t0, 40, V, 11u);
    fill_tokens(t1, 23, V, 12u);
    const int32_t *tp[2] = {t0, t1};
    size_t shared = 0, total = 0;
    int same_steps = 0, agree = 0;
    forward(cpu, B, seq, tp, n, false, lc);
    forward(gpu, B, seq, tp, n, false, lg);
    {
        size_t sh = 0, tot = 0;
        expect_same_positions_n(cpu, gpu, 0, strict, &sh, &tot);
        shared += sh;
        total += tot;
        same_steps += sh == tot;
    }
    (void)check_logits(plugin_files, 0, lg, lc, B, V);
    for (int b = 0; b < B; b++) agree += argmax(lg + (size_t)b * V, V) == argmax(lc + (size_t)b * V, V);
    for (int st = 1; st <= 60; st++) {
        int32_t next[2] = {argmax(lc, V), argmax(lc + V, V)};
        const int32_t *np[2] = {&next[0], &next[1]};
        int one[2] = {1, 1};
        forward(cpu, B, seq, np, one, false, lc);
        forward(gpu, B, seq, np, one, false, lg);
        size_t sh = 0, tot = 0;
        expect_same_positions_n(cpu, gpu, st, strict, &sh, &tot);
        shared += sh;
        total += tot;
        same_steps += sh == tot;
        (void)check_logits(plugin_files, st, lg, lc, B, V);
        for (int b = 0; b < B; b++) agree += argmax(lg + (size_t)b * V, V) == argmax(lc + (size_t)b * V, V);
    }
    printf("%s: kept positions shared %zu of %zu (%.2f%%), identical sets on %d of 61 steps, argmax agreed on %d "
           "of %d rows\n",
           plugin_files, shared, total, 100.0 * (double)shared / (double)total, same_steps, agree, 61 * B);
    cr_assert_geq((double)shared, 0.9 * (double)total, "%s: only %zu of %zu kept positions shared", plugin_files,
                  shared, total);
    cr_assert_geq((double)agree, agree_min * 61 * B, "%s: argmax agreed on only %d of %d rows", plugin_files, agree,
                  61 * B);
    free(lc);
    free(lg);
    kvh_session_free(cpu);
    kvh_session_free(gpu);
    kvh_config_free(&c1);
    kvh_config_free(&c2);
}

static void eviction_run_cfg(const char *plugin_files, const char *ini, kvh_model_config mc, bool strict) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(plugin_files);
    kvh_model m;
    random_model(&m, mc, "small-evict");
    eviction_run_model(&m, plugin_files, ini, strict, 0.0);
    kvh_model_free(&m);
}

static void eviction_run(const char *plugin_file, const char *ini) {
    eviction_run_cfg(plugin_file, ini, small_config(64, 4, 2), true);
}

Test(cuda, eviction_window_same_positions) { eviction_run("window.so", "[cache]\nbudget = 16\nslack = 4\n[window]\n"); }
Test(cuda, eviction_sink_same_positions) { eviction_run("sink.so", "[cache]\nbudget = 20\nslack = 3\n[sink]\n"); }

/* Score accumulators after prefill + decode with no eviction (budget above the length): the device sums,
 * brought to the host by before_evict, match the CPU's within fp16 tolerance. */
static void scores_run(const char *plugin_file, const char *ini) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(plugin_file);
    kvh_model m;
    random_model(&m, small_config(64, 4, 2), "small-scores");
    const int V = m.cfg.n_vocab;
    kvh_run_config c1, c2;
    kvh_session *cpu = open_session(&m, "cpu", 1, ini, &c1);
    kvh_session *gpu = open_session(&m, "cuda", 1, ini, &c2);
    float *lc = malloc((size_t)V * sizeof(float)), *lg = malloc((size_t)V * sizeof(float));
    int32_t toks[30];
    fill_tokens(toks, 30, V, 5u);
    int seq = 0, n = 30;
    const int32_t *tp = toks;
    forward(cpu, 1, &seq, &tp, &n, false, lc);
    forward(gpu, 1, &seq, &tp, &n, false, lg);
    for (int st = 0; st < 10; st++) {
        int32_t next = argmax(lc, V);
        const int32_t *np = &next;
        int one = 1;
        forward(cpu, 1, &seq, &np, &one, false, lc);
        forward(gpu, 1, &seq, &np, &one, false, lg);
    }
    int checked = 0;
    kvh_err err = {{0}};
    for (int l = 0; l < m.cfg.n_layer; l++) {
        cr_assert_eq(gpu->backend->ops->before_evict(gpu->backend, &gpu->cache, 0, l, &err), 0, "%s", err.msg);
        for (int h = 0; h < m.cfg.n_head; h++) {
            kvh_head_cache *x = kvh_kvcache_head(&cpu->cache, 0, l, h), *y = kvh_kvcache_head(&gpu->cache, 0, l, h);
            cr_assert_eq(x->n, y->n);
            for (uint32_t j = 0; j < x->n; j++) {
                cr_assert_eq(x->pos[j], y->pos[j], "slot order differs without eviction");
                if (x->score) {
                    cr_assert(fabsf(x->score[j] - y->score[j]) <= 2e-2f * (1.0f + fabsf(x->score[j])),
                              "layer %d head %d slot %u: score cpu %.5g cuda %.5g", l, h, j, x->score[j], y->score[j]);
                    checked++;
                }
                if (x->obs_score) {
                    cr_assert(fabsf(x->obs_score[j] - y->obs_score[j]) <= 2e-2f * (1.0f + fabsf(x->obs_score[j])),
                              "layer %d head %d slot %u: obs score cpu %.5g cuda %.5g", l, h, j, x->obs_score[j],
                              y->obs_score[j]);
                    checked++;
                }
            }
        }
    }
    cr_assert_gt(checked, 0, "the plugin asked for no scores");
    free(lc);
    free(lg);
    kvh_session_free(cpu);
    kvh_session_free(gpu);
    kvh_config_free(&c1);
    kvh_config_free(&c2);
    kvh_model_free(&m);
}

Test(cuda, scores_h2o) { scores_run("h2o.so", "[cache]\nbudget = 256\n[h2o]\n"); }
Test(cuda, scores_pyramid) { scores_run("pyramid.so", "[cache]\nbudget = 256\n[pyramid]\nbeta = 1\n"); /* beta 1: flat schedule, no eviction */ }

/* ---- score-report policies (ABI 1.3) ------------------------------------------------------------- */

/* What a session's score_report hooks received in its last forward: per (seq, layer, head) the report
 * buffer's contents (kvcache.h layout) as the policy read them. Installed in front of the router's hook
 * (cache.layer[l].policy_report), which it then calls as before. */
#define CAP_S 2
#define CAP_L 2
#define CAP_H 4
typedef int (*report_fn)(void *, kvh_kvcache *, int, int, int, const int32_t *, kvh_err *);
typedef struct report_cap {
    report_fn orig[CAP_L];
    float *data[CAP_S][CAP_L][CAP_H];
    size_t len[CAP_S][CAP_L][CAP_H];
    uint32_t n[CAP_S][CAP_L][CAP_H];
    int T[CAP_S][CAP_L], calls[CAP_S][CAP_L];
    int32_t q_last[CAP_S][CAP_L];
} report_cap;
static report_cap *g_cap; /* the capture of the session being stepped */

static int capture_report(void *ctx, kvh_kvcache *c, int seq, int layer, int T, const int32_t *qpos, kvh_err *err) {
    report_cap *k = g_cap;
    cr_assert(seq < CAP_S && layer < CAP_L && c->n_head <= CAP_H);
    const uint32_t rows = c->layer[layer].report_rows, R = (uint32_t)T < rows ? (uint32_t)T : rows;
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, seq, layer, h);
        const size_t len = T == 1 ? hc->n : (size_t)hc->n * (1 + R);
        k->data[seq][layer][h] = realloc(k->data[seq][layer][h], len * sizeof(float));
        memcpy(k->data[seq][layer][h], hc->report, len * sizeof(float));
        k->len[seq][layer][h] = len;
        k->n[seq][layer][h] = hc->n;
    }
    k->T[seq][layer] = T;
    k->calls[seq][layer]++;
    k->q_last[seq][layer] = qpos[T - 1];
    return k->orig[layer](ctx, c, seq, layer, T, qpos, err);
}

static void cap_install(report_cap *k, kvh_session *s) {
    memset(k, 0, sizeof *k);
    cr_assert(s->cache.n_layer <= CAP_L);
    for (int l = 0; l < s->cache.n_layer; l++) {
        cr_assert(s->cache.layer[l].report, "layer %d's policy did not ask for the score report", l);
        k->orig[l] = s->cache.layer[l].policy_report;
        s->cache.layer[l].policy_report = capture_report;
    }
}

static void cap_free(report_cap *k) {
    for (int s = 0; s < CAP_S; s++)
        for (int l = 0; l < CAP_L; l++)
            for (int h = 0; h < CAP_H; h++) free(k->data[s][l][h]);
}

static void cap_forward(report_cap *k, kvh_session *s, int B, const int *seq, const int32_t *const *toks, const int *n,
                        float *out) {
    for (int b = 0; b < B; b++)
        for (int l = 0; l < CAP_L; l++) k->calls[seq[b]][l] = 0;
    g_cap = k;
    forward(s, B, seq, toks, n, false, out);
    g_cap = NULL;
}

/* The GPU's reports are probability rows (each sums to 1; column sums total T) and equal the CPU's within
 * the fp16 tolerance of the score accumulators (2e-2 relative to 1 + |cpu|). Returns the largest diff. */
static double cap_compare(const report_cap *g, const report_cap *c, int B, int L, int NH, const char *what, int step) {
    double worst = 0;
    for (int s = 0; s < B; s++)
        for (int l = 0; l < L; l++) {
            cr_assert_eq(g->calls[s][l], 1, "%s step %d seq %d layer %d: %d score_report calls on cuda", what, step, s,
                         l, g->calls[s][l]);
            cr_assert_eq(c->calls[s][l], 1);
            cr_assert_eq(g->T[s][l], c->T[s][l]);
            cr_assert_eq(g->q_last[s][l], c->q_last[s][l], "%s step %d: query positions differ", what, step);
            const int T = g->T[s][l];
            for (int h = 0; h < NH; h++) {
                const size_t len = g->len[s][l][h];
                const uint32_t n = g->n[s][l][h];
                cr_assert_eq(len, c->len[s][l][h], "%s step %d seq %d layer %d head %d: report of %zu floats on cuda, "
                             "%zu on cpu", what, step, s, l, h, len, c->len[s][l][h]);
                const float *x = g->data[s][l][h], *y = c->data[s][l][h];
                for (size_t i = 0; i < len; i++) {
                    const double d = fabs((double)x[i] - (double)y[i]);
                    if (d > worst) worst = d;
                    cr_assert(d <= 2e-2 * (1.0 + fabs((double)y[i])),
                              "%s step %d seq %d layer %d head %d: report[%zu] (%s %zu) cuda %.6g cpu %.6g", what,
                              step, s, l, h, i, i < n && T > 1 ? "column sum" : "row", i % n, x[i], y[i]);
                }
                for (size_t r = T > 1 ? 1 : 0; r < len / n; r++) { /* every row a distribution */
                    double sum = 0;
                    for (uint32_t j = 0; j < n; j++) sum += x[r * n + j];
                    cr_assert(fabs(sum - 1.0) < 1e-3, "%s step %d seq %d layer %d head %d: cuda row %zu sums to %.6g",
                              what, step, s, l, h, r, sum);
                }
                if (T > 1) {
                    double col = 0;
                    for (uint32_t j = 0; j < n; j++) col += x[j];
                    cr_assert(fabs(col - T) < 1e-3 * T, "%s step %d: cuda column sums total %.6g, not %d", what, step,
                              col, T);
                }
            }
        }
    return worst;
}

/* Two sequences (prompts of 40 and 5 tokens: more and fewer queries than scissorhands' 32 history rows),
 * then 12 batched greedy steps, no eviction (budget above the length, so slots stay in the same order on
 * both backends); every forward's reports compared. Run with the decode graph and without. */
static void report_match_run(const char *plugin_file, const char *ini) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(plugin_file);
    kvh_model m;
    random_model(&m, small_config(64, 4, 2), "small-report");
    const int V = m.cfg.n_vocab, B = 2;
    for (int graph = 1; graph >= 0; graph--) {
        setenv("KVH_CUDA_GRAPH", graph ? "1" : "0", 1);
        kvh_run_config c1, c2;
        kvh_session *cpu = open_session(&m, "cpu", B, ini, &c1);
        kvh_session *gpu = open_session(&m, "cuda", B, ini, &c2);
        report_cap *kc = malloc(sizeof *kc), *kg = malloc(sizeof *kg);
        cap_install(kc, cpu);
        cap_install(kg, gpu);
        float *lc = malloc((size_t)B * V * sizeof(float)), *lg = malloc((size_t)B * V * sizeof(float));
        int seq[2] = {0, 1}, n[2] = {40, 5};
        int32_t t0[40], t1[5];
        fill_tokens(t0, 40, V, 21u);
        fill_tokens(t1, 5, V, 22u);
        const int32_t *tp[2] = {t0, t1};
        cap_forward(kc, cpu, B, seq, tp, n, lc);
        cap_forward(kg, gpu, B, seq, tp, n, lg);
        double worst = cap_compare(kg, kc, B, m.cfg.n_layer, m.cfg.n_head, plugin_file, 0);
        for (int st = 1; st <= 12; st++) {
            int32_t next[2] = {argmax(lc, V), argmax(lc + V, V)};
            const int32_t *np[2] = {&next[0], &next[1]};
            int one[2] = {1, 1};
            cap_forward(kc, cpu, B, seq, np, one, lc);
            cap_forward(kg, gpu, B, seq, np, one, lg);
            double w = cap_compare(kg, kc, B, m.cfg.n_layer, m.cfg.n_head, plugin_file, st);
            if (w > worst) worst = w;
        }
        printf("%s (graph %s): reports match the cpu, largest |diff| %.3g\n", plugin_file, graph ? "on" : "off", worst);
        expect_graphs(gpu, plugin_file, 12);
        cap_free(kc);
        cap_free(kg);
        free(kc);
        free(kg);
        free(lc);
        free(lg);
        kvh_session_free(cpu);
        kvh_session_free(gpu);
        kvh_config_free(&c1);
        kvh_config_free(&c2);
    }
    unsetenv("KVH_CUDA_GRAPH");
    kvh_model_free(&m);
}

Test(cuda, report_tova_matches_cpu) { report_match_run("tova.so", "[cache]\nbudget = 256\n[tova]\n"); }
Test(cuda, report_scissorhands_matches_cpu) {
    report_match_run("scissorhands.so", "[cache]\nbudget = 256\n[scissorhands]\n");
}

/* tests/plugins/tp_report.so fails the run at the first broken promise of the ABI 1.3 host (insert sees
 * zeroed metadata; rows are distributions masked by position; column sums are the rows' sums when every
 * row is delivered; metadata moves with its slot through compaction; every slot reported before evict):
 * the same runs as test_score_report's, on the device. */
Test(cuda, report_contract_tp_report) {
    REQUIRE_CUDA();
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/plugins/tp_report.so", KVH_BUILD_DIR);
    if (access(path, R_OK) != 0) cr_skip_test("%s not built", path);
    kvh_model_config mc = small_config(32, 4, 3);
    kvh_model m;
    random_model(&m, mc, "small-contract");
    const char *variants[][4] = {
        {"cache.budget=12", "cache.slack=0", "tp_report.rows=4", NULL},
        {"cache.budget=12", "cache.slack=5", "tp_report.rows=1", NULL},
        {"cache.budget=20", "cache.slack=3", "tp_report.rows=64", "cache.prefill_chunk=7"},
    };
    const int V = m.cfg.n_vocab, B = 3;
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        kvh_session_options o = kvh_session_default_options();
        o.backend = "cuda";
        o.n_seq = B;
        o.plugin_path = KVH_BUILD_DIR "/tests/plugins";
        kvh_session *s = NULL;
        kvh_err err = {{0}};
        cr_assert_eq(kvh_test_session(&s, &m, "tp_report.so", variants[v], variants[v][3] ? 4 : 3, &o, &err), 0,
                     "variant %zu: %s", v, err.msg);
        cr_assert_str_eq(s->backend->ops->name, "cuda");
        float *lg = malloc((size_t)B * V * sizeof(float));
        int seq[3] = {0, 1, 2}, n[3] = {3, 17, 40};
        int32_t p[3][40];
        const int32_t *pp[3];
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < n[b]; t++) p[b][t] = (int32_t)((t * 37 + b * 11 + 5) % V);
            pp[b] = p[b];
        }
        kvh_batch pre = {.n = B, .seq = seq, .tokens = pp, .n_tokens = n, .all_logits = false};
        cr_assert_eq(kvh_session_forward(s, &pre, lg, &err), 0, "variant %zu prefill: %s", v, err.msg);
        for (int st = 0; st < 80; st++) {
            int32_t next[3];
            const int32_t *np[3];
            int one[3] = {1, 1, 1};
            for (int b = 0; b < B; b++) {
                next[b] = argmax(lg + (size_t)b * V, V);
                np[b] = &next[b];
            }
            kvh_batch dec = {.n = B, .seq = seq, .tokens = np, .n_tokens = one, .all_logits = false};
            cr_assert_eq(kvh_session_forward(s, &dec, lg, &err), 0, "variant %zu step %d: %s", v, st, err.msg);
        }
        cr_assert_gt(kvh_router_evict_calls(s->router), 0, "variant %zu never evicted", v);
        free(lg);
        kvh_session_free(s);
    }
    kvh_model_free(&m);
}

/* The same evictions and tokens as the CPU on the tiny trained model: live counts identical, at least 90%
 * of kept positions shared (near-tied attention may swap a victim under fp16 noise), greedy tokens agree
 * on at least 90% of the rows. */
static void report_tiny_run(const char *plugin_file, const char *ini) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(plugin_file);
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    eviction_run_model(&m, plugin_file, ini, false, ARGMAX_AGREE);
    kvh_model_free(&m);
}

Test(cuda, eviction_tova_tiny_model) { report_tiny_run("tova.so", "[cache]\nbudget = 24\nslack = 4\n[tova]\n"); }
Test(cuda, eviction_tova_per_head_tiny_model) {
    report_tiny_run("tova.so", "[cache]\nbudget = 24\nslack = 4\n[tova]\nper_head = true\n");
}
Test(cuda, eviction_scissorhands_tiny_model) {
    report_tiny_run("scissorhands.so", "[cache]\nbudget = 24\nslack = 4\n[scissorhands]\n");
}

/* Report traffic only for layers whose policy asked: tova on layer 0, h2o (no report) on layer 1, prefill
 * of 30 then 5 decode steps, no eviction. Each forward makes exactly one transfer holding exactly layer
 * 0's reports (prefill: column sums + tova's 1 row, 2 x 30 floats per head; decode: n floats per head);
 * with h2o alone nothing is computed or copied. */
Test(cuda, report_traffic_only_where_asked) {
    REQUIRE_CUDA();
#ifdef KVH_HAVE_CUDA
    REQUIRE_PLUGINS("tova.so,h2o.so");
    kvh_model m;
    random_model(&m, small_config(64, 4, 2), "small-traffic");
    const int V = m.cfg.n_vocab, NH = m.cfg.n_head;
    const char *inis[2] = {"[cache]\nbudget = 256\n[tova]\nlayers = 0\n[h2o]\nlayers = 1\n",
                           "[cache]\nbudget = 256\n[h2o]\n"};
    for (int v = 0; v < 2; v++) {
        kvh_run_config cfg;
        kvh_session *gpu = open_session(&m, "cuda", 1, inis[v], &cfg);
        cr_assert_eq(gpu->cache.layer[0].report, v == 0);
        cr_assert(!gpu->cache.layer[1].report);
        float *lg = malloc((size_t)V * sizeof(float));
        int32_t toks[30];
        fill_tokens(toks, 30, V, 31u);
        int seq = 0, n = 30;
        const int32_t *tp = toks;
        uint64_t want_bytes = 0;
        forward(gpu, 1, &seq, &tp, &n, false, lg);
        if (v == 0) want_bytes += (uint64_t)NH * 30 * 2 * sizeof(float);
        for (int st = 1; st <= 5; st++) {
            int32_t next = argmax(lg, V);
            const int32_t *np = &next;
            int one = 1;
            forward(gpu, 1, &seq, &np, &one, false, lg);
            if (v == 0) want_bytes += (uint64_t)NH * (30 + st) * sizeof(float);
        }
        kvh_cuda_report_stats rs;
        cr_assert_eq(kvh_cuda_report_stats_get(gpu->backend, &rs), 0);
        printf("report traffic (%s): %llu layer-steps, %llu copies, %llu bytes\n", v == 0 ? "tova layer 0 + h2o" : "h2o",
               (unsigned long long)rs.layer_steps, (unsigned long long)rs.copies, (unsigned long long)rs.bytes);
        cr_assert_eq(rs.layer_steps, v == 0 ? 6u : 0u);
        cr_assert_eq(rs.copies, v == 0 ? 6u : 0u);
        cr_assert_eq(rs.bytes, want_bytes, "%llu report bytes copied, the reporting layer needs %llu",
                     (unsigned long long)rs.bytes, (unsigned long long)want_bytes);
        for (int h = 0; h < NH; h++) cr_assert_null(kvh_kvcache_head(&gpu->cache, 0, 1, h)->report);
        free(lg);
        kvh_session_free(gpu);
        kvh_config_free(&cfg);
    }
    kvh_model_free(&m);
#endif
}

/* ---- quantized stores (int8.so / int4.so) ---------------------------------------------------------- */

#ifdef KVH_HAVE_CUDA
static float urand(unsigned *st) {
    *st = *st * 1664525u + 1013904223u;
    return (float)((*st >> 8) & 0xffffffu) / 16777216.0f; /* [0, 1) */
}

/* Row r of a test batch: random values of several magnitudes, and edge rows (zeros, signed zeros, a
 * constant, tiny values whose scales are fp16 subnormals, values that saturate the fp16 scale). */
static void encode_test_row(float *x, int HS, int r, unsigned *st) {
    const float mags[] = {1.0f, 0.01f, 37.0f, 3e-6f, 1000.0f};
    switch (r) {
    case 0: for (int d = 0; d < HS; d++) x[d] = 0.0f; return;
    case 1: for (int d = 0; d < HS; d++) x[d] = (d % 3 == 0) ? -0.0f : (d % 3 == 1 ? 0.0f : 0.5f); return;
    case 2: for (int d = 0; d < HS; d++) x[d] = 1.25f; return;
    case 3: for (int d = 0; d < HS; d++) x[d] = -3.0f; return;
    case 4: for (int d = 0; d < HS; d++) x[d] = (urand(st) - 0.5f) * 1e-7f; return;
    case 5: for (int d = 0; d < HS; d++) x[d] = (urand(st) - 0.5f) * 2e7f; return;
    case 6: for (int d = 0; d < HS; d++) x[d] = (float)(d % 7) - 3.0f; return; /* exact ties at .5 steps */
    default: break;
    }
    const float mag = mags[r % 5];
    for (int d = 0; d < HS; d++) {
        float v = (urand(st) - 0.5f) * 2.0f * mag;
        if (urand(st) < 0.05f) v *= 20.0f; /* outliers */
        x[d] = v;
    }
}
#endif

/* The GPU encoder writes exactly the bytes kvq_encode writes, for every format and several group sizes
 * (within a 32-lane chunk, a whole chunk, spanning chunks, crossing chunk boundaries, odd). */
Test(cuda, quant_encode_bytes_match_kvq_encode) {
    REQUIRE_CUDA();
#ifdef KVH_HAVE_CUDA
    static const int shapes[][2] = {{64, 32}, {64, 64}, {64, 8}, {96, 48}, {128, 32}, {12, 4}, {12, 6}, {16, 16},
                                    {100, 10}, {64, 2}};
    const int n_rows = 64;
    unsigned st = 12345u;
    int checked = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int bits = 8; bits >= 4; bits -= 4)
            for (int asym = 0; asym <= 1; asym++) {
                const int HS = shapes[si][0], G = shapes[si][1];
                kvq_format f;
                char msg[300];
                if (kvq_format_init(&f, bits, G, asym, HS, msg, sizeof msg) != 0) continue; /* e.g. odd group, int4 */
                float *rows = malloc((size_t)n_rows * HS * sizeof(float));
                unsigned char *ref = malloc((size_t)n_rows * f.slot_bytes);
                unsigned char *gpu = malloc((size_t)n_rows * f.slot_bytes);
                for (int r = 0; r < n_rows; r++) {
                    encode_test_row(rows + (size_t)r * HS, HS, r, &st);
                    kvq_encode(&f, rows + (size_t)r * HS, ref + (size_t)r * f.slot_bytes);
                }
                kvh_err err = {{0}};
                cr_assert_eq(kvh_cuda_quant_encode_rows(rows, n_rows, HS, bits, G, asym, gpu, &err), 0, "%s", err.msg);
                for (int r = 0; r < n_rows; r++)
                    for (uint32_t b = 0; b < f.slot_bytes; b++) {
                        const size_t i = (size_t)r * f.slot_bytes + b;
                        cr_assert_eq(gpu[i], ref[i],
                                     "bits %d %s HS %d group %d row %d: slot byte %u is 0x%02x on the GPU, 0x%02x "
                                     "from kvq_encode (%s)",
                                     bits, asym ? "asym" : "sym", HS, G, r, b, gpu[i], ref[i],
                                     b < f.header_bytes ? "header" : "values");
                    }
                checked++;
                free(rows);
                free(ref);
                free(gpu);
            }
    cr_assert_gt(checked, 30);
    printf("GPU encoder: %d formats x %d rows byte-identical to kvq_encode\n", checked, n_rows);
#endif
}

static void quant_decode_run(const char *store, const char *ini_tail, bool tiny, double tol, double agree) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(store);
    kvh_model m;
    kvh_err err = {{0}};
    const char *name;
    if (tiny) {
        const char *dir = kvh_test_tiny_model_dir();
        if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
        cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
        name = "gpt2-tiny-wt";
    } else {
        cr_assert_eq(kvh_model_load(&m, "random:gpt2-medium", &err), 0, "%s", err.msg);
        name = "random:gpt2-medium";
    }
    char ini[256], what[300];
    snprintf(ini, sizeof ini, "[%.*s]\n%s", (int)(strlen(store) - 3), store, ini_tail);
    snprintf(what, sizeof what, "%s %s %s", name, store, ini_tail);
    /* 160 > one tile of 128 keys: several tiles and splits over packed slots */
    compare_decode_tol(&m, what, 160, 16, ini, tol, agree);
    kvh_model_free(&m);
}

#define INT4_NRMSE_TOL 8e-2
#define INT4_ARGMAX_AGREE 0.8

Test(cuda, int8_gpt2_medium_decode) { quant_decode_run("int8.so", "", false, NRMSE_TOL, ARGMAX_AGREE); }
Test(cuda, int8_asym_gpt2_medium_decode) {
    quant_decode_run("int8.so", "asymmetric = true\n", false, NRMSE_TOL, ARGMAX_AGREE);
}
Test(cuda, int4_gpt2_medium_decode) { quant_decode_run("int4.so", "", false, INT4_NRMSE_TOL, INT4_ARGMAX_AGREE); }
Test(cuda, int4_asym_group16_gpt2_medium_decode) {
    quant_decode_run("int4.so", "asymmetric = true\ngroup = 16\n", false, INT4_NRMSE_TOL, INT4_ARGMAX_AGREE);
}
Test(cuda, int8_tiny_model_decode) { quant_decode_run("int8.so", "", true, NRMSE_TOL, ARGMAX_AGREE); }
Test(cuda, int4_tiny_model_decode) { quant_decode_run("int4.so", "", true, INT4_NRMSE_TOL, INT4_ARGMAX_AGREE); }

/* Eviction over packed slots: compaction moves whole slots of the layer's slot_bytes on the device.
 * HS 16 (C 64, NH 4), so the groups are 16 / 8. */
Test(cuda, eviction_window_int8_same_positions) {
    eviction_run_cfg("window.so,int8.so", "[cache]\nbudget = 16\nslack = 4\n[window]\n[int8]\ngroup = 16\n",
                     small_config(64, 4, 2), true);
}
Test(cuda, eviction_h2o_int8_positions) {
    eviction_run_cfg("h2o.so,int8.so", "[cache]\nbudget = 16\nslack = 4\n[h2o]\n[int8]\ngroup = 16\n",
                     small_config(64, 4, 2), false);
}
Test(cuda, eviction_h2o_int4_asym_positions) {
    eviction_run_cfg("h2o.so,int4.so",
                     "[cache]\nbudget = 16\nslack = 4\n[h2o]\n[int4]\ngroup = 8\nasymmetric = true\n",
                     small_config(64, 4, 2), false);
}

/* A store the CUDA backend has no kernel for fails cleanly at the first forward, naming the store. */
static void store_refused(const char *plugin_file, const char *ini, const char *expect) {
    REQUIRE_CUDA();
    REQUIRE_PLUGINS(plugin_file);
    kvh_model m;
    random_model(&m, small_config(64, 2, 1), "small-store");
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_string(&cfg, ini, "test.ini", &err), 0, "%s", err.msg);
    kvh_session_options o = kvh_session_default_options();
    o.backend = "cuda";
    kvh_session *s = NULL;
    if (kvh_session_create(&s, &m, &cfg, &o, &err) != 0) {
        kvh_config_free(&cfg);
        kvh_model_free(&m);
        cr_skip_test("the store does not start here (%s), so its refusal cannot be checked", err.msg);
    }
    int32_t t[3] = {1, 2, 3};
    const int32_t *tp = t;
    int seq = 0, n = 3;
    float *lg = malloc((size_t)m.cfg.n_vocab * sizeof(float));
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, lg, &err), -1);
    cr_assert(strstr(err.msg, expect) && strstr(err.msg, "HINT"), "message: %s", err.msg);
    printf("refused: %s\n", err.msg);
    free(lg);
    kvh_session_free(s);
    kvh_config_free(&cfg);
    kvh_model_free(&m);
}

Test(cuda, store_kivi_refused) {
    store_refused("int8.so", "[int8]\nkivi = true\n", "no kernel for store 'int8' with kivi = true");
}
Test(cuda, store_minicache_refused) { store_refused("minicache.so", "[minicache]\n", "no kernel for store 'minicache'"); }
