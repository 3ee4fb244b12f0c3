/* test_store_abi.c — the ABI 1.2 store contract through the real session and backend, with the test
 * store tests/plugins/tp_handle_store.so (per-token host->alloc blocks behind pointer slots):
 * append() replaces encode() and gets the right coordinates (logits equal the dense cache), release()
 * is told exactly the evicted slots (a policy evicting every few steps leaves results equal to the
 * same policy over the dense cache, and the store memory equals what the live tokens need), store
 * memory is counted in kv_bytes_held, a --mem-limit that the store's memory passes is a clean error
 * naming plugin, layer, sequence, head and hook, and a sequence reset releases everything. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "model/sampler.h"
#include "runtime/session.h"

#define TPDIR KVH_BUILD_DIR "/tests/plugins"
enum { NSEQ = 2, NEW = 30 };

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 256, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static int session_try(kvh_session **s, const kvh_model *m, const char *plugins, const char *sets, size_t limit,
                       kvh_err *err) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    int rc = 0;
    if (plugins) rc = kvh_config_add_plugins_list(&cfg, plugins, err);
    char buf[256];
    snprintf(buf, sizeof buf, "%s", sets ? sets : "");
    for (char *tok = strtok(buf, " "); rc == 0 && tok; tok = strtok(NULL, " ")) rc = kvh_config_set(&cfg, tok, err);
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = NSEQ;
    o.plugin_path = TPDIR;
    o.kv_mem_limit = limit;
    if (rc == 0) rc = kvh_session_create(s, m, &cfg, &o, err);
    kvh_config_free(&cfg);
    return rc;
}

static kvh_session *session(const kvh_model *m, const char *plugins, const char *sets) {
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(session_try(&s, m, plugins, sets, 0, &err), 0, "%s: %s", plugins ? plugins : "-", err.msg);
    return s;
}

/* Bytes the test store must hold for the live tokens: one block of K + V rows per token and head. */
static size_t expected_store_bytes(const kvh_session *s, size_t fixed) {
    const int HS = s->model->cfg.n_embd / s->model->cfg.n_head;
    return fixed + kvh_kvcache_live_tokens(&s->cache) * 2u * (size_t)HS * sizeof(float);
}

/* Prefill two prompts and decode NEW greedy steps; the logits of every step go to trace. After each
 * step, when fixed != SIZE_MAX, the cache's store memory must be fixed + the live tokens' blocks. */
static void run(kvh_session *s, float *trace, size_t fixed) {
    const int V = s->model->cfg.n_vocab;
    float logits[NSEQ * 97];
    int32_t prompts[NSEQ][20];
    const int32_t *pp[NSEQ];
    int lens[NSEQ] = {12, 17}, seqs[NSEQ] = {0, 1}, ones[NSEQ] = {1, 1};
    for (int b = 0; b < NSEQ; b++) {
        for (int t = 0; t < lens[b]; t++) prompts[b][t] = (int32_t)((t * 29 + b * 11 + 5) % V);
        pp[b] = prompts[b];
    }
    kvh_err err = {{0}};
    kvh_batch pre = {.n = NSEQ, .seq = seqs, .tokens = pp, .n_tokens = lens};
    cr_assert_eq(kvh_session_forward(s, &pre, logits, &err), 0, "%s", err.msg);
    int32_t next[NSEQ];
    const int32_t *np[NSEQ] = {&next[0], &next[1]};
    for (int step = 0; step < NEW; step++) {
        memcpy(trace + (size_t)step * NSEQ * V, logits, sizeof logits);
        for (int b = 0; b < NSEQ; b++) next[b] = kvh_argmax(logits + (size_t)b * V, V);
        kvh_batch d = {.n = NSEQ, .seq = seqs, .tokens = np, .n_tokens = ones};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "step %d: %s", step, err.msg);
        if (fixed != SIZE_MAX)
            cr_assert_eq(s->cache.store_bytes, expected_store_bytes(s, fixed),
                         "step %d: store holds %zu bytes, the live tokens need %zu", step, s->cache.store_bytes,
                         expected_store_bytes(s, fixed));
    }
}

static float max_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

/* The store's own fixed memory (state per layer + the shared block): what it holds with no token. */
static size_t fixed_bytes(const kvh_model *m) {
    kvh_session *s = session(m, "tp_handle_store.so", NULL);
    size_t b = s->cache.store_bytes;
    kvh_session_free(s);
    return b;
}

Test(store_abi, append_store_matches_the_dense_cache) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 3, "random:small", &err), 0, "%s", err.msg);
    const size_t n = (size_t)NEW * NSEQ * c.n_vocab;
    float *base = malloc(n * sizeof(float)), *with = malloc(n * sizeof(float));
    kvh_session *s0 = session(&m, NULL, NULL);
    run(s0, base, SIZE_MAX);
    kvh_session_free(s0);
    const size_t fixed = fixed_bytes(&m);
    cr_assert_gt(fixed, 0, "the store's create-time allocations are not counted");
    kvh_session *s1 = session(&m, "tp_handle_store.so", NULL);
    run(s1, with, fixed);
    /* bytes_held = the slots' bytes + the store's memory, and the store's part is in the peak too */
    cr_assert_geq(s1->cache.bytes_held, s1->cache.store_bytes + kvh_kvcache_live_tokens(&s1->cache) * 2 * sizeof(float *));
    cr_assert_geq(s1->cache.bytes_peak, s1->cache.bytes_held);
    /* a reset releases every token of the sequence */
    cr_assert_eq(kvh_session_reset_seq(s1, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_session_reset_seq(s1, 1, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_live_tokens(&s1->cache), 0);
    cr_assert_eq(s1->cache.store_bytes, fixed, "after reset the store still holds %zu bytes (fixed %zu)",
                 s1->cache.store_bytes, fixed);
    kvh_session_free(s1);
    float d = max_diff(base, with, n);
    cr_assert_leq(d, 1e-5f, "logits through the append store differ from the dense cache by %g", d);
    free(base);
    free(with);
    kvh_model_free(&m);
}

Test(store_abi, release_follows_policy_evictions) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 4, "random:small", &err), 0, "%s", err.msg);
    const size_t n = (size_t)NEW * NSEQ * c.n_vocab;
    float *base = malloc(n * sizeof(float)), *with = malloc(n * sizeof(float));
    const char *sets = "cache.budget=9 cache.slack=3";
    const size_t fixed = fixed_bytes(&m);
    /* h2o moves slots around (score order), so stale or wrongly released handles would show */
    kvh_session *s0 = session(&m, "h2o.so", sets);
    run(s0, base, SIZE_MAX);
    kvh_session_free(s0);
    kvh_session *s1 = session(&m, "h2o.so,tp_handle_store.so", sets);
    run(s1, with, fixed);
    for (int l = 0; l < c.n_layer; l++) cr_assert_leq(kvh_kvcache_max_live(&s1->cache, l), 12u);
    kvh_session_free(s1);
    float d = max_diff(base, with, n);
    cr_assert_leq(d, 1e-5f, "h2o over the append store differs from h2o over the dense cache by %g", d);
    free(base);
    free(with);
    kvh_model_free(&m);
}

Test(store_abi, store_memory_past_the_limit_is_a_clean_error) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 5, "random:small", &err), 0, "%s", err.msg);
    /* Room for the slots (8 bytes per token and head) of a 17-token prompt but not for the blocks the
     * store allocates per token (256 bytes each). */
    kvh_session *s = NULL;
    cr_assert_eq(session_try(&s, &m, "tp_handle_store.so", NULL, 16 * 1024, &err), 0, "%s", err.msg);
    int32_t prompt[17];
    for (int t = 0; t < 17; t++) prompt[t] = t + 1;
    const int32_t *pp[1] = {prompt};
    int len = 17, seq = 0;
    float logits[97];
    kvh_batch pre = {.n = 1, .seq = &seq, .tokens = pp, .n_tokens = &len};
    cr_assert_eq(kvh_session_forward(s, &pre, logits, &err), -1, "the store's memory passed the limit unnoticed");
    cr_assert(strstr(err.msg, "tp_handle_store"), "%s", err.msg);
    cr_assert(strstr(err.msg, "append failed"), "%s", err.msg);
    cr_assert(strstr(err.msg, "out of memory for the token at position"), "%s", err.msg);
    cr_assert(strstr(err.msg, "seq 0 head"), "%s", err.msg);
    cr_assert_leq(s->cache.bytes_held, (size_t)16 * 1024);
    kvh_session_free(s);
    /* and a limit below what the store holds before the first token fails at session creation */
    s = NULL;
    cr_assert_eq(session_try(&s, &m, "tp_handle_store.so", NULL, 16, &err), -1);
    cr_assert_null(s);
    cr_assert(strstr(err.msg, "store plugins hold before the first token"), "%s", err.msg);
    kvh_model_free(&m);
}
