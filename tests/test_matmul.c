/* test_matmul.c — host/backend/matmul_small.c: both products (x·W accumulated into y, x·Wtᵀ written) against
 * a double-precision reference computed here, for every T the backend sends (2..kvh_matmul_small_max())
 * and beyond, K and N with and without vector tails, column ranges that start and end off the vector
 * grid (as the OpenMP split makes them); the SIMD and portable paths; the header's promise that a row's
 * result does not depend on which rows share the call (bit-identical). End to end, the backend's use of
 * it is covered by test_forward's ragged batch (its decode steps of 3 rows take this path) against each
 * sequence decoded alone (sgemv). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "helpers/test_util.h"
#include "backend/matmul_small.h"

static float *random_floats(size_t n, uint64_t seed) {
    float *a = malloc(n * sizeof(float));
    cr_assert_not_null(a);
    for (size_t i = 0; i < n; i++) a[i] = (float)((double)(kvh_test_xorshift(&seed) >> 11) / 9007199254740992.0 - 0.5);
    return a;
}

/* y0 + x·W over columns [n0, n1) in double; columns outside keep y0. */
static void ref_small(double *out, const float *y0, const float *x, const float *W, int T, int K, int N, int n0,
                      int n1) {
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = y0[(size_t)t * N + n];
            if (n >= n0 && n < n1)
                for (int k = 0; k < K; k++) s += (double)x[(size_t)t * K + k] * W[(size_t)k * N + n];
            out[(size_t)t * N + n] = s;
        }
}

/* Largest |got - want| relative to the scale of the sum (sum of |products| + 1): fp32 accumulation error
 * grows with K and with the magnitudes, not with the result, which may cancel to near zero. */
static double rel_err(const float *got, const double *want, const double *scale, size_t n) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)got[i] - want[i]) / scale[i]);
    return worst;
}

typedef void (*small_fn)(float *, size_t, const float *, const float *, int, int, int, int, int);
typedef void (*small_t_fn)(float *, size_t, const float *, const float *, int, int, int, int);

static void check_small(small_fn fn, const char *name, int T, int K, int N, int n0, int n1) {
    float *x = random_floats((size_t)T * K, 11 + T), *W = random_floats((size_t)K * N, 23 + K);
    float *y = random_floats((size_t)T * N, 37 + N); /* y is accumulated into: start from non-zero values */
    float *y0 = malloc((size_t)T * N * sizeof(float));
    double *want = malloc((size_t)T * N * sizeof(double)), *scale = malloc((size_t)T * N * sizeof(double));
    cr_assert(y0 && want && scale);
    memcpy(y0, y, (size_t)T * N * sizeof(float));
    ref_small(want, y0, x, W, T, K, N, n0, n1);
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double s = 1.0 + fabs(y0[(size_t)t * N + n]);
            if (n >= n0 && n < n1)
                for (int k = 0; k < K; k++) s += fabs((double)x[(size_t)t * K + k] * W[(size_t)k * N + n]);
            scale[(size_t)t * N + n] = s;
        }
    fn(y, (size_t)N, x, W, T, K, N, n0, n1);
    double e = rel_err(y, want, scale, (size_t)T * N);
    cr_assert(e < 1e-6, "%s T=%d K=%d N=%d cols [%d, %d): relative error %.3g", name, T, K, N, n0, n1, e);
    /* columns outside the range are untouched, bit for bit */
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++)
            if (n < n0 || n >= n1)
                cr_assert(memcmp(&y[(size_t)t * N + n], &y0[(size_t)t * N + n], sizeof(float)) == 0,
                          "%s: column %d outside [%d, %d) was written", name, n, n0, n1);
    free(x), free(W), free(y), free(y0), free(want), free(scale);
}

static void check_small_t(small_t_fn fn, const char *name, int T, int K, int V, int v0, int v1) {
    float *x = random_floats((size_t)T * K, 41 + T), *Wt = random_floats((size_t)V * K, 53 + K);
    float *y = malloc((size_t)T * V * sizeof(float));
    cr_assert_not_null(y);
    for (size_t i = 0; i < (size_t)T * V; i++) y[i] = -777.0f; /* sentinel: outside the range stays */
    fn(y, (size_t)V, x, Wt, T, K, v0, v1);
    for (int t = 0; t < T; t++)
        for (int v = 0; v < V; v++) {
            float got = y[(size_t)t * V + v];
            if (v < v0 || v >= v1) {
                cr_assert_eq(got, -777.0f, "%s: row %d outside [%d, %d) was written", name, v, v0, v1);
                continue;
            }
            double s = 0, scale = 1;
            for (int k = 0; k < K; k++) {
                double p = (double)x[(size_t)t * K + k] * Wt[(size_t)v * K + k];
                s += p;
                scale += fabs(p);
            }
            cr_assert(fabs(got - s) / scale < 1e-6, "%s T=%d K=%d v=%d: got %.9g want %.9g", name, T, K, v, got, s);
        }
    free(x), free(Wt), free(y);
}

static const int Ts[] = {1, 2, 3, 4, 5, 7, 8, 9, 16};

Test(matmul, small_matches_double_reference) {
    /* K: multiple of 4 and not; N / ranges: whole vectors, tails, a range starting mid-vector, one column */
    const int shapes[][4] = {{64, 96, 0, 96}, {37, 520, 16, 515}, {256, 1030, 3, 1030}, {5, 13, 0, 13},
                             {1024, 40, 8, 9},  {4, 1600, 512, 1600}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++) {
            check_small(kvh_matmul_small, "kvh_matmul_small", Ts[i], shapes[s][0], shapes[s][1], shapes[s][2],
                        shapes[s][3]);
            check_small(kvh_matmul_small_portable, "portable", Ts[i], shapes[s][0], shapes[s][1], shapes[s][2],
                        shapes[s][3]);
        }
}

Test(matmul, small_t_matches_double_reference) {
    /* K with and without a k % 8 tail; V ranges with fewer than 4 rows left at the end, or in all */
    const int shapes[][4] = {{256, 50, 0, 50}, {1024, 23, 5, 23}, {37, 9, 1, 4}, {7, 6, 0, 6}, {96, 4101, 2049, 4101}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++) {
            check_small_t(kvh_matmul_small_t, "kvh_matmul_small_t", Ts[i], shapes[s][0], shapes[s][1], shapes[s][2],
                          shapes[s][3]);
            check_small_t(kvh_matmul_small_t_portable, "portable", Ts[i], shapes[s][0], shapes[s][1], shapes[s][2],
                          shapes[s][3]);
        }
}

/* A row's result is the same whether it is computed alone or as row 5 of 8: bit-identical. */
Test(matmul, row_result_independent_of_batch) {
    const int T = 8, K = 300, N = 203;
    float *x = random_floats((size_t)T * K, 7), *W = random_floats((size_t)K * N, 8), *Wt = random_floats((size_t)N * K, 9);
    float *all = calloc((size_t)T * N, sizeof(float)), *one = calloc((size_t)N, sizeof(float));
    cr_assert(all && one);
    kvh_matmul_small(all, (size_t)N, x, W, T, K, N, 0, N);
    for (int t = 0; t < T; t++) {
        memset(one, 0, (size_t)N * sizeof(float));
        kvh_matmul_small(one, (size_t)N, x + (size_t)t * K, W, 1, K, N, 0, N);
        cr_assert(memcmp(one, all + (size_t)t * N, (size_t)N * sizeof(float)) == 0, "x·W row %d differs alone", t);
    }
    kvh_matmul_small_t(all, (size_t)N, x, Wt, T, K, 0, N);
    for (int t = 0; t < T; t++) {
        kvh_matmul_small_t(one, (size_t)N, x + (size_t)t * K, Wt, 1, K, 0, N);
        cr_assert(memcmp(one, all + (size_t)t * N, (size_t)N * sizeof(float)) == 0, "x·Wtᵀ row %d differs alone", t);
    }
    free(x), free(W), free(Wt), free(all), free(one);
}
