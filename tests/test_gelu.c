/* test_gelu.c — host/backend/gelu.c: every kernel level this CPU can run against a double-precision reference,
 * the vector levels against each other bit for bit, position independence (masked tails), NaN
 * propagation (so non-finite activations still reach the logits check), and the KVH_ISA cap. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu_features.h"
#include "backend/gelu.h"
#include "helpers/test_util.h"

/* gelu_new in double, in the numerically stable form v / (1 + exp(-2u)) (the tanh form loses all
 * relative precision for negative v once 1 + tanh(u) underflows). u is computed in double from the
 * float input, so the bound below includes the kernels' own float rounding of u. */
static double gelu_ref(float vf) {
    const double v = vf;
    const double u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
    return v / (1.0 + exp(-2.0 * u));
}

/* The error allowed: absolute 1e-6 x max(1, |v|), and relative 3e-5 where the value is not tiny. The
 * relative part is dominated by rounding u in float: the result is ~ v exp(2u) for negative v, so a
 * relative error e in u becomes 2|u| e in the result (about 1e-5 at v = -10). Measured maxima over
 * [-20, 20]: 5.2e-7 absolute, 1.1e-5 relative. */
static void check_level(kvh_isa isa) {
    const size_t n = 400001;
    float *x = malloc(n * sizeof(float));
    cr_assert_not_null(x);
    for (size_t i = 0; i < n; i++) x[i] = -20.0f + 40.0f * (float)i / (float)(n - 1);
    float *in = malloc(n * sizeof(float));
    cr_assert_not_null(in);
    memcpy(in, x, n * sizeof(float));
    kvh_gelu_isa(isa, x, n);
    double worst_abs = 0, worst_rel = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        const double r = gelu_ref(in[i]);
        const double e = fabs((double)x[i] - r);
        const double lim = 1e-6 * fmax(1.0, fabs((double)in[i]));
        if (e > worst_abs) worst_abs = e;
        if (fabs(r) > 1e-30 && e / fabs(r) > worst_rel) worst_rel = e / fabs(r);
        if (e > lim || (fabs(r) > 1e-30 && isa != KVH_ISA_PORTABLE && e / fabs(r) > 3e-5)) {
            if (bad++ < 5)
                cr_log_error("%s: gelu(%.9g) = %.9g, reference %.9g", kvh_isa_name(isa), (double)in[i], (double)x[i], r);
        }
    }
    cr_log_info("%s: max abs error %.3g, max rel error %.3g", kvh_isa_name(isa), worst_abs, worst_rel);
    cr_expect_eq(bad, 0, "%s: %zu of %zu values outside the bound (max abs %.3g, max rel %.3g)", kvh_isa_name(isa), bad,
                 n, worst_abs, worst_rel);
    free(x);
    free(in);
}

Test(gelu, every_level_matches_double_reference) {
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++) check_level((kvh_isa)isa);
    if (kvh_cpu_isa_detected() < KVH_ISA_AVX512)
        cr_log_warn("this CPU lacks AVX-512 (or AVX2): those levels were not run here");
}

Test(gelu, vector_levels_agree_bit_for_bit) {
    if (kvh_cpu_isa_detected() < KVH_ISA_AVX512) cr_skip_test("needs an AVX-512 CPU to run both vector levels");
    const size_t n = 100003;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    cr_assert(a && b);
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n; i++) a[i] = b[i] = (float)((double)(kvh_test_xorshift(&seed) >> 11) / 9007199254740992.0 * 24.0 - 12.0);
    kvh_gelu_isa(KVH_ISA_AVX2, a, n);
    kvh_gelu_isa(KVH_ISA_AVX512, b, n);
    cr_expect(memcmp(a, b, n * sizeof(float)) == 0, "AVX2 and AVX-512 GELU differ");
    free(a);
    free(b);
}

/* An element's result must not depend on where it sits (vector body or tail) or on the array length:
 * the backend splits arrays across threads at arbitrary 16-float boundaries, and prefill rows are
 * computed once while decode rows come one at a time. */
Test(gelu, result_independent_of_position_and_length) {
    const float probe[] = {-7.25f, -3.0f, -0.5f, -0.0f, 0.0f, 1e-20f, 0.75f, 2.5f, 9.0f};
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++) {
        for (size_t p = 0; p < sizeof probe / sizeof probe[0]; p++) {
            float alone = probe[p];
            kvh_gelu_isa((kvh_isa)isa, &alone, 1);
            for (size_t len = 1; len <= 40; len++)
                for (size_t at = 0; at < len; at++) {
                    float buf[40];
                    for (size_t i = 0; i < len; i++) buf[i] = 0.125f * (float)i - 2.0f;
                    buf[at] = probe[p];
                    kvh_gelu_isa((kvh_isa)isa, buf, len);
                    cr_assert(memcmp(&buf[at], &alone, sizeof(float)) == 0,
                              "%s: gelu(%g) at %zu of %zu gives %.9g, alone %.9g", kvh_isa_name((kvh_isa)isa),
                              (double)probe[p], at, len, (double)buf[at], (double)alone);
                }
        }
    }
}

Test(gelu, nan_propagates_and_saturates_cleanly) {
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++) {
        float v[5] = {NAN, 1e30f, -1e30f, 50.0f, -50.0f};
        kvh_gelu_isa((kvh_isa)isa, v, 5);
        cr_expect(isnan(v[0]), "%s: gelu(NaN) = %g", kvh_isa_name((kvh_isa)isa), (double)v[0]);
        cr_expect(v[1] == 1e30f, "%s: gelu(1e30) = %g", kvh_isa_name((kvh_isa)isa), (double)v[1]);
        cr_expect(isfinite(v[2]) && fabsf(v[2]) < 1e-30f, "%s: gelu(-1e30) = %g", kvh_isa_name((kvh_isa)isa),
                  (double)v[2]);
        cr_expect(v[3] == 50.0f, "%s: gelu(50) = %g", kvh_isa_name((kvh_isa)isa), (double)v[3]);
        cr_expect(fabsf(v[4]) < 1e-30f, "%s: gelu(-50) = %g", kvh_isa_name((kvh_isa)isa), (double)v[4]);
    }
}

Test(gelu, isa_names) {
    cr_expect_str_eq(kvh_isa_name(KVH_ISA_PORTABLE), "portable");
    cr_expect_str_eq(kvh_isa_name(KVH_ISA_AVX2), "avx2");
    cr_expect_str_eq(kvh_isa_name(KVH_ISA_AVX512), "avx512");
    cr_expect(kvh_cpu_isa() <= kvh_cpu_isa_detected(), "the chosen level exceeds what the CPU has");
}
