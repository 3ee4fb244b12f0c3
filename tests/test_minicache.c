/* test_minicache.c — the MiniCache store (plugins/minicache: mc_math.h, minicache.so).
 * 1. The math on hand-worked cases: identical / orthogonal / opposite directions, t = 0 and 1, a zero
 *    vector, the retention rule, and SLERP's defining property (the result lies on the arc at angle
 *    t * Omega from e_a) against acos computed here.
 * 2. The real minicache.so driven hook by hook through a fake kvp_host (alloc / free / shared / param
 *    with a byte limit): identical-direction layers merge and reconstruct both layers' rows exactly,
 *    orthogonal tokens are retained, release() frees entries (refcounts: a merged entry outlives one
 *    layer's release) and freed entries are reused, attend() equals a double-precision attention over
 *    the decode()d rows (causal mask included), an alloc failure is a clean error.
 * 3. End to end through the session on the tiny model (skipped without ../shared): gamma 1 (nothing
 *    merged) within 1e-4 of the plain cache's logits; default gamma runs and holds fewer KV bytes than
 *    fp32; composition with h2o.so at a budget keeps live <= budget + slack; a too small KV memory
 *    limit is a clean error. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/minicache/mc_math.h"
#include "runtime/config.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "kvp/kvp.h"
#include "model/model.h"
#include "model/sampler.h"
#include "runtime/session.h"

#define PDIR KVH_BUILD_DIR "/plugins"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float rnd_unit(void) { return (float)(kvh_test_xorshift(&rng_state) >> 40) / 16777216.0f * 2.0f - 1.0f; }

/* ---- 1. the math --------------------------------------------------------------------------------- */

static double angle_d(const float *a, const float *b, int n) { /* independent: double acos of normalized dot */
    double d = 0, na = 0, nb = 0;
    for (int i = 0; i < n; i++) {
        d += (double)a[i] * b[i];
        na += (double)a[i] * a[i];
        nb += (double)b[i] * b[i];
    }
    double c = d / sqrt(na * nb);
    return acos(c > 1 ? 1 : (c < -1 ? -1 : c));
}

Test(mc_math, identical_directions) {
    float x[4] = {3, 0, 4, 0}, e[4], out[4];
    cr_assert_float_eq(mc_unit(x, 4, e), 5.0, 1e-12);
    cr_assert_float_eq(e[0], 0.6f, 1e-7);
    cr_assert_float_eq(e[2], 0.8f, 1e-7);
    cr_assert_float_eq(mc_angular_distance(e, e, 4), 0.0, 1e-6);
    mc_slerp(e, e, 4, 0.6, out);
    for (int i = 0; i < 4; i++) cr_assert_float_eq(out[i], e[i], 1e-7, "component %d", i);
}

Test(mc_math, orthogonal_directions) {
    float a[2] = {1, 0}, b[2] = {0, 1}, out[2];
    cr_assert_float_eq(mc_angular_distance(a, b, 2), 0.5, 1e-12);
    /* the arc from a to b: angle t * pi/2 */
    mc_slerp(a, b, 2, 0.6, out);
    cr_assert_float_eq(out[0], cos(0.6 * MC_PI / 2), 1e-7);
    cr_assert_float_eq(out[1], sin(0.6 * MC_PI / 2), 1e-7);
    mc_slerp(a, b, 2, 0.0, out);
    cr_assert_float_eq(out[0], 1.0f, 1e-7);
    cr_assert_float_eq(out[1], 0.0f, 1e-7);
    mc_slerp(a, b, 2, 1.0, out);
    cr_assert_float_eq(out[0], 0.0f, 1e-7);
    cr_assert_float_eq(out[1], 1.0f, 1e-7);
}

Test(mc_math, endpoints_and_arc_property_on_random_vectors) {
    enum { N = 16 };
    for (int trial = 0; trial < 50; trial++) {
        float xa[N], xb[N], ea[N], eb[N], out[N];
        for (int i = 0; i < N; i++) {
            xa[i] = rnd_unit();
            xb[i] = rnd_unit();
        }
        mc_unit(xa, N, ea);
        mc_unit(xb, N, eb);
        double w = angle_d(xa, xb, N);
        cr_assert_float_eq(mc_angular_distance(ea, eb, N), w / MC_PI, 1e-6);
        mc_slerp(ea, eb, N, 0.0, out);
        for (int i = 0; i < N; i++) cr_assert_float_eq(out[i], ea[i], 1e-6);
        mc_slerp(ea, eb, N, 1.0, out);
        for (int i = 0; i < N; i++) cr_assert_float_eq(out[i], eb[i], 1e-6);
        const double ts[] = {0.25, 0.5, 0.6, 0.9};
        for (int k = 0; k < 4; k++) {
            mc_slerp(ea, eb, N, ts[k], out);
            double nr = 0;
            for (int i = 0; i < N; i++) nr += (double)out[i] * out[i];
            cr_assert_float_eq(sqrt(nr), 1.0, 1e-6, "unit length");
            cr_assert_float_eq(angle_d(ea, out, N), ts[k] * w, 1e-4, "angle from e_a, t %g", ts[k]);
            cr_assert_float_eq(angle_d(out, eb, N), (1 - ts[k]) * w, 1e-4, "angle to e_b, t %g", ts[k]);
        }
    }
}

Test(mc_math, opposite_directions_and_zero_vectors) {
    float a[3] = {0, 1, 0}, b[3] = {0, -1, 0}, out[3];
    cr_assert_float_eq(mc_angular_distance(a, b, 3), 1.0, 1e-12);
    mc_slerp(a, b, 3, 0.3, out); /* degenerate: normalized lerp = 0.4 a -> a */
    for (int i = 0; i < 3; i++) cr_assert_float_eq(out[i], a[i], 1e-7);
    mc_slerp(a, b, 3, 0.5, out); /* lerp vanishes: documented choice e_b for t >= 0.5 */
    for (int i = 0; i < 3; i++) cr_assert_float_eq(out[i], b[i], 1e-7);
    float z[3] = {0, 0, 0}, ez[3] = {9, 9, 9};
    cr_assert_eq(mc_unit(z, 3, ez), 0.0);
    for (int i = 0; i < 3; i++) cr_assert_eq(ez[i], 0.0f);
    cr_assert_float_eq(mc_angular_distance(ez, a, 3), 0.5, 1e-12);
    mc_slerp(ez, a, 3, 0.6, out); /* a zero side: the other side's direction */
    for (int i = 0; i < 3; i++) cr_assert_float_eq(out[i], a[i], 1e-7);
    mc_slerp(a, ez, 3, 0.6, out);
    for (int i = 0; i < 3; i++) cr_assert_float_eq(out[i], a[i], 1e-7);
    for (int i = 0; i < 3; i++) cr_assert(!isnan(out[i]));
}

Test(mc_math, retention_rule) {
    /* d in [0.1, 0.5]: gamma 1 keeps all, gamma 0 keeps only the farthest, 0.4 splits at 0.34 */
    const double ds[] = {0.1, 0.2, 0.3, 0.4, 0.5};
    for (int i = 0; i < 5; i++) {
        cr_assert_eq(mc_retain(ds[i], 0.1, 0.5, 1.0), 1, "gamma 1, d %g", ds[i]);
        cr_assert_eq(mc_retain(ds[i], 0.1, 0.5, 0.0), i == 4, "gamma 0, d %g", ds[i]);
        cr_assert_eq(mc_retain(ds[i], 0.1, 0.5, 0.4), i >= 3, "gamma 0.4, d %g", ds[i]);
        cr_assert_eq(mc_retain(ds[i], 0.1, 0.5, 0.05), i == 4, "gamma 0.05, d %g", ds[i]);
    }
    cr_assert_eq(mc_retain(0.2, 0.2, 0.2, 0.05), 1, "one token: retained");
}

/* ---- 2. the plugin through a fake host ------------------------------------------------------------- */

typedef struct fake_alloc {
    struct fake_alloc *next;
    size_t bytes;
} fake_alloc;

typedef struct fake_host {
    kvp_host host;
    fake_alloc *allocs;
    size_t held, limit; /* limit 0 = none */
    void *shared;
    size_t shared_bytes;
    double start_layer, t, gamma;
    char error[512];
    char log[512];
} fake_host;

static void *f_alloc(void *ctx, size_t bytes) {
    fake_host *f = ctx;
    if (f->limit && f->held + bytes > f->limit) return NULL;
    fake_alloc *a = calloc(1, sizeof(fake_alloc) + bytes);
    if (!a) return NULL;
    a->bytes = bytes;
    a->next = f->allocs;
    f->allocs = a;
    f->held += bytes;
    return a + 1; /* 16-byte header on LP64: the block stays suitably aligned */
}
static void f_free(void *ctx, void *p) {
    fake_host *f = ctx;
    if (!p) return;
    for (fake_alloc **pp = &f->allocs; *pp; pp = &(*pp)->next) {
        if ((void *)(*pp + 1) == p) {
            fake_alloc *a = *pp;
            *pp = a->next;
            f->held -= a->bytes;
            free(a);
            return;
        }
    }
    cr_assert_fail("free of a pointer the fake host never gave");
}
static void *f_shared(void *ctx, size_t bytes) {
    fake_host *f = ctx;
    if (f->shared) return bytes == f->shared_bytes ? f->shared : NULL;
    f->shared = f_alloc(ctx, bytes);
    if (f->shared) f->shared_bytes = bytes;
    return f->shared;
}
static double f_param(void *ctx, const char *name) {
    fake_host *f = ctx;
    if (strcmp(name, "start_layer") == 0) return f->start_layer;
    if (strcmp(name, "t") == 0) return f->t;
    if (strcmp(name, "gamma") == 0) return f->gamma;
    return 0;
}
static void f_set_error(void *ctx, const char *msg) { snprintf(((fake_host *)ctx)->error, 512, "%s", msg); }
static void f_log(void *ctx, int level, const char *msg) {
    (void)level;
    snprintf(((fake_host *)ctx)->log, 512, "%s", msg);
}

static void fake_init(fake_host *f, double gamma) {
    memset(f, 0, sizeof *f);
    f->host = (kvp_host){.struct_size = sizeof(kvp_host), .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR,
                         .ctx = f, .log = f_log, .set_error = f_set_error, .alloc = f_alloc, .free = f_free,
                         .param = f_param, .shared = f_shared};
    f->start_layer = -1;
    f->t = 0.6;
    f->gamma = gamma;
}
static void fake_free(fake_host *f) {
    while (f->allocs) {
        fake_alloc *a = f->allocs;
        f->allocs = a->next;
        free(a);
    }
}

static const kvp_descriptor *load_minicache(void **dl) {
    *dl = dlopen(PDIR "/minicache.so", RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(*dl, "dlopen %s: %s", PDIR "/minicache.so", dlerror());
    kvp_entry_fn fn;
    void *sym = dlsym(*dl, KVP_ENTRY_SYMBOL);
    cr_assert_not_null(sym);
    memcpy(&fn, &sym, sizeof fn);
    const kvp_descriptor *d = fn();
    cr_assert_eq(d->role, KVP_ROLE_STORE);
    cr_assert_not_null(d->append);
    cr_assert_not_null(d->release);
    return d;
}

enum { HS = 8, NL = 4, NH = 2, NCTX = 64 };

typedef struct mc_slot { /* the documented handle-slot format of paired layers */
    uint32_t entry;
    float norm;
} mc_slot;

typedef struct layer_t {
    kvp_instance inst;
    mc_slot k[NCTX], v[NCTX];
    int32_t pos[NCTX];
    uint32_t n;
} layer_t;

static void make_layer(const kvp_descriptor *d, fake_host *f, uint32_t l, layer_t *L) {
    memset(L, 0, sizeof *L);
    kvp_layer_info info = {.struct_size = sizeof info, .layer = l, .n_layer = NL, .n_q_head = NH, .n_kv_head = NH,
                           .head_dim = HS, .n_ctx = NCTX, .n_seq = 1};
    L->inst.struct_size = sizeof L->inst;
    cr_assert_eq(d->create(&f->host, &info, &L->inst), KVP_OK, "create layer %u: %s", l, f->error);
    cr_assert_eq(L->inst.k_slot_bytes, sizeof(mc_slot), "paired layer slot is {entry, norm}");
}

/* Appends T rows (k and v given as [T][HS]) to head h of layer L at positions p0.. */
static int append(const kvp_descriptor *d, layer_t *L, uint32_t h, uint32_t T, int32_t p0, const float *k,
                  const float *v) {
    for (uint32_t t = 0; t < T; t++) L->pos[L->n + t] = p0 + (int32_t)t;
    kvp_append_args a = {.struct_size = sizeof a, .seq = 0, .head = h, .head_dim = HS, .n_new = T,
                         .first_slot = L->n, .pos = L->pos, .k_rows = k, .v_rows = v, .row_stride = HS,
                         .k_slots = L->k, .v_slots = L->v};
    int rc = d->append(L->inst.state, &a);
    L->n += T;
    return rc;
}

static void release(const kvp_descriptor *d, layer_t *L, uint32_t h, const uint32_t *slots, uint32_t n) {
    kvp_release_args a = {.struct_size = sizeof a, .seq = 0, .head = h, .n_live = L->n, .pos = L->pos,
                          .k_slots = L->k, .v_slots = L->v, .slots = slots, .n_slots = n};
    d->release(L->inst.state, &a);
}

static void assert_row_eq(const float *got, const float *want, double tol, const char *what, int t) {
    for (int i = 0; i < HS; i++)
        cr_assert(fabs(got[i] - want[i]) <= tol * (1 + fabs(want[i])), "%s token %d [%d]: %g vs %g", what, t, i,
                  got[i], want[i]);
}

Test(minicache_hooks, identical_directions_merge_and_reconstruct_exactly) {
    void *dl;
    const kvp_descriptor *d = load_minicache(&dl);
    fake_host f;
    fake_init(&f, 0.05);
    layer_t *lo = malloc(sizeof *lo), *up = malloc(sizeof *up);
    make_layer(d, &f, 2, lo); /* start_layer -1 -> 4/2 = 2: pair (2,3) */
    make_layer(d, &f, 3, up);
    enum { T = 20 };
    float ka[T * HS], va[T * HS], kb[T * HS], vb[T * HS], row[HS];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < HS; i++) {
            ka[t * HS + i] = rnd_unit();
            va[t * HS + i] = rnd_unit();
            /* same direction, another magnitude; the last token points elsewhere (so d_max > d_min) */
            kb[t * HS + i] = t == T - 1 ? rnd_unit() : (1.5f + 0.1f * t) * ka[t * HS + i];
            vb[t * HS + i] = t == T - 1 ? rnd_unit() : (0.5f + 0.2f * t) * va[t * HS + i];
        }
    cr_assert_eq(append(d, lo, 1, T, 0, ka, va), KVP_OK, "%s", f.error);
    cr_assert_eq(append(d, up, 1, T, 0, kb, vb), KVP_OK, "%s", f.error);
    for (int t = 0; t < T; t++) {
        int merged = t < T - 1;
        cr_assert_eq(up->k[t].entry == lo->k[t].entry, merged, "token %d K %s", t, merged ? "merged" : "retained");
        cr_assert_eq(up->v[t].entry == lo->v[t].entry, merged, "token %d V", t);
        d->decode(lo->inst.state, KVP_WHICH_K, &lo->k[t], row);
        assert_row_eq(row, ka + t * HS, 1e-6, "lower K", t);
        d->decode(lo->inst.state, KVP_WHICH_V, &lo->v[t], row);
        assert_row_eq(row, va + t * HS, 1e-6, "lower V", t);
        d->decode(up->inst.state, KVP_WHICH_K, &up->k[t], row);
        assert_row_eq(row, kb + t * HS, 1e-6, "upper K", t);
        d->decode(up->inst.state, KVP_WHICH_V, &up->v[t], row);
        assert_row_eq(row, vb + t * HS, 1e-6, "upper V", t);
    }
    d->destroy(lo->inst.state);
    d->destroy(up->inst.state);
    cr_assert(strstr(f.log, "merged K 19 / 20") != NULL, "summary log: %s", f.log);
    fake_free(&f);
    free(lo);
    free(up);
    dlclose(dl);
}

Test(minicache_hooks, orthogonal_tokens_retained_gamma1_merges_none) {
    void *dl;
    const kvp_descriptor *d = load_minicache(&dl);
    for (int g = 0; g < 2; g++) {
        fake_host f;
        fake_init(&f, g == 0 ? 0.05 : 1.0);
        layer_t *lo = malloc(sizeof *lo), *up = malloc(sizeof *up);
        make_layer(d, &f, 2, lo);
        make_layer(d, &f, 3, up);
        /* even tokens: same direction in both layers (d = 0); odd: orthogonal (d = 0.5) */
        enum { T = 10 };
        float ka[T * HS] = {0}, kb[T * HS] = {0};
        for (int t = 0; t < T; t++) {
            ka[t * HS + 0] = 1.0f + (float)t;
            kb[t * HS + (t % 2 ? 1 : 0)] = 2.0f;
        }
        cr_assert_eq(append(d, lo, 0, T, 0, ka, ka), KVP_OK, "%s", f.error);
        cr_assert_eq(append(d, up, 0, T, 0, kb, kb), KVP_OK, "%s", f.error);
        for (int t = 0; t < T; t++) {
            int merged = g == 0 && t % 2 == 0;
            cr_assert_eq(up->k[t].entry == lo->k[t].entry, merged, "gamma %s token %d", g ? "1" : "0.05", t);
            float row[HS];
            d->decode(up->inst.state, KVP_WHICH_K, &up->k[t], row);
            assert_row_eq(row, kb + t * HS, 1e-6, "upper K", t);
        }
        d->destroy(lo->inst.state);
        d->destroy(up->inst.state);
        fake_free(&f);
        free(lo);
        free(up);
    }
    dlclose(dl);
}

Test(minicache_hooks, release_frees_and_reuses_entries) {
    void *dl;
    const kvp_descriptor *d = load_minicache(&dl);
    fake_host f;
    fake_init(&f, 0.0); /* merge everything but the farthest token */
    layer_t *lo = malloc(sizeof *lo), *up = malloc(sizeof *up);
    make_layer(d, &f, 2, lo);
    make_layer(d, &f, 3, up);
    enum { T = 8 };
    float ka[T * HS], kb[T * HS], row[HS];
    for (int i = 0; i < T * HS; i++) {
        ka[i] = rnd_unit();
        kb[i] = ka[i] + 0.3f * rnd_unit();
    }
    cr_assert_eq(append(d, lo, 0, T, 0, ka, ka), KVP_OK);
    cr_assert_eq(append(d, up, 0, T, 0, kb, kb), KVP_OK);
    int merged_slot = -1;
    for (int t = 0; t < T; t++)
        if (up->k[t].entry == lo->k[t].entry && merged_slot < 0) merged_slot = t;
    cr_assert_geq(merged_slot, 0, "gamma 0 merged nothing");
    float before[HS];
    d->decode(up->inst.state, KVP_WHICH_K, &up->k[merged_slot], before);
    /* the lower layer evicts every token: merged entries survive for the upper layer */
    uint32_t all[T];
    for (uint32_t i = 0; i < T; i++) all[i] = i;
    release(d, lo, 0, all, T);
    lo->n = 0;
    /* new lower tokens must not overwrite the merged entry the upper layer still uses */
    cr_assert_eq(append(d, lo, 0, T, T, ka, ka), KVP_OK);
    d->decode(up->inst.state, KVP_WHICH_K, &up->k[merged_slot], row);
    assert_row_eq(row, before, 0, "upper K after the lower layer's release and new appends", merged_slot);
    for (int t = 0; t < T; t++)
        cr_assert_neq(lo->k[t].entry, up->k[merged_slot].entry, "a live merged entry was handed out again");
    uint32_t max_entry = 0;
    for (int t = 0; t < T; t++) {
        const uint32_t e[4] = {lo->k[t].entry, lo->v[t].entry, up->k[t].entry, up->v[t].entry};
        for (int i = 0; i < 4; i++) max_entry = e[i] > max_entry ? e[i] : max_entry;
    }
    size_t held = f.held;
    /* release everything on both layers (refcounts reach 0), then append again: freed entries reused */
    release(d, lo, 0, all, T);
    release(d, up, 0, all, T);
    lo->n = up->n = 0;
    for (int round = 0; round < 3; round++) {
        cr_assert_eq(append(d, lo, 0, T, (2 + round) * T, ka, ka), KVP_OK);
        cr_assert_eq(append(d, up, 0, T, (2 + round) * T, kb, kb), KVP_OK);
        for (int t = 0; t < T; t++) {
            cr_assert_leq(lo->k[t].entry, max_entry, "round %d: a fresh entry while freed ones exist", round);
            cr_assert_leq(up->k[t].entry, max_entry, "round %d", round);
            d->decode(up->inst.state, KVP_WHICH_K, &up->k[t], row);
            cr_assert(fabs(mc_norm(row, HS) - mc_norm(kb + t * HS, HS)) < 1e-5, "upper magnitude kept");
        }
        release(d, lo, 0, all, T);
        release(d, up, 0, all, T);
        lo->n = up->n = 0;
    }
    cr_assert_eq(f.held, held, "no growth while freed entries exist");
    d->destroy(lo->inst.state);
    d->destroy(up->inst.state);
    fake_free(&f);
    free(lo);
    free(up);
    dlclose(dl);
}

/* Double-precision attention over decoded rows. */
static void ref_attend(const kvp_descriptor *d, void *st, const layer_t *L, const float *q, int32_t q_pos,
                       double *out, double *probs) {
    double s[NCTX], mx = -INFINITY, sum = 0;
    float k[HS], v[HS];
    for (uint32_t j = 0; j < L->n; j++) {
        if (L->pos[j] > q_pos) {
            s[j] = -INFINITY;
            continue;
        }
        d->decode(st, KVP_WHICH_K, &L->k[j], k);
        double dot = 0;
        for (int i = 0; i < HS; i++) dot += (double)q[i] * k[i];
        s[j] = dot / sqrt((double)HS);
        if (s[j] > mx) mx = s[j];
    }
    for (uint32_t j = 0; j < L->n; j++) {
        probs[j] = s[j] == -INFINITY ? 0 : exp(s[j] - mx);
        sum += probs[j];
    }
    for (int i = 0; i < HS; i++) out[i] = 0;
    for (uint32_t j = 0; j < L->n; j++) {
        probs[j] /= sum;
        d->decode(st, KVP_WHICH_V, &L->v[j], v);
        for (int i = 0; i < HS; i++) out[i] += probs[j] * v[i];
    }
}

Test(minicache_hooks, attend_matches_fp32_attention_over_decoded_rows) {
    void *dl;
    const kvp_descriptor *d = load_minicache(&dl);
    fake_host f;
    fake_init(&f, 0.4);
    layer_t *lo = malloc(sizeof *lo), *up = malloc(sizeof *up);
    make_layer(d, &f, 2, lo);
    make_layer(d, &f, 3, up);
    enum { T = 40 };
    float ka[T * HS], va[T * HS], kb[T * HS], vb[T * HS];
    for (int i = 0; i < T * HS; i++) {
        ka[i] = 2 * rnd_unit();
        va[i] = rnd_unit();
        kb[i] = ka[i] + rnd_unit();
        vb[i] = va[i] + 0.5f * rnd_unit();
    }
    /* two blocks (a prefill of 30, then 10 one-token steps) */
    cr_assert_eq(append(d, lo, 1, 30, 0, ka, va), KVP_OK);
    cr_assert_eq(append(d, up, 1, 30, 0, kb, vb), KVP_OK);
    for (int t = 30; t < T; t++) {
        cr_assert_eq(append(d, lo, 1, 1, t, ka + t * HS, va + t * HS), KVP_OK);
        cr_assert_eq(append(d, up, 1, 1, t, kb + t * HS, vb + t * HS), KVP_OK);
    }
    int n_merged = 0;
    for (int t = 0; t < T; t++) n_merged += up->k[t].entry == lo->k[t].entry;
    cr_assert(n_merged > 0 && n_merged < T, "gamma 0.4 should merge some, not all: %d of %d", n_merged, T);
    layer_t *ls[2] = {lo, up};
    for (int li = 0; li < 2; li++) {
        for (int qi = 0; qi < 3; qi++) {
            float q[HS], out[HS], probs[NCTX];
            double rout[HS], rprobs[NCTX];
            for (int i = 0; i < HS; i++) q[i] = 2 * rnd_unit();
            int32_t q_pos = qi == 0 ? 15 : T - 1; /* 15: causal mask hides later slots */
            kvp_attend_args a = {.struct_size = sizeof a, .head_dim = HS, .n = ls[li]->n, .q_pos = q_pos,
                                 .scale = 1.0f / sqrtf((float)HS), .q = q, .pos = ls[li]->pos,
                                 .k_slots = ls[li]->k, .v_slots = ls[li]->v, .out = out, .probs = probs};
            d->attend(ls[li]->inst.state, &a);
            ref_attend(d, ls[li]->inst.state, ls[li], q, q_pos, rout, rprobs);
            for (uint32_t j = 0; j < ls[li]->n; j++) {
                cr_assert(fabs(probs[j] - rprobs[j]) <= 1e-5, "layer %d q %d prob %u: %g vs %g", li, qi, j, probs[j],
                          rprobs[j]);
                if (ls[li]->pos[j] > q_pos) cr_assert_eq(probs[j], 0.0f, "masked slot %u", j);
            }
            for (int i = 0; i < HS; i++)
                cr_assert(fabs(out[i] - rout[i]) <= 1e-5, "layer %d q %d out[%d]: %g vs %g", li, qi, i, out[i], rout[i]);
        }
    }
    d->destroy(lo->inst.state);
    d->destroy(up->inst.state);
    fake_free(&f);
    free(lo);
    free(up);
    dlclose(dl);
}

Test(minicache_hooks, alloc_failure_is_a_clean_error) {
    void *dl;
    const kvp_descriptor *d = load_minicache(&dl);
    fake_host f;
    fake_init(&f, 0.05);
    layer_t *lo = malloc(sizeof *lo), *up = malloc(sizeof *up);
    make_layer(d, &f, 2, lo);
    make_layer(d, &f, 3, up);
    f.limit = f.held + 64; /* no room for a chunk of entries */
    float k[4 * HS];
    for (int i = 0; i < 4 * HS; i++) k[i] = rnd_unit();
    cr_assert_eq(append(d, lo, 0, 4, 0, k, k), KVP_ERROR);
    cr_assert(strstr(f.error, "memory") != NULL, "error names the cause: '%s'", f.error);
    /* the failed slots are harmless to release and decode to zeros */
    uint32_t all[4] = {0, 1, 2, 3};
    release(d, lo, 0, all, 4);
    float row[HS];
    d->decode(lo->inst.state, KVP_WHICH_K, &lo->k[0], row);
    for (int i = 0; i < HS; i++) cr_assert_eq(row[i], 0.0f);
    /* a bad start_layer is rejected at create */
    fake_host g;
    fake_init(&g, 0.05);
    g.start_layer = NL;
    kvp_layer_info info = {.struct_size = sizeof info, .layer = 0, .n_layer = NL, .n_q_head = NH, .n_kv_head = NH,
                           .head_dim = HS, .n_ctx = NCTX, .n_seq = 1};
    kvp_instance inst = {.struct_size = sizeof inst};
    cr_assert_eq(d->create(&g.host, &info, &inst), KVP_ERROR);
    cr_assert(strstr(g.error, "start_layer") != NULL, "%s", g.error);
    fake_free(&g);
    d->destroy(lo->inst.state);
    d->destroy(up->inst.state);
    fake_free(&f);
    free(lo);
    free(up);
    dlclose(dl);
}

/* ---- 3. end to end on the tiny model --------------------------------------------------------------- */

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                                 size_t mem_limit, kvh_err *err_out) {
    kvh_session_options o = kvh_session_default_options();
    o.threads = 1;
    o.plugin_path = PDIR;
    o.kv_mem_limit = mem_limit;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    int rc = kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err);
    if (err_out) {
        *err_out = err;
        return rc == 0 ? s : NULL;
    }
    cr_assert_eq(rc, 0, "session with %s: %s", plugins ? plugins : "no plugins", err.msg);
    return s;
}

/* Prefill `prompt`, then greedy decode n_new tokens; logits before each decode step into trace (may be
 * NULL). Checks max live <= cap when cap. Returns 0, or -1 with err filled when a forward fails. */
static int greedy(kvh_session *s, const int32_t *prompt, int P, int n_new, float *trace, uint32_t cap, kvh_err *err) {
    const int V = s->model->cfg.n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    int seq = 0, np = P, one = 1, rc = 0;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &prompt, .n_tokens = &np, .all_logits = false};
    rc = kvh_session_forward(s, &b, logits, err);
    for (int i = 0; rc == 0 && i < n_new; i++) {
        if (trace) memcpy(trace + (size_t)i * V, logits, (size_t)V * sizeof(float));
        int32_t t = kvh_argmax(logits, V);
        const int32_t *tp = &t;
        kvh_batch d = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &one, .all_logits = false};
        rc = kvh_session_forward(s, &d, logits, err);
        if (cap)
            for (int l = 0; rc == 0 && l < s->cache.n_layer; l++)
                cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), cap, "step %d layer %d", i, l);
    }
    free(logits);
    return rc;
}

Test(minicache_e2e, tiny_model) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt is absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int P = 150, N = 24, V = m.cfg.n_vocab;
    int32_t *prompt = malloc(P * sizeof *prompt);
    for (int i = 0; i < P; i++) prompt[i] = (int32_t)((i * 7919 + 13) % V);
    float *l0 = malloc((size_t)N * V * sizeof(float)), *l1 = malloc((size_t)N * V * sizeof(float));
    kvh_session *s = session_with(&m, NULL, NULL, 0, 0, NULL);
    cr_assert_eq(greedy(s, prompt, P, N, l0, 0, &err), 0, "%s", err.msg);
    size_t bytes_fp32 = s->cache.bytes_held;
    kvh_session_free(s);
    /* gamma 1: every token retained, magnitude x direction == the row: the plain cache's logits */
    const char *g0[] = {"minicache.gamma=1"};
    s = session_with(&m, "minicache.so", g0, 1, 0, NULL);
    cr_assert_eq(greedy(s, prompt, P, N, l1, 0, &err), 0, "%s", err.msg);
    kvh_session_free(s);
    double diff = kvh_test_compare("minicache gamma 1 vs plain logits", l1, l0, (size_t)N * V, 1e-4);
    cr_assert_leq(diff, 1e-4);
    /* default gamma: runs, holds fewer bytes than fp32; gamma 0 (merge nearly all) fewer still */
    s = session_with(&m, "minicache.so", NULL, 0, 0, NULL);
    cr_assert_eq(greedy(s, prompt, P, N, l1, 0, &err), 0, "%s", err.msg);
    size_t bytes_def = s->cache.bytes_held;
    kvh_session_free(s);
    const char *g1[] = {"minicache.gamma=0"};
    s = session_with(&m, "minicache.so", g1, 1, 0, NULL);
    cr_assert_eq(greedy(s, prompt, P, N, l1, 0, &err), 0, "%s", err.msg);
    size_t bytes_g1 = s->cache.bytes_held;
    kvh_session_free(s);
    fprintf(stderr, "tiny model KV bytes held: fp32 %zu, minicache default %zu, gamma 0 %zu\n", bytes_fp32, bytes_def,
            bytes_g1);
    cr_assert_lt(bytes_def, bytes_fp32);
    cr_assert_leq(bytes_g1, bytes_def); /* the arena grows in chunks of 256 entries: equal is possible */
    double maxabs = 0, d1 = 0;
    for (int i = 0; i < V; i++) {
        maxabs = fmax(maxabs, fabs(l0[i]));
        d1 = fmax(d1, fabs(l0[i] - l1[i]));
    }
    fprintf(stderr, "gamma 0: first-step max |logit diff| %.4g (max |logit| %.4g)\n", d1, maxabs);
    cr_assert(isfinite(d1));
    /* with h2o at a budget: live <= budget + slack at every step (the host moves handle slots) */
    const char *b[] = {"cache.budget=48", "cache.slack=8", "minicache.gamma=0.4"};
    s = session_with(&m, "h2o.so,minicache.so", b, 3, 0, NULL);
    cr_assert_eq(greedy(s, prompt, P, 80, NULL, 56, &err), 0, "%s", err.msg);
    size_t bytes_h2o = s->cache.bytes_held;
    kvh_session_free(s);
    cr_assert_lt(bytes_h2o, bytes_g1, "h2o at 48 tokens should hold less than the whole sequence");
    /* memory limits from too small to enough: each run either completes or stops with a clean error
     * (the host's slot growth or minicache's arena growth failing, whichever comes first) */
    int n_fail = 0;
    const size_t limits[] = {300 << 10, 800 << 10, 1200 << 10, 1600 << 10, 2000 << 10, 64 << 20};
    for (int i = 0; i < 6; i++) {
        err.msg[0] = '\0';
        s = session_with(&m, "minicache.so", g1, 1, limits[i], &err);
        int rc = s ? greedy(s, prompt, P, N, NULL, 0, &err) : -1;
        if (s) kvh_session_free(s);
        fprintf(stderr, "limit %zu: %s\n", limits[i], rc == 0 ? "ok" : err.msg);
        if (rc != 0) {
            n_fail++;
            cr_assert(strlen(err.msg) > 0, "a failure without a message");
        }
    }
    cr_assert_geq(n_fail, 1, "300 KiB should not fit a %d-token cache", P + N);
    cr_assert_lt(n_fail, 6, "64 MiB should fit");
    free(prompt);
    free(l0);
    free(l1);
    kvh_model_free(&m);
}
