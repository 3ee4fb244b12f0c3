/* wformat_kernels.c — y += x · W over the packed formats (see wformat_kernels.h for the contract).
 *
 * f16/bf16: every build walks the inputs 32 at a time: decode 32 weights of an output to fp32 (exactly the
 * values of wf_unpack_row), multiply-add them with the same 32 inputs of every row into that (row,
 * output)'s own accumulator, and sum the accumulator at the end. The AVX-512 build takes four outputs at a
 * time (four weight streams, each decoded once for up to four rows); the AVX2 build, with half the
 * registers, four outputs for one row at a time.
 * w8/w4 (second half of the file): integer products over the row quantized per 32 inputs, in a portable,
 * an AVX2 and an AVX-512 VNNI build; docs/weights.md "How the products run" explains them. */
#include "wformat_kernels.h"

#include <stdlib.h>

#include "wformat_act.h"

/* ---- portable ------------------------------------------------------------------------------------ */

/* 32 weights of one packed row, inputs c..c+31, as fp32. */
static void decode32(wf_spec s, const uint8_t *row, uint32_t c, float *w) {
    for (uint32_t i = 0; i < 32; i++) {
        uint16_t h;
        memcpy(&h, row + 2u * (c + i), 2);
        w[i] = s.kind == WF_F16 ? wf_half_to_float(h) : wf_bf16_to_float(h);
    }
}

static void float_portable(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                           uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    float w[32];
    for (uint32_t j = n0; j < n1; j++) {
        const uint8_t *row = packed + (size_t)j * rb;
        for (uint32_t r0 = 0; r0 < rows; r0 += 8) {
            const uint32_t nr = rows - r0 < 8 ? rows - r0 : 8;
            float lane[8][8] = {{0}};
            for (uint32_t c = 0; c < k; c += 32) {
                decode32(s, row, c, w);
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
/* Prefetch distance of the fp16/bf16 kernel, in weight rows (outputs): two blocks of four ahead. A hint
 * only (it never faults past the matrix, and results do not depend on it). */
#ifndef WF_F16_PF
#define WF_F16_PF 8u
#endif
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
            for (int b = 0; b < JB; b++) {                                                                       \
                /* the same 64 bytes of the output WF_F16_PF rows on: streams stay ahead of use */               \
                _mm_prefetch((const char *)(row[b] + WF_F16_PF * rb) + 2u * c, _MM_HINT_T0);                      \
                DEQ(k, G, row[b], c, &wl[b], &wh[b]);                                                            \
            }                                                                                                    \
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
DEFINE_MATMUL(mm_f16, block_f16)
DEFINE_MATMUL(mm_bf16, block_bf16)

static int float_avx512(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                        uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    switch (s.kind) {
    case WF_F16: mm_f16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_BF16: mm_bf16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
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

static int float_avx2(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                      uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    switch (s.kind) {
    case WF_F16: mm8_f16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    case WF_BF16: mm8_bf16(k, s.group, packed, x, rows, n0, n1, y, ldy, rb); return 1;
    default: return 0;
    }
}
#endif /* x86-64: fp16/bf16 kernels */

/* ==== w8 and w4: integer products over an activation row quantized per 32 inputs (wformat_act.h) ===== */
/* Every build computes, per (row, output), the exact int32 S_b of each 32-input block, multiplies it (as
 * fp32) by the fp32 scale product dw * d_b and adds it into that (row, output)'s own accumulator, summed
 * at the end. The builds differ only in the order fp32 adds these terms, so their S_b agree bit for bit
 * and their results within fp32 rounding; within one build a row's result does not depend on the rows
 * or outputs that share the call.
 * Rows are quantized a chunk at a time (act_buf): a call of up to ACT_ROWS rows (decode) into stack
 * buffers, a longer one (prefill) into one heap buffer of as many rows as ACT_CHUNK_BYTES hold. Within a
 * chunk the outputs are the outer loop (four at a time) and tiles of up to ACT_ROWS rows the inner one, so
 * the weights of four outputs are read from memory once per chunk and from L1 for every further tile,
 * while the chunk's codes stay in L2. Every (row, output) is computed by the same block function whatever
 * the tile or chunk it falls in, with the same sequence of fp32 operations: a prefill's products are the
 * decode products of its rows, bit for bit (tests/test_weight_formats.c). */
#define ACT_ROWS 4u
#define ACT_BLOCKS (WF_MAX_K / 32u + 16u) /* per row; the tail past k/32 stays zero for vector reads */
#ifndef ACT_CHUNK_BYTES
#define ACT_CHUNK_BYTES ((size_t)768 << 10) /* quantized rows of one chunk: well inside L2 */
#endif

/* One chunk's quantized rows: row r's codes at q + r * qs (qs: k rounded up to 64 bytes), its per-lane
 * corrections (VNNI; AVX2 for w4) at corr + r * (qs / 4), its block scales at d + r * ds (ds = k/32 + 16:
 * zero past k/32, so reading 16 scales at once never sees garbage). */
typedef struct act_buf {
    int8_t *q;
    int32_t *corr;
    float *d;
    size_t qs, ds;
    uint32_t cap; /* rows per chunk */
    void *heap;   /* the heap buffer, or NULL: the caller's stack buffers of ACT_ROWS rows */
} act_buf;

/* Stack buffers (ACT_ROWS rows of WF_MAX_K) for a few rows; for more, a heap chunk, or the stack buffers
 * again (ACT_ROWS rows at a time) when that allocation fails: the same results either way. */
static void act_buf_init(act_buf *a, uint32_t k, uint32_t rows, int8_t *q, int32_t *corr, float *d) {
    a->qs = ((size_t)k + 63u) & ~(size_t)63u;
    a->ds = k / 32u + 16u;
    a->q = q;
    a->corr = corr;
    a->d = d;
    a->cap = ACT_ROWS;
    a->heap = NULL;
    if (rows <= ACT_ROWS) return;
    const size_t per = 2u * a->qs + a->ds * sizeof(float);
    size_t cap = ACT_CHUNK_BYTES / per;
    cap = cap < 16u ? 16u : cap > 512u ? 512u : cap;
    if (cap > rows) cap = rows;
    cap = (cap + ACT_ROWS - 1u) & ~(size_t)(ACT_ROWS - 1u);
    const size_t bytes = (cap * per + 63u) & ~(size_t)63u;
    char *p = aligned_alloc(64, bytes);
    if (!p) return;
    a->heap = p;
    a->q = (int8_t *)p;
    a->corr = (int32_t *)(p + cap * a->qs);
    a->d = (float *)(p + 2u * cap * a->qs);
    a->cap = (uint32_t)cap;
}

static inline float block_wscale(const uint8_t *row, uint32_t G, uint32_t b) {
    uint16_t h;
    memcpy(&h, row + 2u * (b * 32u / G), 2);
    return wf_half_to_float(h);
}

/* ---- portable ---- */
static int32_t block_dot_portable(uint32_t kind, const uint8_t *codes, uint32_t b, const int8_t *qa) {
    int32_t acc = 0;
    if (kind == WF_W8) {
        const int8_t *w = (const int8_t *)codes + 32u * b;
        for (uint32_t i = 0; i < 32; i++) acc += (int32_t)w[i] * qa[32u * b + i];
    } else {
        const uint8_t *p = codes + 16u * b;
        for (uint32_t i = 0; i < 16; i++)
            acc += ((int32_t)(p[i] & 15u) - 8) * qa[32u * b + i] + ((int32_t)(p[i] >> 4) - 8) * qa[32u * b + 16u + i];
    }
    return acc;
}

static void int_portable(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                         uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    const uint32_t nb = k / 32u, G = s.group, ng = k / G;
    int8_t sq[ACT_ROWS * WF_MAX_K];
    float sd[ACT_ROWS * ACT_BLOCKS];
    act_buf a;
    act_buf_init(&a, k, rows, sq, NULL, sd);
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++)
            wf_act_quantize_portable(x + (size_t)(r0 + r) * k, k, a.q + (size_t)r * a.qs, a.d + (size_t)r * a.ds);
        for (uint32_t j = n0; j < n1; j++) {
            const uint8_t *row = packed + (size_t)j * rb, *codes = row + 2u * ng;
            for (uint32_t t0 = 0; t0 < nr; t0 += ACT_ROWS) {
                const uint32_t nt = nr - t0 < ACT_ROWS ? nr - t0 : ACT_ROWS;
                float acc[ACT_ROWS] = {0};
                for (uint32_t b = 0; b < nb; b++) {
                    const float ws = block_wscale(row, G, b);
                    for (uint32_t r = 0; r < nt; r++)
                        acc[r] += (float)block_dot_portable(s.kind, codes, b, a.q + (size_t)(t0 + r) * a.qs) *
                                  (ws * a.d[(size_t)(t0 + r) * a.ds + b]);
                }
                for (uint32_t r = 0; r < nt; r++) y[(size_t)(r0 + t0 + r) * ldy + j] += acc[r];
            }
        }
    }
    free(a.heap);
}

#if defined(__x86_64__)
/* ---- AVX2: one block per 256-bit vector, vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd -------------- */
/* w8: |w| x (q with w's sign) (vpsignb), as GGML's AVX2 path: |w| <= 127 and |q| <= 127 keep each s16 pair
 * sum <= 32258, no saturation. w4: codes 0..15 x q, then - 8 * (sum of q over the lane's 4 inputs), which
 * the row's quantization step precomputes (corr). Four outputs at a time, one row at a time. */
#define AVX2I __attribute__((target("avx2,fma,f16c")))

AVX2I static INLINE __m256i lane_dot_avx2(uint32_t kind, const uint8_t *codes, uint32_t blk, const int8_t *qa,
                                          const int32_t *corr) {
    const __m256i a = _mm256_load_si256((const __m256i *)(qa + 32u * blk)), ones = _mm256_set1_epi16(1);
    if (kind == WF_W8) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + 32u * blk));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), ones);
    }
    const __m128i p = _mm_loadu_si128((const __m128i *)(codes + 16u * blk)), m = _mm_set1_epi8(15);
    const __m256i c = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m), _mm_and_si128(p, m));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(c, a), ones),
                            _mm256_load_si256((const __m256i *)(corr + 8u * blk)));
}

AVX2I static INLINE void int_block_avx2(uint32_t kind, uint32_t k, uint32_t G, const uint8_t *packed, size_t rb,
                                        const int8_t *qa, const int32_t *corr, const float *da, float *yr, uint32_t j,
                                        const int JB) {
    const uint32_t nb = k / 32u, ng = k / G;
    const uint8_t *row[4], *codes[4];
    __m256 acc[4];
    for (int o = 0; o < JB; o++) {
        row[o] = packed + (size_t)(j + (uint32_t)o) * rb;
        codes[o] = row[o] + 2u * ng;
        acc[o] = _mm256_setzero_ps();
    }
    for (uint32_t b0 = 0; b0 < nb; b0 += 8) {
        const uint32_t nbc = nb - b0 < 8 ? nb - b0 : 8;
        const __m256 dx = _mm256_loadu_ps(da + b0); /* zero past the row's blocks */
        __m256 comb[4];
        for (int o = 0; o < JB; o++) {
            __m256 wd;
            if (G == 32 && nbc == 8) {
                wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row[o] + 2u * b0)));
            } else {
                float t[8] = {0};
                for (uint32_t i = 0; i < nbc; i++) t[i] = block_wscale(row[o], G, b0 + i);
                wd = _mm256_loadu_ps(t);
            }
            comb[o] = _mm256_mul_ps(wd, dx);
        }
        for (uint32_t i = 0; i < nbc; i++) {
            const __m256i sel = _mm256_set1_epi32((int)i);
            for (int o = 0; o < JB; o++) {
                const __m256i d = lane_dot_avx2(kind, codes[o], b0 + i, qa, corr);
                acc[o] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(comb[o], sel), acc[o]);
            }
        }
    }
    for (int o = 0; o < JB; o++) yr[j + (uint32_t)o] += hsum8(acc[o]);
}

AVX2I static void int_avx2(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                           uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    const uint32_t nb = k / 32u;
    int8_t sq[ACT_ROWS * WF_MAX_K] __attribute__((aligned(64)));
    int32_t scorr[ACT_ROWS * WF_MAX_K / 4u] __attribute__((aligned(64)));
    float sd[ACT_ROWS * ACT_BLOCKS];
    act_buf a;
    act_buf_init(&a, k, rows, sq, scorr, sd);
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++) {
            int8_t *q = a.q + (size_t)r * a.qs;
            int32_t *cr = a.corr + (size_t)r * (a.qs / 4u);
            float *d = a.d + (size_t)r * a.ds;
            wf_act_quantize_avx2(x + (size_t)(r0 + r) * k, k, q, d);
            memset(d + nb, 0, 16 * sizeof(float));
            if (s.kind == WF_W4) /* corr = -8 * (sum of the lane's four q) */
                for (uint32_t b = 0; b < nb; b++) {
                    const __m256i v = _mm256_load_si256((const __m256i *)(q + 32u * b));
                    const __m256i sum4 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
                    _mm256_store_si256((__m256i *)(cr + 8u * b), _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum4, 3)));
                }
        }
#define AVX2_ROWS(JB)                                                                                               \
    for (uint32_t r = 0; r < nr; r++)                                                                               \
    int_block_avx2(s.kind, k, s.group, packed, rb, a.q + (size_t)r * a.qs, a.corr + (size_t)r * (a.qs / 4u),        \
                   a.d + (size_t)r * a.ds, y + (size_t)(r0 + r) * ldy, j, JB)
        uint32_t j = n0;
        for (; j + 4 <= n1; j += 4) AVX2_ROWS(4);
        for (; j < n1; j++) AVX2_ROWS(1);
#undef AVX2_ROWS
    }
    free(a.heap);
}

/* ---- AVX-512 VNNI: two blocks per 512-bit vpdpbusd (u8 x s8, four products summed into each int32) ---- */
/* vpdpbusd needs one unsigned operand. w8: w + 128 (w xor 0x80) times q; w4: the codes 0..15 times q. Both
 * overshoot by C * (sum of the lane's four q), C = 128 or 8, which the row's quantization step precomputes
 * negated (corr) and the product starts from, so each int32 lane ends exactly at sum w_i q_i.
 * Lanes: w8 two blocks A, B of 32 inputs in order: lanes 0-7 A, 8-15 B. w4: one 32-byte load of two
 * blocks' codes, low nibbles in the lower half and high nibbles in the upper: inputs A0-15, B0-15,
 * A16-31, B16-31, so the activation row is stored in that order too (per pair of blocks), and lanes 0-3
 * and 8-11 are A's. A last odd block runs as a 256-bit vpdpbusd. Scales: 16 blocks at a time, dw (16 fp16
 * loaded and widened, spread over the blocks by a table when the group is wider than 32) times d_b, each
 * pair's two scales spread over its lanes by a permute. Up to four rows by four outputs at a time. */
#ifndef WF_PF_GROUPS
#define WF_PF_GROUPS 2
#endif
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")))

typedef struct scale_tab { /* per chunk of 16 blocks: which weight scales, and which lane takes which */
    uint32_t s0[WF_MAX_K / 512u + 1];
    __mmask16 mask[WF_MAX_K / 512u + 1];
    int32_t idx[WF_MAX_K / 512u + 1][16];
} scale_tab;

static void scale_tab_init(scale_tab *t, uint32_t nb, uint32_t G) {
    for (uint32_t c = 0; c * 16u < nb; c++) {
        const uint32_t b0 = 16u * c, nbc = nb - b0 < 16 ? nb - b0 : 16;
        t->s0[c] = b0 * 32u / G;
        const uint32_t count = (b0 + nbc - 1u) * 32u / G - t->s0[c] + 1u;
        t->mask[c] = (__mmask16)((1u << count) - 1u);
        for (uint32_t i = 0; i < 16; i++) t->idx[c][i] = (int32_t)(i < nbc ? (b0 + i) * 32u / G - t->s0[c] : 0);
    }
}

VNNI static INLINE __m512i w512(uint32_t kind, const uint8_t *codes, uint32_t blk) {
    if (kind == WF_W8)
        return _mm512_xor_si512(_mm512_loadu_si512(codes + 32u * blk), _mm512_set1_epi8((char)0x80));
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(codes + 16u * blk)));
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, (__mmask32)0xffff0000u, v, 4), _mm512_set1_epi8(15));
}

VNNI static INLINE __m256i w256(uint32_t kind, const uint8_t *codes, uint32_t blk) {
    if (kind == WF_W8)
        return _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(codes + 32u * blk)), _mm256_set1_epi8((char)0x80));
    const __m128i p = _mm_loadu_si128((const __m128i *)(codes + 16u * blk)), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(p, 4), m), _mm_and_si128(p, m));
}

/* JB outputs from j x RB rows: the tile's first row's codes, corrections and scales at qa, corr, da (rows
 * qs bytes / qs / 4 int32 / ds floats apart), its outputs at y (rows ldy apart). */
VNNI static INLINE void int_block_vnni(uint32_t kind, uint32_t k, uint32_t G, const uint8_t *packed, size_t rb,
                                       const int8_t *qa, const int32_t *corr, const float *da, size_t qs, size_t ds,
                                       const scale_tab *tab, uint32_t j, float *y, size_t ldy, const int JB, const int RB) {
    const uint32_t nb = k / 32u, ng = k / G;
    const uint8_t *row[4], *codes[4];
    __m512 acc[4][4];
    for (int o = 0; o < JB; o++) {
        row[o] = packed + (size_t)(j + (uint32_t)o) * rb;
        codes[o] = row[o] + 2u * ng;
    }
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) acc[r][o] = _mm512_setzero_ps();
    const __m512i base = kind == WF_W8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                       : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    for (uint32_t c = 0; c * 16u < nb; c++) {
        const uint32_t b0 = 16u * c, nbc = nb - b0 < 16 ? nb - b0 : 16;
        const __m512i sidx = _mm512_loadu_si512(tab->idx[c]);
        __m512 comb[4][4];
        for (int o = 0; o < JB; o++) {
            const __m512 wd = _mm512_permutexvar_ps(
                sidx, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tab->mask[c], row[o] + 2u * tab->s0[c])));
            for (int r = 0; r < RB; r++)
                comb[r][o] = _mm512_mul_ps(wd, _mm512_loadu_ps(da + (size_t)r * ds + b0));
        }
        uint32_t p = 0;
        for (; 2u * p + 1u < nbc; p++) {
            const uint32_t blk = b0 + 2u * p;
            const __m512i pidx = _mm512_add_epi32(base, _mm512_set1_epi32((int)(2u * p)));
            __m512i w[4];
            for (int o = 0; o < JB; o++) {
#if WF_PF_GROUPS
                _mm_prefetch((const char *)(row[o] + WF_PF_GROUPS * 4u * rb) + 2u * ng + (kind == WF_W8 ? 32u : 16u) * blk, _MM_HINT_T0);
#endif
                w[o] = w512(kind, codes[o], blk);
            }
            for (int r = 0; r < RB; r++) {
                const size_t ro = (size_t)r * qs; /* the tile's row r */
                const __m512i a = _mm512_load_si512(qa + ro + 32u * blk);
                const __m512i nc = _mm512_load_si512(corr + ro / 4u + 8u * blk);
                for (int o = 0; o < JB; o++) {
                    const __m512i d = _mm512_dpbusd_epi32(nc, w[o], a);
                    acc[r][o] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(pidx, comb[r][o]), acc[r][o]);
                }
            }
        }
        if (2u * p < nbc) { /* the row's last block, when k / 32 is odd */
            const uint32_t blk = b0 + 2u * p;
            const __m512i pidx = _mm512_set1_epi32((int)(2u * p));
            __m256i w[4];
            for (int o = 0; o < JB; o++) w[o] = w256(kind, codes[o], blk);
            for (int r = 0; r < RB; r++) {
                const size_t ro = (size_t)r * qs; /* the tile's row r */
                const __m256i a = _mm256_load_si256((const __m256i *)(qa + ro + 32u * blk));
                const __m256i nc = _mm256_load_si256((const __m256i *)(corr + ro / 4u + 8u * blk));
                for (int o = 0; o < JB; o++) {
                    const __m256 d = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(nc, w[o], a));
                    acc[r][o] = _mm512_mask3_fmadd_ps(_mm512_castps256_ps512(d), _mm512_permutexvar_ps(pidx, comb[r][o]),
                                                      acc[r][o], (__mmask16)0x00ff);
                }
            }
        }
    }
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) y[(size_t)r * ldy + j + (uint32_t)o] += _mm512_reduce_add_ps(acc[r][o]);
}

VNNI static void int_vnni(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                          uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    const uint32_t nb = k / 32u;
    int8_t sq[ACT_ROWS * WF_MAX_K] __attribute__((aligned(64)));
    int32_t scorr[ACT_ROWS * WF_MAX_K / 4u] __attribute__((aligned(64)));
    float sd[ACT_ROWS * ACT_BLOCKS];
    int8_t nat[WF_MAX_K] __attribute__((aligned(64)));
    act_buf a;
    act_buf_init(&a, k, rows, sq, scorr, sd);
    scale_tab tab;
    scale_tab_init(&tab, nb, s.group);
    const __m512i C = _mm512_set1_epi8((char)(s.kind == WF_W8 ? 0x80 : 8));
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++) {
            int8_t *q = a.q + (size_t)r * a.qs;
            float *d = a.d + (size_t)r * a.ds;
            wf_act_quantize_avx512(x + (size_t)(r0 + r) * k, k, s.kind == WF_W4 ? nat : q, d);
            memset(d + nb, 0, 16 * sizeof(float));
            if (s.kind == WF_W4) { /* per pair of blocks A, B: A0-15 B0-15 A16-31 B16-31; a last odd block as is */
                uint32_t b = 0;
                for (; b + 1 < nb; b += 2)
                    for (int h = 0; h < 4; h++)
                        memcpy(q + 32u * b + 16u * (uint32_t)h, nat + 32u * (b + (uint32_t)(h & 1)) + 16u * (uint32_t)(h >> 1), 16);
                if (b < nb) memcpy(q + 32u * b, nat + 32u * b, 32);
            }
            int32_t *cr = a.corr + (size_t)r * (a.qs / 4u);
            uint32_t i = 0; /* corr = -C * (sum of each lane's four q) */
            for (; i + 64 <= k; i += 64)
                _mm512_store_si512(cr + i / 4u, _mm512_sub_epi32(_mm512_setzero_si512(),
                                                                  _mm512_dpbusd_epi32(_mm512_setzero_si512(), C, _mm512_load_si512(q + i))));
            if (i < k)
                _mm256_store_si256((__m256i *)(cr + i / 4u),
                                   _mm256_sub_epi32(_mm256_setzero_si256(),
                                                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm512_castsi512_si256(C),
                                                                        _mm256_load_si256((const __m256i *)(q + i)))));
        }
        /* four outputs at a time; for each, the chunk's rows in tiles of four */
#define VNNI_TILE(JB, RB)                                                                                           \
    int_block_vnni(s.kind, k, s.group, packed, rb, a.q + (size_t)t0 * a.qs, a.corr + (size_t)t0 * (a.qs / 4u),     \
                   a.d + (size_t)t0 * a.ds, a.qs, a.ds, &tab, j, y + (size_t)(r0 + t0) * ldy, ldy, JB, RB)
#define VNNI_ROWS(JB)                                                                                               \
    for (uint32_t t0 = 0; t0 < nr; t0 += ACT_ROWS) switch (nr - t0) {                                               \
        case 1: VNNI_TILE(JB, 1); break;                                                                            \
        case 2: VNNI_TILE(JB, 2); break;                                                                            \
        case 3: VNNI_TILE(JB, 3); break;                                                                            \
        default: VNNI_TILE(JB, 4); break;                                                                           \
        }
        uint32_t j = n0;
        for (; j + 4 <= n1; j += 4) VNNI_ROWS(4)
        for (; j < n1; j++) VNNI_ROWS(1)
#undef VNNI_ROWS
#undef VNNI_TILE
    }
    free(a.heap);
}

int wf_cpu_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
}
#else
int wf_cpu_has_vnni(void) { return 0; }
#endif

/* ---- dispatch ---- */
void wf_matmul(wf_spec s, uint32_t level, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
               uint32_t n1, float *y, size_t ldy) {
    const int integer = s.kind == WF_W8 || s.kind == WF_W4;
#if defined(__x86_64__)
    if (integer) {
        if (level >= WF_LEVEL_AVX512_VNNI) int_vnni(s, k, packed, x, rows, n0, n1, y, ldy);
        else if (level >= WF_LEVEL_AVX2) int_avx2(s, k, packed, x, rows, n0, n1, y, ldy);
        else int_portable(s, k, packed, x, rows, n0, n1, y, ldy);
        return;
    }
    if (level >= WF_LEVEL_AVX512 && float_avx512(s, k, packed, x, rows, n0, n1, y, ldy)) return;
    if (level >= WF_LEVEL_AVX2 && float_avx2(s, k, packed, x, rows, n0, n1, y, ldy)) return;
#else
    (void)level;
    if (integer) {
        int_portable(s, k, packed, x, rows, n0, n1, y, ldy);
        return;
    }
#endif
    float_portable(s, k, packed, x, rows, n0, n1, y, ldy);
}
