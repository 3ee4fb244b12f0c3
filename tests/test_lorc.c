/* test_lorc.c — plugins/lorc (LoRC low-rank KV store) against its definition: K is held as
 * x W_r + b_k with W_r the best rank-r approximation of each head's W_k (V likewise), so
 *   - at full rank (r = head_dim) the logits equal the dense fp32 cache's (up to fp32 rounding);
 *   - when every head's W_k and W_v have rank 2 (weights rebuilt by the test as products of [C, 2] and
 *     [2, head_dim] factors), rank 2 is still exact and rank 1 is not;
 *   - progressive ranks follow the linear schedule by depth (slot sizes 4 + 4r per layer);
 *   - the weight service's errors: an unknown tensor name, and a host without weights, are named;
 *   - bits = 8 (int8 latents, one fp32 scale per token): slots of 8 + r bytes, at full rank within int8
 *     rounding of the dense cache (and not bit-equal: the codes are really used), no better than fp32
 *     latents; stacking int8.so on lorc's layers is refused, naming both sections and lorc's bits. */
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

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 256, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static int try_session(kvh_session **s, const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                       kvh_err *err) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 1;
    o.threads = 1;
    o.plugin_path = KVH_BUILD_DIR "/tests/plugins";
    return kvh_test_session(s, m, plugins, sets, n_sets, &o, err);
}

/* Prefill 12 tokens, then 40 greedy steps; every step's logits into trace[40 * V]. */
static void run(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets, float *trace) {
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(try_session(&s, m, plugins, sets, n_sets, &err), 0, "%s: %s", plugins ? plugins : "dense", err.msg);
    const int V = m->cfg.n_vocab;
    int32_t prompt[12];
    for (int t = 0; t < 12; t++) prompt[t] = (int32_t)((t * 13 + 7) % V);
    const int32_t *pp = prompt;
    int seq = 0, len = 12, one = 1;
    float *logits = malloc((size_t)V * sizeof(float));
    kvh_batch pre = {.n = 1, .seq = &seq, .tokens = &pp, .n_tokens = &len};
    cr_assert_eq(kvh_session_forward(s, &pre, logits, &err), 0, "%s", err.msg);
    for (int step = 0; step < 40; step++) {
        memcpy(trace + (size_t)step * V, logits, (size_t)V * sizeof(float));
        int32_t next = kvh_argmax(logits, V);
        const int32_t *np = &next;
        kvh_batch d = {.n = 1, .seq = &seq, .tokens = &np, .n_tokens = &one};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "%s", err.msg);
    }
    free(logits);
    kvh_session_free(s);
}

static float max_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

Test(lorc, full_rank_equals_the_dense_cache) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 21, "random:small", &err), 0, "%s", err.msg);
    const size_t n = (size_t)40 * c.n_vocab;
    float *dense = malloc(n * sizeof(float)), *low = malloc(n * sizeof(float));
    run(&m, NULL, NULL, 0, dense);
    const char *sets[] = {"lorc.rank=8"};
    run(&m, "lorc.so", sets, 1, low);
    float d = max_diff(dense, low, n);
    cr_assert_leq(d, 2e-4f, "full-rank lorc differs from the dense cache by %g", d);
    free(dense);
    free(low);
    kvh_model_free(&m);
}

/* Rebuilds the K and V columns of every head of every layer as A [C, 2] x B [2, HS] (rank 2). */
static void make_rank2(kvh_model *m, uint64_t seed) {
    const int C = m->cfg.n_embd, NH = m->cfg.n_head, HS = C / NH;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        float *w = (float *)m->layers[l].attn_w; /* the random model's own allocation */
        for (int part = 1; part <= 2; part++)
            for (int h = 0; h < NH; h++) {
                float a[64][2], b[2][16];
                for (int i = 0; i < C; i++)
                    for (int k = 0; k < 2; k++) a[i][k] = (float)((int)(kvh_test_xorshift(&seed) % 2001) - 1000) / 4000.0f;
                for (int k = 0; k < 2; k++)
                    for (int j = 0; j < HS; j++) b[k][j] = (float)((int)(kvh_test_xorshift(&seed) % 2001) - 1000) / 1000.0f;
                for (int i = 0; i < C; i++)
                    for (int j = 0; j < HS; j++)
                        w[(size_t)i * 3 * C + (size_t)part * C + (size_t)h * HS + j] = a[i][0] * b[0][j] + a[i][1] * b[1][j];
            }
    }
}

Test(lorc, exact_at_the_weights_rank_and_not_below) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 22, "random:small", &err), 0, "%s", err.msg);
    make_rank2(&m, 99);
    const size_t n = (size_t)40 * c.n_vocab;
    float *dense = malloc(n * sizeof(float)), *r2 = malloc(n * sizeof(float)), *r1 = malloc(n * sizeof(float));
    run(&m, NULL, NULL, 0, dense);
    const char *s2[] = {"lorc.rank=2"}, *s1[] = {"lorc.rank=1"};
    run(&m, "lorc.so", s2, 1, r2);
    run(&m, "lorc.so", s1, 1, r1);
    float d2 = max_diff(dense, r2, n), d1 = max_diff(dense, r1, n);
    cr_assert_leq(d2, 2e-4f, "rank 2 on rank-2 weights differs by %g", d2);
    cr_assert_gt(d1, 1e-2f, "rank 1 on rank-2 weights is suspiciously exact (%g)", d1);
    free(dense);
    free(r2);
    free(r1);
    kvh_model_free(&m);
}

Test(lorc, progressive_ranks_by_depth) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 23, "random:small", &err), 0, "%s", err.msg);
    kvh_session *s = NULL;
    const char *sets[] = {"lorc.rank=6", "lorc.last_rank=2"};
    cr_assert_eq(try_session(&s, &m, "lorc.so", sets, 2, &err), 0, "%s", err.msg);
    const uint32_t want[3] = {6, 4, 2}; /* 6 + (2 - 6) * l / 2 */
    for (int l = 0; l < 3; l++) {
        cr_assert_eq(s->cache.layer[l].k_slot_bytes, 4 + 4 * want[l], "layer %d K slot %u", l, s->cache.layer[l].k_slot_bytes);
        cr_assert_eq(s->cache.layer[l].v_slot_bytes, 4 + 4 * want[l], "layer %d V slot", l);
    }
    kvh_session_free(s);
    kvh_model_free(&m);
}

Test(lorc, weight_service_errors_name_the_plugin_and_tensor) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 24, "random:small", &err), 0, "%s", err.msg);
    kvh_session *s = NULL;
    const char *sets[] = {"tp_report.bad_tensor=true"};
    cr_assert_eq(try_session(&s, &m, "tp_report.so", sets, 1, &err), -1, "a missing tensor was not refused");
    cr_assert(strstr(err.msg, "plugin 'tp_report' (tp_report.so) layer 0: create failed: host->tensor: no tensor "
                              "'attn.c_attn.wieght' (known: attn.c_attn.weight"), "%s", err.msg);
    kvh_model_free(&m);
    /* a router made without a model (a test rig) has no weights to give */
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    cr_assert_eq(kvh_config_load_string(&cfg, "[lorc]\n", "run.ini", &err), 0, "%s", err.msg);
    kvh_router *r = NULL;
    cr_assert_eq(kvh_router_create(&r, &cfg, 2, 4, 8, 64, 1, &err), -1);
    cr_assert(strstr(err.msg, "plugin 'lorc' (lorc.so) layer 0: create failed: host->tensor: this host has no model "
                              "weights at hand"), "%s", err.msg);
    kvh_config_free(&cfg);
}

Test(lorc, int8_latents) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 21, "random:small", &err), 0, "%s", err.msg);
    kvh_session *s = NULL;
    const char *sets[] = {"lorc.rank=6", "lorc.last_rank=2", "lorc.bits=8"};
    cr_assert_eq(try_session(&s, &m, "lorc.so", sets, 3, &err), 0, "%s", err.msg);
    const uint32_t want[3] = {6, 4, 2};
    for (int l = 0; l < 3; l++) /* head index, fp32 scale, r codes */
        cr_assert_eq(s->cache.layer[l].k_slot_bytes, 8 + want[l], "layer %d K slot %u", l, s->cache.layer[l].k_slot_bytes);
    kvh_session_free(s);
    const size_t n = (size_t)40 * c.n_vocab;
    float *dense = malloc(n * sizeof(float)), *q8 = malloc(n * sizeof(float)), *f32 = malloc(n * sizeof(float));
    run(&m, NULL, NULL, 0, dense);
    const char *s8[] = {"lorc.rank=8", "lorc.bits=8"}, *s32[] = {"lorc.rank=8"};
    run(&m, "lorc.so", s8, 2, q8);
    run(&m, "lorc.so", s32, 1, f32);
    float d8 = max_diff(dense, q8, n), d32 = max_diff(dense, f32, n);
    /* per-token absmax int8 on 8 latents: |error| <= s/2 = max|c| / 254 per latent */
    cr_assert_leq(d8, 2e-2f, "int8 latents at full rank differ from the dense cache by %g", d8);
    cr_assert_gt(d8, 0.0f, "int8 latents are bit-equal to the dense cache: the codes are not used");
    cr_assert_geq(d8, d32, "int8 latents (%g) beat fp32 latents (%g)", d8, d32);
    free(dense);
    free(q8);
    free(f32);
    const char *bad[] = {"lorc.bits=16"};
    cr_assert_eq(try_session(&s, &m, "lorc.so", bad, 1, &err), -1);
    cr_assert(strstr(err.msg, "bits = 16: must be 32 (fp32 latents) or 8 (int8 latents)"), "%s", err.msg);
    cr_assert_eq(try_session(&s, &m, "lorc.so,int8.so", NULL, 0, &err), -1);
    cr_assert(strstr(err.msg, "claimed by two stores: [lorc]") && strstr(err.msg, "lorc's bits = 8"), "%s", err.msg);
    kvh_model_free(&m);
}
