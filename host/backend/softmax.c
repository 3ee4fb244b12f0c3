/* softmax.c — softmax numerators and their sum: portable, AVX2 + FMA, AVX-512 (contract in softmax.h). */
#include "backend/softmax.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include "backend/vexp.h"
#define KVH_SOFTMAX_X86 1
#endif

/* Exponents below this give 0 (exp(-86) < 5e-38); the vector levels clamp their exp at the same point
 * (vexp.h's KVH_VEXP_LO). Written as "t >= floor" everywhere, so a NaN comes out 0 at every level too. */
#define EXP_FLOOR (-86.0f)

static float exp_sum_portable(float *x, uint32_t n, float mx) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        const float t = x[j] - mx; /* -inf for a masked slot */
        const float e = t >= EXP_FLOOR ? expf(t) : 0.0f;
        x[j] = e;
        sum += e;
    }
    return sum;
}

#ifdef KVH_SOFTMAX_X86
__attribute__((target("avx2,fma"))) static inline __m256 exp_row8(__m256 x, __m256 mx) {
    const __m256 t = _mm256_sub_ps(x, mx);
    /* below the floor (and -inf) the clamped exp would give 2^-124, not the 0 a masked slot must get */
    return _mm256_and_ps(_mm256_cmp_ps(t, _mm256_set1_ps(EXP_FLOOR), _CMP_GE_OQ), kvh_vexp8(t));
}

__attribute__((target("avx2,fma"))) static float exp_sum_avx2(float *x, uint32_t n, float mx) {
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    uint32_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp_row8(_mm256_loadu_ps(x + j), vmx);
        _mm256_storeu_ps(x + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (j < n) { /* the tail through a copy padded with -inf, which adds 0 */
        float buf[8];
        for (int i = 0; i < 8; i++) buf[i] = -INFINITY;
        memcpy(buf, x + j, (n - j) * sizeof(float));
        const __m256 e = exp_row8(_mm256_loadu_ps(buf), vmx);
        _mm256_storeu_ps(buf, e);
        memcpy(x + j, buf, (n - j) * sizeof(float));
        acc = _mm256_add_ps(acc, e);
    }
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static inline __m512 exp_row16(__m512 x, __m512 mx) {
    const __m512 t = _mm512_sub_ps(x, mx);
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, _mm512_set1_ps(EXP_FLOOR), _CMP_GE_OQ), kvh_vexp16(t));
}

__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma"))) static float exp_sum_avx512(float *x, uint32_t n,
                                                                                             float mx) {
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 acc = _mm512_setzero_ps();
    uint32_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 e = exp_row16(_mm512_loadu_ps(x + j), vmx);
        _mm512_storeu_ps(x + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (j < n) {
        const __mmask16 k = (__mmask16)((1u << (n - j)) - 1u);
        /* lanes past the row read as -inf and come out 0 */
        const __m512 e = exp_row16(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + j), vmx);
        _mm512_mask_storeu_ps(x + j, k, e);
        acc = _mm512_add_ps(acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}
#endif

float kvh_softmax_exp_sum_isa(kvh_isa isa, float *x, uint32_t n, float mx) {
#ifdef KVH_SOFTMAX_X86
    if (isa == KVH_ISA_AVX512) return exp_sum_avx512(x, n, mx);
    if (isa == KVH_ISA_AVX2) return exp_sum_avx2(x, n, mx);
#endif
    (void)isa;
    return exp_sum_portable(x, n, mx);
}

float kvh_softmax_exp_sum(float *x, uint32_t n, float mx) { return kvh_softmax_exp_sum_isa(kvh_cpu_isa(), x, n, mx); }
