/* test_softmax.c — host/backend/softmax.c: the softmax numerators and their sum at every kernel level
 * this CPU runs, against a double-precision reference; masked (-inf) and far-below-the-maximum entries
 * exactly 0; the vector levels equal bit for bit per element; an element's value independent of its place
 * in the row (masked tails); the sum equal to the sum of what was written. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu_features.h"
#include "backend/softmax.h"
#include "helpers/test_util.h"

static double uniform(uint64_t *seed, double lo, double hi) {
    return lo + (hi - lo) * (double)(kvh_test_xorshift(seed) >> 11) / 9007199254740992.0;
}

/* A score row like attention's: values in [-40, 12], about one in five masked, maximum found the way
 * the backend finds it (over unmasked entries). */
static float make_row(uint64_t *seed, float *x, uint32_t n) {
    float mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        x[j] = (kvh_test_xorshift(seed) % 5 == 0 && j != n / 2) ? -INFINITY : (float)uniform(seed, -40.0, 12.0);
        if (x[j] > mx) mx = x[j];
    }
    return mx;
}

/* Bound per element: relative 4e-7 against exp of the float difference computed in double (the
 * polynomial and the 2^m scaling; libm's expf is within 1 ulp, 6e-8); 0 exactly below -86 and for
 * masked entries. Sum: each element's 4e-7 plus float summation's worst case, (n - 1) x 2^-24 relative
 * (the portable level adds in order; the vector levels in lanes, which only lowers the error). */
static void check_level(kvh_isa isa) {
    uint64_t seed = 0x2545f4914f6cdd1dull + (uint64_t)isa;
    const uint32_t lens[] = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 64, 127, 255, 256, 1000, 1024, 4099};
    double worst_rel = 0;
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++)
        for (int rep = 0; rep < 20; rep++) {
            const uint32_t n = lens[li];
            float *x = malloc(n * sizeof(float)), *in = malloc(n * sizeof(float));
            cr_assert(x && in);
            const float mx = make_row(&seed, x, n);
            memcpy(in, x, n * sizeof(float));
            const float sum = kvh_softmax_exp_sum_isa(isa, x, n, mx);
            double ref_sum = 0;
            for (uint32_t j = 0; j < n; j++) {
                const float t = in[j] - mx; /* the kernels' own float difference */
                if (in[j] == -INFINITY || t < -86.0f) {
                    cr_assert(x[j] == 0.0f, "%s n=%u: entry %u (score %g, max %g) gives %g, not 0",
                              kvh_isa_name(isa), n, j, (double)in[j], (double)mx, (double)x[j]);
                    continue;
                }
                const double r = exp((double)t);
                ref_sum += r;
                const double rel = fabs((double)x[j] - r) / r;
                if (rel > worst_rel) worst_rel = rel;
                cr_assert(rel <= 4e-7, "%s n=%u: exp(%.9g) = %.9g, reference %.9g (rel %.3g)", kvh_isa_name(isa), n,
                          (double)t, (double)x[j], r, rel);
            }
            cr_assert(fabs((double)sum - ref_sum) <= (4e-7 + (double)(n - 1) * 0x1p-24) * ref_sum, "%s n=%u: sum %.9g, reference %.9g",
                      kvh_isa_name(isa), n, (double)sum, ref_sum);
            free(x);
            free(in);
        }
    cr_log_info("%s: max relative error %.3g", kvh_isa_name(isa), worst_rel);
}

Test(softmax, every_level_matches_double_reference) {
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++) check_level((kvh_isa)isa);
    if (kvh_cpu_isa_detected() < KVH_ISA_AVX512)
        cr_log_warn("this CPU lacks AVX-512 (or AVX2): those levels were not run here");
}

/* The whole exponent range the polynomial covers, densely: t from -86 to 0 in steps of 2^-10. */
Test(softmax, dense_exponent_range) {
    const uint32_t n = 86 * 1024 + 1;
    float *x = malloc(n * sizeof(float));
    cr_assert_not_null(x);
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++) {
        for (uint32_t j = 0; j < n; j++) x[j] = -(float)j / 1024.0f;
        kvh_softmax_exp_sum_isa((kvh_isa)isa, x, n, 0.0f);
        double worst = 0;
        for (uint32_t j = 0; j < n; j++) {
            const double r = exp(-(double)j / 1024.0);
            const double rel = fabs((double)x[j] - r) / r;
            if (rel > worst) worst = rel;
        }
        cr_log_info("%s: max relative error over [-86, 0]: %.3g", kvh_isa_name((kvh_isa)isa), worst);
        cr_expect(worst <= 4e-7, "%s: max relative error %.3g over [-86, 0]", kvh_isa_name((kvh_isa)isa), worst);
    }
    free(x);
}

Test(softmax, vector_levels_agree_bit_for_bit) {
    if (kvh_cpu_isa_detected() < KVH_ISA_AVX512) cr_skip_test("needs an AVX-512 CPU to run both vector levels");
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    const uint32_t n = 10007;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
    cr_assert(a && b);
    const float mx = make_row(&seed, a, n);
    memcpy(b, a, n * sizeof(float));
    kvh_softmax_exp_sum_isa(KVH_ISA_AVX2, a, n, mx);
    kvh_softmax_exp_sum_isa(KVH_ISA_AVX512, b, n, mx);
    cr_expect(memcmp(a, b, n * sizeof(float)) == 0, "AVX2 and AVX-512 numerators differ");
    free(a);
    free(b);
}

/* Paged and contiguous caches, a head's first and later blocks: an element must come out the same
 * wherever it sits in the row (vector body or tail), and the sum must be that of the written values. */
Test(softmax, element_independent_of_position_and_length) {
    const float probe[] = {-85.5f, -30.0f, -3.25f, -0.5f, 0.0f};
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++)
        for (size_t p = 0; p < sizeof probe / sizeof probe[0]; p++) {
            float alone = probe[p];
            kvh_softmax_exp_sum_isa((kvh_isa)isa, &alone, 1, 0.0f);
            for (uint32_t len = 1; len <= 40; len++)
                for (uint32_t at = 0; at < len; at++) {
                    float buf[40];
                    for (uint32_t i = 0; i < len; i++) buf[i] = (i % 3 == 1) ? -INFINITY : -0.25f * (float)i;
                    buf[at] = probe[p];
                    const float sum = kvh_softmax_exp_sum_isa((kvh_isa)isa, buf, len, 0.0f);
                    cr_assert(memcmp(&buf[at], &alone, sizeof(float)) == 0,
                              "%s: exp(%g) at %u of %u gives %.9g, alone %.9g", kvh_isa_name((kvh_isa)isa),
                              (double)probe[p], at, len, (double)buf[at], (double)alone);
                    double written = 0;
                    for (uint32_t i = 0; i < len; i++) written += buf[i];
                    cr_assert(fabs(written - (double)sum) <= 1e-6 * written, "%s len %u: sum %.9g, written %.9g",
                              kvh_isa_name((kvh_isa)isa), len, (double)sum, written);
                }
        }
}

/* Only the row is written: the floats around it stay as they were (the tails are masked stores). */
Test(softmax, writes_nothing_outside_the_row) {
    for (int isa = KVH_ISA_PORTABLE; isa <= (int)kvh_cpu_isa_detected(); isa++)
        for (uint32_t n = 1; n <= 33; n++) {
            float buf[64];
            for (int i = 0; i < 64; i++) buf[i] = 1234.5f;
            for (uint32_t j = 0; j < n; j++) buf[8 + j] = -(float)j;
            kvh_softmax_exp_sum_isa((kvh_isa)isa, buf + 8, n, 0.0f);
            for (int i = 0; i < 8; i++) cr_assert(buf[i] == 1234.5f, "%s n=%u: wrote before the row", kvh_isa_name((kvh_isa)isa), n);
            for (uint32_t i = 8 + n; i < 64; i++)
                cr_assert(buf[i] == 1234.5f, "%s n=%u: wrote past the row at %u", kvh_isa_name((kvh_isa)isa), n, i - 8);
            cr_assert(buf[8] == 1.0f, "%s: exp(0) = %.9g", kvh_isa_name((kvh_isa)isa), (double)buf[8]);
        }
}
