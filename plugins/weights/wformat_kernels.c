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
 * The codes are stored a run of 16 blocks at a time, four inputs of one block per 4-byte lane (wformat.h,
 * wf_code_pos), so the vector builds sum each block in one int32 lane over eight steps and convert, scale
 * and accumulate it once: per 16 blocks of one (row, output), eight vpdpbusd and one conversion, one
 * multiply and one FMA. The x86 builds store each quantized row in the same order (act_interleave).
 * Rows are quantized a chunk at a time (act_buf): a call of up to ACT_ROWS rows (decode) into stack
 * buffers, a longer one (prefill) into one heap buffer of as many rows as ACT_CHUNK_BYTES hold. Within a
 * chunk the outputs are the outer loop (four at a time) and tiles of up to ACT_ROWS rows the inner one, so
 * the weights of four outputs are read from memory once per chunk and from L1 for every further tile,
 * while the chunk's codes stay in L2. Every (row, output) is computed by the same tile function whatever
 * the tile or chunk it falls in, with the same sequence of fp32 operations: a prefill's products are the
 * decode products of its rows, bit for bit (tests/test_weight_formats.c). */
#define ACT_ROWS 4u
#define ACT_BLOCKS (WF_MAX_K / 32u + 16u) /* per row; the tail past k/32 stays zero for vector reads */
#ifndef ACT_CHUNK_BYTES
#define ACT_CHUNK_BYTES ((size_t)768 << 10) /* quantized rows of one chunk: well inside L2 */
#endif

/* One chunk's quantized rows: row r's codes at q + r * qs (qs: k rounded up to 64 bytes), its per-block
 * corrections (x86: -C times the block's sum of codes, C = 128 for w8, 8 for w4) at corr + r * ds, its
 * block scales at d + r * ds (ds = k/32 + 16: both zero past k/32, so reading 16 at once never sees
 * garbage). */
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
    const size_t per = a->qs + a->ds * (sizeof(float) + sizeof(int32_t));
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
    a->d = (float *)(p + cap * a->qs + cap * a->ds * sizeof(int32_t));
    a->cap = (uint32_t)cap;
}

static inline float block_wscale(const uint8_t *row, uint32_t G, uint32_t b) {
    uint16_t h;
    memcpy(&h, row + 2u * (b * 32u / G), 2);
    return wf_half_to_float(h);
}

/* ---- portable ---- */
/* S_b of every block of one output's codes against a row quantized in natural order. */
static void block_sums_portable(uint32_t kind, uint32_t k, const uint8_t *codes, const int8_t *q, int32_t *S) {
    const uint32_t nb = k / 32u;
    for (uint32_t b0 = 0; b0 < nb; b0 += 16) {
        const uint32_t m = nb - b0 < 16 ? nb - b0 : 16;
        for (uint32_t l = 0; l < m; l++) {
            const int8_t *qb = q + 32u * (b0 + l);
            int32_t acc = 0;
            if (kind == WF_W8) {
                const int8_t *w = (const int8_t *)codes + 32u * b0 + 4u * l;
                for (uint32_t t = 0; t < 8; t++)
                    for (uint32_t c = 0; c < 4; c++) acc += (int32_t)w[4u * m * t + c] * qb[4u * t + c];
            } else {
                const uint8_t *w = codes + 16u * b0 + 4u * l;
                for (uint32_t v = 0; v < 4; v++)
                    for (uint32_t c = 0; c < 4; c++) {
                        const uint8_t byte = w[4u * m * v + c];
                        acc += ((int32_t)(byte & 15u) - 8) * qb[4u * v + c] + ((int32_t)(byte >> 4) - 8) * qb[16u + 4u * v + c];
                    }
            }
            S[b0 + l] = acc;
        }
    }
}

static void int_portable(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                         uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    const uint32_t nb = k / 32u, G = s.group, ng = k / G;
    int8_t sq[ACT_ROWS * WF_MAX_K];
    float sd[ACT_ROWS * ACT_BLOCKS];
    int32_t S[WF_MAX_K / 32u];
    act_buf a;
    act_buf_init(&a, k, rows, sq, NULL, sd);
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++)
            wf_act_quantize_portable(x + (size_t)(r0 + r) * k, k, a.q + (size_t)r * a.qs, a.d + (size_t)r * a.ds);
        for (uint32_t j = n0; j < n1; j++) {
            const uint8_t *row = packed + (size_t)j * rb, *codes = row + 2u * ng;
            for (uint32_t r = 0; r < nr; r++) {
                block_sums_portable(s.kind, k, codes, a.q + (size_t)r * a.qs, S);
                const float *d = a.d + (size_t)r * a.ds;
                float acc = 0.0f;
                for (uint32_t b = 0; b < nb; b++) acc += (float)S[b] * (block_wscale(row, G, b) * d[b]);
                y[(size_t)(r0 + r) * ldy + j] += acc;
            }
        }
    }
    free(a.heap);
}

#if defined(__x86_64__)
/* A row quantized in natural order (nat) into the code order of wformat.h (w8's: the four inputs 4t..4t+3
 * of block l of a run at 512 * run + 4m * t + 4l), and corr[b] = -C * (sum of block b's codes), zero
 * from k/32 up to the next multiple of 16. */
static void act_interleave(const int8_t *nat, uint32_t k, uint32_t C, int8_t *q, int32_t *corr, uint32_t from) {
    const uint32_t nb = k / 32u;
    for (uint32_t b0 = from; b0 < nb; b0 += 16) {
        const uint32_t m = nb - b0 < 16 ? nb - b0 : 16;
        int8_t *run = q + 32u * b0;
        for (uint32_t l = 0; l < m; l++) {
            const int8_t *qb = nat + 32u * (b0 + l);
            int32_t sum = 0;
            for (uint32_t t = 0; t < 8; t++) {
                memcpy(run + 4u * m * t + 4u * l, qb + 4u * t, 4);
                sum += qb[4u * t] + qb[4u * t + 1u] + qb[4u * t + 2u] + qb[4u * t + 3u];
            }
            corr[b0 + l] = -(int32_t)C * sum;
        }
        for (uint32_t l = m; l < 16; l++) corr[b0 + l] = 0;
    }
}

/* ---- AVX2: a run's eight steps per 8-lane half (blocks 0-7, 8-15), vpmaddubsw + vpmaddwd -------------- */
/* w8: |w| x (q with w's sign) (vpsignb), as GGML's AVX2 path: |w| <= 127 and |q| <= 127 keep each s16 pair
 * sum <= 32258, no saturation. w4: codes 0..15 x q, starting from corr = -8 * (block sum of q). Each lane
 * adds its block's eight steps in int32, then one conversion, multiply and FMA per half. Four outputs at a
 * time, one row at a time. */
#define AVX2I __attribute__((target("avx2,fma,f16c")))

AVX2I static INLINE __m256i lanes_avx2(const void *p, uint32_t nl) { /* nl 4-byte lanes (1..8), zero above */
    if (nl >= 8) return _mm256_loadu_si256((const __m256i *)p);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_epi32((const int *)p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nl), idx));
}

AVX2I static INLINE void int_tile_avx2(uint32_t kind, uint32_t k, uint32_t G, const uint8_t *packed, size_t rb,
                                       const int8_t *qa, const int32_t *corr, const float *da, float *yr, uint32_t j,
                                       const int JB) {
    const uint32_t nb = k / 32u, ng = k / G;
    const uint8_t *row[4], *codes[4];
    __m256 acc[4];
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(15);
    for (int o = 0; o < JB; o++) {
        row[o] = packed + (size_t)(j + (uint32_t)o) * rb;
        codes[o] = row[o] + 2u * ng;
        acc[o] = _mm256_setzero_ps();
    }
    for (uint32_t b0 = 0; b0 < nb; b0 += 16) {
        const uint32_t m = nb - b0 < 16 ? nb - b0 : 16;
        for (uint32_t h = 0; h * 8u < m; h++) {
            const uint32_t nl = m - 8u * h < 8 ? m - 8u * h : 8, bh = b0 + 8u * h;
            const int8_t *ar = qa + 32u * b0 + 32u * h;
            __m256i s[4];
            for (int o = 0; o < JB; o++)
                s[o] = kind == WF_W8 ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i *)(corr + bh));
            if (kind == WF_W8) {
                for (uint32_t t = 0; t < 8; t++) {
                    const __m256i a = lanes_avx2(ar + 4u * m * t, nl);
                    for (int o = 0; o < JB; o++) {
                        const __m256i w = lanes_avx2(codes[o] + 32u * b0 + 4u * m * t + 32u * h, nl);
                        s[o] = _mm256_add_epi32(s[o], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w)), ones));
                    }
                }
            } else {
                for (uint32_t v = 0; v < 4; v++) {
                    const __m256i alo = lanes_avx2(ar + 4u * m * v, nl), ahi = lanes_avx2(ar + 4u * m * (v + 4u), nl);
                    for (int o = 0; o < JB; o++) {
                        const __m256i raw = lanes_avx2(codes[o] + 16u * b0 + 4u * m * v + 32u * h, nl);
                        const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                        s[o] = _mm256_add_epi32(s[o], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, alo), ones));
                        s[o] = _mm256_add_epi32(s[o], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ahi), ones));
                    }
                }
            }
            const __m256 dx = _mm256_loadu_ps(da + bh); /* zero past the row's blocks */
            for (int o = 0; o < JB; o++) {
                __m256 wd;
                if (G == 32 && nl == 8) {
                    wd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row[o] + 2u * bh)));
                } else {
                    float t[8] = {0};
                    for (uint32_t i = 0; i < nl; i++) t[i] = block_wscale(row[o], G, bh + i);
                    wd = _mm256_loadu_ps(t);
                }
                acc[o] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[o]), _mm256_mul_ps(wd, dx), acc[o]);
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
    int32_t scorr[ACT_ROWS * ACT_BLOCKS] __attribute__((aligned(64)));
    float sd[ACT_ROWS * ACT_BLOCKS];
    int8_t nat[WF_MAX_K] __attribute__((aligned(64)));
    act_buf a;
    act_buf_init(&a, k, rows, sq, scorr, sd);
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++) {
            float *d = a.d + (size_t)r * a.ds;
            wf_act_quantize_avx2(x + (size_t)(r0 + r) * k, k, nat, d);
            memset(d + nb, 0, 16 * sizeof(float));
            act_interleave(nat, k, 8u, a.q + (size_t)r * a.qs, a.corr + (size_t)r * a.ds, 0);
        }
#define AVX2_ROWS(JB)                                                                                               \
    for (uint32_t r = 0; r < nr; r++)                                                                               \
    int_tile_avx2(s.kind, k, s.group, packed, rb, a.q + (size_t)r * a.qs, a.corr + (size_t)r * a.ds,               \
                  a.d + (size_t)r * a.ds, y + (size_t)(r0 + r) * ldy, j, JB)
        uint32_t j = n0;
        for (; j + 4 <= n1; j += 4) AVX2_ROWS(4);
        for (; j < n1; j++) AVX2_ROWS(1);
#undef AVX2_ROWS
    }
    free(a.heap);
}

/* ---- AVX-512 VNNI: a run of 16 blocks per 512-bit register, eight vpdpbusd per (row, output) ------------ */
/* vpdpbusd multiplies unsigned by signed bytes, four products into each int32 lane. w8: w + 128 (w xor 0x80)
 * times q; w4: the codes 0..15 times q (the low nibbles of a 64-byte load are steps 0-3, the high ones
 * 4-7). Both overshoot by C * (the block's sum of q), C = 128 or 8, so each lane starts from corr = -C *
 * that sum and ends exactly at S_b. Then one conversion, and one FMA by dw * d (16 fp16 weight scales
 * widened at once, spread over the blocks by a table when the group is wider than 32). A last run of m <
 * 16 blocks loads 4m bytes per step (masked). Up to four rows by four outputs at a time, the weights of the
 * outputs two groups of four ahead prefetched. */
#ifndef WF_PF_GROUPS
#define WF_PF_GROUPS 2
#endif
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")))

typedef struct scale_tab { /* per run of 16 blocks: which weight scales, and which lane takes which */
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

/* act_interleave for the full runs with one gather per step (block l's dword t in lane l) and the block
 * sums by vpdpbusd with ones; a last partial run as there. The same bytes and corrections. */
VNNI static void act_interleave_vnni(const int8_t *nat, uint32_t k, uint32_t C, int8_t *q, int32_t *corr) {
    const uint32_t nb = k / 32u;
    const __m512i idx = _mm512_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448, 480);
    const __m512i ones = _mm512_set1_epi8(1);
    const __m128i sh = _mm_cvtsi32_si128(C == 128u ? 7 : 3);
    uint32_t b0 = 0;
    for (; b0 + 16u <= nb; b0 += 16) {
        const int8_t *src = nat + 32u * b0;
        int8_t *dst = q + 32u * b0;
        __m512i sum = _mm512_setzero_si512();
        for (uint32_t t = 0; t < 8; t++) {
            const __m512i v = _mm512_i32gather_epi32(idx, src + 4u * t, 1);
            _mm512_storeu_si512(dst + 64u * t, v);
            sum = _mm512_dpbusd_epi32(sum, ones, v);
        }
        _mm512_storeu_si512(corr + b0, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_sll_epi32(sum, sh)));
    }
    if (b0 < nb) act_interleave(nat, k, C, q, corr, b0);
}

/* JB outputs from j x RB rows: the tile's first row's codes, corrections and scales at qa, corr, da (rows
 * qs bytes / ds int32 / ds floats apart), its outputs at y (rows ldy apart). */
VNNI static INLINE void int_tile_vnni(uint32_t kind, uint32_t k, uint32_t G, const uint8_t *packed, size_t rb,
                                      const int8_t *qa, const int32_t *corr, const float *da, size_t qs, size_t ds,
                                      const scale_tab *tab, uint32_t j, float *y, size_t ldy, const int JB, const int RB) {
    const uint32_t nb = k / 32u, ng = k / G;
    const uint8_t *row[4], *codes[4];
    __m512 accf[4][4];
    for (int o = 0; o < JB; o++) {
        row[o] = packed + (size_t)(j + (uint32_t)o) * rb;
        codes[o] = row[o] + 2u * ng;
    }
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) accf[r][o] = _mm512_setzero_ps();
    const __m512i x80 = _mm512_set1_epi8((char)0x80), m4 = _mm512_set1_epi8(15);
    for (uint32_t c = 0; c * 16u < nb; c++) {
        const uint32_t b0 = 16u * c, m = nb - b0 < 16 ? nb - b0 : 16;
        const __mmask64 bm = m == 16 ? ~(__mmask64)0 : (((__mmask64)1 << (4u * m)) - 1u);
        __m512i acc[4][4];
        for (int r = 0; r < RB; r++) {
            const __m512i c0 = _mm512_loadu_si512(corr + (size_t)r * ds + b0);
            for (int o = 0; o < JB; o++) acc[r][o] = c0;
        }
        if (kind == WF_W8) {
            for (uint32_t t = 0; t < 8; t++) {
                __m512i w[4];
                for (int o = 0; o < JB; o++) {
                    const uint8_t *p = codes[o] + 32u * b0 + 4u * m * t;
#if WF_PF_GROUPS
                    _mm_prefetch((const char *)(p + WF_PF_GROUPS * 4u * rb), _MM_HINT_T0);
#endif
                    w[o] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bm, p), x80);
                }
                for (int r = 0; r < RB; r++) {
                    const __m512i a = _mm512_maskz_loadu_epi8(bm, qa + (size_t)r * qs + 32u * b0 + 4u * m * t);
                    for (int o = 0; o < JB; o++) acc[r][o] = _mm512_dpbusd_epi32(acc[r][o], w[o], a);
                }
            }
        } else {
            for (uint32_t v = 0; v < 4; v++) {
                __m512i lo[4], hi[4];
                for (int o = 0; o < JB; o++) {
                    const uint8_t *p = codes[o] + 16u * b0 + 4u * m * v;
#if WF_PF_GROUPS
                    _mm_prefetch((const char *)(p + WF_PF_GROUPS * 4u * rb), _MM_HINT_T0);
#endif
                    const __m512i raw = _mm512_maskz_loadu_epi8(bm, p);
                    lo[o] = _mm512_and_si512(raw, m4);
                    hi[o] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                }
                for (int r = 0; r < RB; r++) {
                    const int8_t *ar = qa + (size_t)r * qs + 32u * b0;
                    const __m512i alo = _mm512_maskz_loadu_epi8(bm, ar + 4u * m * v);
                    const __m512i ahi = _mm512_maskz_loadu_epi8(bm, ar + 4u * m * (v + 4u));
                    for (int o = 0; o < JB; o++)
                        acc[r][o] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][o], lo[o], alo), hi[o], ahi);
                }
            }
        }
        for (int o = 0; o < JB; o++) {
            const __m512 wd = _mm512_permutexvar_ps(_mm512_loadu_si512(tab->idx[c]),
                                                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tab->mask[c], row[o] + 2u * tab->s0[c])));
            for (int r = 0; r < RB; r++)
                accf[r][o] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][o]), _mm512_mul_ps(wd, _mm512_loadu_ps(da + (size_t)r * ds + b0)),
                                             accf[r][o]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) y[(size_t)r * ldy + j + (uint32_t)o] += _mm512_reduce_add_ps(accf[r][o]);
}

VNNI static void int_vnni(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                          uint32_t n1, float *y, size_t ldy) {
    const size_t rb = wf_row_bytes(s, k);
    const uint32_t nb = k / 32u;
    int8_t sq[ACT_ROWS * WF_MAX_K] __attribute__((aligned(64)));
    int32_t scorr[ACT_ROWS * ACT_BLOCKS] __attribute__((aligned(64)));
    float sd[ACT_ROWS * ACT_BLOCKS];
    int8_t nat[WF_MAX_K] __attribute__((aligned(64)));
    act_buf a;
    act_buf_init(&a, k, rows, sq, scorr, sd);
    scale_tab tab;
    scale_tab_init(&tab, nb, s.group);
    for (uint32_t r0 = 0; r0 < rows; r0 += a.cap) {
        const uint32_t nr = rows - r0 < a.cap ? rows - r0 : a.cap;
        for (uint32_t r = 0; r < nr; r++) {
            float *d = a.d + (size_t)r * a.ds;
            wf_act_quantize_avx512(x + (size_t)(r0 + r) * k, k, nat, d);
            memset(d + nb, 0, 16 * sizeof(float));
            act_interleave_vnni(nat, k, s.kind == WF_W8 ? 128u : 8u, a.q + (size_t)r * a.qs, a.corr + (size_t)r * a.ds);
        }
        /* four outputs at a time; for each, the chunk's rows in tiles of four */
#define VNNI_TILE(JB, RB)                                                                                           \
    int_tile_vnni(s.kind, k, s.group, packed, rb, a.q + (size_t)t0 * a.qs, a.corr + (size_t)t0 * a.ds,             \
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
