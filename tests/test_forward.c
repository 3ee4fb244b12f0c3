/* test_forward.c — the CPU forward pass against independent references and against itself:
 * golden logits and greedy continuations of the tiny model (PyTorch float32 reference), cached decode vs
 * --no-cache recompute, a ragged batch vs each sequence alone. The golden logits are checked at every
 * CPU kernel level this machine can run (KVH_ISA: portable, avx2, avx512 — each test is its own process,
 * so the level is set before the first kernel call). */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include <cjson/cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu_features.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "model/sampler.h"
#include "runtime/session.h"
#include "util/util.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static kvh_session *open_session(const kvh_model *m, int n_seq, bool no_cache) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = n_seq;
    o.no_cache = no_cache;
    o.threads = 2;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    int rc = kvh_session_create(&s, m, NULL, &o, &err);
    cr_assert_eq(rc, 0, "session: %s", err.msg);
    return s;
}

/* Runs one entry (seq, tokens) and returns the last-token logits into out[V]. */
static void run_one(kvh_session *s, int seq, const int32_t *toks, int n, float *out) {
    kvh_err err = {{0}};
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &toks, .n_tokens = &n, .all_logits = false};
    int rc = kvh_session_forward(s, &b, out, &err);
    cr_assert_eq(rc, 0, "forward: %s", err.msg);
}

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 128, .n_embd = 48, .n_head = 4, .n_layer = 3,
                          .n_inner = 192, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

/* ---- golden logits of the tiny model ---------------------------------------------------------- */

static cJSON *load_golden(void) {
    const char *p = kvh_test_shared_path("models/gpt2-tiny-wt/golden.json");
    if (!p) return NULL;
    char *text = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_read_file(p, 1 << 20, &text, NULL, &err), 0, "%s", err.msg);
    cJSON *g = cJSON_Parse(text);
    free(text);
    cr_assert_not_null(g, "golden.json does not parse");
    return g;
}

static int32_t *ids_of(const cJSON *arr, int *n) {
    *n = cJSON_GetArraySize(arr);
    int32_t *ids = malloc((size_t)*n * sizeof *ids);
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)cJSON_GetArrayItem(arr, i)->valuedouble;
    return ids;
}

static void check_golden_logits(void) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    cJSON *g = load_golden();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int V = m.cfg.n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    const cJSON *prompts = cJSON_GetObjectItem(g, "prompts");
    int n_checked = 0;
    for (int pi = 0; pi < cJSON_GetArraySize(prompts); pi++) {
        const cJSON *p = cJSON_GetArrayItem(prompts, pi);
        int n;
        int32_t *ids = ids_of(cJSON_GetObjectItem(p, "ids"), &n);
        kvh_session *s = open_session(&m, 1, false);
        run_one(s, 0, ids, n, logits);
        const cJSON *lp = cJSON_GetObjectItem(p, "last_position_logits");
        const cJSON *top = cJSON_GetObjectItem(lp, "top10");
        for (int k = 0; k < cJSON_GetArraySize(top); k++) {
            const cJSON *e = cJSON_GetArrayItem(top, k);
            int id = (int)cJSON_GetObjectItem(e, "id")->valuedouble;
            double want = cJSON_GetObjectItem(e, "logit")->valuedouble;
            cr_expect(fabs(logits[id] - want) < 1e-4, "prompt %d top id %d: %f vs golden %f", pi, id, logits[id], want);
            n_checked++;
        }
        const cJSON *probe_ids = cJSON_GetObjectItem(lp, "probe_ids");
        const cJSON *probe_logits = cJSON_GetObjectItem(lp, "probe_logits");
        for (int k = 0; k < cJSON_GetArraySize(probe_ids); k++) {
            int id = (int)cJSON_GetArrayItem(probe_ids, k)->valuedouble;
            double want = cJSON_GetArrayItem(probe_logits, k)->valuedouble;
            cr_expect(fabs(logits[id] - want) < 1e-4, "prompt %d probe id %d: %f vs golden %f", pi, id, logits[id], want);
            n_checked++;
        }
        double mx = logits[kvh_argmax(logits, V)], sum = 0;
        for (int i = 0; i < V; i++) sum += exp((double)logits[i] - mx);
        double lse = mx + log(sum);
        double want_lse = cJSON_GetObjectItem(lp, "logsumexp")->valuedouble;
        cr_expect(fabs(lse - want_lse) < 1e-4, "prompt %d logsumexp %f vs golden %f", pi, lse, want_lse);
        kvh_session_free(s);
        free(ids);
    }
    cr_assert_gt(n_checked, 50, "golden.json had too few values to check");
    free(logits);
    kvh_model_free(&m);
    cJSON_Delete(g);
}

Test(forward, golden_logits_tiny_model) { check_golden_logits(); }

/* The same at a lower kernel level (vector GELU, few-row products and OpenBLAS's core all follow it). */
static void golden_at_level(const char *level, kvh_isa isa) {
    setenv("KVH_ISA", level, 1); /* before anything reads it: the level is fixed at the first query */
    if (kvh_cpu_isa_detected() < isa) cr_skip_test("this CPU cannot run the %s kernels", level);
    cr_assert_eq(kvh_cpu_isa(), isa, "KVH_ISA=%s was not taken", level);
    check_golden_logits();
}
Test(forward, golden_logits_tiny_model_portable_kernels) { golden_at_level("portable", KVH_ISA_PORTABLE); }
Test(forward, golden_logits_tiny_model_avx2_kernels) { golden_at_level("avx2", KVH_ISA_AVX2); }

/* Greedy continuation through the cache (and through --no-cache) equals the reference's. */
static void check_greedy(bool no_cache) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    cJSON *g = load_golden();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int V = m.cfg.n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    const cJSON *prompts = cJSON_GetObjectItem(g, "prompts");
    for (int pi = 0; pi < cJSON_GetArraySize(prompts); pi++) {
        const cJSON *p = cJSON_GetArrayItem(prompts, pi);
        int n, n_want;
        int32_t *ids = ids_of(cJSON_GetObjectItem(p, "ids"), &n);
        int32_t *want = ids_of(cJSON_GetObjectItem(cJSON_GetObjectItem(p, "greedy_20"), "ids"), &n_want);
        kvh_session *s = open_session(&m, 1, no_cache);
        run_one(s, 0, ids, n, logits);
        for (int t = 0; t < n_want; t++) {
            int32_t next = kvh_argmax(logits, V);
            cr_expect_eq(next, want[t], "prompt %d step %d: got %d, golden %d (%s)", pi, t, next, want[t],
                         no_cache ? "no-cache" : "cached");
            if (next != want[t]) break;
            run_one(s, 0, &next, 1, logits);
        }
        kvh_session_free(s);
        free(ids);
        free(want);
    }
    free(logits);
    kvh_model_free(&m);
    cJSON_Delete(g);
}

Test(forward, golden_greedy_cached) { check_greedy(false); }
Test(forward, golden_greedy_no_cache) { check_greedy(true); }

/* ---- cached decode == --no-cache recompute, 64 steps ---------------------------------------- */

static void cached_vs_recompute(const kvh_model *m, const int32_t *prompt, int n_prompt, double tol) {
    const int V = m->cfg.n_vocab;
    float *a = malloc((size_t)V * sizeof(float));
    float *b = malloc((size_t)V * sizeof(float));
    kvh_session *cached = open_session(m, 1, false);
    kvh_session *recompute = open_session(m, 1, true);
    run_one(cached, 0, prompt, n_prompt, a);
    run_one(recompute, 0, prompt, n_prompt, b);
    double worst = kvh_test_compare("prefill logits", a, b, (size_t)V, tol);
    cr_assert_leq(worst, tol);
    for (int step = 0; step < 64; step++) {
        int32_t next = kvh_argmax(a, V);
        run_one(cached, 0, &next, 1, a);
        run_one(recompute, 0, &next, 1, b);
        char what[64];
        snprintf(what, sizeof what, "decode step %d", step);
        double d = kvh_test_compare(what, a, b, (size_t)V, tol);
        if (d > worst) worst = d;
        cr_assert_leq(d, tol, "step %d: cached and recomputed logits differ by %g", step, d);
    }
    fprintf(stderr, "cached vs no-cache: max |diff| over 64 steps = %.3g\n", worst);
    kvh_session_free(cached);
    kvh_session_free(recompute);
    free(a);
    free(b);
}

Test(forward, cached_matches_no_cache_tiny_model) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    int32_t prompt[] = {464, 2106, 286, 262, 1748, 373, 257, 890, 290}; /* "The history of the city was a long and" */
    cached_vs_recompute(&m, prompt, 9, 1e-5);
    kvh_model_free(&m);
}

Test(forward, cached_matches_no_cache_random_small) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 7, "random:small", &err), 0, "%s", err.msg);
    int32_t prompt[] = {1, 5, 9, 33, 2, 96, 40};
    cached_vs_recompute(&m, prompt, 7, 1e-5);
    kvh_model_free(&m);
}

/* ---- a ragged batch of 3 == each sequence alone -------------------------------------------- */

static void batch_vs_alone(const kvh_model *m, double tol) {
    const int V = m->cfg.n_vocab;
    int32_t p0[] = {11, 22, 33, 44, 55, 66, 77, 88, 90, 12, 13};
    int32_t p1[] = {3};
    int32_t p2[] = {5, 6, 7, 8, 9};
    const int32_t *prompts[3] = {p0, p1, p2};
    int lens[3] = {11, 1, 5};
    int seqs[3] = {0, 1, 2};
    float *batched = malloc(3 * (size_t)V * sizeof(float));
    float *alone = malloc((size_t)V * sizeof(float));
    kvh_session *sb = open_session(m, 3, false);
    kvh_err err = {{0}};
    kvh_batch b = {.n = 3, .seq = seqs, .tokens = prompts, .n_tokens = lens, .all_logits = false};
    cr_assert_eq(kvh_session_forward(sb, &b, batched, &err), 0, "%s", err.msg);
    /* then 8 decode steps of the whole batch, greedy, compared with each sequence run alone */
    int32_t hist[3][32];
    int hl[3];
    for (int i = 0; i < 3; i++) {
        memcpy(hist[i], prompts[i], (size_t)lens[i] * sizeof(int32_t));
        hl[i] = lens[i];
    }
    for (int step = 0; step < 8; step++) {
        int32_t next[3];
        const int32_t *np[3];
        int ones[3] = {1, 1, 1};
        for (int i = 0; i < 3; i++) {
            next[i] = kvh_argmax(batched + (size_t)i * V, V);
            hist[i][hl[i]++] = next[i];
            np[i] = &next[i];
        }
        kvh_batch d = {.n = 3, .seq = seqs, .tokens = np, .n_tokens = ones, .all_logits = false};
        cr_assert_eq(kvh_session_forward(sb, &d, batched, &err), 0, "%s", err.msg);
    }
    for (int i = 0; i < 3; i++) {
        kvh_session *sa = open_session(m, 1, false);
        run_one(sa, 0, hist[i], lens[i], alone);
        for (int t = lens[i]; t < hl[i]; t++) run_one(sa, 0, &hist[i][t], 1, alone);
        char what[64];
        snprintf(what, sizeof what, "sequence %d after 8 steps", i);
        double d = kvh_test_compare(what, batched + (size_t)i * V, alone, (size_t)V, tol);
        cr_assert_leq(d, tol, "sequence %d: batched vs alone differ by %g", i, d);
        kvh_session_free(sa);
    }
    kvh_session_free(sb);
    free(batched);
    free(alone);
}

Test(forward, ragged_batch_matches_alone_random_small) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 11, "random:small", &err), 0, "%s", err.msg);
    batch_vs_alone(&m, 1e-5);
    kvh_model_free(&m);
}

Test(forward, ragged_batch_matches_alone_tiny_model) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    batch_vs_alone(&m, 1e-4);
    kvh_model_free(&m);
}

/* ---- bad input -------------------------------------------------------------------------------- */

Test(forward, token_out_of_range_is_an_error) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 3, "random:small", &err), 0, "%s", err.msg);
    kvh_session *s = open_session(&m, 1, false);
    int32_t bad[] = {1, 97};
    int seq = 0, n = 2;
    const int32_t *tp = bad;
    float *logits = malloc((size_t)c.n_vocab * sizeof(float));
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), -1);
    cr_assert(strstr(err.msg, "token id 97 out of range"), "message was: %s", err.msg);
    kvh_session_free(s);
    free(logits);
    kvh_model_free(&m);
}

Test(forward, past_n_positions_is_an_error) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 3, "random:small", &err), 0, "%s", err.msg);
    kvh_session *s = open_session(&m, 1, false);
    int32_t toks[129];
    for (int i = 0; i < 129; i++) toks[i] = i % 97;
    int seq = 0, n = 129;
    const int32_t *tp = toks;
    float *logits = malloc((size_t)c.n_vocab * sizeof(float));
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), -1);
    cr_assert(strstr(err.msg, "past n_positions 128"), "message was: %s", err.msg);
    kvh_session_free(s);
    free(logits);
    kvh_model_free(&m);
}

Test(forward, kv_memory_limit_is_an_error_not_a_crash) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 3, "random:small", &err), 0, "%s", err.msg);
    kvh_session_options o = kvh_session_default_options();
    o.kv_mem_limit = 4096;
    kvh_session *s = NULL;
    cr_assert_eq(kvh_session_create(&s, &m, NULL, &o, &err), 0, "%s", err.msg);
    int32_t toks[64];
    for (int i = 0; i < 64; i++) toks[i] = i;
    int seq = 0, n = 64;
    const int32_t *tp = toks;
    float *logits = malloc((size_t)c.n_vocab * sizeof(float));
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), -1);
    cr_assert(strstr(err.msg, "memory limit"), "message was: %s", err.msg);
    kvh_session_free(s);
    free(logits);
    kvh_model_free(&m);
}
