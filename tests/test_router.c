/* test_router.c — host/runtime/router.c against a real kvh_kvcache filled synthetically: per-layer routing and
 * settings, parameter and layer-claim errors naming file:line:key, hook failures naming plugin and
 * hook, rejected victim lists leaving the cache intact, compaction keeping K/V/pos/scores aligned,
 * per-head budgets, the live <= budget + slack invariant over a long run, the JSON description. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "runtime/router.h"

#define TPDIR KVH_BUILD_DIR "/tests/plugins"
enum { L = 4, NH = 3, HS = 5, CTX = 1024, NSEQ = 2 };

typedef struct rig {
    kvh_run_config cfg;
    kvh_router *r;
    kvh_kvcache c;
} rig;

/* Loads an INI string; expects success. */
static void rig_config(rig *g, const char *ini) {
    kvh_err err = {{0}};
    kvh_config_defaults(&g->cfg);
    cr_assert_eq(kvh_config_load_string(&g->cfg, ini, "run.ini", &err), 0, "%s", err.msg);
}

/* Creates router + cache from an INI string; expects success. */
static void rig_up(rig *g, const char *ini) {
    kvh_err err = {{0}};
    rig_config(g, ini);
    cr_assert_eq(kvh_router_create_ex(&g->r, &g->cfg, TPDIR, L, NH, HS, CTX, NSEQ, &err), 0, "%s", err.msg);
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g->r, st);
    cr_assert_eq(kvh_kvcache_init(&g->c, NSEQ, L, NH, HS, CTX, st, 0, &err), 0, "%s", err.msg);
}

static void rig_down(rig *g) {
    kvh_kvcache_free(&g->c);
    kvh_router_free(g->r);
    kvh_config_free(&g->cfg);
}

/* Expects router creation to fail with a message containing n1 and n2. */
static void expect_create_error(const char *ini, const char *n1, const char *n2) {
    rig g;
    kvh_err err = {{0}};
    rig_config(&g, ini);
    g.r = (kvh_router *)1;
    cr_assert_eq(kvh_router_create_ex(&g.r, &g.cfg, TPDIR, L, NH, HS, CTX, NSEQ, &err), -1, "accepted:\n%s", ini);
    cr_assert_null(g.r);
    cr_assert(strstr(err.msg, n1), "lacks '%s': %s", n1, err.msg);
    if (n2) cr_assert(strstr(err.msg, n2), "lacks '%s': %s", n2, err.msg);
    kvh_config_free(&g.cfg);
}

static float kval(int32_t pos, int h, int d) { return (float)pos * 1000.0f + (float)h * 100.0f + (float)d; }

/* Appends tokens with the given positions to every head of (s, l): K = kval, V = -kval, and sets each
 * new slot's score to pos / 2 and obs_score to pos / 4 when the layer keeps them. */
static void put(rig *g, int s, int l, const int32_t *pos, int T) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(&g->c, s, l, (uint32_t)T, &err), 0, "%s", err.msg);
    float *k = malloc((size_t)T * NH * HS * sizeof *k), *v = malloc((size_t)T * NH * HS * sizeof *v);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < HS; d++) {
                k[(size_t)t * NH * HS + h * HS + d] = kval(pos[t], h, d);
                v[(size_t)t * NH * HS + h * HS + d] = -kval(pos[t], h, d);
            }
    uint32_t n0[NH];
    for (int h = 0; h < NH; h++) n0[h] = kvh_kvcache_head(&g->c, s, l, h)->n;
    kvh_kvcache_append(&g->c, s, l, T, k, v, (size_t)NH * HS, pos);
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&g->c, s, l, h);
        for (int t = 0; t < T; t++) {
            if (hc->score) hc->score[n0[h] + (uint32_t)t] = (float)pos[t] * 0.5f;
            if (hc->obs_score) hc->obs_score[n0[h] + (uint32_t)t] = (float)pos[t] * 0.25f;
        }
    }
    free(k);
    free(v);
}

/* Every live slot of (s, l, h) holds the data its position says. */
static void check_aligned(rig *g, int s, int l, int h) {
    kvh_head_cache *hc = kvh_kvcache_head(&g->c, s, l, h);
    for (uint32_t i = 0; i < hc->n; i++) {
        int32_t p = hc->pos[i];
        for (int d = 0; d < HS; d++) {
            cr_assert_eq(((const float *)hc->k)[(size_t)i * HS + d], kval(p, h, d), "seq %d layer %d head %d slot %u: K not aligned", s, l, h, i);
            cr_assert_eq(((const float *)hc->v)[(size_t)i * HS + d], -kval(p, h, d), "V not aligned at slot %u", i);
        }
        if (hc->score) cr_assert_eq(hc->score[i], (float)p * 0.5f, "score not aligned at slot %u", i);
        if (hc->obs_score) cr_assert_eq(hc->obs_score[i], (float)p * 0.25f, "obs_score not aligned at slot %u", i);
    }
}

static void shuffled_positions(int32_t *pos, int n, unsigned seed) {
    for (int i = 0; i < n; i++) pos[i] = i;
    srand(seed);
    for (int i = n - 1; i > 0; i--) {
        int j = rand() % (i + 1);
        int32_t t = pos[i];
        pos[i] = pos[j];
        pos[j] = t;
    }
}

Test(router, no_plugins_keeps_everything) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 4\n");
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g.r, st);
    for (int l = 0; l < L; l++) {
        cr_assert_eq(st[l].budget, KVH_BUDGET_UNLIMITED);
        cr_assert(!st[l].track_scores);
        cr_assert_null(kvh_router_layer_policy_name(g.r, l));
    }
    int32_t pos[100];
    shuffled_positions(pos, 100, 1);
    put(&g, 0, 2, pos, 100);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_head(&g.c, 0, 2, 1)->n, 100);
    cr_assert_eq(kvh_router_evict_calls(g.r), 0);
    rig_down(&g);
}

Test(router, settings_follow_caps_and_layers) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 16\nslack = 4\n[tp_params]\nlayers = 1-2\n[w]\nplugin = window\nlayers = 3\nwindow = 9\n");
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g.r, st);
    cr_assert_eq(st[0].budget, KVH_BUDGET_UNLIMITED);
    cr_assert_eq(st[1].budget, 16);
    cr_assert_eq(st[1].slack, 4);
    cr_assert(st[1].track_scores && st[1].decode_scores && st[1].prefill_scores && !st[1].obs_scores);
    cr_assert_eq(st[3].budget, 9);
    cr_assert(!st[3].track_scores);
    cr_assert_null(kvh_router_layer_policy_name(g.r, 0));
    cr_assert_str_eq(kvh_router_layer_policy_name(g.r, 2), "tp_params");
    cr_assert_str_eq(kvh_router_layer_policy_name(g.r, 3), "window");
    cr_assert_str_eq(kvh_router_layer_section(g.r, 3), "w");
    cr_assert_null(kvh_router_layer_policy_name(g.r, L));
    rig_down(&g);
}

Test(router, parameter_and_layer_errors) {
    expect_create_error("[tp_params]\ncount = 3\nrecnt = 5\n", "run.ini:3: [tp_params] unknown parameter 'recnt'",
                        "its parameters are: count, ratio, flag");
    expect_create_error("[tp_params]\n\ncount = 0\n", "run.ini:3: [tp_params] count = 0: must be >= 1", NULL);
    expect_create_error("[tp_params]\ncount = 101\n", "run.ini:2: [tp_params] count = 101: must be <= 100", NULL);
    expect_create_error("[tp_params]\ncount = 2.5\n", "run.ini:2: [tp_params] count = 2.5: expected an integer", NULL);
    expect_create_error("[tp_params]\nratio = abc\n", "ratio = abc: expected a number", NULL);
    expect_create_error("[tp_params]\nflag = maybe\n", "flag = maybe: expected a bool", NULL);
    expect_create_error("[tp_params]\nlayers = 0-4\n", "run.ini:2: [tp_params] layers = 0-4", "0..3 (the model has 4 layers)");
    expect_create_error("[a]\nplugin = tp_params\nlayers = 0-2\n[b]\nplugin = window\nwindow = 3\nlayers = 2-3\n",
                        "layer 2 is claimed by two policies: [a] (run.ini:3) and [b] (run.ini:7)", NULL);
    expect_create_error("[nothere]\n", "run.ini:1: [nothere] plugin = nothere", "plugin 'nothere' not found");
    expect_create_error("[x]\nplugin = bad_abi\n", "run.ini:2: [x] plugin = bad_abi", "built for ABI 2, host speaks 1");
    expect_create_error("[window]\n", "plugin 'window' (window.so) layer 0: create failed", "no [cache] budget");
    expect_create_error("[bad_create]\n", "plugin 'bad_create' (bad_create.so) layer 0: create failed: create refused", NULL);
    expect_create_error("[bad_budget0]\n", "plugin 'bad_budget0' (bad_budget0.so) layer 0: create set budget 0", NULL);
    /* a --set value is named as such */
    rig g;
    kvh_err err = {{0}};
    rig_config(&g, "[tp_params]\n");
    cr_assert_eq(kvh_config_set(&g.cfg, "tp_params.count=-3", &err), 0);
    cr_assert_eq(kvh_router_create_ex(&g.r, &g.cfg, TPDIR, L, NH, HS, CTX, NSEQ, &err), -1);
    cr_assert(strstr(err.msg, "--set: [tp_params] count = -3: must be >= 1"), "%s", err.msg);
    kvh_config_free(&g.cfg);
}

/* Snapshot of one (seq, layer): every head's n, positions and K. */
typedef struct snap {
    uint32_t n[NH];
    int32_t pos[NH][CTX];
    float k0[NH][CTX];
} snap;
static void take(rig *g, int s, int l, snap *out) {
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&g->c, s, l, h);
        out->n[h] = hc->n;
        for (uint32_t i = 0; i < hc->n; i++) {
            out->pos[h][i] = hc->pos[i];
            out->k0[h][i] = ((const float *)hc->k)[(size_t)i * HS];
        }
    }
}

static void expect_enforce_error(const char *plugin, const char *n1, const char *n2) {
    char ini[200];
    snprintf(ini, sizeof ini, "[cache]\nbudget = 10\nslack = 2\n[%s]\nlayers = 2\n", plugin);
    rig g;
    rig_up(&g, ini);
    int32_t pos[40];
    shuffled_positions(pos, 40, 7);
    put(&g, 1, 2, pos, 40);
    static snap before, after;
    take(&g, 1, 2, &before);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_enforce(g.r, &g.c, 1, 2, 0, &err), -1, "%s: bad answer accepted", plugin);
    char who[128];
    snprintf(who, sizeof who, "plugin '%s' (%s.so) layer 2 seq 1 head 0", plugin, plugin);
    cr_assert(strstr(err.msg, who), "lacks '%s': %s", who, err.msg);
    cr_assert(strstr(err.msg, n1), "lacks '%s': %s", n1, err.msg);
    if (n2) cr_assert(strstr(err.msg, n2), "lacks '%s': %s", n2, err.msg);
    take(&g, 1, 2, &after);
    cr_assert(memcmp(&before, &after, sizeof before) == 0, "the cache changed after a rejected answer");
    for (int h = 0; h < NH; h++) check_aligned(&g, 1, 2, h);
    /* the victim scratch marks were cleaned: a good enforce on another layer-less path still works */
    rig_down(&g);
}

Test(router, bad_victim_lists_are_rejected) {
    expect_enforce_error("bad_range", "bad victim list", "slot 540, out of range (n_live 40)");
    expect_enforce_error("bad_dup", "bad victim list", "listed twice");
    expect_enforce_error("bad_few", "bad victim list", "returned 29 victims, at least 30 needed");
}

Test(router, hook_error_message_is_escaped_and_bounded) {
    expect_enforce_error("bad_error", "evict failed: evict broke\\x0a\\x1b[31mred\\x07\\x0d\\x09xxx", "...");
    rig g;
    rig_up(&g, "[cache]\nbudget = 10\nslack = 2\n[bad_error]\nlayers = 2\n");
    int32_t pos[40];
    shuffled_positions(pos, 40, 7);
    put(&g, 1, 2, pos, 40);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_enforce(g.r, &g.c, 1, 2, 0, &err), -1);
    for (const char *p = err.msg; *p; p++)
        cr_assert((unsigned char)*p >= 0x20 && (unsigned char)*p < 0x7f, "raw byte 0x%02x in the message", (unsigned char)*p);
    rig_down(&g);
}

Test(router, compaction_keeps_data_aligned) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 50\nslack = 10\n[tp_params]\nlayers = 0,3\n");
    kvh_err err = {{0}};
    for (int s = 0; s < NSEQ; s++) {
        int32_t pos[300];
        shuffled_positions(pos, 300, 11u + (unsigned)s);
        put(&g, s, 3, pos, 300);
        put(&g, s, 1, pos, 300);
        cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, s, &err), 0, "%s", err.msg);
        for (int h = 0; h < NH; h++) {
            kvh_head_cache *hc = kvh_kvcache_head(&g.c, s, 3, h);
            cr_assert_eq(hc->n, 50);
            cr_assert_not_null(hc->score);
            check_aligned(&g, s, 3, h);
            /* tp_params evicts the smallest positions: 250..299 remain */
            unsigned char seen[300] = {0};
            for (uint32_t i = 0; i < hc->n; i++) {
                cr_assert_geq(hc->pos[i], 250);
                cr_assert(!seen[hc->pos[i]]);
                seen[hc->pos[i]] = 1;
            }
            cr_assert_eq(kvh_kvcache_head(&g.c, s, 1, h)->n, 300, "layer 1 has no policy");
            check_aligned(&g, s, 1, h);
            cr_assert_leq(hc->cap, 60, "shrunk to budget + slack");
        }
    }
    cr_assert_eq(kvh_router_evict_calls(g.r), (uint64_t)NSEQ * NH);
    cr_assert_gt(kvh_router_hook_ns(g.r), 0.0);
    cr_assert_eq(kvh_router_reset_seq(g.r, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_router_reset_seq(g.r, NSEQ, &err), -1);
    rig_down(&g);
}

Test(router, head_budgets) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 20\nslack = 0\n[tp_heads]\nlayers = 1\n");
    int32_t pos[100];
    shuffled_positions(pos, 100, 3);
    put(&g, 0, 1, pos, 100);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), 0, "%s", err.msg);
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&g.c, 0, 1, h);
        cr_assert_eq(hc->budget, 20u + (uint32_t)h);
        cr_assert_eq(hc->n, 20u + (uint32_t)h, "head %d: live counts differ per head", h);
        check_aligned(&g, 0, 1, h);
    }
    rig_down(&g);
    rig_up(&g, "[cache]\nbudget = 20\n[bad_headbudgets0]\n");
    put(&g, 0, 0, pos, 100);
    cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, 0, &err), -1);
    cr_assert(strstr(err.msg, "plugin 'bad_headbudgets0' (bad_headbudgets0.so) layer 0 seq 0: head_budgets gave head 1 budget 0"),
              "%s", err.msg);
    rig_down(&g);
}

Test(router, invariant_live_within_budget_plus_slack) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 24\nslack = 5\n[window]\nlayers = 0,2\n[sink]\nlayers = 1\nsinks = 3\n"
               "[tp_params]\nlayers = 3\n");
    kvh_err err = {{0}};
    /* prefill 40 tokens, then 300 decode steps, on both sequences with different lengths */
    for (int s = 0; s < NSEQ; s++) {
        int32_t pre[40];
        for (int i = 0; i < 40; i++) pre[i] = i;
        for (int l = 0; l < L; l++) put(&g, s, l, pre, 40 - 10 * s);
        cr_assert_eq(kvh_router_after_prefill(g.r, &g.c, s, &err), 0, "%s", err.msg);
        for (int32_t p = 40 - 10 * s; p < 340; p++) {
            for (int l = 0; l < L; l++) {
                put(&g, s, l, &p, 1);
                cr_assert_eq(kvh_router_enforce(g.r, &g.c, s, l, 0, &err), 0, "%s", err.msg);
                for (int h = 0; h < NH; h++) {
                    kvh_head_cache *hc = kvh_kvcache_head(&g.c, s, l, h);
                    cr_assert_leq(hc->n, 24u + 5u, "seq %d layer %d head %d: %u live > budget + slack at pos %d", s, l, h,
                                  hc->n, p);
                    cr_assert_geq(hc->n, p < 24 ? (uint32_t)p + 1 : 24u);
                }
            }
        }
        for (int l = 0; l < L; l++)
            for (int h = 0; h < NH; h++) check_aligned(&g, s, l, h);
    }
    rig_down(&g);
}

Test(router, describe_json) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 24\n[w]\nplugin = window\nlayers = 0,2\nwindow = 7\n[tp_params]\nlayers = 3\nflag = yes\n");
    char buf[4096];
    int n = kvh_router_describe_json(g.r, buf, sizeof buf);
    cr_assert_gt(n, 0);
    cr_assert_lt((size_t)n, sizeof buf);
    cJSON *j = cJSON_Parse(buf);
    cr_assert_not_null(j, "invalid JSON: %s", buf);
    cr_assert_eq(cJSON_GetObjectItem(j, "budget")->valuedouble, 24);
    cJSON *layers = cJSON_GetObjectItem(j, "layers");
    cr_assert_eq(cJSON_GetArraySize(layers), L);
    cr_assert_str_eq(cJSON_GetArrayItem(layers, 0)->valuestring, "w");
    cr_assert(cJSON_IsNull(cJSON_GetArrayItem(layers, 1)));
    cr_assert_str_eq(cJSON_GetArrayItem(layers, 3)->valuestring, "tp_params");
    cJSON *inst = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "instances"), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(inst, "plugin")->valuestring, "window");
    cr_assert_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(inst, "params"), "window")->valuedouble, 7);
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(inst, "layers")), 2);
    cJSON *tp = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "instances"), 1);
    cJSON *params = cJSON_GetObjectItem(tp, "params");
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(params, "flag")));
    cr_assert_eq(cJSON_GetObjectItem(params, "count")->valuedouble, 8, "defaults are listed too");
    cJSON_Delete(j);
    char small[10];
    int m = kvh_router_describe_json(g.r, small, sizeof small);
    cr_assert_eq(m, n, "returns the full length when truncated");
    cr_assert_eq(strlen(small), sizeof small - 1);
    rig_down(&g);
}

/* Stores (role STORE, here the real int8.so / int4.so from the build's plugin dir) route separately
 * from policies: one of each per layer, two stores on a layer rejected naming both sections, settings
 * carrying the store's descriptor and slot sizes, policy names staying policy-only. */
Test(router, stores_route_beside_policies) {
    expect_create_error("[a]\nplugin = " KVH_BUILD_DIR "/plugins/int8.so\ngroup = 5\nlayers = 1-2\n[b]\nplugin = "
                        KVH_BUILD_DIR "/plugins/int4.so\ngroup = 5\nlayers = 0-1\n",
                        "layer 1 is claimed by two stores: [a] (run.ini:4) and [b] (run.ini:8)", NULL);
    rig g;
    rig_up(&g, "[cache]\nbudget = 10\nslack = 2\n[tp_params]\nlayers = 1-2\n[q]\nplugin = " KVH_BUILD_DIR
               "/plugins/int8.so\ngroup = 5\nlayers = 2-3\n");
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g.r, st);
    cr_assert_null(st[1].store);
    cr_assert_eq(st[1].k_slot_bytes, 0);
    cr_assert_not_null(st[2].store);
    cr_assert_eq(st[2].k_slot_bytes, HS + 2, "int8, one group of 5: 5 bytes + one fp16 scale");
    cr_assert_eq(st[2].v_slot_bytes, HS + 2);
    cr_assert_eq(st[2].budget, 10);
    cr_assert_eq(st[3].budget, KVH_BUDGET_UNLIMITED);
    cr_assert_str_eq(kvh_router_layer_policy_name(g.r, 2), "tp_params");
    cr_assert_null(kvh_router_layer_policy_name(g.r, 3));
    cr_assert_str_eq(kvh_router_layer_store_name(g.r, 3), "int8");
    cr_assert_null(kvh_router_layer_store_name(g.r, 1));
    /* a store-only layer is never asked to evict */
    kvh_err err = {{0}};
    cr_assert_eq(kvh_router_enforce(g.r, &g.c, 0, 3, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_router_evict_calls(g.r), 0);
    rig_down(&g);
}
