/* test_weights_deferred.c — single-file F16 / BF16 checkpoints keep their layer matrices in the file's format
 * (issue 21): the loader defers converting c_attn, attn c_proj, c_fc and mlp c_proj (their fp32 pointers are
 * NULL after load), a weight format packs them straight from the file's bytes (one temporary fp32 matrix at a
 * time), and a session converts into fp32 only the matrices no format holds, before any backend reads them.
 *
 * Checked: NULL after load and the same values once materialized; a session without a weight format gives
 * the logits of the same values held in fp32 (an F32 checkpoint of those exact values), bit for bit; f16.so on
 * an F16 checkpoint (bf16.so on BF16) holds exactly the file's values (fp16 -> fp32 -> fp16 is lossless) and
 * never allocates their fp32 copies (the model's accounting); per-layer composition (some layers f16, others
 * none) converts only the others; a later session without a format converts the rest; a non-finite value in
 * a deferred matrix is refused at load naming the tensor. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "runtime/session.h"
#include "runtime/weights.h"

/* widths multiples of 32 (the formats' need); MLP inner size 4C = 256 */
static const kvh_fx_shape SHAPE = {.V = 97, .P = 64, .C = 64, .NH = 4, .L = 3};

/* Values k / 4096 (|k| <= 205): exact in F16, BF16 and F32, so checkpoints in the three dtypes hold the
 * same numbers. */
static void exact_edit(const char *name, float *data, size_t n, void *user) {
    (void)name;
    (void)user;
    for (size_t i = 0; i < n; i++) data[i] = roundf(data[i] * 4096.0f) / 4096.0f;
}

static const char *write_fixture(const char *sub, const char *dtype, bool exact) {
    static char dirs[8][600];
    static int next;
    char *dir = dirs[next++ % 8];
    snprintf(dir, sizeof dirs[0], "%s/%s", kvh_test_tmpdir(), sub);
    kvh_fx_write_model(dir, SHAPE, dtype, NULL, exact ? exact_edit : NULL, NULL);
    return dir;
}

static void load(kvh_model *m, const char *dir) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(m, dir, &err), 0, "%s: %s", dir, err.msg);
}

static const float *mat_ptr(const kvh_model *m, int l, int w) {
    const kvh_layer_weights *lw = &m->layers[l];
    return w == KVH_MAT_ATTN_QKV ? lw->attn_w : w == KVH_MAT_ATTN_PROJ ? lw->proj_w : w == KVH_MAT_MLP_FC ? lw->fc_w
                                                                                                        : lw->fcproj_w;
}

static size_t layer_floats(void) {
    const size_t C = (size_t)SHAPE.C, F = 4 * C;
    return C * 3 * C + C * C + C * F + F * C;
}

/* kvh_test_compare_sessions' script (a prefill of two prompts, then decode at batch 2 and 1); tol 0: bit
 * for bit. */
static void compare(kvh_session *a, kvh_session *b, double tol, const char *what) {
    kvh_test_compare_sessions(a, b, SHAPE.V, tol, tol, 6, what);
}

Test(weights_deferred, null_after_load_then_same_values) {
    const char *dtypes[] = {"F16", "BF16"};
    for (int d = 0; d < 2; d++) {
        char sub[32];
        snprintf(sub, sizeof sub, "vals_%s", dtypes[d]);
        kvh_model m, f32;
        load(&m, write_fixture(sub, dtypes[d], true));
        snprintf(sub, sizeof sub, "vals32_%s", dtypes[d]);
        load(&f32, write_fixture(sub, "F32", true));
        cr_assert_eq(m.n_deferred, 4 * SHAPE.L, "%s: %d matrices deferred", dtypes[d], m.n_deferred);
        cr_assert_eq(m.deferred_floats, SHAPE.L * layer_floats());
        cr_assert_eq(m.materialized_floats, 0);
        cr_assert_not_null(m.map_base, "deferred matrices are read from the mapping");
        /* the rest converted into the arena as before: embeddings, biases, LayerNorms */
        cr_assert_eq(m.arena_floats >= m.n_params - m.deferred_floats, 1);
        cr_assert(m.wte >= m.arena && m.wte < m.arena + m.arena_floats);
        cr_assert_not_null(m.layers[1].attn_b);
        for (int l = 0; l < SHAPE.L; l++)
            for (int w = 0; w < 4; w++) {
                cr_assert_null(mat_ptr(&m, l, w), "%s: layer %d matrix %d not deferred", dtypes[d], l, w);
                cr_assert(kvh_model_needs_materialize(&m, l, w));
                cr_assert_not_null(kvh_model_deferred(&m, l, w));
            }
        /* the temporary conversion gives the values the file holds */
        float *tmp = malloc(layer_floats() * sizeof(float));
        kvh_model_deferred_to_f32(&m, 1, KVH_MAT_MLP_FC, tmp);
        cr_assert(memcmp(tmp, f32.layers[1].fc_w, (size_t)SHAPE.C * 4 * SHAPE.C * sizeof(float)) == 0);
        free(tmp);
        kvh_err err = {{0}};
        cr_assert_eq(kvh_model_materialize(&m, 2, KVH_MAT_ATTN_PROJ, &err), 0, "%s", err.msg);
        cr_assert_eq(m.materialized_floats, (size_t)SHAPE.C * SHAPE.C);
        cr_assert_not(kvh_model_needs_materialize(&m, 2, KVH_MAT_ATTN_PROJ));
        cr_assert_eq(kvh_model_materialize(&m, 2, KVH_MAT_ATTN_PROJ, &err), 0, "a second call is a no-op");
        cr_assert_eq(m.materialized_floats, (size_t)SHAPE.C * SHAPE.C);
        cr_assert_eq(kvh_model_materialize_all(&m, &err), 0, "%s", err.msg);
        cr_assert_eq(m.materialized_floats, m.deferred_floats);
        const size_t C = (size_t)SHAPE.C, F = 4 * C, sizes[4] = {C * 3 * C, C * C, C * F, F * C};
        for (int l = 0; l < SHAPE.L; l++)
            for (int w = 0; w < 4; w++)
                cr_assert(memcmp(mat_ptr(&m, l, w), mat_ptr(&f32, l, w), sizes[w] * sizeof(float)) == 0,
                          "%s: layer %d matrix %d differs from the F32 checkpoint's", dtypes[d], l, w);
        kvh_model_free(&m);
        kvh_model_free(&f32);
    }
}

/* No weight format: the session converts every deferred matrix before the backend reads it, and the logits
 * are those of the same values held in fp32, bit for bit (an F32 checkpoint of the same numbers; and the
 * model materialized up front, the load-time conversion kvhost did before). */
Test(weights_deferred, no_format_same_logits_bit_for_bit) {
    const char *dir16 = write_fixture("nf16", "F16", true), *dir32 = write_fixture("nf32", "F32", true);
    kvh_model m, eager, f32;
    load(&m, dir16);
    load(&eager, dir16);
    load(&f32, dir32);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_materialize_all(&eager, &err), 0, "%s", err.msg);
    kvh_session *s = kvh_test_open_session(&m, NULL, NULL, 2, 2);
    cr_assert_null(s->weights);
    cr_assert_eq(m.materialized_floats, m.deferred_floats, "the session converts every deferred matrix");
    for (int l = 0; l < SHAPE.L; l++)
        for (int w = 0; w < 4; w++) cr_assert_not_null(mat_ptr(&m, l, w));
    kvh_session *e = kvh_test_open_session(&eager, NULL, NULL, 2, 2);
    kvh_session *r = kvh_test_open_session(&f32, NULL, NULL, 2, 2);
    compare(s, e, 0, "deferred vs converted up front");
    kvh_session_free(s);
    kvh_session_free(e);
    s = kvh_test_open_session(&m, NULL, NULL, 2, 2);
    compare(s, r, 0, "F16 checkpoint vs F32 of the same values");
    kvh_session_free(s);
    kvh_session_free(r);
    kvh_model_free(&m);
    kvh_model_free(&eager);
    kvh_model_free(&f32);
}

/* f16.so on F16 (bf16.so on BF16): every layer matrix and the head packed, their fp32 copies never
 * allocated, and the packed values are exactly the file's (unpack gives back the converted values bit for
 * bit: fp16 -> fp32 -> fp16 is lossless); logits as the same format on an F32 checkpoint of the same values,
 * bit for bit, and as the fp32 model within fp32 summation order. */
static void check_native(const char *dtype, const char *plugin, bool exact) {
    char sub[64];
    snprintf(sub, sizeof sub, "native_%s_%d", dtype, exact);
    const char *dir = write_fixture(sub, dtype, exact);
    kvh_model m, ref;
    load(&m, dir);
    load(&ref, dir);
    kvh_session *s = kvh_test_open_session(&m, plugin, NULL, 2, 2);
    const kvh_weight_set *ws = s->weights;
    cr_assert_not_null(ws);
    cr_assert_eq(ws->n_packed, 4 * SHAPE.L + 1);
    cr_assert_eq(m.materialized_floats, 0, "%s: %zu fp32 floats allocated for packed matrices", plugin,
                 m.materialized_floats);
    cr_assert_eq(ws->never_materialized_bytes, SHAPE.L * layer_floats() * sizeof(float));
    cr_assert_geq(ws->released_bytes, ws->never_materialized_bytes);
    cr_assert_eq(kvh_weights_bytes_held(&m, ws), m.n_params * 4 - ws->replaced_fp32_bytes + ws->packed_bytes);
    for (int l = 0; l < SHAPE.L; l++)
        for (int w = 0; w < 4; w++) {
            cr_assert_null(mat_ptr(&m, l, w), "layer %d matrix %d was materialized", l, w);
            const kvh_packed_matrix *pm = kvh_weights_matrix(ws, l, (uint32_t)w);
            cr_assert_not_null(pm);
            const uint32_t k = pm->info.k, n = pm->info.n;
            float *u = malloc((size_t)k * n * sizeof(float)), *src = malloc((size_t)k * n * sizeof(float));
            pm->desc->unpack(pm->state, &pm->info, pm->packed, 0, n, u); /* [n, k] output-major */
            kvh_model_deferred_to_f32(&m, l, w, src);                  /* [k, n] input-major */
            for (uint32_t j = 0; j < n; j++)
                for (uint32_t i = 0; i < k; i++) {
                    float a = u[(size_t)j * k + i], b = src[(size_t)i * n + j];
                    cr_assert(memcmp(&a, &b, sizeof a) == 0, "%s %s layer %d matrix %d (%u, %u): held %a, file %a",
                              dtype, plugin, l, w, i, j, (double)a, (double)b);
                }
            free(u);
            free(src);
        }
    /* the fp32 model of the same values (materialized), without a format: within fp32 summation order */
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_materialize_all(&ref, &err), 0, "%s", err.msg);
    kvh_session *r = kvh_test_open_session(&ref, NULL, NULL, 2, 2);
    compare(s, r, 2e-5, plugin);
    kvh_session_free(r);
    if (exact) { /* the same format over an F32 checkpoint of the same numbers packs the same bytes */
        snprintf(sub, sizeof sub, "native32_%s", dtype);
        kvh_model f32;
        load(&f32, write_fixture(sub, "F32", true));
        kvh_session *t = kvh_test_open_session(&f32, plugin, NULL, 2, 2);
        for (int l = 0; l < SHAPE.L; l++)
            for (int w = 0; w < 4; w++) {
                const kvh_packed_matrix *a = kvh_weights_matrix(ws, l, (uint32_t)w);
                const kvh_packed_matrix *b = kvh_weights_matrix(t->weights, l, (uint32_t)w);
                cr_assert_eq(a->bytes, b->bytes);
                cr_assert(memcmp(a->packed, b->packed, a->bytes) == 0, "layer %d matrix %d packed differently", l, w);
            }
        /* fresh caches; packs from the file's bytes again */
        kvh_session *s2 = kvh_test_open_session(&m, plugin, NULL, 2, 2);
        cr_assert_eq(m.materialized_floats, 0);
        compare(s2, t, 0, "checkpoint vs F32 of the same values, both packed");
        kvh_session_free(s2);
        kvh_session_free(t);
        kvh_model_free(&f32);
    }
    /* a later session on the same model without a format converts what it needs then */
    kvh_session *plain = kvh_test_open_session(&m, NULL, NULL, 2, 2);
    cr_assert_eq(m.materialized_floats, m.deferred_floats);
    kvh_session_free(plain);
    kvh_session_free(s);
    kvh_model_free(&m);
    kvh_model_free(&ref);
}

Test(weights_deferred, f16_on_f16_exact_and_never_fp32) {
    check_native("F16", "f16.so", false);
    check_native("F16", "f16.so", true);
}

Test(weights_deferred, bf16_on_bf16_exact_and_never_fp32) {
    check_native("BF16", "bf16.so", false);
    check_native("BF16", "bf16.so", true);
}

/* Per-layer composition: layers 0 and 2 in f16, layer 1 without a format (and the head fp32): only layer
 * 1's matrices are converted; logits as the same composition over an F32 checkpoint of the same values. */
Test(weights_deferred, layer_subset) {
    kvh_model m, f32;
    load(&m, write_fixture("sub16", "F16", true));
    load(&f32, write_fixture("sub32", "F32", true));
    const char *ini = "[edge]\nplugin = f16.so\nlayers = 0,2\nlm_head = false\n";
    kvh_session *s = kvh_test_open_session(&m, NULL, ini, 2, 2);
    kvh_session *r = kvh_test_open_session(&f32, NULL, ini, 2, 2);
    cr_assert_eq(s->weights->n_packed, 8);
    cr_assert_eq(m.materialized_floats, layer_floats(), "only layer 1 is converted (%zu floats)", m.materialized_floats);
    cr_assert_eq(s->weights->never_materialized_bytes, 2 * layer_floats() * sizeof(float));
    for (int w = 0; w < 4; w++) {
        cr_assert_null(mat_ptr(&m, 0, w));
        cr_assert_not_null(mat_ptr(&m, 1, w));
        cr_assert_null(mat_ptr(&m, 2, w));
    }
    cr_assert_eq(kvh_weights_bytes_held(&m, s->weights), kvh_weights_bytes_held(&f32, r->weights));
    compare(s, r, 0, "f16 on layers 0 and 2");
    kvh_session_free(s);
    kvh_session_free(r);
    kvh_model_free(&m);
    kvh_model_free(&f32);
}

/* A non-finite value in a deferred matrix is still refused at load, naming the tensor and the element. */
Test(weights_deferred, nonfinite_deferred_matrix_refused_at_load) {
    const struct {
        const char *dtype;
        kvh_fx_plant p;
        const char *want;
    } cases[] = {
        {"F16", {"h.1.mlp.c_fc.weight", 300, NAN},
         "tensor 'h.1.mlp.c_fc.weight' holds a non-finite value (nan) at element 300 (row 1, column 44)"},
        {"BF16", {"h.2.attn.c_proj.weight", 5, -INFINITY},
         "tensor 'h.2.attn.c_proj.weight' holds a non-finite value (-inf) at element 5 (row 0, column 5)"},
        {"F16", {"h.0.attn.c_attn.weight", 4000, INFINITY},
         "tensor 'h.0.attn.c_attn.weight' holds a non-finite value (inf) at element 4000 (row 20, column 160)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[600];
        snprintf(dir, sizeof dir, "%s/bad_%zu", kvh_test_tmpdir(), i);
        kvh_fx_plant p[2] = {cases[i].p, {NULL, 0, 0}};
        kvh_fx_write_model(dir, SHAPE, cases[i].dtype, NULL, kvh_fx_plant_edit, p);
        kvh_model m;
        kvh_err err = {{0}};
        cr_assert_eq(kvh_model_load(&m, dir, &err), -1, "%s: loaded", cases[i].want);
        cr_assert(strstr(err.msg, cases[i].want), "message lacks \"%s\": %s", cases[i].want, err.msg);
        cr_assert(strstr(err.msg, "model.safetensors"), "%s", err.msg);
    }
}

/* A KV store that reads c_attn through host->tensor at create (lorc) on an F16 checkpoint: the matrix is
 * converted on demand, and f16.so on the same layers then packs from that copy; logits as over an F32
 * checkpoint of the same values, bit for bit. */
Test(weights_deferred, host_tensor_converts_on_demand) {
    kvh_model m, f32;
    load(&m, write_fixture("lorc16", "F16", true));
    load(&f32, write_fixture("lorc32", "F32", true));
    const char *plugins = "lorc.so,f16.so";
    const char *sets[] = {"lorc.rank=8"};
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 2;
    o.threads = 2;
    kvh_session *s = NULL, *r = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, &m, plugins, sets, 1, &o, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_test_session(&r, &f32, plugins, sets, 1, &o, &err), 0, "%s", err.msg);
    cr_assert_eq(s->weights->n_packed, 4 * SHAPE.L + 1);
    for (int l = 0; l < SHAPE.L; l++) {
        cr_assert_not_null(m.layers[l].attn_w, "layer %d: lorc's host->tensor converted c_attn", l);
        cr_assert_null(m.layers[l].fc_w, "layer %d: c_fc is packed only", l);
    }
    cr_assert_lt(m.materialized_floats, m.deferred_floats);
    compare(s, r, 0, "lorc + f16 on F16 vs F32 of the same values");
    kvh_session_free(s);
    kvh_session_free(r);
    kvh_model_free(&m);
    kvh_model_free(&f32);
}
