/* test_weight_formats.c — the weight-format plugins (plugins/weights: f16.so, bf16.so, w8.so, w4.so)
 * and their format definition (wformat.h), through the real .so files and a fake host:
 *   - binary16 / bfloat16 conversions against the compiler's _Float16 and a double-rounding reference;
 *   - packing round-trip bounds per format (what each encoding promises about one weight);
 *   - matmul (every kernel level this CPU can run) against a double-precision reference of the format's
 *     arithmetic, for 1..9 rows, several k, output ranges off every grid: f16/bf16, the product over the
 *     reference-unpacked weights; w8/w4, the activation row quantized per 32 inputs (wformat_act.h), each
 *     block's exact integer sum times its weight and activation scales;
 *   - w8/w4's activation quantization: every vector build byte for byte equal to the portable one, and its
 *     own promises (codes within +-127, scale amax/127, error <= half a step, zero and non-finite blocks);
 *   - w8/w4's integer sums exact at every level: inputs whose scales are powers of two make every fp32
 *     operation exact, so each level must return the exact answer, bit for bit (a wrong block-to-scale
 *     pairing, nibble order or sign correction cannot hide there); a non-finite input gives NaN;
 *   - a row's result independent of the rows sharing the call and of the range's start (bit for bit);
 *   - w8/w4 prefill (many rows through matmul, KVP_CAP_MATMUL_PREFILL): every row's products equal that
 *     row's decode products bit for bit, across row chunks, tiles and thread-split ranges, every level;
 *   - errors: k not a multiple of 32, a group that is not a multiple of 32 or does not divide k, a
 *     non-finite weight (named by matrix, layer, input and output). */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/weights/wformat.h"
#include "../plugins/weights/wformat_act.h"
#include "backend/cpu_features.h"
#include "helpers/test_util.h"
#include "kvp/kvp.h"

#define PDIR KVH_BUILD_DIR "/plugins"

/* The compiler's binary16 type (GCC >= 12, Clang >= 15 on x86-64) is the independent reference. */
__extension__ typedef _Float16 half_ref;

/* ---- a fake host: counted allocations, parameters by name, the last error ---------------------------- */

typedef struct fake_host {
    kvp_host host;
    double group, lm_head;
    char error[512];
    long live_allocs;
} fake_host;

static void *f_alloc(void *ctx, size_t bytes) {
    fake_host *f = ctx;
    void *p = calloc(1, bytes ? bytes : 1);
    if (p) f->live_allocs++;
    return p;
}
static void f_free(void *ctx, void *p) {
    fake_host *f = ctx;
    if (p) f->live_allocs--;
    free(p);
}
static double f_param(void *ctx, const char *name) {
    fake_host *f = ctx;
    if (strcmp(name, "group") == 0) return f->group;
    if (strcmp(name, "lm_head") == 0) return f->lm_head;
    return 0;
}
static void f_set_error(void *ctx, const char *msg) { snprintf(((fake_host *)ctx)->error, 512, "%s", msg); }
static void f_log(void *ctx, int level, const char *msg) { (void)ctx, (void)level, (void)msg; }

static void fake_init(fake_host *f, uint32_t cpu_level, double group) {
    memset(f, 0, sizeof *f);
    f->host = (kvp_host){.struct_size = sizeof(kvp_host), .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR,
                         .ctx = f, .log = f_log, .set_error = f_set_error, .alloc = f_alloc, .free = f_free,
                         .param = f_param, .cpu_level = cpu_level};
    f->group = group;
    f->lm_head = 1;
}

typedef struct loaded {
    void *dl;
    const kvp_descriptor *d;
    wf_spec spec;
} loaded;

static loaded load_format(const char *name, uint32_t group) {
    char path[512];
    snprintf(path, sizeof path, PDIR "/%s.so", name);
    loaded L = {0};
    L.dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(L.dl, "dlopen %s: %s", path, dlerror());
    void *sym = dlsym(L.dl, KVP_ENTRY_SYMBOL);
    cr_assert_not_null(sym);
    kvp_entry_fn fn;
    memcpy(&fn, &sym, sizeof fn);
    L.d = fn();
    cr_assert_eq(L.d->role, KVP_ROLE_WEIGHTS, "%s: role %u", name, L.d->role);
    cr_assert(L.d->packed_size && L.d->pack && L.d->unpack && L.d->matmul, "%s: a weight hook is NULL", name);
    cr_assert_str_eq(L.d->name, name);
    L.spec.kind = strcmp(name, "f16") == 0 ? WF_F16 : strcmp(name, "bf16") == 0 ? WF_BF16 : strcmp(name, "w8") == 0 ? WF_W8 : WF_W4;
    L.spec.group = (L.spec.kind == WF_W8 || L.spec.kind == WF_W4) ? group : 0;
    return L;
}

static const char *const formats[] = {"f16", "bf16", "w8", "w4"};

static float *random_floats(size_t n, uint64_t seed, float scale) {
    float *a = malloc(n * sizeof(float));
    cr_assert_not_null(a);
    for (size_t i = 0; i < n; i++)
        a[i] = scale * (float)((double)(kvh_test_xorshift(&seed) >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    return a;
}

/* ---- conversions ---------------------------------------------------------------------------------- */

Test(weight_formats, half_conversion_matches_compiler_float16) {
    /* every binary16 value converts to float exactly and back to itself */
    for (uint32_t h = 0; h < 65536; h++) {
        const float f = wf_half_to_float((uint16_t)h);
        if (isnan(f)) continue;
        half_ref ref;
        const uint16_t hh = (uint16_t)h;
        memcpy(&ref, &hh, 2);
        cr_assert(f == (float)ref || (f == 0 && (float)ref == 0), "half %04x -> %g, compiler %g", h, (double)f,
                  (double)(float)ref);
        cr_assert_eq(wf_float_to_half(f), (uint16_t)h, "half %04x does not round-trip", h);
    }
    /* floats round to nearest even exactly as the compiler's conversion does, across the whole range */
    uint64_t seed = 12345;
    for (int i = 0; i < 2000000; i++) {
        uint32_t bits = (uint32_t)kvh_test_xorshift(&seed);
        float f;
        memcpy(&f, &bits, 4);
        if (isnan(f)) continue;
        const half_ref ref = (half_ref)f;
        uint16_t rh;
        memcpy(&rh, &ref, 2);
        cr_assert_eq(wf_float_to_half(f), rh, "float %a: half %04x, compiler %04x", (double)f, wf_float_to_half(f), rh);
    }
}

Test(weight_formats, bf16_rounds_to_nearest_even) {
    uint64_t seed = 777;
    for (int i = 0; i < 1000000; i++) {
        uint32_t bits = (uint32_t)kvh_test_xorshift(&seed);
        float f;
        memcpy(&f, &bits, 4);
        if (!isfinite(f)) continue;
        const float b = wf_bf16_to_float(wf_float_to_bf16(f));
        /* the two bfloat16 neighbours of f, and the nearer one (ties to the even mantissa) */
        const uint32_t lo_bits = bits & 0xffff0000u, hi_bits = lo_bits + 0x10000u;
        float lo, hi;
        memcpy(&lo, &lo_bits, 4);
        memcpy(&hi, &hi_bits, 4);
        /* past the largest bfloat16 the upper neighbour is infinity, which rounding treats as 2^128 */
        const double hi_d = isinf(hi) ? copysign(ldexp(1.0, 128), (double)hi) : (double)hi;
        const double dl = fabs((double)f - lo), dh = fabs(hi_d - f);
        const float want = dl < dh ? lo : dh < dl ? hi : (((lo_bits >> 16) & 1u) ? hi : lo);
        cr_assert(b == want, "float %a -> bf16 %a, expected %a", (double)f, (double)b, (double)want);
    }
}

/* ---- packing round trip ------------------------------------------------------------------------------ */

/* Packs W (k x n, input-major) with plugin L at the given level; returns the packed bytes (caller frees). */
static uint8_t *pack_with(const loaded *L, fake_host *f, void *state, uint32_t k, uint32_t n, const float *W,
                          uint32_t layout, kvp_weight_info *info) {
    *info = (kvp_weight_info){.struct_size = sizeof *info, .layer = 0, .which = KVP_MAT_MLP_FC, .k = k, .n = n};
    const size_t bytes = L->d->packed_size(state, info);
    cr_assert_gt(bytes, 0, "packed_size failed: %s", f->error);
    cr_assert_eq(bytes, wf_row_bytes(L->spec, k) * n);
    uint8_t *packed = aligned_alloc(64, (bytes + 63) / 64 * 64);
    cr_assert_not_null(packed);
    memset(packed, 0, bytes);
    cr_assert_eq(L->d->pack(state, info, W, layout, packed), KVP_OK, "pack: %s", f->error);
    return packed;
}

Test(weight_formats, round_trip_within_each_formats_bound) {
    const uint32_t k = 256, n = 48;
    float *W = random_floats((size_t)k * n, 99, 0.5f);
    W[7] = 3.0f; /* an outlier: its group's scale grows, the bound follows the scale */
    for (size_t fi = 0; fi < 4; fi++) {
        fake_host f;
        fake_init(&f, KVP_CPU_PORTABLE, 32);
        loaded L = load_format(formats[fi], 32);
        kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
        kvp_instance inst = {.struct_size = sizeof inst};
        cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK, "%s create: %s", formats[fi], f.error);
        kvp_weight_info info;
        uint8_t *packed = pack_with(&L, &f, inst.state, k, n, W, KVP_LAYOUT_IN_MAJOR, &info);
        float *u = malloc((size_t)k * n * sizeof(float));
        L.d->unpack(inst.state, &info, packed, 0, n, u);
        double worst = 0;
        for (uint32_t j = 0; j < n; j++)
            for (uint32_t i = 0; i < k; i++) {
                const float w = W[(size_t)i * n + j], v = u[(size_t)j * k + i];
                double bound;
                if (L.spec.kind == WF_F16) bound = fabs(w) * 0x1p-11 + 0x1p-25;
                else if (L.spec.kind == WF_BF16) bound = fabs(w) * 0x1p-8;
                else {
                    uint16_t dh; /* the group's stored scale: |error| <= half a step */
                    memcpy(&dh, packed + (size_t)j * wf_row_bytes(L.spec, k) + 2u * (i / 32u), 2);
                    bound = 0.5 * fabs(wf_half_to_float(dh)) * (1 + 1e-6);
                    /* w4's codes run -8..7 with the group's largest magnitude m at -8: a value of the other
                     * sign near |m| clamps at +7, one full step away (as GGML's Q4_0) */
                    double m = 0;
                    for (uint32_t g = i / 32u * 32u; g < i / 32u * 32u + 32u; g++)
                        if (fabs(W[(size_t)g * n + j]) > fabs(m)) m = W[(size_t)g * n + j];
                    if (L.spec.kind == WF_W4 && (double)w * m < 0) bound *= 2;
                    /* and the step itself is what the format promises: amax/127 (w8), amax/8 (w4), fp16-rounded */
                    double amax = 0;
                    for (uint32_t g = i / 32u * 32u; g < i / 32u * 32u + 32u; g++) amax = fmax(amax, fabs(W[(size_t)g * n + j]));
                    const double step = L.spec.kind == WF_W8 ? amax / 127 : amax / 8;
                    cr_assert_leq(fabs(wf_half_to_float(dh)), step * (1 + 0x1p-10) + 1e-12, "%s scale %g for amax %g",
                                  formats[fi], (double)wf_half_to_float(dh), amax);
                }
                const double e = fabs((double)w - v);
                if (e > worst) worst = e;
                cr_assert_leq(e, bound, "%s: W(%u,%u) = %g unpacks to %g (error %g > bound %g)", formats[fi], i, j,
                              (double)w, (double)v, e, bound);
            }
        cr_log_info("%s: max round-trip error %.3g", formats[fi], worst);
        /* packing an output-major copy gives the same bytes */
        float *Wt = malloc((size_t)k * n * sizeof(float));
        for (uint32_t j = 0; j < n; j++)
            for (uint32_t i = 0; i < k; i++) Wt[(size_t)j * k + i] = W[(size_t)i * n + j];
        kvp_weight_info info2;
        uint8_t *packed2 = pack_with(&L, &f, inst.state, k, n, Wt, KVP_LAYOUT_OUT_MAJOR, &info2);
        cr_expect(memcmp(packed, packed2, wf_row_bytes(L.spec, k) * n) == 0, "%s: layouts pack differently", formats[fi]);
        free(Wt);
        free(packed2);
        free(packed);
        free(u);
        L.d->destroy(inst.state);
        cr_expect_eq(f.live_allocs, 0, "%s leaked %ld host allocations", formats[fi], f.live_allocs);
        dlclose(L.dl);
    }
    free(W);
}

/* ---- matmul against a double reference ------------------------------------------------------------------ */

/* w8/w4's arithmetic in double: the row quantized per 32 inputs (the portable definition), each block's
 * integer sum of weight codes times activation codes (exact), times the weight scale of its group and the
 * activation scale. *mag: the sum of the terms' magnitudes (for the fp32 rounding bound). */
static double int_reference(const loaded *L, uint32_t k, const uint8_t *row, const float *x, double *mag) {
    int8_t *q = malloc(k);
    float *d = malloc(k / 32 * sizeof(float));
    wf_act_quantize_portable(x, k, q, d);
    const uint32_t G = L->spec.group;
    const uint8_t *codes = row + 2u * (k / G);
    double sum = 0;
    *mag = 0;
    for (uint32_t b = 0; b < k / 32; b++) {
        int64_t S = 0;
        for (uint32_t i = 0; i < 32; i++) {
            const uint32_t e = 32 * b + i;
            const int w = wf_code(L->spec.kind, k, codes, e); /* wformat.h's code order */
            S += (int64_t)w * q[e];
        }
        uint16_t dh;
        memcpy(&dh, row + 2u * (32 * b / G), 2);
        const double term = (double)wf_half_to_float(dh) * d[b] * (double)S;
        sum += term;
        *mag += fabs(term);
    }
    free(q);
    free(d);
    return sum;
}

static void check_matmul(const char *fmt, uint32_t level, uint32_t group, uint32_t k, uint32_t n) {
    fake_host f;
    fake_init(&f, level, group);
    loaded L = load_format(fmt, group);
    kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
    kvp_instance inst = {.struct_size = sizeof inst};
    cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK, "%s create: %s", fmt, f.error);
    float *W = random_floats((size_t)k * n, 1000 + k + n, 0.25f);
    kvp_weight_info info;
    uint8_t *packed = pack_with(&L, &f, inst.state, k, n, W, KVP_LAYOUT_IN_MAJOR, &info);
    float *u = malloc((size_t)k * n * sizeof(float)); /* the reference values, output-major */
    L.d->unpack(inst.state, &info, packed, 0, n, u);
    const int quantized = L.spec.kind == WF_W8 || L.spec.kind == WF_W4;
    const size_t rb = wf_row_bytes(L.spec, k);
    const uint32_t max_rows = 9;
    float *x = random_floats((size_t)max_rows * k, 7 + k, 1.0f);
    float *y = malloc((size_t)max_rows * n * sizeof(float)), *y_alone = malloc((size_t)n * sizeof(float));
    const uint32_t ranges[][2] = {{0, n}, {1, n - 3}, {5, 6}, {n / 2, n}};
    for (uint32_t rows = 1; rows <= max_rows; rows++)
        for (size_t ri = 0; ri < sizeof ranges / sizeof ranges[0]; ri++) {
            const uint32_t n0 = ranges[ri][0], n1 = ranges[ri][1];
            for (size_t i = 0; i < (size_t)rows * n; i++) y[i] = 0.5f; /* matmul adds to what is there */
            kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = rows,
                                 .n0 = n0, .n1 = n1, .y = y, .ldy = n};
            L.d->matmul(inst.state, &a);
            for (uint32_t r = 0; r < rows; r++)
                for (uint32_t j = 0; j < n; j++) {
                    double ref = 0.5, mag = 0, tol;
                    if (quantized) {
                        if (j >= n0 && j < n1) ref += int_reference(&L, k, packed + (size_t)j * rb, x + (size_t)r * k, &mag);
                        tol = (k / 32 + 4) * 0x1p-23 * mag + 1e-7; /* fp32 rounding of the scale products and sums */
                    } else {
                        if (j >= n0 && j < n1)
                            for (uint32_t i = 0; i < k; i++) {
                                ref += (double)x[(size_t)r * k + i] * u[(size_t)j * k + i];
                                mag += fabs((double)x[(size_t)r * k + i] * u[(size_t)j * k + i]);
                            }
                        tol = 2e-6 * mag + 1e-7;
                    }
                    const double got = y[(size_t)r * n + j];
                    cr_assert_leq(fabs(got - ref), tol, "%s level %u k %u rows %u range [%u,%u): y[%u][%u] = %.9g, ref %.9g",
                                  fmt, level, k, rows, n0, n1, r, j, got, ref);
                }
            /* the last row alone, over the same range, gives the same bits */
            for (uint32_t j = 0; j < n; j++) y_alone[j] = 0.5f;
            kvp_matmul_args b = a;
            b.x = x + (size_t)(rows - 1) * k;
            b.rows = 1;
            b.y = y_alone;
            L.d->matmul(inst.state, &b);
            cr_assert(memcmp(y_alone + n0, y + (size_t)(rows - 1) * n + n0, (size_t)(n1 - n0) * sizeof(float)) == 0,
                      "%s level %u: row %u of %u differs from the same row alone", fmt, level, rows - 1, rows);
            /* and one output alone (a range starting there) too */
            float *one = malloc((size_t)n * sizeof(float));
            one[n1 - 1] = 0.5f;
            kvp_matmul_args c = b;
            c.n0 = n1 - 1;
            c.n1 = n1;
            c.y = one;
            L.d->matmul(inst.state, &c);
            cr_assert(memcmp(&one[n1 - 1], &y_alone[n1 - 1], sizeof(float)) == 0, "%s level %u: output %u alone differs",
                      fmt, level, n1 - 1);
            free(one);
        }
    free(x);
    free(y);
    free(y_alone);
    free(u);
    free(packed);
    free(W);
    L.d->destroy(inst.state);
    cr_expect_eq(f.live_allocs, 0);
    dlclose(L.dl);
}

Test(weight_formats, matmul_matches_double_reference_every_level) {
    const uint32_t shapes[][2] = {{32, 13}, {64, 40}, {96, 37}, {1024, 70}};
    for (size_t fi = 0; fi < 4; fi++)
        for (uint32_t level = KVP_CPU_PORTABLE; level <= (uint32_t)kvh_cpu_isa_detected(); level++)
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
                check_matmul(formats[fi], level, 32, shapes[si][0], shapes[si][1]);
    /* a wider group */
    check_matmul("w8", (uint32_t)kvh_cpu_isa_detected(), 64, 1024, 21);
    check_matmul("w4", (uint32_t)kvh_cpu_isa_detected(), 128, 1024, 21);
}

/* ---- w8/w4 prefill: many rows through matmul (KVP_CAP_MATMUL_PREFILL) ------------------------------------ */

/* The host calls w8/w4's matmul for prefill pieces of any length too: the plugin quantizes the rows a chunk
 * at a time (one heap buffer; 89 rows of k = 4096, 351 of k = 1024) and multiplies tiles of up to 4 rows by
 * 4 outputs. Every row's products must be the ones a call of that row alone (a decode step) gives, bit
 * for bit, whatever tile, chunk or output range the row falls in (ranges split as the host splits them
 * between threads, at a multiple of 16), and within the double reference's bound. */
static void check_prefill(const char *fmt, uint32_t level, uint32_t G, uint32_t k, uint32_t n, uint32_t rows) {
    fake_host f;
    fake_init(&f, level, G);
    loaded L = load_format(fmt, G);
    cr_assert(L.d->caps & KVP_CAP_MATMUL_PREFILL, "%s does not declare KVP_CAP_MATMUL_PREFILL", fmt);
    cr_assert(!(L.d->caps & KVP_CAP_ACT_QUANT), "%s still declares KVP_CAP_ACT_QUANT", fmt);
    kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
    kvp_instance inst = {.struct_size = sizeof inst};
    cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK, "%s create: %s", fmt, f.error);
    float *W = random_floats((size_t)k * n, 77 + k + n, 0.25f);
    kvp_weight_info info;
    uint8_t *packed = pack_with(&L, &f, inst.state, k, n, W, KVP_LAYOUT_IN_MAJOR, &info);
    const size_t rb = wf_row_bytes(L.spec, k);
    float *x = random_floats((size_t)rows * k, 3 + k + rows, 2.0f);
    memset(x + (size_t)(rows / 2) * k, 0, (size_t)k * sizeof(float)); /* an all-zero row: d = 0 in every block */
    for (uint32_t i = 0; i < k; i += 64) x[(size_t)(rows - 1) * k + i] *= 1000.0f; /* an outlier per 64 inputs */
    float *y = malloc((size_t)rows * n * sizeof(float)), *y1 = malloc((size_t)n * sizeof(float));
    for (size_t i = 0; i < (size_t)rows * n; i++) y[i] = 0.25f;
    const uint32_t up = (n / 2 + 15u) & ~15u, split = up < n ? up : n / 2; /* two threads' ranges */
    const uint32_t bounds[3] = {0, split, n};
    for (int t = 0; t < 2; t++) {
        if (bounds[t] == bounds[t + 1]) continue;
        kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = rows,
                             .n0 = bounds[t], .n1 = bounds[t + 1], .y = y, .ldy = n};
        L.d->matmul(inst.state, &a);
    }
    for (uint32_t r = 0; r < rows; r++) {
        for (uint32_t j = 0; j < n; j++) y1[j] = 0.25f;
        kvp_matmul_args b = {.struct_size = sizeof b, .w = &info, .packed = packed, .x = x + (size_t)r * k, .rows = 1,
                             .n0 = 0, .n1 = n, .y = y1, .ldy = n};
        L.d->matmul(inst.state, &b);
        for (uint32_t j = 0; j < n; j++)
            cr_assert(memcmp(&y1[j], &y[(size_t)r * n + j], sizeof(float)) == 0,
                      "%s level %u G %u k %u: row %u of %u, output %u: prefill %a, decode %a", fmt, level, G, k, r, rows, j,
                      (double)y[(size_t)r * n + j], (double)y1[j]);
        if (r % 7 == 0 || r == rows - 1)
            for (uint32_t j = 0; j < n; j++) {
                double mag;
                const double ref = 0.25 + int_reference(&L, k, packed + (size_t)j * rb, x + (size_t)r * k, &mag);
                const double tol = (k / 32 + 4) * 0x1p-23 * mag + 1e-6;
                cr_assert_leq(fabs(y1[j] - ref), tol, "%s level %u k %u: y[%u][%u] = %.9g, ref %.9g", fmt, level, k, r, j,
                              (double)y1[j], ref);
            }
    }
    /* the same rows from row 5 on, in one call over a range off the grid: each row's tile and chunk move */
    if (rows > 6 && n > 4) {
        float *y2 = malloc((size_t)rows * n * sizeof(float));
        for (size_t i = 0; i < (size_t)rows * n; i++) y2[i] = 0.25f;
        kvp_matmul_args c = {.struct_size = sizeof c, .w = &info, .packed = packed, .x = x + 5 * (size_t)k,
                             .rows = rows - 5, .n0 = 3, .n1 = n - 1, .y = y2, .ldy = n};
        L.d->matmul(inst.state, &c);
        for (uint32_t r = 5; r < rows; r++)
            cr_assert(memcmp(y2 + (size_t)(r - 5) * n + 3, y + (size_t)r * n + 3, (size_t)(n - 4) * sizeof(float)) == 0,
                      "%s level %u k %u: row %u differs when the call starts at row 5", fmt, level, k, r);
        free(y2);
    }
    free(y);
    free(y1);
    free(x);
    free(packed);
    free(W);
    L.d->destroy(inst.state);
    cr_expect_eq(f.live_allocs, 0);
    dlclose(L.dl);
}

Test(weight_formats, w8_w4_prefill_products_equal_decode_products_bit_for_bit) {
    /* k = 96: an odd number of 32-input blocks; rows not a multiple of the tile; k = 4096 crosses chunks */
    const uint32_t shapes[][3] = {{64, 97, 21}, {256, 64, 21}, {96, 37, 13}, {1024, 70, 67}, {4096, 21, 197}};
    const char *q[] = {"w8", "w4"};
    for (int fi = 0; fi < 2; fi++) {
        for (uint32_t level = KVP_CPU_PORTABLE; level <= (uint32_t)kvh_cpu_isa_detected(); level++)
            for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
                check_prefill(q[fi], level, 32, shapes[si][0], shapes[si][1], shapes[si][2]);
        check_prefill(q[fi], (uint32_t)kvh_cpu_isa_detected(), 64, 1024, 19, 41);
        check_prefill(q[fi], (uint32_t)kvh_cpu_isa_detected(), 128, 1024, 19, 41);
    }
    /* f16/bf16 stay on the host's unpacked panels for prefill: they declare neither capability */
    for (int fi = 0; fi < 2; fi++) {
        loaded L = load_format(formats[fi], 32);
        cr_expect_eq(L.d->caps & (KVP_CAP_MATMUL_PREFILL | KVP_CAP_ACT_QUANT), 0u, "%s", formats[fi]);
        dlclose(L.dl);
    }
}

/* ---- w8/w4: the activation quantization and exact integer sums ------------------------------------------ */

Test(weight_formats, activation_quantization_every_build_equals_portable) {
    const uint32_t k = 32 * 64;
    float *x = random_floats(k, 4242, 3.0f);
    /* special blocks: all zero; ties at amax = 127 (id = 1: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0); one large
     * outlier; tiny values; a NaN; an infinity */
    memset(x + 32, 0, 32 * sizeof(float));
    for (int i = 0; i < 32; i++) x[64 + i] = (float)(i % 8) - 3.5f;
    x[64] = 127.0f;
    x[65] = 2.5f;
    x[66] = 0.5f;
    x[96 + 5] = 1e30f;
    for (int i = 0; i < 32; i++) x[128 + i] = 1e-30f * (float)(i - 16);
    x[160 + 7] = NAN;
    x[192 + 31] = -INFINITY;
    int8_t q0[32 * 64], q1[32 * 64];
    float d0[64], d1[64];
    wf_act_quantize_portable(x, k, q0, d0);
    /* what the definition promises */
    for (uint32_t b = 0; b < k / 32; b++) {
        double amax = 0;
        int finite = 1;
        for (int i = 0; i < 32; i++) {
            if (!isfinite(x[32 * b + i])) finite = 0;
            else amax = fmax(amax, fabs((double)x[32 * b + i]));
        }
        if (!finite) {
            cr_expect(isnan(d0[b]), "block %u with a non-finite input: scale %g, not NaN", b, (double)d0[b]);
            continue;
        }
        cr_expect_eq(d0[b], (float)amax / 127.0f, "block %u: scale %g for amax %g", b, (double)d0[b], amax);
        for (int i = 0; i < 32; i++) {
            const int8_t q = q0[32 * b + i];
            cr_assert_neq(q, -128, "block %u input %d: code -128", b, i); /* codes run -127..127 */
            if (amax > 0)
                cr_assert_leq(fabs((double)x[32 * b + i] - (double)q * d0[b]), 0.5 * d0[b] * (1 + 1e-4) + 1e-45, /* and d's own rounding times |q| */
                              "block %u input %d: %g as %d x %g", b, i, (double)x[32 * b + i], q, (double)d0[b]);
            else
                cr_assert_eq(q, 0);
        }
    }
    cr_expect_eq(q0[65], 2, "ties go to even: 2.5 -> %d", q0[65]);
    cr_expect_eq(q0[64 + 31], 4, "3.5 -> %d", q0[64 + 31]);
    cr_expect_eq(q0[64 + 8], -4, "-3.5 -> %d", q0[64 + 8]);
    cr_expect_eq(q0[66], 0, "0.5 -> %d", q0[66]);
    /* every vector build gives the same bytes and the same scale bits */
    const int isa = kvh_cpu_isa_detected();
    for (int level = KVP_CPU_AVX2; level <= isa; level++) {
        memset(q1, 0x55, sizeof q1);
        memset(d1, 0x55, sizeof d1);
        if (level == KVP_CPU_AVX2) wf_act_quantize_avx2(x, k, q1, d1);
        else wf_act_quantize_avx512(x, k, q1, d1);
        for (uint32_t b = 0; b < k / 32; b++) {
            cr_expect(memcmp(&d0[b], &d1[b], 4) == 0 || (isnan(d0[b]) && isnan(d1[b])), "level %d block %u: scale %a vs %a",
                      level, b, (double)d1[b], (double)d0[b]);
            cr_expect(memcmp(q0 + 32 * b, q1 + 32 * b, 32) == 0, "level %d block %u: codes differ", level, b);
        }
    }
    free(x);
}

/* W (k x n, input-major) whose groups have power-of-two scales: per (group, output) one value at the
 * format's extreme (w8: +-127 * 2^e; w4: -8 * 2^e, so d = 2^e), the rest small integers times 2^e. */
static float *exact_weights(uint32_t kind, uint32_t G, uint32_t k, uint32_t n, uint64_t seed) {
    float *W = malloc((size_t)k * n * sizeof(float));
    for (uint32_t j = 0; j < n; j++)
        for (uint32_t g = 0; g < k / G; g++) {
            const float scale = ldexpf(1.0f, (int)(kvh_test_xorshift(&seed) % 3)); /* 1, 2, 4 */
            const uint32_t at = (uint32_t)(kvh_test_xorshift(&seed) % G);
            for (uint32_t i = 0; i < G; i++) {
                float v = (float)((int)(kvh_test_xorshift(&seed) % 15) - 7); /* -7..7 */
                if (i == at) v = kind == WF_W8 ? ((kvh_test_xorshift(&seed) & 1) ? 127.0f : -127.0f) : -8.0f;
                W[(size_t)(g * G + i) * n + j] = v * scale;
            }
        }
    return W;
}

Test(weight_formats, w8_w4_integer_sums_exact_at_every_level) {
    const uint32_t shapes[][3] = {{32, 9, 32}, {96, 13, 32}, {544, 21, 32}, {1024, 11, 32}, {1024, 7, 64}, {1024, 6, 128}};
    const char *q[] = {"w8", "w4"};
    for (int fi = 0; fi < 2; fi++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            const uint32_t k = shapes[si][0], n = shapes[si][1], G = shapes[si][2], rows = 5;
            loaded L = load_format(q[fi], G);
            float *W = exact_weights(L.spec.kind, G, k, n, 31 + k + G);
            /* rows: per 32 inputs one value at +-127 * 2^f (so the activation scale is 2^f), the rest
             * integers -8..8 times 2^f, f in -1..1: every fp32 product and sum below is exact */
            float *x = malloc((size_t)rows * k * sizeof(float));
            uint64_t seed = 5 + k;
            for (uint32_t r = 0; r < rows; r++)
                for (uint32_t b = 0; b < k / 32; b++) {
                    const float scale = ldexpf(1.0f, (int)(kvh_test_xorshift(&seed) % 3) - 1);
                    const uint32_t at = (uint32_t)(kvh_test_xorshift(&seed) % 32);
                    for (uint32_t i = 0; i < 32; i++) {
                        float v = (float)((int)(kvh_test_xorshift(&seed) % 17) - 8);
                        if (i == at) v = (kvh_test_xorshift(&seed) & 1) ? 127.0f : -127.0f;
                        x[(size_t)r * k + 32 * b + i] = v * scale;
                    }
                }
            float *ref = NULL;
            for (uint32_t level = KVP_CPU_PORTABLE; level <= (uint32_t)kvh_cpu_isa_detected(); level++) {
                fake_host f;
                fake_init(&f, level, G);
                kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
                kvp_instance inst = {.struct_size = sizeof inst};
                cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK, "%s", f.error);
                kvp_weight_info info;
                uint8_t *packed = pack_with(&L, &f, inst.state, k, n, W, KVP_LAYOUT_IN_MAJOR, &info);
                /* the packed scales are the powers of two chosen, so the held weights are W itself */
                float *u = malloc((size_t)k * n * sizeof(float));
                L.d->unpack(inst.state, &info, packed, 0, n, u);
                for (uint32_t j = 0; j < n; j++)
                    for (uint32_t i = 0; i < k; i++)
                        cr_assert_eq(u[(size_t)j * k + i], W[(size_t)i * n + j], "%s: W(%u,%u) not held exactly", q[fi], i, j);
                float *y = malloc((size_t)rows * n * sizeof(float));
                for (size_t i = 0; i < (size_t)rows * n; i++) y[i] = 0.5f;
                kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = rows,
                                     .n0 = 0, .n1 = n, .y = y, .ldy = n};
                L.d->matmul(inst.state, &a);
                for (uint32_t r = 0; r < rows; r++)
                    for (uint32_t j = 0; j < n; j++) {
                        double exact = 0.5; /* activations quantize exactly here, so the arithmetic is W's */
                        for (uint32_t i = 0; i < k; i++) exact += (double)x[(size_t)r * k + i] * W[(size_t)i * n + j];
                        cr_assert_eq((double)y[(size_t)r * n + j], exact, "%s level %u k %u G %u: y[%u][%u] = %.1f, exact %.1f",
                                     q[fi], level, k, G, r, j, (double)y[(size_t)r * n + j], exact);
                    }
                if (!ref) ref = y;
                else {
                    cr_assert(memcmp(ref, y, (size_t)rows * n * sizeof(float)) == 0);
                    free(y);
                }
                free(u);
                free(packed);
                L.d->destroy(inst.state);
            }
            free(ref);
            free(x);
            free(W);
            dlclose(L.dl);
        }
}

Test(weight_formats, w8_w4_nonfinite_input_gives_nan_for_its_row_only) {
    const uint32_t k = 96, n = 10;
    const char *q[] = {"w8", "w4"};
    for (int fi = 0; fi < 2; fi++)
        for (uint32_t level = KVP_CPU_PORTABLE; level <= (uint32_t)kvh_cpu_isa_detected(); level++) {
            fake_host f;
            fake_init(&f, level, 32);
            loaded L = load_format(q[fi], 32);
            kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
            kvp_instance inst = {.struct_size = sizeof inst};
            cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK);
            float *W = random_floats((size_t)k * n, 3, 0.5f);
            kvp_weight_info info;
            uint8_t *packed = pack_with(&L, &f, inst.state, k, n, W, KVP_LAYOUT_IN_MAJOR, &info);
            float *x = random_floats(2 * k, 8, 1.0f), y[2 * 10] = {0};
            x[k + 70] = INFINITY; /* row 1 */
            kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = 2, .n0 = 0,
                                 .n1 = n, .y = y, .ldy = n};
            L.d->matmul(inst.state, &a);
            for (uint32_t j = 0; j < n; j++) {
                cr_expect(isfinite(y[j]), "%s level %u: row 0 output %u is %g", q[fi], level, j, (double)y[j]);
                cr_expect(isnan(y[n + j]), "%s level %u: row 1 output %u is %g, not NaN", q[fi], level, j, (double)y[n + j]);
            }
            free(x);
            free(packed);
            free(W);
            L.d->destroy(inst.state);
            dlclose(L.dl);
        }
}

/* ---- errors ------------------------------------------------------------------------------------------- */

Test(weight_formats, refusals_name_what_and_where) {
    for (size_t fi = 0; fi < 4; fi++) {
        fake_host f;
        fake_init(&f, KVP_CPU_PORTABLE, 32);
        loaded L = load_format(formats[fi], 32);
        kvp_layer_info li = {.struct_size = sizeof li, .layer = 3, .n_layer = 4};
        kvp_instance inst = {.struct_size = sizeof inst};
        cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK);
        kvp_weight_info bad = {.struct_size = sizeof bad, .layer = 3, .which = KVP_MAT_ATTN_PROJ, .k = 100, .n = 8};
        cr_expect_eq(L.d->packed_size(inst.state, &bad), 0);
        cr_expect(strstr(f.error, "attn.c_proj of layer 3") && strstr(f.error, "100 inputs"), "%s: '%s'", formats[fi],
                  f.error);
        float W[64 * 2];
        for (int i = 0; i < 128; i++) W[i] = 0.01f * (float)i;
        W[2 * 17 + 1] = NAN; /* input 17, output 1 */
        kvp_weight_info info = {.struct_size = sizeof info, .layer = 3, .which = KVP_MAT_MLP_PROJ, .k = 64, .n = 2};
        uint8_t packed[512] = {0};
        cr_assert_leq(L.d->packed_size(inst.state, &info), sizeof packed);
        cr_expect_eq(L.d->pack(inst.state, &info, W, KVP_LAYOUT_IN_MAJOR, packed), KVP_ERROR);
        cr_expect(strstr(f.error, "mlp.c_proj of layer 3") && strstr(f.error, "input 17, output 1") &&
                      strstr(f.error, "not finite"),
                  "%s: '%s'", formats[fi], f.error);
        L.d->destroy(inst.state);
        cr_expect_eq(f.live_allocs, 0, "%s: a failed pack leaked", formats[fi]);
        dlclose(L.dl);
    }
    /* quantized formats: a group must be a multiple of 32, and divide k */
    const char *q[] = {"w8", "w4"};
    for (int i = 0; i < 2; i++) {
        fake_host f;
        fake_init(&f, KVP_CPU_PORTABLE, 48);
        loaded L = load_format(q[i], 48);
        kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
        kvp_instance inst = {.struct_size = sizeof inst};
        cr_expect_eq(L.d->create(&f.host, &li, &inst), KVP_ERROR);
        cr_expect(strstr(f.error, "group = 48") && strstr(f.error, "multiple of 32"), "%s: '%s'", q[i], f.error);
        fake_init(&f, KVP_CPU_PORTABLE, 128);
        cr_assert_eq(L.d->create(&f.host, &li, &inst), KVP_OK);
        kvp_weight_info info = {.struct_size = sizeof info, .layer = 0, .which = KVP_MAT_ATTN_QKV, .k = 96, .n = 8};
        cr_expect_eq(L.d->packed_size(inst.state, &info), 0);
        cr_expect(strstr(f.error, "group 128 does not divide its 96 inputs"), "%s: '%s'", q[i], f.error);
        /* the activation row is quantized into a stack buffer of WF_MAX_K inputs */
        kvp_weight_info wide = {.struct_size = sizeof wide, .layer = 2, .which = KVP_MAT_MLP_PROJ, .k = WF_MAX_K + 128, .n = 8};
        cr_expect_eq(L.d->packed_size(inst.state, &wide), 0);
        cr_expect(strstr(f.error, "mlp.c_proj of layer 2: 8320 inputs") && strstr(f.error, "at most 8192 inputs"), "%s: '%s'",
                  q[i], f.error);
        L.d->destroy(inst.state);
        dlclose(L.dl);
    }
}

Test(weight_formats, bytes_per_weight_as_documented) {
    /* GPT-2 Medium's c_fc (1024 x 4096): what `plan` and the records count */
    const uint32_t k = 1024, n = 4096;
    cr_expect_eq(wf_row_bytes((wf_spec){WF_F16, 0}, k) * n, (size_t)k * n * 2);
    cr_expect_eq(wf_row_bytes((wf_spec){WF_BF16, 0}, k) * n, (size_t)k * n * 2);
    cr_expect_eq(wf_row_bytes((wf_spec){WF_W8, 32}, k) * n, (size_t)k * n * 34 / 32); /* 8.5 bits, like Q8_0 */
    cr_expect_eq(wf_row_bytes((wf_spec){WF_W4, 32}, k) * n, (size_t)k * n * 18 / 32); /* 4.5 bits, like Q4_0 */
}
