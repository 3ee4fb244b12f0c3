/* wformat_act.h — the activation side of w8/w4's integer products: an input row quantized per 32 inputs to
 * int8 with one fp32 scale (the arithmetic of GGML's Q8_0 activations, with the scale kept in fp32).
 * Header-only, so tests/test_weight_formats.c checks every build of it byte for byte against the portable
 * definition; wformat_kernels.c uses the build of its own level.
 *
 * Block b (inputs 32b .. 32b+31 of the row):
 *   amax = max_i |x_i|;  d_b = amax / 127;  q_i = rint(x_i * (127 / amax))   (nearest, ties to even: the
 *   rounding mode every build uses; |q_i| <= 127 since |x_i * 127/amax| <= 127 (1 + 2^-24))
 *   amax == 0: d_b = 0, q = 0.   A non-finite input in the block: d_b = NaN, q = 0, so the products of that
 *   row come out NaN as the fp32 path's would (the host's non-finite check then names the step).
 * The product of one output j is then y_j += sum_b (dw_g(b) * d_b) * S_b, with S_b = sum_{i in b} w_i q_i
 * an exact int32 (|S_b| <= 32 * 127 * 127), dw_g the weight scale of the group holding block b, and the
 * scale product dw * d_b rounded once to fp32 (every build forms it the same way). */
#ifndef WFORMAT_ACT_H
#define WFORMAT_ACT_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define WF_ACT_BLOCK 32u
#define WF_MAX_K 8192u /* inputs of one w8/w4 matrix: a call quantizes its rows into stack buffers */

/* x[0..k-1] (k a multiple of 32) -> q[0..k-1], d[0..k/32-1]. */
static inline void wf_act_quantize_portable(const float *x, uint32_t k, int8_t *q, float *d) {
    for (uint32_t b = 0; b < k / WF_ACT_BLOCK; b++) {
        const float *xb = x + (size_t)b * WF_ACT_BLOCK;
        int8_t *qb = q + (size_t)b * WF_ACT_BLOCK;
        float amax = 0.0f;
        int finite = 1;
        for (uint32_t i = 0; i < WF_ACT_BLOCK; i++) {
            const float a = fabsf(xb[i]);
            if (!(a <= FLT_MAX)) finite = 0;
            else if (a > amax) amax = a;
        }
        if (!finite || amax == 0.0f) {
            memset(qb, 0, WF_ACT_BLOCK);
            d[b] = finite ? 0.0f : NAN;
            continue;
        }
        const float id = 127.0f / amax;
        d[b] = amax / 127.0f;
        for (uint32_t i = 0; i < WF_ACT_BLOCK; i++) qb[i] = (int8_t)(int)nearbyintf(xb[i] * id);
    }
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same with AVX2 (8 lanes; vcvtps2dq rounds to nearest even in the default rounding mode, as rint). */
__attribute__((target("avx2,fma"))) static inline void wf_act_quantize_avx2(const float *x, uint32_t k, int8_t *q,
                                                                           float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (uint32_t b = 0; b < k / WF_ACT_BLOCK; b++) {
        const float *xb = x + (size_t)b * WF_ACT_BLOCK;
        __m256 v[4], m = _mm256_setzero_ps();
        int ok = 0xff;
        for (int t = 0; t < 4; t++) {
            v[t] = _mm256_loadu_ps(xb + 8 * t);
            const __m256 a = _mm256_andnot_ps(sign, v[t]);
            ok &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ));
            m = _mm256_max_ps(m, a);
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        if (ok != 0xff || amax == 0.0f) {
            memset(q + (size_t)b * WF_ACT_BLOCK, 0, WF_ACT_BLOCK);
            d[b] = ok == 0xff ? 0.0f : NAN;
            continue;
        }
        const float idf = 127.0f / amax;
        d[b] = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(idf);
        __m256i i[4];
        for (int t = 0; t < 4; t++) i[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], id));
        /* packs work within 128-bit halves: 32-bit groups come out i0a i1a i2a i3a i0b i1b i2b i3b */
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
        _mm256_storeu_si256((__m256i *)(q + (size_t)b * WF_ACT_BLOCK), _mm256_permutevar8x32_epi32(p, order));
    }
}

/* The same with AVX-512 (16 lanes). */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static inline void
wf_act_quantize_avx512(const float *x, uint32_t k, int8_t *q, float *d) {
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    for (uint32_t b = 0; b < k / WF_ACT_BLOCK; b++) {
        const float *xb = x + (size_t)b * WF_ACT_BLOCK;
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const __m512 alo = _mm512_abs_ps(lo), ahi = _mm512_abs_ps(hi);
        const __mmask16 ok = (__mmask16)(_mm512_cmp_ps_mask(alo, big, _CMP_LE_OQ) & _mm512_cmp_ps_mask(ahi, big, _CMP_LE_OQ));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(alo, ahi));
        if (ok != 0xffff || amax == 0.0f) {
            memset(q + (size_t)b * WF_ACT_BLOCK, 0, WF_ACT_BLOCK);
            d[b] = ok == 0xffff ? 0.0f : NAN;
            continue;
        }
        const float idf = 127.0f / amax;
        d[b] = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(idf);
        _mm_storeu_si128((__m128i *)(q + (size_t)b * WF_ACT_BLOCK), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(lo, id))));
        _mm_storeu_si128((__m128i *)(q + (size_t)b * WF_ACT_BLOCK + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(hi, id))));
    }
}
#endif

#endif
