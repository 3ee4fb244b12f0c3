/* test_quant.c — the quantized KV store (plugins/quant: kvq_format.h, int8.so, int4.so) and the
 * router's store support: fp16 conversion against an independent nearest-value search, round-trip
 * error within the closed-form bound per group, attention over packed slots against a double-precision
 * attention over the decoded rows, masking, bad parameters and two stores on a layer rejected,
 * compaction keeping packed blocks and scales with their positions, composition with a policy through
 * the session, and (when ../shared is present) the tiny trained model with int8 close to fp32.
 *
 * Bounds used (s = the STORED fp16 scale of a group, m = the stored min, qmax = 127 / 7 symmetric,
 * 255 / 15 asymmetric, range = absmax (symmetric) or max - m (asymmetric)):
 *   s >= range / qmax                              (scale rounded up: nothing clips)
 *   s <= (range / qmax) * (1 + 2^-10) + 2^-24       (one fp16 step above the exact scale at most)
 *   m <= min, m >= min - max(|min| * 2^-10, 2^-24)  (min rounded down by at most one fp16 step)
 *   |x - x^| <= s / 2 + 2^-20 * (|x| + |m| + s)    (half a step, plus fp32 rounding of x/s and s*u+m)
 * Attention: out[d] within 1e-5 * sum_j p_j |v_jd| of double-precision attention over decode()d rows
 * (fp32 summation error is relative to the summed terms), probabilities within 1e-5 * max p. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/quant/kvq_format.h"
#include "runtime/config.h"
#include "kvp/kvp.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "runtime/router.h"
#include "model/sampler.h"
#include "runtime/session.h"

#define PDIR KVH_BUILD_DIR "/plugins"

/* ---- deterministic random numbers ---------------------------------------------------------------- */
static uint64_t rng_state = 88172645463325252ull;
static uint32_t rnd_u32(void) { return (uint32_t)(kvh_test_xorshift(&rng_state) >> 16); }
static float rnd_unit(void) { return (float)rnd_u32() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

/* ---- fp16 --------------------------------------------------------------------------------------- */

/* Value of a finite fp16 computed from its fields in double (independent of kvq_half_to_float). */
static double half_value(uint16_t h) {
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double v = e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

Test(quant, fp16_to_float_exhaustive_and_round_trip) {
    for (uint32_t h = 0; h < 65536; h++) {
        int e = (h >> 10) & 0x1f;
        float f = kvq_half_to_float((uint16_t)h);
        if (e == 31) {
            if (h & 0x3ff) cr_assert(isnan(f), "0x%04x should be NaN", h);
            else cr_assert(isinf(f) && ((h & 0x8000) ? f < 0 : f > 0), "0x%04x should be Inf", h);
            continue;
        }
        cr_assert_eq((double)f, half_value((uint16_t)h), "0x%04x -> %.9g", h, (double)f);
        cr_assert_eq(kvq_half_from_float(f), (uint16_t)h, "round trip of 0x%04x", h);
    }
}

/* The nearest fp16 to f by brute force over the neighbours of a candidate, ties to the even mantissa. */
static void check_rne(float f) {
    uint16_t got = kvq_half_from_float(f);
    double x = (double)f;
    if (fabs(x) >= 65520.0) {
        cr_assert_eq(got & 0x7fff, 0x7c00, "%.9g should overflow to Inf", x);
        return;
    }
    /* every finite fp16 of the same sign is a candidate: pick the nearest, ties -> even */
    uint16_t sign = signbit(f) ? 0x8000 : 0, best = sign;
    double bd = INFINITY;
    for (uint16_t m = 0; m <= 0x7bff; m++) {
        uint16_t h = (uint16_t)(sign | m);
        double d = fabs(half_value(h) - x);
        if (d < bd || (d == bd && (h & 1) == 0)) {
            bd = d;
            best = h;
        }
    }
    cr_assert_eq(got, best, "%.9g -> 0x%04x, nearest-even is 0x%04x", x, got, best);
}

Test(quant, fp16_from_float_rounds_to_nearest_even) {
    /* ties: the midpoint of every pair of adjacent fp16 in a few binades, and subnormal ones */
    const uint16_t starts[] = {0x0000, 0x0001, 0x03fe, 0x03ff, 0x0400, 0x3bff, 0x3c00, 0x3c01, 0x5000, 0x7bfe, 0x8001, 0xbc00};
    for (size_t i = 0; i < sizeof starts / sizeof starts[0]; i++) {
        uint16_t h = starts[i];
        double a = half_value(h), b = half_value((uint16_t)(h + 1));
        float mid = (float)((a + b) / 2); /* exact: fp16 midpoints need 12 significant bits */
        cr_assert_eq((double)mid, (a + b) / 2);
        uint16_t want = (h & 1) ? (uint16_t)(h + 1) : h;
        cr_assert_eq(kvq_half_from_float(mid), want, "tie between 0x%04x and 0x%04x", h, h + 1);
        check_rne(nextafterf(mid, INFINITY));
        check_rne(nextafterf(mid, -INFINITY));
    }
    for (int i = 0; i < 3000; i++) {
        float f = ldexpf(rnd_unit(), (int)(rnd_u32() % 44) - 28); /* 2^-29 .. 2^15 */
        check_rne(f);
    }
    check_rne(65504.0f);
    check_rne(65519.99f);
    check_rne(65520.0f);
    check_rne(-1e9f);
    check_rne(2.9802322e-8f);   /* 2^-25: ties to zero */
    check_rne(2.9802326e-8f);   /* just above: rounds to the smallest subnormal */
    cr_assert(isnan(kvq_half_to_float(kvq_half_from_float(NAN))));
}

Test(quant, fp16_up_and_down_bracket_the_value) {
    for (int i = 0; i < 20000; i++) {
        float f = ldexpf(rnd_unit(), (int)(rnd_u32() % 40) - 26);
        uint16_t u = kvq_half_up(f), d = kvq_half_down(f);
        double fu = half_value(u), fd = half_value(d);
        cr_assert(fu >= f && fd <= f, "%.9g: up %.9g down %.9g", (double)f, fu, fd);
        /* and they are the closest such: one step further crosses f */
        cr_assert(fu - fd <= ldexp(fabs((double)f), -10) * 2 + ldexp(1.0, -24), "%.9g: bracket too wide", (double)f);
    }
    cr_assert_eq(kvq_half_up(1e9f), 0x7bff);
    cr_assert_eq(kvq_half_down(-1e9f), 0xfbff);
}

/* ---- round trip --------------------------------------------------------------------------------- */

/* Fills a row with one of several shapes: gaussian-ish, with an outlier, all zero, constant. */
static void make_row(float *x, int n, int kind, float mag) {
    for (int i = 0; i < n; i++) x[i] = mag * (rnd_unit() + rnd_unit() + rnd_unit());
    if (kind == 1) x[rnd_u32() % (uint32_t)n] = 20.0f * mag;
    if (kind == 2)
        for (int i = 0; i < n; i++) x[i] = 0.0f;
    if (kind == 3)
        for (int i = 0; i < n; i++) x[i] = mag;
    if (kind == 4)
        for (int i = 0; i < n; i++) x[i] = 300.0f + mag * rnd_unit(); /* large offset: asymmetric's min rounding */
}

static void check_round_trip(int bits, int asym, int group, int hs) {
    kvq_format f;
    char msg[256];
    cr_assert_eq(kvq_format_init(&f, bits, group, asym, hs, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(f.slot_bytes, (uint32_t)(hs * bits / 8 + (hs / group) * 2 * (asym ? 2 : 1)));
    const double qmax = bits == 8 ? (asym ? 255 : 127) : (asym ? 15 : 7);
    unsigned char *slot = malloc(f.slot_bytes);
    float x[KVQ_MAX_HEAD_DIM], y[KVQ_MAX_HEAD_DIM];
    for (int trial = 0; trial < 400; trial++) {
        float mag = ldexpf(1.0f, (int)(rnd_u32() % 24) - 14);
        make_row(x, hs, trial % 5, mag);
        memset(slot, 0xa5, f.slot_bytes);
        kvq_encode(&f, x, slot);
        kvq_decode(&f, slot, y);
        for (int g = 0; g < hs / group; g++) {
            const float *xg = x + g * group;
            double lo = xg[0], hi = xg[0], amax = 0;
            for (int i = 0; i < group; i++) {
                lo = fmin(lo, xg[i]);
                hi = fmax(hi, xg[i]);
                amax = fmax(amax, fabs(xg[i]));
            }
            double s = kvq_scale(&f, slot, (uint32_t)g), m = kvq_min(&f, slot, (uint32_t)g);
            if (asym) {
                cr_assert(m <= lo, "min %.9g above the group min %.9g", m, lo);
                cr_assert(m >= lo - fmax(fabs(lo) * ldexp(1, -10), ldexp(1, -24)), "min %.9g too far below %.9g", m, lo);
            }
            double range = asym ? hi - m : amax;
            cr_assert(s >= range / qmax * (1 - 1e-7), "bits %d asym %d: scale %.9g below range/qmax %.9g", bits, asym, s,
                      range / qmax);
            cr_assert(s <= range / qmax * (1 + ldexp(1, -10)) + ldexp(1, -24), "scale %.9g too large for range %.9g", s,
                      range);
            for (int i = 0; i < group; i++) {
                double e = fabs((double)xg[i] - (double)y[g * group + i]);
                double bound = s / 2 + ldexp(1, -20) * (fabs(xg[i]) + fabs(m) + s);
                cr_assert(e <= bound, "bits %d asym %d group %d kind %d: x %.9g decoded %.9g error %.3g > bound %.3g",
                          bits, asym, group, trial % 5, (double)xg[i], (double)y[g * group + i], e, bound);
            }
        }
    }
    free(slot);
}

Test(quant, round_trip_within_closed_form_bound) {
    const int groups[] = {32, 16, 64, 2, 8};
    for (int bits = 4; bits <= 8; bits += 4)
        for (int asym = 0; asym < 2; asym++)
            for (size_t g = 0; g < sizeof groups / sizeof groups[0]; g++) check_round_trip(bits, asym, groups[g], 64);
    check_round_trip(8, 0, 3, 48); /* odd groups are fine for 8 bits */
    check_round_trip(8, 1, 1, 8);
}

Test(quant, int4_packing_order_and_codes) {
    /* group 8: byte i holds element i (low nibble) and element i + 4 (high nibble) of the group */
    kvq_format f;
    char msg[256];
    cr_assert_eq(kvq_format_init(&f, 4, 8, 0, 16, msg, sizeof msg), 0, "%s", msg);
    float x[16] = {-7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7, 7};
    unsigned char slot[64];
    kvq_encode(&f, x, slot);
    cr_assert_eq(f.slot_bytes, 2 * 2 + 8u);
    cr_assert_float_eq(kvq_scale(&f, slot, 0), 1.0f, 0.0); /* absmax 7 / 7 */
    const unsigned char *v = slot + 4;
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(v[i] & 0xf, (unsigned)(x[i] + 8), "low nibble of byte %d", i);
        cr_assert_eq(v[i] >> 4, (unsigned)(x[i + 4] + 8), "high nibble of byte %d", i);
    }
}

/* ---- attention ---------------------------------------------------------------------------------- */

/* Reference: double-precision attention over DECODED rows. mag[d] = sum_j p_j |v_jd|, the size of the
 * terms summed into out[d]: fp32 summation error is relative to it, not to |out[d]| (which may cancel). */
static void ref_attend(const kvq_format *f, const float *q, int32_t qpos, float scale, uint32_t n, const int32_t *pos,
                       const unsigned char *ks, const unsigned char *vs, double *out, double *probs, double *mag) {
    const int HS = (int)f->head_dim;
    float row[KVQ_MAX_HEAD_DIM];
    double mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > qpos) {
            probs[j] = -INFINITY;
            continue;
        }
        kvq_decode(f, ks + (size_t)j * f->slot_bytes, row);
        double s = 0;
        for (int d = 0; d < HS; d++) s += (double)q[d] * row[d];
        probs[j] = s * scale;
        mx = fmax(mx, probs[j]);
    }
    double sum = 0;
    for (uint32_t j = 0; j < n; j++) {
        probs[j] = probs[j] == -INFINITY ? 0 : exp(probs[j] - mx);
        sum += probs[j];
    }
    for (int d = 0; d < HS; d++) out[d] = mag[d] = 0;
    for (uint32_t j = 0; j < n; j++) {
        probs[j] /= sum;
        kvq_decode(f, vs + (size_t)j * f->slot_bytes, row);
        for (int d = 0; d < HS; d++) {
            out[d] += probs[j] * row[d];
            mag[d] += probs[j] * fabs(row[d]);
        }
    }
}

static void check_attend(int bits, int asym, int group, int hs, uint32_t n) {
    kvq_format f;
    char msg[256];
    cr_assert_eq(kvq_format_init(&f, bits, group, asym, hs, msg, sizeof msg), 0, "%s", msg);
    unsigned char *ks = malloc((size_t)n * f.slot_bytes), *vs = malloc((size_t)n * f.slot_bytes);
    int32_t *pos = malloc(n * sizeof *pos);
    float *probs = malloc(n * sizeof *probs), out[KVQ_MAX_HEAD_DIM], q[KVQ_MAX_HEAD_DIM], row[KVQ_MAX_HEAD_DIM];
    double *rprobs = malloc(n * sizeof *rprobs), rout[KVQ_MAX_HEAD_DIM], rmag[KVQ_MAX_HEAD_DIM];
    for (uint32_t j = 0; j < n; j++) {
        pos[j] = (int32_t)j;
        for (int d = 0; d < hs; d++) row[d] = 2.0f * rnd_unit() + (asym ? 1.0f : 0.0f);
        kvq_encode(&f, row, ks + (size_t)j * f.slot_bytes);
        for (int d = 0; d < hs; d++) row[d] = 3.0f * rnd_unit();
        kvq_encode(&f, row, vs + (size_t)j * f.slot_bytes);
    }
    /* shuffle positions: slot order is not chronological after eviction */
    for (uint32_t j = n - 1; j > 0; j--) {
        uint32_t k = rnd_u32() % (j + 1);
        int32_t t = pos[j];
        pos[j] = pos[k];
        pos[k] = t;
    }
    const int32_t qposes[] = {(int32_t)n - 1, (int32_t)n / 2, 0};
    for (int qi = 0; qi < 3; qi++) {
        for (int d = 0; d < hs; d++) q[d] = 2.0f * rnd_unit();
        const float scale = 1.0f / sqrtf((float)hs);
        ref_attend(&f, q, qposes[qi], scale, n, pos, ks, vs, rout, rprobs, rmag);
        /* both kernels: kvq_attend (the AVX2 one where the build has it) and the portable C one */
        for (int kernel = 0; kernel < 2; kernel++) {
        if (kernel == 0) kvq_attend(&f, q, qposes[qi], scale, n, pos, ks, vs, out, probs);
        else kvq_attend_portable(&f, q, qposes[qi], scale, n, pos, ks, vs, out, probs);
        double pmax = 0, psum = 0;
        for (uint32_t j = 0; j < n; j++) pmax = fmax(pmax, rprobs[j]);
        for (int d = 0; d < hs; d++)
            cr_assert(fabs(out[d] - rout[d]) <= 1e-5 * rmag[d] + 1e-12, "kernel %d bits %d asym %d n %u q_pos %d: out[%d] %.9g vs %.9g", kernel,
                      bits, asym, n, qposes[qi], d, (double)out[d], rout[d]);
        for (uint32_t j = 0; j < n; j++) {
            cr_assert(fabs(probs[j] - rprobs[j]) <= 1e-5 * pmax, "probs[%u] %.9g vs %.9g", j, (double)probs[j], rprobs[j]);
            if (pos[j] > qposes[qi]) cr_assert_eq(probs[j], 0.0f, "masked slot %u (pos %d > %d) got weight", j, pos[j],
                                                  qposes[qi]);
            psum += probs[j];
        }
        cr_assert(fabs(psum - 1) < 1e-5, "kernel %d: probabilities sum to %.9g", kernel, psum);
        }
    }
    free(ks);
    free(vs);
    free(pos);
    free(probs);
    free(rprobs);
}

Test(quant, attend_matches_fp32_attention_over_decoded_values) {
    const uint32_t ns[] = {1, 7, 100, 1024};
    for (int bits = 4; bits <= 8; bits += 4)
        for (int asym = 0; asym < 2; asym++)
            for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) check_attend(bits, asym, 32, 64, ns[i]);
    check_attend(8, 0, 64, 64, 50);
    check_attend(4, 1, 2, 64, 50);
    check_attend(8, 1, 3, 48, 50);
    check_attend(4, 0, 8, 32, 50);
    /* group 32 at other head sizes: the tiny model's 32, GPT-2's 64, larger models' 128 */
    for (int bits = 4; bits <= 8; bits += 4)
        for (int asym = 0; asym < 2; asym++) {
            check_attend(bits, asym, 32, 32, 300);
            check_attend(bits, asym, 32, 128, 300);
        }
}

Test(quant, masked_slots_do_not_influence_the_output) {
    kvq_format f;
    char msg[256];
    cr_assert_eq(kvq_format_init(&f, 8, 32, 0, 64, msg, sizeof msg), 0, "%s", msg);
    enum { N = 20 };
    unsigned char ks[N * 68], vs[N * 68];
    int32_t pos[N];
    float row[64], q[64], out1[64], out2[64], p1[N], p2[N];
    for (int j = 0; j < N; j++) {
        pos[j] = j;
        for (int d = 0; d < 64; d++) row[d] = rnd_unit();
        kvq_encode(&f, row, ks + j * 68);
        kvq_encode(&f, row, vs + j * 68);
    }
    for (int d = 0; d < 64; d++) q[d] = rnd_unit();
    kvq_attend(&f, q, 9, 0.125f, N, pos, ks, vs, out1, p1);
    /* scribble over the masked (future) slots: the result must not change at all */
    for (int j = 10; j < N; j++) {
        for (int d = 0; d < 64; d++) row[d] = 100.0f * rnd_unit();
        kvq_encode(&f, row, ks + j * 68);
        kvq_encode(&f, row, vs + j * 68);
    }
    kvq_attend(&f, q, 9, 0.125f, N, pos, ks, vs, out2, p2);
    cr_assert(memcmp(out1, out2, sizeof out1) == 0);
    cr_assert(memcmp(p1, p2, sizeof p1) == 0);
    for (int j = 10; j < N; j++) cr_assert_eq(p1[j], 0.0f);
}

/* ---- through the router: parameters, layer claims, settings ---------------------------------- */

enum { RL = 4, RNH = 3, RHS = 64, RCTX = 1024, RNSEQ = 2 };

static int router_from(const char *ini, int hs, kvh_router **r, kvh_run_config *cfg, kvh_err *err) {
    kvh_config_defaults(cfg);
    cr_assert_eq(kvh_config_load_string(cfg, ini, "run.ini", err), 0, "%s", err->msg);
    return kvh_router_create_ex(r, cfg, PDIR, RL, RNH, hs, RCTX, RNSEQ, err);
}

static void expect_error(const char *ini, int hs, const char *n1, const char *n2) {
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(router_from(ini, hs, &r, &cfg, &err), -1, "accepted:\n%s", ini);
    cr_assert_null(r);
    cr_assert(strstr(err.msg, n1), "lacks '%s': %s", n1, err.msg);
    if (n2) cr_assert(strstr(err.msg, n2), "lacks '%s': %s", n2, err.msg);
    kvh_config_free(&cfg);
}

Test(quant, bad_parameters_are_rejected_clearly) {
    expect_error("[int8]\nbits = 5\n", RHS, "plugin 'int8' (int8.so) layer 0: create failed", "bits = 5: must be 8 or 4");
    expect_error("[int8]\ngroup = 0\n", RHS, "run.ini:2: [int8] group = 0: must be >= 1", NULL);
    expect_error("[int4]\ngroup = 24\n", RHS, "group = 24 does not divide head_dim 64", "int4");
    expect_error("[int4]\ngroup = 3\n", 66, "with bits = 4 the group must be even", NULL);
    expect_error("[int8]\nasymmetric = sometimes\n", RHS, "asymmetric = sometimes: expected a bool", NULL);
    expect_error("[int8]\nbitz = 8\n", RHS, "unknown parameter 'bitz'", "bits, group, asymmetric");
    /* the default group (32) does not divide a head_dim of 8: the message says so */
    expect_error("[int8]\n", 8, "group = 32 does not divide head_dim 8", NULL);
}

Test(quant, two_stores_on_one_layer_are_rejected) {
    expect_error("[a]\nplugin = int8\nlayers = 0-2\n[b]\nplugin = int4\nlayers = 2-3\n", RHS,
                 "layer 2 is claimed by two stores: [a] (run.ini:3) and [b] (run.ini:6)", "at most one store");
    /* a policy and a store on the same layer is the normal composition */
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(router_from("[cache]\nbudget = 8\n[window]\n[int8]\nlayers = 1-3\n", RHS, &r, &cfg, &err), 0, "%s",
                 err.msg);
    kvh_router_free(r);
    kvh_config_free(&cfg);
}

Test(quant, router_settings_and_description) {
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(router_from("[cache]\nbudget = 8\n[w]\nplugin = window\nlayers = 0,1\n[q]\nplugin = int4\nlayers = 1-2\n"
                             "asymmetric = true\ngroup = 16\n",
                             RHS, &r, &cfg, &err),
                 0, "%s", err.msg);
    kvh_layer_policy_settings st[RL];
    kvh_router_layer_settings(r, st);
    const uint32_t want = RHS / 2 + (RHS / 16) * 4;
    cr_assert_null(st[0].store);
    cr_assert_eq(st[0].k_slot_bytes, 0);
    cr_assert_eq(st[0].budget, 8);
    for (int l = 1; l <= 2; l++) {
        cr_assert_not_null(st[l].store);
        cr_assert_str_eq(st[l].store->name, "int4");
        cr_assert_not_null(st[l].store_state);
        cr_assert_eq(st[l].k_slot_bytes, want);
        cr_assert_eq(st[l].v_slot_bytes, want);
        cr_assert_str_eq(kvh_router_layer_store_name(r, l), "int4");
        cr_assert_str_eq(kvh_router_layer_store_section(r, l), "q");
    }
    cr_assert_eq(st[1].budget, 8, "policy fields stay on a layer with a store");
    cr_assert_eq(st[2].budget, KVH_BUDGET_UNLIMITED, "a store alone keeps every token");
    cr_assert_null(kvh_router_layer_policy_name(r, 2), "policy names stay policy-only");
    cr_assert_str_eq(kvh_router_layer_policy_name(r, 1), "window");
    cr_assert_null(kvh_router_layer_store_name(r, 0));
    cr_assert_null(kvh_router_layer_store_name(r, RL));
    char buf[4096];
    int n = kvh_router_describe_json(r, buf, sizeof buf);
    cr_assert(n > 0 && (size_t)n < sizeof buf);
    cJSON *j = cJSON_Parse(buf);
    cr_assert_not_null(j, "%s", buf);
    cJSON *stores = cJSON_GetObjectItem(j, "stores");
    cr_assert_eq(cJSON_GetArraySize(stores), RL);
    cr_assert(cJSON_IsNull(cJSON_GetArrayItem(stores, 0)));
    cr_assert_str_eq(cJSON_GetArrayItem(stores, 2)->valuestring, "q");
    cr_assert(cJSON_IsNull(cJSON_GetArrayItem(cJSON_GetObjectItem(j, "layers"), 2)));
    cJSON *qi = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "instances"), 1);
    cr_assert_str_eq(cJSON_GetObjectItem(qi, "role")->valuestring, "store");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(qi, "layers")), 2);
    cr_assert_eq(cJSON_GetArrayItem(cJSON_GetArrayItem(cJSON_GetObjectItem(qi, "slot_bytes"), 0), 0)->valuedouble, want);
    cr_assert_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(qi, "params"), "bits")->valuedouble, 4);
    cr_assert(cJSON_IsTrue(cJSON_GetObjectItem(cJSON_GetObjectItem(qi, "params"), "asymmetric")));
    cJSON *wi = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "instances"), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(wi, "role")->valuestring, "policy");
    cJSON_Delete(j);
    kvh_router_free(r);
    kvh_config_free(&cfg);
}

/* ---- compaction on the packed form --------------------------------------------------------------- */

static float kv_elem(int32_t p, int h, int d, int which) {
    return (which ? -1.0f : 1.0f) * (0.5f * sinf(0.37f * (float)p + 0.11f * (float)d) + 0.01f * (float)h + 0.001f * (float)p);
}

Test(quant, compaction_keeps_packed_blocks_and_scales_with_their_positions) {
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(router_from("[cache]\nbudget = 40\nslack = 7\n[window]\nlayers = 1\n[int4]\nlayers = 1\n", RHS, &r, &cfg,
                             &err),
                 0, "%s", err.msg);
    kvh_layer_policy_settings st[RL];
    kvh_router_layer_settings(r, st);
    for (int l = 0; l < RL; l++)
        if (!st[l].store) st[l].k_slot_bytes = st[l].v_slot_bytes = RHS * 4;
    kvh_kvcache c;
    cr_assert_eq(kvh_kvcache_init(&c, RNSEQ, RL, RNH, RHS, RCTX, st, 0, &err), 0, "%s", err.msg);
    const kvp_descriptor *d = st[1].store;
    kvq_format ref;
    char msg[256];
    cr_assert_eq(kvq_format_init(&ref, 4, 32, 0, RHS, msg, sizeof msg), 0, "%s", msg);
    float row[RHS], dec[RHS];
    unsigned char want[1024];
    /* tokens arrive one by one in a shuffled position order, window evicts the oldest positions */
    int32_t order[300];
    for (int i = 0; i < 300; i++) order[i] = i;
    for (int i = 299; i > 0; i--) {
        int k = (int)(rnd_u32() % (uint32_t)(i + 1));
        int32_t t = order[i];
        order[i] = order[k];
        order[k] = t;
    }
    for (int i = 0; i < 300; i++) {
        cr_assert_eq(kvh_kvcache_reserve(&c, 0, 1, 1, &err), 0, "%s", err.msg);
        kvh_kvcache_append_meta(&c, 0, 1, 1, &order[i]);
        for (int h = 0; h < RNH; h++) {
            kvh_head_cache *hc = kvh_kvcache_head(&c, 0, 1, h);
            for (int which = 0; which < 2; which++) {
                for (int e = 0; e < RHS; e++) row[e] = kv_elem(order[i], h, e, which);
                void *slot = (char *)(which ? hc->v : hc->k) + (size_t)(hc->n - 1) * st[1].k_slot_bytes;
                d->encode(st[1].store_state, which, row, slot);
            }
        }
        cr_assert_eq(kvh_router_enforce(r, &c, 0, 1, 0, &err), 0, "%s", err.msg);
    }
    cr_assert_gt(kvh_router_evict_calls(r), 10);
    for (int h = 0; h < RNH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&c, 0, 1, h);
        cr_assert_leq(hc->n, 47u);
        for (uint32_t i = 0; i < hc->n; i++)
            for (int which = 0; which < 2; which++) {
                const void *slot = (const char *)(which ? hc->v : hc->k) + (size_t)i * st[1].k_slot_bytes;
                for (int e = 0; e < RHS; e++) row[e] = kv_elem(hc->pos[i], h, e, which);
                kvq_encode(&ref, row, want);
                cr_assert(memcmp(slot, want, ref.slot_bytes) == 0, "head %d slot %u (pos %d) %s: packed bytes differ from "
                          "the encoding of that position", h, i, hc->pos[i], which ? "V" : "K");
                d->decode(st[1].store_state, which, slot, dec);
                for (int e = 0; e < RHS; e++)
                    cr_assert(fabsf(dec[e] - row[e]) <= 0.6f / 7.0f, "decode of pos %d elem %d: %g vs %g", hc->pos[i], e,
                              (double)dec[e], (double)row[e]);
            }
    }
    /* bytes held count the packed slot size, not fp32 */
    cr_assert_eq(kvh_kvcache_k_slot_bytes(&c, 1), (uint32_t)ref.slot_bytes);
    kvh_kvcache_free(&c);
    kvh_router_free(r);
    kvh_config_free(&cfg);
}

/* ---- end to end through the session -------------------------------------------------------------- */

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets) {
    kvh_session_options o = kvh_session_default_options();
    o.threads = 1;
    o.plugin_path = PDIR;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err), 0, "session with %s: %s",
                 plugins ? plugins : "no plugins", err.msg);
    return s;
}

/* Prefill `prompt`, then greedy decode n_new tokens; writes the logits before each decode step into
 * trace[n_new * V] (may be NULL) and the chosen tokens into toks[n_new]. Checks live <= cap if cap. */
static void greedy(kvh_session *s, const int32_t *prompt, int P, int n_new, float *trace, int32_t *toks, uint32_t cap) {
    const int V = s->model->cfg.n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    kvh_err err = {{0}};
    int seq = 0, np = P, one = 1;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &prompt, .n_tokens = &np, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), 0, "%s", err.msg);
    for (int i = 0; i < n_new; i++) {
        if (trace) memcpy(trace + (size_t)i * V, logits, (size_t)V * sizeof(float));
        int32_t t = kvh_argmax(logits, V);
        toks[i] = t;
        const int32_t *tp = &t;
        kvh_batch d = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &one, .all_logits = false};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "step %d: %s", i, err.msg);
        if (cap)
            for (int l = 0; l < s->cache.n_layer; l++)
                cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), cap, "step %d layer %d", i, l);
    }
    free(logits);
}

Test(quant, store_composes_with_window_in_a_session) {
    /* head_dim 64 so the default group of 32 applies */
    kvh_model_config c = {.n_vocab = 97, .n_positions = 512, .n_embd = 128, .n_head = 2, .n_layer = 2, .n_inner = 256,
                          .ln_eps = 1e-5f, .bos_id = 0};
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 3, "random:quant", &err), 0, "%s", err.msg);
    int32_t prompt[20], toks[200];
    for (int i = 0; i < 20; i++) prompt[i] = (int32_t)((i * 31 + 5) % c.n_vocab);
    const int n_new = 60, V = c.n_vocab;
    float *a = malloc((size_t)n_new * V * sizeof(float)), *b = malloc((size_t)n_new * V * sizeof(float));
    /* window with budget >= length is a no-op on top of int8: bit-identical to int8 alone */
    kvh_session *s1 = session_with(&m, "int8.so", NULL, 0);
    greedy(s1, prompt, 20, n_new, a, toks, 0);
    size_t bytes_int8 = s1->cache.bytes_held;
    kvh_session_free(s1);
    const char *big[] = {"cache.budget=128", "cache.slack=0"};
    kvh_session *s2 = session_with(&m, "window.so,int8.so", big, 2);
    greedy(s2, prompt, 20, n_new, b, toks, 0);
    kvh_session_free(s2);
    cr_assert(memcmp(a, b, (size_t)n_new * V * sizeof(float)) == 0, "window (budget >= length) changed int8's logits");
    /* int8 logits close to fp32 ones on the same tokens (random weights: loose but meaningful) */
    kvh_session *s0 = session_with(&m, NULL, NULL, 0);
    greedy(s0, prompt, 20, n_new, b, toks, 0);
    size_t bytes_fp32 = s0->cache.bytes_held;
    kvh_session_free(s0);
    double maxabs = 0;
    for (size_t i = 0; i < (size_t)V; i++) maxabs = fmax(maxabs, fabs(b[i]));
    double diff = kvh_test_compare("int8 vs fp32 logits, first step", a, b, (size_t)V, 0.02 * maxabs + 1e-3);
    cr_assert_leq(diff, 0.02 * maxabs + 1e-3);
    cr_assert_lt(bytes_int8, bytes_fp32 / 2, "int8 held %zu bytes, fp32 %zu", bytes_int8, bytes_fp32);
    /* invariant with eviction: live <= budget + slack at every step, for int8 and int4 */
    const char *small[] = {"cache.budget=24", "cache.slack=5"};
    kvh_session *s3 = session_with(&m, "window.so,int4.so", small, 2);
    greedy(s3, prompt, 20, 200, NULL, toks, 29);
    kvh_session_free(s3);
    kvh_session *s4 = session_with(&m, "sink.so,int8.so", small, 2);
    greedy(s4, prompt, 20, 200, NULL, toks, 29);
    kvh_session_free(s4);
    free(a);
    free(b);
    kvh_model_free(&m);
}

Test(quant, tiny_model_int8_close_to_fp32) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt is absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int P = 200, N = 32, V = m.cfg.n_vocab;
    int32_t *prompt = malloc(P * sizeof *prompt), t0[N], t8[N], t4[N];
    for (int i = 0; i < P; i++) prompt[i] = (int32_t)((i * 7919 + 13) % V);
    float *l0 = malloc((size_t)N * V * sizeof(float)), *l8 = malloc((size_t)N * V * sizeof(float));
    float *l4 = malloc((size_t)N * V * sizeof(float));
    kvh_session *s = session_with(&m, NULL, NULL, 0);
    greedy(s, prompt, P, N, l0, t0, 0);
    kvh_session_free(s);
    s = session_with(&m, "int8.so", NULL, 0);
    greedy(s, prompt, P, N, l8, t8, 0);
    kvh_session_free(s);
    s = session_with(&m, "int4.so", NULL, 0);
    greedy(s, prompt, P, N, l4, t4, 0);
    kvh_session_free(s);
    /* logits after the prompt (same inputs): int8 within 0.05 absolute of fp32 on logits spanning ~+-15 */
    double d8 = kvh_test_compare("tiny int8 vs fp32 logits", l8, l0, (size_t)V, 0.05);
    double d4 = kvh_test_compare("tiny int4 vs fp32 logits", l4, l0, (size_t)V, 0.5);
    fprintf(stderr, "tiny model: max |logit diff| int8 %.4g, int4 %.4g\n", d8, d4);
    cr_assert_leq(d8, 0.05);
    cr_assert_leq(d4, 0.5);
    int same8 = 0, same4 = 0;
    for (int i = 0; i < N; i++) {
        same8 += t8[i] == t0[i];
        same4 += t4[i] == t0[i];
    }
    fprintf(stderr, "tiny model: greedy tokens equal to fp32: int8 %d/%d, int4 %d/%d\n", same8, N, same4, N);
    cr_assert_geq(same8, 28, "int8 greedy continuation diverged: %d/%d equal", same8, N);
    free(prompt);
    free(l0);
    free(l8);
    free(l4);
    kvh_model_free(&m);
}
