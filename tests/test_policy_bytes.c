/* test_policy_bytes.c — policy memory (what policy instances take through host->alloc / host->shared) is
 * counted apart from KV memory: kvh_router_policy_bytes and the run record's `policy_bytes` /
 * `policy_bytes_peak` give the exact bytes of tests/plugins/tp_alloc.so (hand-computed from its
 * parameters), kv_bytes_held / kv_bytes_peak are unchanged by it, store memory stays in the KV figures
 * and out of policy_bytes, and a --mem-limit does not bound policy memory. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "runtime/router.h"

#define TPDIR KVH_BUILD_DIR "/tests/plugins"
enum { L = 4, NH = 2, HS = 4, CTX = 64, NSEQ = 2 };

typedef struct rig {
    kvh_run_config cfg;
    kvh_router *r;
    kvh_kvcache c;
} rig;

static void rig_up(rig *g, const char *ini) {
    kvh_err err = {{0}};
    kvh_config_defaults(&g->cfg);
    cr_assert_eq(kvh_config_load_string(&g->cfg, ini, "run.ini", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_router_create_ex(&g->r, &g->cfg, TPDIR, L, NH, HS, CTX, NSEQ, &err), 0, "%s", err.msg);
    kvh_layer_policy_settings st[L];
    kvh_router_layer_settings(g->r, st);
    cr_assert_eq(kvh_kvcache_init(&g->c, NSEQ, L, NH, HS, CTX, st, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_router_bind_cache(g->r, &g->c, &err), 0, "%s", err.msg);
}

static void rig_down(rig *g) {
    kvh_kvcache_free(&g->c);
    kvh_router_free(g->r);
    kvh_config_free(&g->cfg);
}

Test(policy_bytes, router_counts_exactly_what_policies_hold) {
    rig g;
    rig_up(&g, "[cache]\nbudget = 16\n[a]\nplugin = tp_alloc.so\nlayers = all\nbytes = 1000\nper_layer = 24\n"
               "shared = 100\nscratch = 5000\n");
    size_t peak = 0, now = kvh_router_policy_bytes(g.r, &peak);
    /* layers 0..3: 1000, 1024, 1048, 1072 (= 4144), + the section's shared 100; the 5000 scratch block of
     * the last create came and went on top of everything else */
    cr_assert_eq(now, 4244, "policy bytes %zu", now);
    cr_assert_eq(peak, 9244, "policy bytes peak %zu", peak);
    cr_assert_eq(g.c.bytes_held, 0, "policy memory leaked into the KV bytes: %zu", g.c.bytes_held);
    cr_assert_eq(g.c.store_bytes, 0);
    rig_down(&g);
}

Test(policy_bytes, two_sections_add_up_and_stores_stay_out) {
    rig g;
    /* layers 0-1: 500 + 8*l each -> 500 + 508; layers 2-3: 2000 each -> 4000; the store's memory is KV */
    rig_up(&g, "[cache]\nbudget = 16\n[a]\nplugin = tp_alloc.so\nlayers = 0-1\nbytes = 500\nper_layer = 8\n"
               "[b]\nplugin = tp_alloc.so\nlayers = 2-3\nbytes = 1000\nper_layer = 500\n"
               "[s]\nplugin = tp_handle_store.so\nlayers = all\n");
    size_t peak = 0, now = kvh_router_policy_bytes(g.r, &peak);
    /* [b]: layer 2 -> 1000 + 1000, layer 3 -> 1000 + 1500 */
    cr_assert_eq(now, 500 + 508 + 2000 + 2500, "policy bytes %zu", now);
    cr_assert_eq(peak, now);
    cr_assert_gt(g.c.store_bytes, 0, "the handle store's state should be KV memory");
    cr_assert_eq(g.c.bytes_held, g.c.store_bytes, "only store memory is held before any token");
    rig_down(&g);
}

Test(policy_bytes, no_router_no_bytes) {
    size_t peak = 7;
    cr_assert_eq(kvh_router_policy_bytes(NULL, &peak), 0);
    cr_assert_eq(peak, 0);
}

/* ---- the run record ---------------------------------------------------------------------------- */

static const char *model_dir(void) {
    static char dir[512];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/policy_bytes_model", kvh_test_tmpdir());
        kvh_fx_shape s = {.V = 257, .P = 64, .C = 16, .NH = 2, .L = 3};
        kvh_fx_write_model(dir, s, "F32", NULL, NULL, NULL);
        kvh_fx_write_byte_tokenizer(dir);
    }
    return dir;
}

/* kvhost generate with the given plugins and --set values; returns the parsed record. */
static cJSON *generate(const char *plugins, const char *set1, const char *set2, const char *mem_limit) {
    char json[600];
    static int n;
    snprintf(json, sizeof json, "%s/policy_bytes_%d.jsonl", kvh_test_tmpdir(), n++);
    const char *argv[32];
    int argc = 0;
    const char *fixed[] = {"generate", "--model", model_dir(), "--prompt-tokens", "40", "--max-new", "8",
                           "--threads", "1", "--plugin-path", TPDIR, "--plugins", plugins, "--set",
                           "cache.budget=16", "--json", json};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) argv[argc++] = fixed[i];
    if (set1) argv[argc++] = "--set", argv[argc++] = set1;
    if (set2) argv[argc++] = "--set", argv[argc++] = set2;
    if (mem_limit) argv[argc++] = "--mem-limit", argv[argc++] = mem_limit;
    argv[argc] = NULL;
    return kvh_test_generate_record(argv, json);
}

static double field(const cJSON *rec, const char *name) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(rec, name);
    cr_assert(cJSON_IsNumber(x), "record has no number %s", name);
    return x->valuedouble;
}

Test(policy_bytes, record_reports_policy_bytes_beside_unchanged_kv_bytes, .timeout = 120) {
    /* 3 layers of 1000 + 40 * l bytes = 3120, + 64 shared; peak + 4096 scratch */
    cJSON *a = generate("tp_alloc.so", "tp_alloc.per_layer=40", "tp_alloc.shared=64", NULL);
    cr_assert_eq(field(a, "policy_bytes"), 3184);
    cr_assert_eq(field(a, "policy_bytes_peak"), 3184);
    cJSON *b = generate("tp_alloc.so", "tp_alloc.bytes=50000", "tp_alloc.scratch=4096", NULL);
    cr_assert_eq(field(b, "policy_bytes"), 150000);
    cr_assert_eq(field(b, "policy_bytes_peak"), 154096);
    /* the policies hold different amounts; KV memory is the same cache either way */
    cr_assert_eq(field(a, "kv_bytes_held"), field(b, "kv_bytes_held"));
    cr_assert_eq(field(a, "kv_bytes_peak"), field(b, "kv_bytes_peak"));
    cr_assert_gt(field(a, "kv_bytes_held"), 0);
    /* a run without a policy holds no policy memory; a store's memory is not policy memory */
    cJSON *c = generate("tp_handle_store.so", NULL, NULL, NULL);
    cr_assert_eq(field(c, "policy_bytes"), 0);
    cr_assert_eq(field(c, "policy_bytes_peak"), 0);
    cJSON_Delete(a);
    cJSON_Delete(b);
    cJSON_Delete(c);
}

Test(policy_bytes, mem_limit_bounds_kv_not_policy_memory, .timeout = 120) {
    cJSON *a = generate("tp_alloc.so", NULL, NULL, NULL);
    char limit[32];
    snprintf(limit, sizeof limit, "%.0f", field(a, "kv_bytes_peak"));
    /* a limit of exactly the KV peak passes although the policy holds 1 MB more than that */
    cJSON *b = generate("tp_alloc.so", "tp_alloc.bytes=1000000", NULL, limit);
    cr_assert_eq(field(b, "policy_bytes"), 3000000);
    cr_assert_eq(field(b, "kv_bytes_peak"), field(a, "kv_bytes_peak"));
    cJSON_Delete(a);
    cJSON_Delete(b);
}
