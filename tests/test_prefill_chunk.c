/* test_prefill_chunk.c — [cache] prefill_chunk (session.c): a prompt fed in pieces with budgets enforced
 * after each. Without a policy the logits equal the unsplit prefill's (ragged batches, last-token and
 * all-token logits); a chunk at least the prompt is the unsplit path, bit for bit; under every policy the
 * KV bytes at peak stay within budget + slack + chunk slots per head and below the unsplit peak; and a
 * teacher-forced evaluation with one-token pieces is exactly the streaming evaluation. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "cli/evaluate.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "runtime/session.h"

static kvh_model small_model(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 256, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 21, "random:small", &err), 0, "%s", err.msg);
    return m;
}

/* A session from --plugins / --set strings (either may be NULL / empty). */
static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                                 int n_seq) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = n_seq;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err), 0, "session: %s", err.msg);
    return s;
}

/* Three ragged prompts (30, 1 and 17 tokens) as one batch; logits of the last tokens or of all. */
static const int kLens[3] = {30, 1, 17};

static float *prefill(kvh_session *s, bool all_logits) {
    const int V = s->model->cfg.n_vocab;
    static int32_t p[3][32];
    const int32_t *pp[3];
    int seqs[3] = {0, 1, 2};
    for (int b = 0; b < 3; b++) {
        for (int t = 0; t < kLens[b]; t++) p[b][t] = (int32_t)((t * 13 + b * 29 + 5) % V);
        pp[b] = p[b];
    }
    size_t rows = all_logits ? (size_t)(kLens[0] + kLens[1] + kLens[2]) : 3;
    float *logits = malloc(rows * (size_t)V * sizeof(float));
    cr_assert_not_null(logits);
    kvh_err err = {{0}};
    kvh_batch b = {.n = 3, .seq = seqs, .tokens = pp, .n_tokens = kLens, .all_logits = all_logits};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), 0, "%s", err.msg);
    return logits;
}

Test(prefill_chunk, without_policy_equals_the_unsplit_prefill) {
    kvh_model m = small_model();
    const int V = m.cfg.n_vocab;
    const char *chunk[] = {"cache.prefill_chunk=7"};
    for (int all = 0; all <= 1; all++) {
        kvh_session *whole = session_with(&m, NULL, NULL, 0, 3), *split = session_with(&m, NULL, chunk, 1, 3);
        cr_assert_eq(split->prefill_chunk, 7);
        float *a = prefill(whole, all), *b = prefill(split, all);
        size_t rows = all ? (size_t)(kLens[0] + kLens[1] + kLens[2]) : 3;
        double d = kvh_test_compare(all ? "all logits" : "last logits", a, b, rows * (size_t)V, 1e-5);
        cr_assert_leq(d, 1e-5, "%s: chunked prefill differs by %g", all ? "all logits" : "last logits", d);
        /* the cache holds the same positions afterwards: every prompt token, in order */
        for (int sq = 0; sq < 3; sq++)
            cr_assert_eq(kvh_kvcache_head(&split->cache, sq, 2, 1)->n, (uint32_t)kLens[sq]);
        free(a), free(b);
        kvh_session_free(whole);
        kvh_session_free(split);
    }
    kvh_model_free(&m);
}

Test(prefill_chunk, chunk_covering_the_prompt_is_the_unsplit_path) {
    kvh_model m = small_model();
    const int V = m.cfg.n_vocab;
    const char *plain[] = {"cache.budget=8"}, *chunk[] = {"cache.budget=8", "cache.prefill_chunk=30"};
    kvh_session *whole = session_with(&m, "h2o.so", plain, 1, 3), *split = session_with(&m, "h2o.so", chunk, 2, 3);
    float *a = prefill(whole, false), *b = prefill(split, false);
    cr_assert(memcmp(a, b, 3 * (size_t)V * sizeof(float)) == 0, "chunk >= every prompt must not change the logits");
    cr_assert_eq(whole->cache.bytes_peak, split->cache.bytes_peak);
    free(a), free(b);
    kvh_session_free(whole);
    kvh_session_free(split);
    kvh_model_free(&m);
}

/* Bytes the cache charges per slot of layer l (kvcache.c: K + V + position, plus the score arrays). */
static size_t slot_bytes(const kvh_kvcache *c, int l) {
    size_t b = kvh_kvcache_k_slot_bytes(c, l) + (size_t)kvh_kvcache_v_slot_bytes(c, l) + sizeof(int32_t);
    if (c->layer[l].track_scores) b += sizeof(float);
    if (c->layer[l].obs_scores) b += sizeof(float);
    return b;
}

Test(prefill_chunk, every_policy_peaks_within_budget_slack_and_chunk) {
    kvh_model m = small_model();
    /* pyramid keeps its observation window (8 by default) inside the budget: narrow it for budget 8 */
    const char *policies[] = {"window.so", "sink.so", "h2o.so", "pyramid.so"};
    const char *extra[] = {NULL, NULL, NULL, "pyramid.window=4"};
    const uint32_t chunk = 6, slack = 4;
    for (size_t p = 0; p < sizeof policies / sizeof policies[0]; p++) {
        const char *sets[] = {"cache.budget=8", "cache.slack=4", "cache.prefill_chunk=6", extra[p]};
        const char *plain[] = {"cache.budget=8", "cache.slack=4", extra[p]};
        const int n_extra = extra[p] ? 1 : 0;
        kvh_session *whole = session_with(&m, policies[p], plain, 2 + n_extra, 3);
        kvh_session *split = session_with(&m, policies[p], sets, 3 + n_extra, 3);
        free(prefill(whole, false));
        free(prefill(split, false));
        size_t bound = 0;
        for (int l = 0; l < m.cfg.n_layer; l++)
            bound += (size_t)3 * m.cfg.n_head * (split->cache.layer[l].budget + slack + chunk) * slot_bytes(&split->cache, l);
        cr_assert_leq(split->cache.bytes_peak, bound, "%s: peak %zu bytes above budget + slack + chunk (%zu)",
                      policies[p], split->cache.bytes_peak, bound);
        cr_assert_lt(split->cache.bytes_peak, whole->cache.bytes_peak, "%s: chunking did not lower the peak (%zu vs %zu)",
                     policies[p], split->cache.bytes_peak, whole->cache.bytes_peak);
        for (int l = 0; l < m.cfg.n_layer; l++)
            cr_assert_leq(kvh_kvcache_max_live(&split->cache, l), split->cache.layer[l].budget + slack,
                          "%s layer %d: over budget + slack after the prefill", policies[p], l);
        kvh_session_free(whole);
        kvh_session_free(split);
    }
    kvh_model_free(&m);
}

Test(prefill_chunk, teacher_with_one_token_pieces_is_the_stream_evaluation) {
    kvh_model m = small_model();
    int32_t ids[120];
    for (int i = 0; i < 120; i++) ids[i] = (int32_t)((i * 37 + 11) % m.cfg.n_vocab);
    const char *sets[] = {"cache.budget=12", "cache.slack=3", "cache.prefill_chunk=1"};
    kvh_session *teacher = session_with(&m, "h2o.so", sets, 3, 1);
    kvh_session *policy = session_with(&m, "h2o.so", sets, 2, 1); /* stream mode: no chunk needed */
    kvh_session *full = session_with(&m, NULL, NULL, 0, 1);
    kvh_eval_options o = {.ctx = 60};
    kvh_eval_result rt, rs;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_eval_teacher(teacher, ids, 120, &o, &rt, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_eval_stream(policy, full, ids, 120, &o, &rs, &err), 0, "%s", err.msg);
    cr_assert_eq(rt.n_predicted, rs.n_predicted);
    cr_assert(fabs(rt.nll_mean - rs.nll_mean) <= 1e-12 * fabs(rs.nll_mean), "teacher %.15g vs stream %.15g",
              rt.nll_mean, rs.nll_mean);
    cr_assert_gt(rs.kl_mean, 0.0, "budget 12 of 60 tokens should move the distribution");
    kvh_session_free(teacher);
    kvh_session_free(policy);
    kvh_session_free(full);
    kvh_model_free(&m);
}
