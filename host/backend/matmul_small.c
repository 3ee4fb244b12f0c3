/* matmul_small.c — implementation of matmul_small.h.
 *
 * x·W (input-major W [K, N]): the columns are cut into tiles of COL_TILE; inside a tile, four weight rows
 * at a time are loaded once from memory and applied to every output row (two rows per pass, so each
 * weight vector feeds two FMAs), with the tile's outputs staying in L1/L2. Weights stream row by row,
 * which the hardware prefetchers follow; a column-strip walk (one cache line per weight row, keeping
 * the outputs in registers) measured 3x slower at T = 1.
 *
 * x·Wtᵀ (row-major Wt [N, K], the LM head): tiles of 4 weight rows x 2 input rows, 8 vector
 * accumulators along k, then one horizontal sum per output.
 *
 * The AVX2 + FMA kernels are compiled for that target whatever the build's flags and chosen at run time
 * from kvhost's CPU-feature reading (cpu_features.h, which KVH_ISA can lower); the portable versions keep
 * the same contracts for other CPUs and serve as the tests' second path. */
#include "backend/matmul_small.h"

#include <math.h>

#include "backend/cpu_features.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVH_MATMUL_AVX2 1
#define AVX2 __attribute__((target("avx2,fma")))
#endif

/* Columns per tile: 4 weight rows x 512 floats = 8 KB, 8 output rows x 512 floats = 16 KB. */
#define COL_TILE 512

/* ---- portable ------------------------------------------------------------------------------------ */

/* Plain multiply-add (no fmaf: without hardware FMA it is a library call); the loops over c and the
 * 8 partial sums along k (kvh_dot_lanes8) are what compilers vectorize without -ffast-math. */
void kvh_matmul_small_portable(float *y, size_t ldy, const float *x, const float *W, int T, int K, int N, int n0,
                               int n1) {
    for (int c0 = n0; c0 < n1; c0 += COL_TILE) {
        const int c1 = c0 + COL_TILE < n1 ? c0 + COL_TILE : n1;
        for (int k = 0; k < K; k++) {
            const float *w = W + (size_t)k * N;
            for (int t = 0; t < T; t++) {
                const float a = x[(size_t)t * K + k];
                float *yt = y + (size_t)t * ldy;
                for (int c = c0; c < c1; c++) yt[c] += a * w[c];
            }
        }
    }
}

void kvh_matmul_small_t_portable(float *y, size_t ldy, const float *x, const float *Wt, int T, int K, int v0, int v1) {
    for (int v = v0; v < v1; v++) {
        const float *w = Wt + (size_t)v * K;
        for (int t = 0; t < T; t++) {
            y[(size_t)t * ldy + v] = kvh_dot_lanes8(w, x + (size_t)t * K, K);
        }
    }
}

#ifdef KVH_MATMUL_AVX2
/* ---- AVX2 + FMA: x·W ------------------------------------------------------------------------------ */

/* One output row, weight rows k..k+3, columns [c0, c1) of which [c0, cv) are whole vectors. The scalar
 * tail uses fmaf in the same order, so it rounds exactly like the vector lanes. */
AVX2 static inline void rows4_one(float *yt, const float *xt, const float *w0, size_t N, int c0, int cv, int c1) {
    const float *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
    const __m256 a0 = _mm256_set1_ps(xt[0]), a1 = _mm256_set1_ps(xt[1]), a2 = _mm256_set1_ps(xt[2]),
                 a3 = _mm256_set1_ps(xt[3]);
    for (int c = c0; c < cv; c += 8) {
        __m256 s = _mm256_loadu_ps(yt + c);
        s = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + c), s);
        s = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + c), s);
        s = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + c), s);
        s = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + c), s);
        _mm256_storeu_ps(yt + c, s);
    }
    for (int c = cv; c < c1; c++)
        yt[c] = fmaf(xt[3], w3[c], fmaf(xt[2], w2[c], fmaf(xt[1], w1[c], fmaf(xt[0], w0[c], yt[c]))));
}

/* Two output rows at once: each weight vector is loaded once for both. */
AVX2 static inline void rows4_two(float *ya, float *yb, const float *xa, const float *xb, const float *w0, size_t N, int c0,
                             int cv, int c1) {
    const float *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
    const __m256 a0 = _mm256_set1_ps(xa[0]), a1 = _mm256_set1_ps(xa[1]), a2 = _mm256_set1_ps(xa[2]),
                 a3 = _mm256_set1_ps(xa[3]);
    const __m256 b0 = _mm256_set1_ps(xb[0]), b1 = _mm256_set1_ps(xb[1]), b2 = _mm256_set1_ps(xb[2]),
                 b3 = _mm256_set1_ps(xb[3]);
    for (int c = c0; c < cv; c += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + c), v1 = _mm256_loadu_ps(w1 + c), v2 = _mm256_loadu_ps(w2 + c),
                     v3 = _mm256_loadu_ps(w3 + c);
        __m256 s = _mm256_loadu_ps(ya + c), u = _mm256_loadu_ps(yb + c);
        s = _mm256_fmadd_ps(a0, v0, s);
        u = _mm256_fmadd_ps(b0, v0, u);
        s = _mm256_fmadd_ps(a1, v1, s);
        u = _mm256_fmadd_ps(b1, v1, u);
        s = _mm256_fmadd_ps(a2, v2, s);
        u = _mm256_fmadd_ps(b2, v2, u);
        s = _mm256_fmadd_ps(a3, v3, s);
        u = _mm256_fmadd_ps(b3, v3, u);
        _mm256_storeu_ps(ya + c, s);
        _mm256_storeu_ps(yb + c, u);
    }
    for (int c = cv; c < c1; c++) {
        ya[c] = fmaf(xa[3], w3[c], fmaf(xa[2], w2[c], fmaf(xa[1], w1[c], fmaf(xa[0], w0[c], ya[c]))));
        yb[c] = fmaf(xb[3], w3[c], fmaf(xb[2], w2[c], fmaf(xb[1], w1[c], fmaf(xb[0], w0[c], yb[c]))));
    }
}

AVX2 static void small_avx2(float *y, size_t ldy, const float *x, const float *W, int T, int K, int N, int n0, int n1) {
    for (int c0 = n0; c0 < n1; c0 += COL_TILE) {
        const int c1 = c0 + COL_TILE < n1 ? c0 + COL_TILE : n1;
        const int cv = c0 + ((c1 - c0) & ~7);
        int k = 0;
        for (; k + 4 <= K; k += 4) {
            const float *w0 = W + (size_t)k * N;
            int t = 0;
            for (; t + 2 <= T; t += 2)
                rows4_two(y + (size_t)t * ldy, y + (size_t)(t + 1) * ldy, x + (size_t)t * K + k,
                          x + (size_t)(t + 1) * K + k, w0, (size_t)N, c0, cv, c1);
            if (t < T) rows4_one(y + (size_t)t * ldy, x + (size_t)t * K + k, w0, (size_t)N, c0, cv, c1);
        }
        for (; k < K; k++) /* K not a multiple of 4: the last rows one at a time */
            for (int t = 0; t < T; t++) {
                const float a = x[(size_t)t * K + k];
                const float *w = W + (size_t)k * N;
                float *yt = y + (size_t)t * ldy;
                for (int c = c0; c < c1; c++) yt[c] = fmaf(a, w[c], yt[c]);
            }
    }
}

/* ---- AVX2 + FMA: x·Wtᵀ ----------------------------------------------------------------------------- */

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Four weight rows (v..v+3) against two input rows: 8 accumulators of 8 lanes along k. Every output's
 * sum is the same sequence — lane partials in k order, the horizontal sum, the k % 8 tail — in this
 * tile and in dot_1x1, so an output does not depend on its tile. */
AVX2 static void dot_4x2(float *ya, float *yb, const float *xa, const float *xb, const float *w0, int K) {
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 p = _mm256_loadu_ps(xa + k), q = _mm256_loadu_ps(xb + k);
        __m256 w = _mm256_loadu_ps(w0 + k);
        a0 = _mm256_fmadd_ps(w, p, a0);
        b0 = _mm256_fmadd_ps(w, q, b0);
        w = _mm256_loadu_ps(w1 + k);
        a1 = _mm256_fmadd_ps(w, p, a1);
        b1 = _mm256_fmadd_ps(w, q, b1);
        w = _mm256_loadu_ps(w2 + k);
        a2 = _mm256_fmadd_ps(w, p, a2);
        b2 = _mm256_fmadd_ps(w, q, b2);
        w = _mm256_loadu_ps(w3 + k);
        a3 = _mm256_fmadd_ps(w, p, a3);
        b3 = _mm256_fmadd_ps(w, q, b3);
    }
    float sa[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)}, sb[4] = {hsum(b0), hsum(b1), hsum(b2), hsum(b3)};
    const float *w[4] = {w0, w1, w2, w3};
    for (int i = 0; i < 4; i++) {
        for (int kk = k; kk < K; kk++) {
            sa[i] = fmaf(w[i][kk], xa[kk], sa[i]);
            sb[i] = fmaf(w[i][kk], xb[kk], sb[i]);
        }
        ya[i] = sa[i];
        yb[i] = sb[i];
    }
}

/* Four weight rows against one input row (an odd row of a call, or decode at batch 1): four independent
 * accumulators, so the FMAs do not wait on each other as four dot_1x1 calls would; each output's sum is
 * dot_1x1's (and dot_4x2's) sequence exactly. */
AVX2 static void dot_4x1(float *y, const float *x, const float *w0, int K) {
    const float *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 p = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), p, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), p, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), p, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), p, a3);
    }
    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    const float *w[4] = {w0, w1, w2, w3};
    for (int i = 0; i < 4; i++) {
        for (int kk = k; kk < K; kk++) s[i] = fmaf(w[i][kk], x[kk], s[i]);
        y[i] = s[i];
    }
}

/* One weight row against one input row, in dot_4x2's order. */
AVX2 static float dot_1x1(const float *x, const float *w, int K) {
    __m256 a = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
    float s = hsum(a);
    for (; k < K; k++) s = fmaf(w[k], x[k], s);
    return s;
}

AVX2 static void small_t_avx2(float *y, size_t ldy, const float *x, const float *Wt, int T, int K, int v0, int v1) {
    int v = v0;
    for (; v + 4 <= v1; v += 4) {
        const float *w0 = Wt + (size_t)v * K;
        int t = 0;
        for (; t + 2 <= T; t += 2)
            dot_4x2(y + (size_t)t * ldy + v, y + (size_t)(t + 1) * ldy + v, x + (size_t)t * K, x + (size_t)(t + 1) * K,
                    w0, K);
        if (t < T) dot_4x1(y + (size_t)t * ldy + v, x + (size_t)t * K, w0, K);
    }
    for (; v < v1; v++) /* the last rows of the range (the vocabulary is odd) */
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + v] = dot_1x1(x + (size_t)t * K, Wt + (size_t)v * K, K);
}
#endif /* KVH_MATMUL_AVX2 */

int kvh_matmul_small_max(void) { return kvh_cpu_isa() >= KVH_ISA_AVX2 ? 8 : 2; }

void kvh_matmul_small(float *y, size_t ldy, const float *x, const float *W, int T, int K, int N, int n0, int n1) {
#ifdef KVH_MATMUL_AVX2
    if (kvh_cpu_isa() >= KVH_ISA_AVX2) {
        small_avx2(y, ldy, x, W, T, K, N, n0, n1);
        return;
    }
#endif
    kvh_matmul_small_portable(y, ldy, x, W, T, K, N, n0, n1);
}

void kvh_matmul_small_t(float *y, size_t ldy, const float *x, const float *Wt, int T, int K, int v0, int v1) {
#ifdef KVH_MATMUL_AVX2
    if (kvh_cpu_isa() >= KVH_ISA_AVX2) {
        small_t_avx2(y, ldy, x, Wt, T, K, v0, v1);
        return;
    }
#endif
    kvh_matmul_small_t_portable(y, ldy, x, Wt, T, K, v0, v1);
}
