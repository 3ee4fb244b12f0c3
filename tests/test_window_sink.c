/* test_window_sink.c — plugins/window and plugins/sink through the real loader and router: on
 * synthetic sequences whose slot order is shuffled, they keep exactly the positions their definitions
 * say (window: the most recent; sink: positions 0..sinks-1 plus the most recent), during prefill and
 * token-by-token decode; their parameter defaults and configuration errors. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "runtime/router.h"

enum { L = 2, NH = 2, HS = 4, CTX = 1024, NSEQ = 1 };

typedef struct rig {
    kvh_run_config cfg;
    kvh_router *r;
    kvh_kvcache c;
} rig;

static int rig_try(rig *g, const char *ini, kvh_err *err) {
    kvh_config_defaults(&g->cfg);
    cr_assert_eq(kvh_config_load_string(&g->cfg, ini, "run.ini", err), 0, "%s", err->msg);
    if (kvh_router_create(&g->r, &g->cfg, L, NH, HS, CTX, NSEQ, err) != 0) {
        kvh_config_free(&g->cfg);
        return -1;
    }
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g->r, st);
    cr_assert_eq(kvh_kvcache_init(&g->c, NSEQ, L, NH, HS, CTX, st, 0, err), 0, "%s", err->msg);
    return 0;
}
static void rig_up(rig *g, const char *ini) {
    kvh_err err = {{0}};
    cr_assert_eq(rig_try(g, ini, &err), 0, "%s", err.msg);
}
static void rig_down(rig *g) {
    kvh_kvcache_free(&g->c);
    kvh_router_free(g->r);
    kvh_config_free(&g->cfg);
}

static void put(rig *g, int l, const int32_t *pos, int T) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(&g->c, 0, l, (uint32_t)T, &err), 0, "%s", err.msg);
    float *k = calloc((size_t)T * NH * HS, sizeof *k);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < NH * HS; i++) k[(size_t)t * NH * HS + i] = (float)pos[t];
    kvh_kvcache_append(&g->c, 0, l, T, k, k, (size_t)NH * HS, pos);
    free(k);
}

/* The live positions of head h equal exactly the set {p : keep(p)}, checked against 0..upto-1. */
static void expect_positions(rig *g, int l, int h, int upto, int sinks, int recent, const char *what) {
    kvh_head_cache *hc = kvh_kvcache_head(&g->c, 0, l, h);
    unsigned char *have = calloc((size_t)upto, 1);
    for (uint32_t i = 0; i < hc->n; i++) {
        cr_assert(hc->pos[i] >= 0 && hc->pos[i] < upto);
        cr_assert(!have[hc->pos[i]], "%s: position %d twice", what, hc->pos[i]);
        have[hc->pos[i]] = 1;
        cr_assert_eq(((const float *)hc->k)[(size_t)i * HS], (float)hc->pos[i], "%s: K moved without its position", what);
    }
    for (int p = 0; p < upto; p++) {
        int want = p < sinks || p >= upto - recent;
        cr_assert_eq(have[p], want, "%s: position %d %s (live %u)", what, p, want ? "missing" : "kept", hc->n);
    }
    free(have);
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

Test(window_sink, window_after_shuffled_prefill) {
    for (unsigned seed = 1; seed <= 20; seed++) {
        rig g;
        rig_up(&g, "[cache]\nslack = 7\n[window]\nwindow = 33\n");
        int n = 40 + (int)seed * 17;
        int32_t *pos = malloc((size_t)n * sizeof *pos);
        shuffled(pos, n, seed);
        put(&g, 0, pos, n);
        put(&g, 1, pos, n);
        kvh_err err = {{0}};
        cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), 0, "%s", err.msg);
        for (int h = 0; h < NH; h++) {
            cr_assert_eq(kvh_kvcache_head(&g.c, 0, 0, h)->n, 33);
            expect_positions(&g, 0, h, n, 0, 33, "window prefill");
            expect_positions(&g, 1, h, n, 0, 33, "window prefill layer 1");
        }
        free(pos);
        rig_down(&g);
    }
}

Test(window_sink, sink_after_shuffled_prefill) {
    for (unsigned seed = 1; seed <= 20; seed++) {
        rig g;
        rig_up(&g, "[cache]\nslack = 3\n[sink]\nsinks = 5\nwindow = 20\n");
        int n = 30 + (int)seed * 13;
        int32_t *pos = malloc((size_t)n * sizeof *pos);
        shuffled(pos, n, seed + 100);
        put(&g, 0, pos, n);
        kvh_err err = {{0}};
        cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), 0, "%s", err.msg);
        for (int h = 0; h < NH; h++) {
            cr_assert_eq(kvh_kvcache_head(&g.c, 0, 0, h)->n, 25);
            expect_positions(&g, 0, h, n, 5, 20, "sink prefill");
        }
        free(pos);
        rig_down(&g);
    }
}

/* Decode one token at a time: after each enforce the live set is exactly the first `sinks` plus the
 * most recent (live - sinks) positions, and live stays within [budget, budget + slack]. */
static void decode_run(const char *ini, int sinks, uint32_t budget, uint32_t slack) {
    rig g;
    rig_up(&g, ini);
    kvh_err err = {{0}};
    int32_t pre[10];
    for (int i = 0; i < 10; i++) pre[i] = 9 - i; /* reversed slot order */
    put(&g, 0, pre, 10);
    cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), 0, "%s", err.msg);
    for (int32_t p = 10; p < 400; p++) {
        put(&g, 0, &p, 1);
        cr_assert_eq(kvh_router_enforce(g.r, &g.c, 0, 0, 0, &err), 0, "%s", err.msg);
        for (int h = 0; h < NH; h++) {
            uint32_t n = kvh_kvcache_head(&g.c, 0, 0, h)->n;
            cr_assert_leq(n, budget + slack);
            if (p + 1 >= (int32_t)budget) cr_assert_geq(n, budget);
            int keep_sinks = sinks < p + 1 ? sinks : p + 1;
            expect_positions(&g, 0, h, p + 1, keep_sinks, (int)n - keep_sinks, "decode");
        }
    }
    rig_down(&g);
}

Test(window_sink, window_decode) { decode_run("[cache]\nbudget = 16\nslack = 4\n[window]\n", 0, 16, 4); }
Test(window_sink, window_decode_no_slack) { decode_run("[cache]\nbudget = 16\nslack = 0\n[window]\nlayers = 0\n", 0, 16, 0); }
Test(window_sink, sink_decode_default_sinks) { decode_run("[cache]\nbudget = 24\nslack = 6\n[sink]\n", 4, 24, 6); }
Test(window_sink, sink_decode_explicit) {
    decode_run("[cache]\nslack = 2\n[sink]\nsinks = 1\nwindow = 9\n", 1, 10, 2);
}

Test(window_sink, budgets_and_defaults) {
    rig g;
    kvh_layer_policy_settings st[L];
    rig_up(&g, "[cache]\nbudget = 50\n[sink]\n");
    kvh_router_layer_settings(g.r, st);
    cr_assert_eq(st[0].budget, 50, "sink: 4 sinks + window (budget - sinks)");
    rig_down(&g);
    rig_up(&g, "[cache]\nbudget = 50\n[sink]\nwindow = 100\nsinks = 0\n");
    kvh_router_layer_settings(g.r, st);
    cr_assert_eq(st[0].budget, 100, "explicit window wins over [cache] budget");
    rig_down(&g);
    rig_up(&g, "[cache]\nbudget = 50\n[window]\nwindow = 10\n");
    kvh_router_layer_settings(g.r, st);
    cr_assert_eq(st[1].budget, 10);
    rig_down(&g);
}

Test(window_sink, configuration_errors) {
    rig g;
    kvh_err err = {{0}};
    cr_assert_eq(rig_try(&g, "[window]\n", &err), -1);
    cr_assert(strstr(err.msg, "plugin 'window' (window.so) layer 0: create failed: window is 0"), "%s", err.msg);
    cr_assert_eq(rig_try(&g, "[sink]\n", &err), -1);
    cr_assert(strstr(err.msg, "plugin 'sink' (sink.so)"), "%s", err.msg);
    cr_assert_eq(rig_try(&g, "[cache]\nbudget = 4\n[sink]\n", &err), -1);
    cr_assert(strstr(err.msg, "no room for a window after 4 sinks"), "%s", err.msg);
    cr_assert_eq(rig_try(&g, "[cache]\nbudget = 40\n[sink]\nsinks = -1\n", &err), -1);
    cr_assert(strstr(err.msg, "run.ini:4: [sink] sinks = -1: must be >= 0"), "%s", err.msg);
    cr_assert_eq(rig_try(&g, "[cache]\nbudget = 40\n[window]\nsize = 3\n", &err), -1);
    cr_assert(strstr(err.msg, "unknown parameter 'size'"), "%s", err.msg);
    cr_assert(strstr(err.msg, "its parameters are: window"), "%s", err.msg);
}
