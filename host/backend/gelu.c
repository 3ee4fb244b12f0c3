/* gelu.c — GELU kernels: portable, AVX2 + FMA, AVX-512 (see gelu.h for the formula and the promises). */
#include "backend/gelu.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include "backend/vexp.h"
#define KVH_GELU_X86 1
#endif

static const float SQRT_2_OVER_PI = 0.7978845608028654f;
static const float GELU_CUBIC = 0.044715f;

/* The reference formula with libm's tanhf. */
static void gelu_portable(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(SQRT_2_OVER_PI * (v + GELU_CUBIC * v * v * v)));
    }
}

#ifdef KVH_GELU_X86
/* GELU as v / (1 + exp(t)), t = -2u, with vexp.h's exp (t is clamped to [-86, 86] there). Where t
 * reaches 86 (v below about -9.6) the true value is under 5e-37 in magnitude and the result is v x 0
 * (-0, as the tanh form gives), rather than v / 2^124, which would not vanish for huge |v|. Above
 * t = -86 the result is v / (1 + tiny) = v. */
__attribute__((target("avx2,fma"))) static inline __m256 gelu8(__m256 v) {
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_CUBIC), v),
                                                   _mm256_mul_ps(v, v), v));
    const __m256 t = _mm256_mul_ps(_mm256_set1_ps(-2.0f), u);
    const __m256 g = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), kvh_vexp8(t)));
    return _mm256_blendv_ps(g, _mm256_mul_ps(v, _mm256_setzero_ps()),
                            _mm256_cmp_ps(t, _mm256_set1_ps(KVH_VEXP_HI), _CMP_GE_OQ));
}

__attribute__((target("avx2,fma"))) static void gelu_avx2(float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) { /* the tail through a padded copy, so it runs the very same lanes */
        float buf[8] = {0};
        memcpy(buf, x + i, (n - i) * sizeof(float));
        _mm256_storeu_ps(buf, gelu8(_mm256_loadu_ps(buf)));
        memcpy(x + i, buf, (n - i) * sizeof(float));
    }
}

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static inline __m512 gelu16(__m512 v) {
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(GELU_CUBIC), v),
                                                   _mm512_mul_ps(v, v), v));
    const __m512 t = _mm512_mul_ps(_mm512_set1_ps(-2.0f), u);
    const __m512 g = _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), kvh_vexp16(t)));
    return _mm512_mask_mul_ps(g, _mm512_cmp_ps_mask(t, _mm512_set1_ps(KVH_VEXP_HI), _CMP_GE_OQ), v, _mm512_setzero_ps());
}

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static void gelu_avx512(float *x, size_t n) {
    size_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, gelu16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        const __mmask16 k = (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(x + i, k, gelu16(_mm512_maskz_loadu_ps(k, x + i)));
    }
}
#endif

void kvh_gelu_isa(kvh_isa isa, float *x, size_t n) {
#ifdef KVH_GELU_X86
    if (isa == KVH_ISA_AVX512) {
        gelu_avx512(x, n);
        return;
    }
    if (isa == KVH_ISA_AVX2) {
        gelu_avx2(x, n);
        return;
    }
#endif
    (void)isa;
    gelu_portable(x, n);
}

void kvh_gelu(float *x, size_t n) { kvh_gelu_isa(kvh_cpu_isa(), x, n); }
