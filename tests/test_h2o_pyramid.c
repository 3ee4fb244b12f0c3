/* test_h2o_pyramid.c — plugins/h2o and plugins/pyramid through the real loader, router and cache, on
 * synthetic slots (shuffled slot order, scores written by hand): who stays and who goes per head, worked
 * out from the papers' definitions (H2O: `recent` newest + `heavy` highest accumulated score; PyramidKV:
 * observation window + top pooled observation scores), ties, decode-time eviction against a naive
 * reference, the PyramidKV budget schedule (hand-computed and total-preserving), parameter errors; and,
 * through the session on a small random model, pyramid's per-layer invariant and no-op. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
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

enum { NH = 2, HS = 4, CTX = 1024, MAXL = 32 };

typedef struct rig {
    kvh_run_config cfg;
    kvh_router *r;
    kvh_kvcache c;
    int n_layer;
    kvh_layer_policy_settings st[MAXL];
} rig;

static int rig_try(rig *g, int n_layer, const char *ini, kvh_err *err) {
    g->n_layer = n_layer;
    kvh_config_defaults(&g->cfg);
    cr_assert_eq(kvh_config_load_string(&g->cfg, ini, "run.ini", err), 0, "%s", err->msg);
    if (kvh_router_create(&g->r, &g->cfg, n_layer, NH, HS, CTX, 1, err) != 0) {
        kvh_config_free(&g->cfg);
        return -1;
    }
    kvh_router_layer_settings(g->r, g->st);
    cr_assert_eq(kvh_kvcache_init(&g->c, 1, n_layer, NH, HS, CTX, g->st, 0, err), 0, "%s", err->msg);
    return 0;
}
static void rig_up(rig *g, int n_layer, const char *ini) {
    kvh_err err = {{0}};
    cr_assert_eq(rig_try(g, n_layer, ini, &err), 0, "%s", err.msg);
}
static void rig_down(rig *g) {
    kvh_kvcache_free(&g->c);
    kvh_router_free(g->r);
    kvh_config_free(&g->cfg);
}
static void expect_error(int n_layer, const char *ini, const char *needle) {
    rig g;
    kvh_err err = {{0}};
    cr_assert_eq(rig_try(&g, n_layer, ini, &err), -1, "accepted: %s", ini);
    cr_assert(strstr(err.msg, needle), "%s\n  wanted: %s", err.msg, needle);
}

/* Appends T tokens to layer l (K = position, so moves can be checked); scores of the new slots are set
 * per head from score(h, pos) and obs(h, pos) when given (NULL: left at 0). */
typedef float (*score_fn)(int h, int32_t pos);
static void put(rig *g, int l, const int32_t *pos, int T, score_fn score, score_fn obs) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(&g->c, 0, l, (uint32_t)T, &err), 0, "%s", err.msg);
    float *k = calloc((size_t)T * NH * HS, sizeof *k);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NH * HS; i++) k[(size_t)t * NH * HS + i] = (float)pos[t];
    kvh_kvcache_append(&g->c, 0, l, T, k, k, (size_t)NH * HS, pos);
    free(k);
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&g->c, 0, l, h);
        for (uint32_t i = hc->n - (uint32_t)T; i < hc->n; i++) {
            if (score) { cr_assert(hc->score); hc->score[i] = score(h, hc->pos[i]); }
            if (obs) { cr_assert(hc->obs_score); hc->obs_score[i] = obs(h, hc->pos[i]); }
        }
    }
}

/* The live positions of (l, h) are exactly want[0..n_want-1] (any order); K moved with its position. */
static void expect_set(rig *g, int l, int h, const int32_t *want, int n_want, const char *what) {
    kvh_head_cache *hc = kvh_kvcache_head(&g->c, 0, l, h);
    cr_assert_eq(hc->n, (uint32_t)n_want, "%s head %d: %u live, want %d", what, h, hc->n, n_want);
    for (uint32_t i = 0; i < hc->n; i++) {
        cr_assert_eq(((const float *)hc->k)[(size_t)i * HS], (float)hc->pos[i], "%s: K moved without its position", what);
        int found = 0;
        for (int j = 0; j < n_want; j++) found |= want[j] == hc->pos[i];
        cr_assert(found, "%s head %d: position %d kept, not expected", what, h, hc->pos[i]);
    }
}

static void shuffled(int32_t *pos, int n, unsigned seed) {
    for (int i = 0; i < n; i++) pos[i] = i;
    srand(seed);
    for (int i = n - 1; i > 0; i--) {
        int j = rand() % (i + 1);
        int32_t t = pos[i];
        pos[i] = pos[j];
        pos[j] = t;
    }
}

static void prefill(rig *g, int l, const int32_t *pos, int n, score_fn score, score_fn obs) {
    kvh_err err = {{0}};
    put(g, l, pos, n, score, obs);
    cr_assert_eq(kvh_router_after_prefill(g->r, &g->c, 0, &err), 0, "%s", err.msg);
}

/* ---- H2O ------------------------------------------------------------------------------------------ */

/* Head 0 and head 1 attend differently over positions 0..7. */
static float h2o_hand(int h, int32_t p) {
    static const float s[2][8] = {{5, 1, 9, 3, 2, 0.5f, 0.1f, 0.2f}, {0, 8, 0, 0, 7, 1, 100, 0}};
    return s[h][p];
}

/* heavy 2 + recent 2 over 8 tokens: recent = {6, 7}; head 0's heavy hitters among 0..5 are 2 (9) and
 * 0 (5); head 1's are 1 (8) and 4 (7) — its 100 at position 6 is inside the recent window anyway. */
static void h2o_hand_case(const char *ini) {
    for (unsigned seed = 1; seed <= 10; seed++) {
        rig g;
        rig_up(&g, 2, ini);
        cr_assert_eq(g.st[0].budget, 4);
        cr_assert(g.st[0].prefill_scores && g.st[0].decode_scores, "h2o asks for prefill and decode scores");
        int32_t pos[8];
        shuffled(pos, 8, seed);
        prefill(&g, 0, pos, 8, h2o_hand, NULL);
        const int32_t want0[] = {0, 2, 6, 7}, want1[] = {1, 4, 6, 7};
        expect_set(&g, 0, 0, want0, 4, "h2o hand");
        expect_set(&g, 0, 1, want1, 4, "h2o hand");
        rig_down(&g);
    }
}
Test(h2o, hand_case_explicit) { h2o_hand_case("[cache]\nslack = 0\n[h2o]\nheavy = 2\nrecent = 2\n"); }
Test(h2o, hand_case_budget_split_half_half) { h2o_hand_case("[cache]\nbudget = 4\nslack = 0\n[h2o]\n"); }
Test(h2o, hand_case_one_derived) { h2o_hand_case("[cache]\nbudget = 4\nslack = 0\n[h2o]\nrecent = 2\n"); }

static float ones(int h, int32_t p) { (void)h; (void)p; return 1.0f; }

/* Equal scores: the smaller slot index is evicted first. Slots hold positions {2, 0, 3, 1}; heavy 1,
 * recent 1: position 3 (slot 2) is recent; candidates slot 0 (pos 2), 1 (pos 0), 3 (pos 1) tie; the
 * two victims are slots 0 and 1, so positions 3 and 1 stay. */
Test(h2o, ties_by_slot_index) {
    rig g;
    rig_up(&g, 1, "[cache]\nslack = 0\n[h2o]\nheavy = 1\nrecent = 1\n");
    const int32_t pos[] = {2, 0, 3, 1}, want[] = {3, 1};
    prefill(&g, 0, pos, 4, ones, NULL);
    for (int h = 0; h < NH; h++) expect_set(&g, 0, h, want, 2, "h2o ties");
    rig_down(&g);
}

/* Budgets from parameters. */
Test(h2o, budgets) {
    static const struct { const char *ini; uint32_t budget; } cases[] = {
        {"[cache]\nbudget = 50\n[h2o]\n", 50},
        {"[cache]\nbudget = 51\n[h2o]\n", 51},
        {"[cache]\nbudget = 50\n[h2o]\nheavy_ratio = 1\n", 50},
        {"[cache]\nbudget = 50\n[h2o]\nheavy_ratio = 0\n", 50},
        {"[cache]\nbudget = 50\n[h2o]\nheavy = 3\nrecent = 5\n", 8},
        {"[h2o]\nheavy = 3\nrecent = 5\n", 8},
        {"[cache]\nbudget = 50\n[h2o]\nheavy = 10\n", 50},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        rig g;
        rig_up(&g, 2, cases[i].ini);
        cr_assert_eq(g.st[0].budget, cases[i].budget, "%s", cases[i].ini);
        cr_assert_eq(g.st[1].budget, cases[i].budget, "%s", cases[i].ini);
        rig_down(&g);
    }
}

/* heavy_ratio 1 with budget 4: heavy 3, recent 1 (the newest token always stays); heavy_ratio 0: a pure
 * window of 4. Positions 0..7, head 0's scores: heavy among 0..6 = 2 (9), 0 (5), 3 (3). */
Test(h2o, heavy_ratio_extremes) {
    rig g;
    int32_t pos[8];
    shuffled(pos, 8, 3);
    rig_up(&g, 1, "[cache]\nbudget = 4\nslack = 0\n[h2o]\nheavy_ratio = 1\n");
    prefill(&g, 0, pos, 8, h2o_hand, NULL);
    const int32_t want_r1[] = {0, 2, 3, 7};
    expect_set(&g, 0, 0, want_r1, 4, "heavy_ratio 1");
    rig_down(&g);
    rig_up(&g, 1, "[cache]\nbudget = 4\nslack = 0\n[h2o]\nheavy_ratio = 0\n");
    prefill(&g, 0, pos, 8, h2o_hand, NULL);
    const int32_t want_r0[] = {4, 5, 6, 7};
    expect_set(&g, 0, 0, want_r0, 4, "heavy_ratio 0");
    expect_set(&g, 0, 1, want_r0, 4, "heavy_ratio 0");
    rig_down(&g);
}

/* ---- naive reference for decode-time eviction (both policies) --------------------------------------
 * Keeps the `recent` newest live positions and the top `budget - recent` others by key(h, pos); distinct
 * keys, so no tie rule is needed. */
typedef struct ref_head {
    int32_t live[CTX + 64];
    int n;
} ref_head;

static score_fn g_key;
static int g_ref_h;
static int by_pos_desc(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x < y) - (x > y);
}
static int by_key_desc(const void *a, const void *b) {
    float x = g_key(g_ref_h, *(const int32_t *)a), y = g_key(g_ref_h, *(const int32_t *)b);
    return (x < y) - (x > y);
}
static void ref_evict(ref_head *r, int h, int budget, int recent, score_fn key) {
    qsort(r->live, (size_t)r->n, sizeof r->live[0], by_pos_desc);
    g_key = key;
    g_ref_h = h;
    qsort(r->live + recent, (size_t)(r->n - recent), sizeof r->live[0], by_key_desc);
    r->n = budget;
}

/* Distinct pseudo-random keys, different per head. */
static float hashed(int h, int32_t p) {
    uint32_t x = (uint32_t)p * 2654435761u + (uint32_t)h * 40503u + 12345u;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return (float)(x % 1000003u) + (float)p * 1e-7f;
}

/* Prefill of n_pre tokens (reversed slot order), then token-by-token decode up to n_total; after every
 * enforce the live set equals the reference's and stays within budget + slack. */
static void decode_vs_reference(const char *ini, int budget, int recent, int slack, int n_pre, int n_total,
                                score_fn score, score_fn obs, score_fn key, bool prefill_uses_key) {
    rig g;
    rig_up(&g, 1, ini);
    cr_assert_eq(g.st[0].budget, (uint32_t)budget);
    static ref_head ref[NH];
    int32_t *pre = malloc((size_t)n_pre * sizeof *pre);
    for (int i = 0; i < n_pre; i++) pre[i] = n_pre - 1 - i;
    prefill(&g, 0, pre, n_pre, score, obs);
    for (int h = 0; h < NH; h++) {
        ref[h].n = n_pre;
        for (int i = 0; i < n_pre; i++) ref[h].live[i] = i;
        if (n_pre > budget + slack) {
            cr_assert(prefill_uses_key);
            ref_evict(&ref[h], h, budget, recent, key);
        }
        expect_set(&g, 0, h, ref[h].live, ref[h].n, "after prefill");
    }
    kvh_err err = {{0}};
    for (int32_t p = n_pre; p < n_total; p++) {
        put(&g, 0, &p, 1, score, obs);
        cr_assert_eq(kvh_router_enforce(g.r, &g.c, 0, 0, 0, &err), 0, "%s", err.msg);
        for (int h = 0; h < NH; h++) {
            ref[h].live[ref[h].n++] = p;
            if (ref[h].n > budget + slack) ref_evict(&ref[h], h, budget, recent, key);
            expect_set(&g, 0, h, ref[h].live, ref[h].n, "decode");
            cr_assert_leq(kvh_kvcache_head(&g.c, 0, 0, h)->n, (uint32_t)(budget + slack));
        }
    }
    free(pre);
    rig_down(&g);
}

Test(h2o, decode_matches_reference) {
    decode_vs_reference("[cache]\nslack = 5\n[h2o]\nheavy = 7\nrecent = 4\n", 11, 4, 5, 30, 300, hashed, NULL,
                        hashed, true);
    decode_vs_reference("[cache]\nbudget = 16\nslack = 0\n[h2o]\n", 16, 8, 0, 5, 200, hashed, NULL, hashed, true);
}

Test(h2o, configuration_errors) {
    expect_error(2, "[h2o]\n", "plugin 'h2o' (h2o.so) layer 0: create failed: heavy and recent are 0 and the run sets no [cache] budget");
    expect_error(2, "[h2o]\nheavy = 4\n", "recent is 0 and the run sets no [cache] budget");
    expect_error(2, "[cache]\nbudget = 10\n[h2o]\nrecent = 10\n", "[cache] budget 10 leaves no room for heavy after recent = 10");
    expect_error(2, "[cache]\nbudget = 10\n[h2o]\nheavy = -1\n", "run.ini:4: [h2o] heavy = -1: must be >= 0");
    expect_error(2, "[cache]\nbudget = 10\n[h2o]\nheavy_ratio = 1.5\n", "[h2o] heavy_ratio = 1.5");
    expect_error(2, "[cache]\nbudget = 10\n[h2o]\nhh_size = 3\n", "unknown parameter 'hh_size'");
}

/* ---- PyramidKV ------------------------------------------------------------------------------------ */

static uint32_t *budgets_of(int n_layer, const char *ini, uint32_t *out) {
    rig g;
    rig_up(&g, n_layer, ini);
    for (int l = 0; l < n_layer; l++) out[l] = g.st[l].budget;
    cr_assert(g.st[0].obs_scores && g.st[0].decode_scores && !g.st[0].prefill_scores);
    rig_down(&g);
    return out;
}

/* L = 6, average 64, window 8, beta 20, by hand: A = 64 - 8 = 56 selected per layer on average;
 * min = 56 / 20 = 2, max = 2 * 56 - 2 = 110, step (110 - 2) / 5 = 21.6:
 * s_l = floor(110 - 21.6 l) = 110, 88, 66, 45, 23, 2 (sum 334); the 336 - 334 = 2 left go to layers 0
 * and 1: 111, 89, 66, 45, 23, 2; plus the window: 119, 97, 74, 53, 31, 10 (sum 384 = 6 * 64). */
Test(pyramid, schedule_by_hand) {
    uint32_t b[6];
    const uint32_t want[6] = {119, 97, 74, 53, 31, 10};
    budgets_of(6, "[cache]\nbudget = 64\n[pyramid]\n", b);
    for (int l = 0; l < 6; l++) cr_assert_eq(b[l], want[l], "layer %d: %u, want %u", l, b[l], want[l]);
    budgets_of(6, "[cache]\nbudget = 1\n[pyramid]\navg_budget = 64\n", b);
    for (int l = 0; l < 6; l++) cr_assert_eq(b[l], want[l], "avg_budget wins: layer %d", l);
    /* L = 3, average 24, window 8, beta 20: A = 16, min 0, max 32, step 16: 32, 16, 0 -> 40, 24, 8. */
    budgets_of(3, "[cache]\nbudget = 24\n[pyramid]\n", b);
    cr_assert(b[0] == 40 && b[1] == 24 && b[2] == 8, "%u %u %u", b[0], b[1], b[2]);
}

/* Over a grid: the total is exactly L * avg, budgets never increase with depth, every layer keeps at
 * least the window, beta = 1 gives uniform budgets, the top layer keeps (avg - window) / beta besides the
 * window (before the remainder, which only reaches it when L * A leaves one per layer). */
Test(pyramid, schedule_total_preserved) {
    static const int Ls[] = {1, 2, 3, 5, 6, 12, 32};
    static const int avgs[] = {9, 10, 24, 64, 100, 257};
    static const int betas[] = {1, 3, 20, 1000};
    static const int windows[] = {8, 1};
    uint32_t b[MAXL];
    char ini[200];
    for (size_t a = 0; a < 7; a++)
        for (size_t v = 0; v < 6; v++)
            for (size_t e = 0; e < 4; e++)
                for (size_t w = 0; w < 2; w++) {
                    int L = Ls[a], avg = avgs[v], beta = betas[e], win = windows[w];
                    snprintf(ini, sizeof ini, "[cache]\nbudget = %d\n[pyramid]\nbeta = %d\nwindow = %d\n", avg, beta, win);
                    budgets_of(L, ini, b);
                    long total = 0;
                    for (int l = 0; l < L; l++) {
                        total += b[l];
                        cr_assert_geq(b[l], (uint32_t)win, "%s L %d layer %d", ini, L, l);
                        if (l > 0) cr_assert_leq(b[l], b[l - 1], "%s L %d: layer %d grows", ini, L, l);
                        if (beta == 1) cr_assert_eq(b[l], (uint32_t)avg, "%s: beta 1 is uniform", ini);
                    }
                    cr_assert_eq(total, (long)L * avg, "%s L %d: total %ld", ini, L, total);
                    if (L > 1) {
                        int A = avg - win, mn = A / beta;
                        cr_assert(b[L - 1] == (uint32_t)(win + mn) || b[L - 1] == (uint32_t)(win + mn + 1),
                                  "%s L %d: top layer %u, want %d (+1)", ini, L, b[L - 1], win + mn);
                    }
                }
}

/* Observation scores by position 0..7 (8, 9 are the window): head 0 raw A = [0,0,0,6,0,0,5,0],
 * head 1 raw B = [2,0,0,0,2.4,0,0,0]. L = 1, budget 4 = window 2 + 2 selected, kernel 3.
 *  max pool, A: [0,0,6,6,6,5,5,5] -> top 2 with ties evicting the older first: {3, 4}
 *  max pool, B: [2,2,0,2.4,2.4,2.4,0,0] -> {4, 5}
 *  avg pool, A: [0,0,2,2,2,5/3,5/3,5/3] -> {3, 4}
 *  avg pool, B (zero padding counted, /3): [2/3,2/3,0,.8,.8,.8,0,0] -> {4, 5}
 *     (dividing by the in-range count instead would give p0 = 1.0 and keep {0, 5})
 *  no pooling (kernel 1): A -> {3, 6}, B -> {0, 4}. The window {8, 9} stays though its scores are 0. */
static float obs_hand(int h, int32_t p) {
    static const float o[2][10] = {{0, 0, 0, 6, 0, 0, 5, 0, 0, 0}, {2, 0, 0, 0, 2.4f, 0, 0, 0, 0, 0}};
    return o[h][p];
}
static void pool_case(const char *ini, const int32_t *want0, const int32_t *want1) {
    for (unsigned seed = 1; seed <= 10; seed++) {
        rig g;
        rig_up(&g, 1, ini);
        cr_assert_eq(g.st[0].budget, 4);
        cr_assert_eq(g.st[0].obs_window, 2);
        int32_t pos[10];
        shuffled(pos, 10, seed);
        prefill(&g, 0, pos, 10, NULL, obs_hand);
        expect_set(&g, 0, 0, want0, 4, ini);
        expect_set(&g, 0, 1, want1, 4, ini);
        rig_down(&g);
    }
}
Test(pyramid, pooling_by_hand) {
    const int32_t a34[] = {3, 4, 8, 9}, b45[] = {4, 5, 8, 9}, a36[] = {3, 6, 8, 9}, b04[] = {0, 4, 8, 9};
    pool_case("[cache]\nbudget = 4\nslack = 0\n[pyramid]\nwindow = 2\nkernel_size = 3\n", a34, b45);
    pool_case("[cache]\nbudget = 4\nslack = 0\n[pyramid]\nwindow = 2\nkernel_size = 3\npool_max = false\n", a34, b45);
    pool_case("[cache]\nbudget = 4\nslack = 0\n[pyramid]\nwindow = 2\nkernel_size = 1\n", a36, b04);
}

/* Sparse positions (5 apart, spanning more than the bucket scratch: the heapsort path) and dense ones
 * (bucket path), kernel 1: the window (largest positions) plus the top obs scores. */
static float obs_hashed(int h, int32_t p) { return hashed(h + 7, p); }
static int32_t g_pos_scale;
static float obs_sparse(int h, int32_t p) { return hashed(h + 7, p / g_pos_scale); }
Test(pyramid, prefill_selection_sparse_and_dense) {
    for (int scale = 1; scale <= 5; scale += 4) {
        g_pos_scale = scale;
        rig g;
        rig_up(&g, 1, "[cache]\nbudget = 40\nslack = 3\n[pyramid]\nwindow = 6\nkernel_size = 1\n");
        const int n = 300;
        int32_t pos[300];
        shuffled(pos, n, 11);
        for (int i = 0; i < n; i++) pos[i] *= scale;
        prefill(&g, 0, pos, n, NULL, obs_sparse);
        for (int h = 0; h < NH; h++) {
            static ref_head r;
            r.n = n;
            for (int i = 0; i < n; i++) r.live[i] = i * scale;
            ref_evict(&r, h, 40, 6, obs_sparse);
            expect_set(&g, 0, h, r.live, r.n, scale == 1 ? "dense" : "sparse");
        }
        rig_down(&g);
    }
}

/* Decode: the window stays, the rest ranked by obs_score (from prefill) + decode score. */
static float dec_score(int h, int32_t p) { return hashed(h + 3, p) * 0.5f; }
static float dec_key(int h, int32_t p) { return obs_hashed(h, p) + dec_score(h, p); }
Test(pyramid, decode_matches_reference) {
    /* prompt 12 <= budget + slack: no prefill eviction; then decode keeps budget 20 = window 4 + 16 */
    decode_vs_reference("[cache]\nbudget = 20\nslack = 3\n[pyramid]\nwindow = 4\n", 20, 4, 3, 12, 300, dec_score,
                        obs_hashed, dec_key, false);
}

Test(pyramid, configuration_errors) {
    expect_error(2, "[pyramid]\n", "plugin 'pyramid' (pyramid.so) layer 0: create failed: avg_budget is 0 and the run sets no [cache] budget");
    expect_error(2, "[cache]\nbudget = 8\n[pyramid]\n", "average budget 8 must be larger than window 8");
    expect_error(2, "[cache]\nbudget = 64\n[pyramid]\nkernel_size = 4\n", "kernel_size 4 must be odd");
    expect_error(2, "[cache]\nbudget = 64\n[pyramid]\nbeta = 0\n", "run.ini:4: [pyramid] beta = 0: must be >= 1");
    expect_error(2, "[cache]\nbudget = 64\n[pyramid]\nwindow = 0\n", "[pyramid] window = 0: must be >= 1");
    expect_error(2, "[cache]\nbudget = 64\n[pyramid]\nkernel_size = 103\n", "[pyramid] kernel_size = 103");
}

/* ---- pyramid end to end through the session (per-layer budgets, so not in test_policy_e2e's grid) ---- */

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 512, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 2;
    o.threads = 1;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err), 0, "%s", err.msg);
    return s;
}

/* Greedy generation for 2 sequences (prompts of 30 and 35 tokens); logits of every step into trace when
 * given; when check, after every step every layer holds at most its own budget + slack. */
static void generate(kvh_session *s, int n_new, float *trace, bool check) {
    const int V = s->model->cfg.n_vocab;
    float *logits = malloc((size_t)2 * V * sizeof(float));
    int32_t prompts[2][40];
    int lens[2] = {30, 35}, seqs[2] = {0, 1}, ones_[2] = {1, 1};
    const int32_t *pp[2] = {prompts[0], prompts[1]};
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < lens[b]; t++) prompts[b][t] = (int32_t)((t * 31 + b * 7 + 3) % V);
    kvh_err err = {{0}};
    kvh_batch pre = {.n = 2, .seq = seqs, .tokens = pp, .n_tokens = lens, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &pre, logits, &err), 0, "%s", err.msg);
    int32_t next[2];
    const int32_t *np[2] = {&next[0], &next[1]};
    for (int step = 0; step < n_new; step++) {
        if (trace) memcpy(trace + (size_t)step * 2 * V, logits, (size_t)2 * V * sizeof(float));
        for (int b = 0; b < 2; b++) next[b] = kvh_argmax(logits + (size_t)b * V, V);
        kvh_batch d = {.n = 2, .seq = seqs, .tokens = np, .n_tokens = ones_, .all_logits = false};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "step %d: %s", step, err.msg);
        if (check)
            for (int l = 0; l < s->cache.n_layer; l++) {
                const kvh_layer_policy_settings *ls = &s->cache.layer[l];
                cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), ls->budget + ls->slack, "step %d layer %d", step, l);
            }
    }
    free(logits);
}

/* Window 56 with average 64 over 3 layers: budgets 72, 64, 56, all >= the 35 + 20 = 55 tokens: no
 * eviction ever, so logits are bit-identical to the run without plugins. */
Test(pyramid, session_budget_at_least_length_is_bit_identical) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 5, "random:small", &err), 0, "%s", err.msg);
    const int n_new = 20, V = c.n_vocab;
    float *base = malloc((size_t)n_new * 2 * V * sizeof(float));
    float *with = malloc((size_t)n_new * 2 * V * sizeof(float));
    kvh_session *s0 = session_with(&m, NULL, NULL, 0);
    generate(s0, n_new, base, false);
    kvh_session_free(s0);
    const char *sets[] = {"cache.budget=64", "cache.slack=0", "pyramid.window=56"};
    kvh_session *s1 = session_with(&m, "pyramid.so", sets, 3);
    cr_assert(s1->cache.layer[0].budget == 72 && s1->cache.layer[2].budget == 56);
    generate(s1, n_new, with, false);
    kvh_session_free(s1);
    cr_assert(memcmp(base, with, (size_t)n_new * 2 * V * sizeof(float)) == 0, "pyramid with budgets >= length changed the logits");
    free(base);
    free(with);
    kvh_model_free(&m);
}

/* Average 24 (budgets 40, 24, 8), slack 5, 300 tokens: every layer within its own budget + slack. */
Test(pyramid, session_invariant_per_layer) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 9, "random:small", &err), 0, "%s", err.msg);
    const char *sets[] = {"cache.budget=24", "cache.slack=5"};
    kvh_session *s = session_with(&m, "pyramid.so", sets, 2);
    cr_assert(s->cache.layer[0].budget == 40 && s->cache.layer[1].budget == 24 && s->cache.layer[2].budget == 8);
    generate(s, 300, NULL, true);
    uint32_t top = kvh_kvcache_max_live(&s->cache, 2);
    cr_assert(top >= 8 && top <= 8 + 5, "top layer holds %u (budget 8, slack 5): it evicted", top);
    kvh_session_free(s);
    kvh_model_free(&m);
}
