/* test_score_report.c — the ABI 1.3 policy hooks (score_report, insert, per-slot metadata) and the two
 * policies built on them:
 *   - the host's side of the contract, checked by a plugin that validates every report, insert and
 *     metadata move (tests/plugins/tp_report.c) through real sessions: decode rows, prefill blocks with
 *     all rows and with only the last rows, chunked prefill, eviction with compaction, several sequences;
 *   - a plugin built against the frozen ABI 1.2 header still loads and gives the same logits as window.so;
 *   - a failing score_report names plugin, file, layer, seq, head and hook;
 *   - tova.so and scissorhands.so on hand-computed cases from the papers' definitions (TOVA: lowest
 *     attention of the CURRENT query, layer-wise mean or per head, whatever the slack; Scissorhands:
 *     counts of below-1/t attention inside the last `history` queries, recent window protected);
 *   - both on the tiny trained model: bit-identical to the full cache when the budget covers the
 *     sequence, and never above budget + slack otherwise. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "runtime/router.h"
#include "model/sampler.h"
#include "runtime/session.h"

/* ---- sessions on a small random model --------------------------------------------------------- */

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 512, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static int try_session(kvh_session **s, const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                       int n_seq, kvh_err *err) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = n_seq;
    o.threads = 1;
    o.plugin_path = KVH_BUILD_DIR "/tests/plugins"; /* tp_report.so, tp_fifo_1_2.so */
    return kvh_test_session(s, m, plugins, sets, n_sets, &o, err);
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets, int n_seq) {
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(try_session(&s, m, plugins, sets, n_sets, n_seq, &err), 0, "session with %s: %s",
                 plugins ? plugins : "no plugins", err.msg);
    return s;
}

/* Prefill n_seq prompts (lengths 3, 17, 40: fewer, and more, queries than report_rows), then n_new greedy
 * steps; every step's logits go to trace when given. Checks live <= budget + slack when budget > 0.
 * Returns 0, or -1 with err filled (the first failing forward). */
static int generate(kvh_session *s, int n_seq, int n_new, float *trace, uint32_t budget, uint32_t slack, kvh_err *err) {
    const int V = s->model->cfg.n_vocab;
    float *logits = malloc((size_t)n_seq * V * sizeof(float));
    static const int lens_all[3] = {3, 17, 40};
    int32_t prompts[3][40];
    const int32_t *pp[3];
    int seqs[3], lens[3];
    for (int b = 0; b < n_seq; b++) {
        lens[b] = lens_all[b];
        for (int t = 0; t < lens[b]; t++) prompts[b][t] = (int32_t)((t * 37 + b * 11 + 5) % V);
        pp[b] = prompts[b];
        seqs[b] = b;
    }
    int rc = 0;
    kvh_batch pre = {.n = n_seq, .seq = seqs, .tokens = pp, .n_tokens = lens, .all_logits = false};
    if (kvh_session_forward(s, &pre, logits, err) != 0) rc = -1;
    int32_t next[3];
    const int32_t *np[3];
    int ones[3] = {1, 1, 1};
    for (int step = 0; rc == 0 && step < n_new; step++) {
        if (trace) memcpy(trace + (size_t)step * n_seq * V, logits, (size_t)n_seq * V * sizeof(float));
        for (int b = 0; b < n_seq; b++) {
            next[b] = kvh_argmax(logits + (size_t)b * V, V);
            np[b] = &next[b];
        }
        kvh_batch d = {.n = n_seq, .seq = seqs, .tokens = np, .n_tokens = ones, .all_logits = false};
        if (kvh_session_forward(s, &d, logits, err) != 0) rc = -1;
        for (int l = 0; rc == 0 && budget && l < s->cache.n_layer; l++)
            cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), budget + slack, "step %d layer %d", step, l);
    }
    free(logits);
    return rc;
}

/* tp_report fails its run on the first broken promise; these runs cover decode rows, prefill blocks
 * of 3 (all rows), 17 and 40 queries (last rows only), chunked prefill, eviction and compaction. */
Test(score_report, host_keeps_the_contract) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 7, "random:small", &err), 0, "%s", err.msg);
    const char *variants[][4] = {
        {"cache.budget=12", "cache.slack=0", "tp_report.rows=4", NULL},
        {"cache.budget=12", "cache.slack=5", "tp_report.rows=1", NULL},
        {"cache.budget=20", "cache.slack=3", "tp_report.rows=64", "cache.prefill_chunk=7"},
    };
    for (size_t v = 0; v < sizeof variants / sizeof variants[0]; v++) {
        int n_sets = variants[v][3] ? 4 : 3;
        kvh_session *s = session_with(&m, "tp_report.so", variants[v], n_sets, 3);
        uint32_t budget = (uint32_t)atoi(variants[v][0] + strlen("cache.budget="));
        uint32_t slack = (uint32_t)atoi(variants[v][1] + strlen("cache.slack="));
        cr_assert_eq(generate(s, 3, 120, NULL, budget, slack, &err), 0, "variant %zu: %s", v, err.msg);
        cr_assert(s->cache.layer[0].report && s->cache.layer[0].slot_meta_bytes == 8, "the layer did not ask");
        cr_assert_gt(kvh_router_evict_calls(s->router), 0, "variant %zu never evicted", v);
        kvh_session_free(s);
    }
    kvh_model_free(&m);
}

Test(score_report, failing_report_names_plugin_layer_and_hook) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 7, "random:small", &err), 0, "%s", err.msg);
    const char *sets[] = {"cache.budget=12", "tp_report.fail_at=6"};
    kvh_session *s = session_with(&m, "tp_report.so", sets, 2, 1);
    cr_assert_eq(generate(s, 1, 5, NULL, 0, 0, &err), -1, "the failing hook was not reported");
    /* each layer's instance counts its own calls: 1-4 are heads 0-3 after the prefill, 5 and 6 heads 0
     * and 1 of the first decode step, so layer 0 fails first */
    cr_assert(strstr(err.msg, "plugin 'tp_report' (tp_report.so) layer 0 seq 0 head 1: score_report failed: asked to "
                              "fail here"), "%s", err.msg);
    kvh_session_free(s);
    kvh_model_free(&m);
}

/* A policy compiled against the ABI 1.2 header, before the new fields existed, runs unchanged: the same
 * victims as window.so (both evict the oldest positions), so the same logits, bit for bit. */
Test(score_report, abi_1_2_plugin_behaves_as_before) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 11, "random:small", &err), 0, "%s", err.msg);
    const int n_new = 80, V = c.n_vocab;
    float *a = malloc((size_t)n_new * 3 * V * sizeof(float)), *b = malloc((size_t)n_new * 3 * V * sizeof(float));
    const char *sets[] = {"cache.budget=16", "cache.slack=3"};
    kvh_session *s0 = session_with(&m, "window.so", sets, 2, 3);
    cr_assert_eq(generate(s0, 3, n_new, a, 16, 3, &err), 0, "%s", err.msg);
    kvh_session_free(s0);
    kvh_session *s1 = session_with(&m, "tp_fifo_1_2.so", sets, 2, 3);
    cr_assert_eq(s1->cache.layer[0].report, false);
    cr_assert_eq(s1->cache.layer[0].slot_meta_bytes, 0u);
    cr_assert_eq(generate(s1, 3, n_new, b, 16, 3, &err), 0, "%s", err.msg);
    cr_assert_gt(kvh_router_evict_calls(s1->router), 0);
    kvh_session_free(s1);
    cr_assert(memcmp(a, b, (size_t)n_new * 3 * V * sizeof(float)) == 0, "the 1.2 plugin's logits differ from window.so");
    free(a);
    free(b);
    kvh_model_free(&m);
}

/* ---- hand-computed cases: router + cache, reports written by hand -------------------------------- */

enum { NH = 2, HS = 4, CTX = 64 };

typedef struct rig {
    kvh_run_config cfg;
    kvh_router *r;
    kvh_kvcache c;
    kvh_layer_policy_settings st[1];
} rig;

static void rig_up(rig *g, const char *ini) {
    kvh_err err = {{0}};
    kvh_config_defaults(&g->cfg);
    cr_assert_eq(kvh_config_load_string(&g->cfg, ini, "run.ini", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_router_create(&g->r, &g->cfg, 1, NH, HS, CTX, 1, &err), 0, "%s", err.msg);
    kvh_router_layer_settings(g->r, g->st);
    cr_assert(g->st[0].report, "the policy did not ask for score reports");
    cr_assert_eq(kvh_kvcache_init(&g->c, 1, 1, NH, HS, CTX, g->st, 0, &err), 0, "%s", err.msg);
}
static void rig_down(rig *g) {
    kvh_kvcache_free(&g->c);
    kvh_router_free(g->r);
    kvh_config_free(&g->cfg);
}

/* Appends tokens at positions pos[T] (slot order = the order given). */
static void put(rig *g, const int32_t *pos, int T) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(&g->c, 0, 0, (uint32_t)T, &err), 0, "%s", err.msg);
    float k[16 * NH * HS] = {0};
    kvh_kvcache_append(&g->c, 0, 0, T, k, k, (size_t)NH * HS, pos);
}

/* One decode step's report: head h's probability for the slot at position p is row[h][p]. */
static void report(rig *g, const float row[NH][8], int32_t q_pos) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(&g->c, 0, 0, 0, &err), 0, "%s", err.msg); /* points heads at their buffers */
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&g->c, 0, 0, h);
        float *r = kvh_report_row(hc, 1, 0);
        for (uint32_t j = 0; j < hc->n; j++) r[j] = row[h][hc->pos[j]];
    }
    cr_assert_eq(g->st[0].policy_report(g->st[0].policy_ctx, &g->c, 0, 0, 1, &q_pos, &err), 0, "%s", err.msg);
}

static void evict(rig *g) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_enforce(g->r, &g->c, 0, 0, 0, &err), 0, "%s", err.msg);
}

static void expect_set(rig *g, int h, const int32_t *want, int n_want, const char *what) {
    kvh_head_cache *hc = kvh_kvcache_head(&g->c, 0, 0, h);
    cr_assert_eq(hc->n, (uint32_t)n_want, "%s head %d: %u live, want %d", what, h, hc->n, n_want);
    for (uint32_t i = 0; i < hc->n; i++) {
        int found = 0;
        for (int j = 0; j < n_want; j++) found |= want[j] == hc->pos[i];
        cr_assert(found, "%s head %d: position %d kept, not expected", what, h, hc->pos[i]);
    }
}

static const int32_t kShuffled[6] = {3, 0, 5, 1, 4, 2};
/* The current query's attention per head over positions 0..5 (each row sums to 1). */
static const float kRow[NH][8] = {{0.30f, 0.05f, 0.20f, 0.10f, 0.15f, 0.20f},
                                  {0.10f, 0.25f, 0.05f, 0.30f, 0.12f, 0.18f}};

/* Layer-wise (the paper's default): mean over heads = 0.20 0.15 0.125 0.20 0.135 0.19 for positions
 * 0..5; budget 4 drops the two lowest, positions 2 and 4, from BOTH heads. */
Test(tova, layer_wise_hand_case) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\nslack = 0\n[tova]\n");
    put(&g, kShuffled, 6);
    report(&g, kRow, 5);
    evict(&g);
    const int32_t want[] = {0, 1, 3, 5};
    expect_set(&g, 0, want, 4, "tova layer-wise");
    expect_set(&g, 1, want, 4, "tova layer-wise");
    rig_down(&g);
}

/* Per head: head 0 drops 1 (0.05) and 3 (0.10); head 1 drops 2 (0.05) and 0 (0.10). */
Test(tova, per_head_hand_case) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\nslack = 0\n[tova]\nper_head = true\n");
    put(&g, kShuffled, 6);
    report(&g, kRow, 5);
    evict(&g);
    const int32_t want0[] = {0, 2, 4, 5}, want1[] = {1, 3, 4, 5};
    expect_set(&g, 0, want0, 4, "tova per head");
    expect_set(&g, 1, want1, 4, "tova per head");
    rig_down(&g);
}

/* Exact for any slack: with slack 2 nothing is evicted after the first step (6 <= 4 + 2); one step later
 * (7 > 6) the victims come from the NEWEST query alone: 0.02 (pos 0), 0.03 (pos 2), 0.08 (pos 6, the
 * newest token itself, a candidate as in the paper). An accumulated score would have kept position 0
 * (0.30 + 0.02). */
Test(tova, newest_query_decides_whatever_the_slack) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\nslack = 2\n[tova]\n");
    put(&g, kShuffled, 6);
    report(&g, kRow, 5);
    evict(&g);
    cr_assert_eq(kvh_kvcache_head(&g.c, 0, 0, 0)->n, 6u);
    const int32_t p6 = 6;
    put(&g, &p6, 1);
    static const float row2[NH][8] = {{0.02f, 0.30f, 0.03f, 0.25f, 0.12f, 0.20f, 0.08f},
                                      {0.02f, 0.30f, 0.03f, 0.25f, 0.12f, 0.20f, 0.08f}};
    report(&g, row2, 6);
    evict(&g);
    const int32_t want[] = {1, 3, 4, 5};
    expect_set(&g, 0, want, 4, "tova slack 2");
    expect_set(&g, 1, want, 4, "tova slack 2");
    rig_down(&g);
}

/* Scissorhands, history w = 3, recent r = 1, threshold 1/t = 1/6 (six visible tokens). Four queries:
 *   q1: .40 .10 .10 .10 .10 .20   below: 1 2 3 4   (outside the window by the time of eviction)
 *   q2: .10 .30 .10 .20 .10 .20   below: 0 2 4
 *   q3: .10 .20 .40 .10 .10 .10   below: 0 3 4 5
 *   q4: .30 .10 .30 .20 .05 .05   below: 1 4 5
 * Counts over q2..q4: pos0 2, pos1 1, pos2 1, pos3 1, pos4 3, pos5 2 (pos5 is the recent window).
 * Budget 4 drops the two highest counts among positions 0..4: 4 and 0. */
Test(scissorhands, history_window_hand_case) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\nslack = 0\n[scissorhands]\nhistory = 3\nrecent = 1\n");
    put(&g, kShuffled, 6);
    static const float q[4][8] = {{0.40f, 0.10f, 0.10f, 0.10f, 0.10f, 0.20f},
                                  {0.10f, 0.30f, 0.10f, 0.20f, 0.10f, 0.20f},
                                  {0.10f, 0.20f, 0.40f, 0.10f, 0.10f, 0.10f},
                                  {0.30f, 0.10f, 0.30f, 0.20f, 0.05f, 0.05f}};
    for (int i = 0; i < 4; i++) {
        float both[NH][8];
        memcpy(both[0], q[i], sizeof both[0]);
        memcpy(both[1], q[i], sizeof both[1]);
        report(&g, (const float(*)[8])both, 5);
    }
    evict(&g);
    const int32_t want[] = {1, 2, 3, 5};
    expect_set(&g, 0, want, 4, "scissorhands w=3");
    expect_set(&g, 1, want, 4, "scissorhands w=3");
    rig_down(&g);
}

/* A fixed threshold replaces 1/t: with threshold 0.06 only the .05 entries of q4 are below it (positions
 * 4 and 5; 5 is the recent window), so position 4 goes first and the second victim is a tie at count 0
 * among positions 0..3, broken by the smaller slot index: slot 0, which holds position 3. */
Test(scissorhands, fixed_threshold_and_ties) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\nslack = 0\n[scissorhands]\nhistory = 4\nrecent = 1\nthreshold = 0.06\n");
    put(&g, kShuffled, 6);
    static const float q4[NH][8] = {{0.30f, 0.10f, 0.30f, 0.20f, 0.05f, 0.05f}, {0.30f, 0.10f, 0.30f, 0.20f, 0.05f, 0.05f}};
    report(&g, q4, 5);
    evict(&g);
    const int32_t want[] = {0, 1, 2, 5};
    expect_set(&g, 0, want, 4, "scissorhands threshold");
    rig_down(&g);
}

/* ---- the tiny trained model ------------------------------------------------------------------- */

static const char *const kPolicies[] = {"tova.so", "tova.so", "scissorhands.so"};
static const char *const kExtra[] = {NULL, "tova.per_head=true", NULL};

static void tiny_case(int i) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent: tiny-model end-to-end checks skipped");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int n_new = 60, V = m.cfg.n_vocab;
    const size_t n = (size_t)n_new * 3 * V;
    float *base = malloc(n * sizeof(float)), *with = malloc(n * sizeof(float));
    kvh_session *s0 = session_with(&m, NULL, NULL, 0, 3);
    cr_assert_eq(generate(s0, 3, n_new, base, 0, 0, &err), 0, "%s", err.msg);
    kvh_session_free(s0);
    /* longest sequence 40 + 60 = 100 tokens: budget 128 keeps everything */
    const char *big[] = {"cache.budget=128", "cache.slack=0", kExtra[i]};
    kvh_session *s1 = session_with(&m, kPolicies[i], big, kExtra[i] ? 3 : 2, 3);
    cr_assert_eq(generate(s1, 3, n_new, with, 0, 0, &err), 0, "%s", err.msg);
    kvh_session_free(s1);
    cr_assert(memcmp(base, with, n * sizeof(float)) == 0, "%s with budget >= length changed the logits", kPolicies[i]);
    const char *small[] = {"cache.budget=24", "cache.slack=4", kExtra[i]};
    kvh_session *s2 = session_with(&m, kPolicies[i], small, kExtra[i] ? 3 : 2, 3);
    cr_assert_eq(generate(s2, 3, n_new, with, 24, 4, &err), 0, "%s", err.msg);
    cr_assert_gt(kvh_router_evict_calls(s2->router), 0);
    kvh_session_free(s2);
    free(base);
    free(with);
    kvh_model_free(&m);
}
Test(tiny_model, tova_layer_wise) { tiny_case(0); }
Test(tiny_model, tova_per_head) { tiny_case(1); }
Test(tiny_model, scissorhands) { tiny_case(2); }

/* The router warns once per run when a policy drops the newest token (TOVA may, by design). */
Test(score_report, warns_once_when_the_newest_token_goes, .init = cr_redirect_stderr) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 7, "random:small", &err), 0, "%s", err.msg);
    const char *sets[] = {"cache.budget=4", "cache.slack=0", "tova.per_head=true"};
    kvh_session *s = session_with(&m, "tova.so", sets, 3, 1);
    cr_assert_eq(generate(s, 1, 60, NULL, 4, 0, &err), 0, "%s", err.msg);
    kvh_session_free(s);
    kvh_model_free(&m);
    fflush(stderr);
    FILE *f = cr_get_redirected_stderr();
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    const char *first = strstr(buf, "evicted the newest token");
    cr_assert(first, "no warning in: %s", buf);
    cr_assert_null(strstr(first + 1, "evicted the newest token"), "warned more than once: %s", buf);
    cr_assert(strstr(buf, "plugin 'tova' (tova.so) layer "), "%s", buf);
}
