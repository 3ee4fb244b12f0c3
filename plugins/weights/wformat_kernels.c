/* wformat_kernels.c — y += x · W over the packed formats (see wformat_kernels.h for the contract).
 *
 * Both builds walk the inputs 32 at a time: decode 32 weights of an output to fp32 (exactly the values of
 * wf_unpack_row), multiply-add them with the same 32 inputs of every row into that (row, output)'s own
 * accumulator, and sum the accumulator at the end. Decode is bandwidth-bound at one row (every weight is
 * read once per token), so the formats that read fewer bytes decode faster; the AVX-512 build takes four
 * outputs at a time (four weight streams, each decoded once for up to four rows); the AVX2 build, with
 * half the registers, four outputs for one row at a time. */
#include "wformat_kernels.h"

/* ---- portable ------------------------------------------------------------------------------------ */

/* 32 weights of one packed row, inputs c..c+31, as fp32. */
static void decode32(wf_spec s, uint32_t k, const uint8_t *row, uint32_t c, float *w) {
    if (s.kind == WF_F16 || s.kind == WF_BF16) {
        for (uint32_t i = 0; i < 32; i++) {
            uint16_t h;
            memcpy(&h, row + 2u * (c + i), 2);
            w[i] = s.kind == WF_F16 ? wf_half_to_float(h) : wf_bf16_to_float(h);
        }
        return;
    }
    const uint32_t ng = k / s.group;
    uint16_t dh;
    memcpy(&dh, row + 2u * (c / s.group), 2);
    const float d = wf_half_to_float(dh);
    const uint8_t *q = row + 2u * ng;
    if (s.kind == WF_W8) {
        for (uint32_t i = 0; i < 32; i++) w[i] = (float)(int8_t)q[c + i] * d;
    } else {
        const uint8_t *b = q + c / 2u;
        for (uint32_t i = 0; i < 16; i++) {
            w[i] = (float)((int)(b[i] & 15u) - 8) * d;
            w[i + 16] = (float)((int)(b[i] >> 4) - 8) * d;
        }
    }
}

void wf_matmul_portable(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                        uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    float w[32];
    for (uint32_t j = n0; j < n1; j++) {
        const uint8_t *row = packed + (size_t)j * rb;
        for (uint32_t r0 = 0; r0 < rows; r0 += 8) {
            const uint32_t nr = rows - r0 < 8 ? rows - r0 : 8;
            float lane[8][8] = {{0}};
            for (uint32_t c = 0; c < k; c += 32) {
                decode32(s, k, row, c, w);
                for (uint32_t r = 0; r < nr; r++) {
                    const float *xr = x + (size_t)(r0 + r) * k + c;
                    for (uint32_t i = 0; i < 32; i++) lane[r][i % 8] += w[i] * xr[i];
                }
            }
            for (uint32_t r = 0; r < nr; r++) {
                float sum = 0.0f;
                for (int l = 0; l < 8; l++) sum += lane[r][l];
                y[(size_t)(r0 + r) * ldy + j] += sum;
            }
        }
    }
}

/* ---- AVX-512 ------------------------------------------------------------------------------------- */
#if defined(__x86_64__)
#include <immintrin.h>

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,f16c")))
#define INLINE inline __attribute__((always_inline))

/* Decoders: 32 weights of `row` from input c as two 16-lane vectors. */
AVX512 static INLINE void deq_f16(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m512 *lo, __m512 *hi) {
    (void)k, (void)G;
    *lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2u * c)));
    *hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2u * c + 32u)));
}

AVX512 static INLINE void deq_bf16(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m512 *lo, __m512 *hi) {
    (void)k, (void)G;
    *lo = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 2u * c))), 16));
    *hi = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 2u * c + 32u))), 16));
}

AVX512 static INLINE __m512 group_scale(const uint8_t *row, uint32_t G, uint32_t c) {
    uint16_t dh;
    memcpy(&dh, row + 2u * (c / G), 2);
    return _mm512_set1_ps(_cvtsh_ss(dh));
}

AVX512 static INLINE void deq_w8(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m512 *lo, __m512 *hi) {
    const __m512 d = group_scale(row, G, c);
    const uint8_t *q = row + 2u * (k / G) + c;
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))), d);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))), d);
}

AVX512 static INLINE void deq_w4(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m512 *lo, __m512 *hi) {
    const __m512 d = group_scale(row, G, c);
    const __m128i b = _mm_loadu_si128((const __m128i *)(row + 2u * (k / G) + c / 2u));
    const __m128i mask = _mm_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512i ql = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(b, mask)), eight);
    const __m512i qh = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), mask)), eight);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(ql), d);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(qh), d);
}

/* JB outputs (j..j+JB-1) x RB rows (r0..r0+RB-1), JB and RB compile-time constants after inlining. */
#define DEFINE_BLOCK(NAME, DEQ)                                                                                  \
    AVX512 static INLINE void NAME(uint32_t k, uint32_t G, const uint8_t *packed, size_t rb, const float *x,     \
                                   uint32_t r0, uint32_t j, float *y, size_t ldy, const int JB, const int RB) {  \
        __m512 acc[4][4];                                                                                        \
        const uint8_t *row[4];                                                                                   \
        for (int b = 0; b < JB; b++) row[b] = packed + (size_t)(j + (uint32_t)b) * rb;                           \
        for (int r = 0; r < RB; r++)                                                                             \
            for (int b = 0; b < JB; b++) acc[r][b] = _mm512_setzero_ps();                                        \
        for (uint32_t c = 0; c < k; c += 32) {                                                                   \
            __m512 wl[4], wh[4];                                                                                 \
            for (int b = 0; b < JB; b++) DEQ(k, G, row[b], c, &wl[b], &wh[b]);                                   \
            for (int r = 0; r < RB; r++) {                                                                       \
                const float *xr = x + (size_t)(r0 + (uint32_t)r) * k + c;                                        \
                const __m512 xl = _mm512_loadu_ps(xr), xh = _mm512_loadu_ps(xr + 16);                            \
                for (int b = 0; b < JB; b++) {                                                                   \
                    acc[r][b] = _mm512_fmadd_ps(wl[b], xl, acc[r][b]);                                           \
                    acc[r][b] = _mm512_fmadd_ps(wh[b], xh, acc[r][b]);                                           \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < RB; r++)                                                                             \
            for (int b = 0; b < JB; b++) y[(size_t)(r0 + (uint32_t)r) * ldy + j + (uint32_t)b] += _mm512_reduce_add_ps(acc[r][b]); \
    }

/* The whole range: four outputs at a time (one at a time for the last few), rows four at a time. */
#define DEFINE_MATMUL(NAME, BLOCK)                                                                               \
    AVX512 static void NAME(uint32_t k, uint32_t G, const uint8_t *packed, const float *x, uint32_t rows,       \
                            uint32_t n0, uint32_t n1, float *y, size_t ldy, size_t rb) {                         \
        for (uint32_t r0 = 0; r0 < rows; r0 += 4) {                                                              \
            const uint32_t nr = rows - r0 < 4 ? rows - r0 : 4;                                                   \
            uint32_t j = n0;                                                                                     \
            for (; j + 4 <= n1; j += 4) switch (nr) {                                                            \
                case 1: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 4, 1); break;                                  \
                case 2: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 4, 2); break;                                  \
                case 3: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 4, 3); break;                                  \
                default: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 4, 4); break;                                 \
                }                                                                                                \
            for (; j < n1; j++) switch (nr) {                                                                    \
                case 1: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 1, 1); break;                                  \
                case 2: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 1, 2); break;                                  \
                case 3: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 1, 3); break;                                  \
                default: BLOCK(k, G, packed, rb, x, r0, j, y, ldy, 1, 4); break;                                 \
                }                                                                                                \
        }                                                                                                        \
    }

DEFINE_BLOCK(block_f16, deq_f16)
DEFINE_BLOCK(block_bf16, deq_bf16)
DEFINE_BLOCK(block_w8, deq_w8)
DEFINE_BLOCK(block_w4, deq_w4)
DEFINE_MATMUL(mm_f16, block_f16)
DEFINE_MATMUL(mm_bf16, block_bf16)
DEFINE_MATMUL(mm_w8, block_w8)
DEFINE_MATMUL(mm_w4, block_w4)

int wf_matmul_avx512(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                     uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    switch (s.kind) {
    case WF_F16: mm_f16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_BF16: mm_bf16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_W8: mm_w8(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_W4: mm_w4(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    default: return 0;
    }
}

/* ---- AVX2 + FMA + F16C --------------------------------------------------------------------------- */
/* Sixteen registers: four outputs at a time, one row at a time, 16 inputs per step (two 8-lane halves per
 * output), so a row's sum is built the same way whatever the batch or range. */
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static INLINE void deq16_f16(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m256 *lo, __m256 *hi) {
    (void)k, (void)G;
    *lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2u * c)));
    *hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2u * c + 16u)));
}

AVX2 static INLINE void deq16_bf16(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m256 *lo, __m256 *hi) {
    (void)k, (void)G;
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2u * c))), 16));
    *hi = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2u * c + 16u))), 16));
}

AVX2 static INLINE __m256 group_scale8(const uint8_t *row, uint32_t G, uint32_t c) {
    uint16_t dh;
    memcpy(&dh, row + 2u * (c / G), 2);
    return _mm256_set1_ps(_cvtsh_ss(dh));
}

AVX2 static INLINE void deq16_w8(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m256 *lo, __m256 *hi) {
    const __m256 d = group_scale8(row, G, c);
    const __m128i q = _mm_loadu_si128((const __m128i *)(row + 2u * (k / G) + c));
    *lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    *hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8))), d);
}

/* Inputs c..c+15 of a w4 row: in its 32-input block (c0 = c & ~31), inputs c0..c0+15 are the low nibbles
 * of the block's 16 bytes, c0+16..c0+31 the high ones. */
AVX2 static INLINE void deq16_w4(uint32_t k, uint32_t G, const uint8_t *row, uint32_t c, __m256 *lo, __m256 *hi) {
    const __m256 d = group_scale8(row, G, c);
    const uint32_t c0 = c & ~31u;
    const __m128i b = _mm_loadu_si128((const __m128i *)(row + 2u * (k / G) + c0 / 2u));
    const __m128i nib = (c & 16u) ? _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15)) : _mm_and_si128(b, _mm_set1_epi8(15));
    const __m256i eight = _mm256_set1_epi32(8);
    *lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), eight)), d);
    *hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(nib, 8)), eight)), d);
}

AVX2 static INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define DEFINE_MATMUL8(NAME, DEQ)                                                                                \
    AVX2 static void NAME(uint32_t k, uint32_t G, const uint8_t *packed, const float *x, uint32_t rows,          \
                          uint32_t n0, uint32_t n1, float *y, size_t ldy, size_t rb) {                           \
        for (uint32_t r = 0; r < rows; r++) {                                                                    \
            const float *xr = x + (size_t)r * k;                                                                 \
            float *yr = y + (size_t)r * ldy;                                                                     \
            uint32_t j = n0;                                                                                     \
            for (; j + 4 <= n1; j += 4) {                                                                        \
                const uint8_t *w0 = packed + (size_t)j * rb, *w1 = w0 + rb, *w2 = w1 + rb, *w3 = w2 + rb;         \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, l, h;                                 \
                for (uint32_t c = 0; c < k; c += 16) {                                                           \
                    const __m256 xl = _mm256_loadu_ps(xr + c), xh = _mm256_loadu_ps(xr + c + 8);                 \
                    DEQ(k, G, w0, c, &l, &h);                                                                    \
                    a0 = _mm256_fmadd_ps(h, xh, _mm256_fmadd_ps(l, xl, a0));                                     \
                    DEQ(k, G, w1, c, &l, &h);                                                                    \
                    a1 = _mm256_fmadd_ps(h, xh, _mm256_fmadd_ps(l, xl, a1));                                     \
                    DEQ(k, G, w2, c, &l, &h);                                                                    \
                    a2 = _mm256_fmadd_ps(h, xh, _mm256_fmadd_ps(l, xl, a2));                                     \
                    DEQ(k, G, w3, c, &l, &h);                                                                    \
                    a3 = _mm256_fmadd_ps(h, xh, _mm256_fmadd_ps(l, xl, a3));                                     \
                }                                                                                                \
                yr[j] += hsum8(a0);                                                                              \
                yr[j + 1] += hsum8(a1);                                                                          \
                yr[j + 2] += hsum8(a2);                                                                          \
                yr[j + 3] += hsum8(a3);                                                                          \
            }                                                                                                    \
            for (; j < n1; j++) {                                                                                \
                const uint8_t *w0 = packed + (size_t)j * rb;                                                     \
                __m256 a0 = _mm256_setzero_ps(), l, h;                                                           \
                for (uint32_t c = 0; c < k; c += 16) {                                                           \
                    DEQ(k, G, w0, c, &l, &h);                                                                    \
                    a0 = _mm256_fmadd_ps(h, _mm256_loadu_ps(xr + c + 8), _mm256_fmadd_ps(l, _mm256_loadu_ps(xr + c), a0)); \
                }                                                                                                \
                yr[j] += hsum8(a0);                                                                              \
            }                                                                                                    \
        }                                                                                                        \
    }

DEFINE_MATMUL8(mm8_f16, deq16_f16)
DEFINE_MATMUL8(mm8_bf16, deq16_bf16)
DEFINE_MATMUL8(mm8_w8, deq16_w8)
DEFINE_MATMUL8(mm8_w4, deq16_w4)

int wf_matmul_avx2(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                   uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    switch (s.kind) {
    case WF_F16: mm8_f16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_BF16: mm8_bf16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_W8: mm8_w8(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_W4: mm8_w4(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    default: return 0;
    }
}
#else
int wf_matmul_avx512(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                     uint32_t n1, float *y, size_t ldy) {
    (void)s, (void)k, (void)packed, (void)x, (void)rows, (void)n0, (void)n1, (void)y, (void)ldy;
    return 0;
}
int wf_matmul_avx2(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                   uint32_t n1, float *y, size_t ldy) {
    (void)s, (void)k, (void)packed, (void)x, (void)rows, (void)n0, (void)n1, (void)y, (void)ldy;
    return 0;
}
#endif
