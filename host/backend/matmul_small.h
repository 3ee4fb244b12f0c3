/* matmul_small.h — matrix products for a few rows at a time (decode batches, short prefills), reading
 * every weight exactly once per call.
 * Owns: y += x·W over a column range of an input-major weight, and y = x·Wtᵀ over a row range of a
 * row-major weight (the tied LM head). Does not own: threading (the caller splits the columns), bias
 * or residual (the caller puts them in y first), or large T (OpenBLAS sgemm is faster there).
 *
 * Why not sgemm: OpenBLAS packs the whole weight on every call. At T = 1 sgemv streams the weight at
 * memory speed, but sgemm at T = 2..8 streams it at a third of that speed on the machine we measured,
 * so decoding a batch of 4 cost almost what 4 single decodes cost (docs/results/matmul.md).
 *
 * Shapes: T rows (any T works; the backend uses these for 2..kvh_matmul_small_max()), K inputs,
 * N outputs; x [T, K] row stride K; W [K, N] row stride N; Wt [N, K] row stride K; y row stride ldy.
 * Each output element adds up its K products in one fixed order, whatever T is and wherever the column
 * range starts, so a row's result does not depend on which other rows share the call (tested bit for bit). */
#ifndef KVH_MATMUL_SMALL_H
#define KVH_MATMUL_SMALL_H

#include <stddef.h>

/* Largest T for which the backend calls these instead of sgemm (measured: docs/results/matmul.md):
 * 8 where the AVX2 + FMA kernels run (kvh_cpu_isa() >= avx2, chosen at run time); 2 for the portable C
 * ones, which lose to sgemm from 4 rows on. */
int kvh_matmul_small_max(void);

/* y[t, n] += sum_k x[t, k] * W[k, n] for t < T, n0 <= n < n1. */
void kvh_matmul_small(float *y, size_t ldy, const float *x, const float *W, int T, int K, int N, int n0, int n1);

/* y[t, v] = sum_k x[t, k] * Wt[v, k] for t < T, v0 <= v < v1 (y is overwritten, not accumulated). */
void kvh_matmul_small_t(float *y, size_t ldy, const float *x, const float *Wt, int T, int K, int v0, int v1);

/* sum_i a[i] * b[i] with 8 independent partial sums (compilers vectorize it without -ffast-math): the
 * k % 8 tail first, then the 8 lanes in order. The CPU backend's decode attention and the portable
 * x·Wtᵀ share it. */
static inline float kvh_dot_lanes8(const float *a, const float *b, int n) {
    float lane[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 8; l++) s += lane[l];
    return s;
}

/* The portable C versions (no SIMD intrinsics), same contracts; exposed so tests cover both paths. */
void kvh_matmul_small_portable(float *y, size_t ldy, const float *x, const float *W, int T, int K, int N, int n0,
                               int n1);
void kvh_matmul_small_t_portable(float *y, size_t ldy, const float *x, const float *Wt, int T, int K, int v0, int v1);

#endif
