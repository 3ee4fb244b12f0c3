/* vexp.h — exp(t) on AVX2 and AVX-512 vectors, shared by the kernels that need one (gelu.c, softmax.c).
 * Owns: the approximation itself. Does not own: what a kernel does with values outside [-86, 86] (each
 * caller masks or blends them as its formula needs) or the choice of level (cpu_features.h).
 *
 * Method: t is clamped to [-86, 86], split as t = m ln2 + r with |r| <= ln2/2 (ln2 in two parts, so
 * m ln2 is exact), exp(r) comes from Cephes' degree-6 minimax polynomial and 2^m is built in the
 * exponent bits; the clamp keeps 2^m a normal number. The AVX2 and AVX-512 versions do the same
 * operations in the same order, so equal inputs give equal bits. Error: tested through the callers
 * (tests/test_gelu.c, tests/test_softmax.c). Include only from x86 translation units. */
#ifndef KVH_VEXP_H
#define KVH_VEXP_H

#include <immintrin.h>

#define KVH_VEXP_LO (-86.0f)
#define KVH_VEXP_HI 86.0f

#define KVH_VEXP_CONSTANTS                                                                                       \
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f,                  \
                p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, p3 = 4.1665795894e-2f,     \
                p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f

/* exp(clamp(t, -86, 86)) for 8 floats. */
__attribute__((target("avx2,fma"))) static inline __m256 kvh_vexp8(__m256 t) {
    KVH_VEXP_CONSTANTS;
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(KVH_VEXP_LO)), _mm256_set1_ps(KVH_VEXP_HI));
    const __m256 m = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(m, _mm256_set1_ps(ln2_hi), t);
    r = _mm256_fnmadd_ps(m, _mm256_set1_ps(ln2_lo), r);
    __m256 p = _mm256_set1_ps(p0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(p5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(m), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* exp(clamp(t, -86, 86)) for 16 floats. */
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static inline __m512 kvh_vexp16(__m512 t) {
    KVH_VEXP_CONSTANTS;
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(KVH_VEXP_LO)), _mm512_set1_ps(KVH_VEXP_HI));
    const __m512 m = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(m, _mm512_set1_ps(ln2_hi), t);
    r = _mm512_fnmadd_ps(m, _mm512_set1_ps(ln2_lo), r);
    __m512 p = _mm512_set1_ps(p0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(p5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(m), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

#endif
