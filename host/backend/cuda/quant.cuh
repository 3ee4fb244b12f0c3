/* quant.cuh — the int8 / int4 KV slot format of plugins/quant/kvq_format.h on the GPU: the encoder
 * (one warp per (token, head) K or V row, writing exactly the bytes kvq_encode writes) and the readers
 * the attention kernels use (scale / min of a group, q·k over a packed slot, one dequantized element).
 * Owns: the CUDA implementation of that format. Does not own the format (kvq_format.h is its single
 * definition: slot layout, fp16 scales rounded up / mins rounded down, u = clamp(roundf((x - m) * inv)),
 * nibble order, zero point 8 for symmetric int4) nor where slots live (the pooled device memory of
 * backend_cuda.cu; the host compacts by moving whole slots of the layer's slot_bytes).
 *
 * Bit-exactness of the encoder: every step is the IEEE operation kvq_encode performs in C (no
 * -ffast-math there): group max / min / absmax are exact in any order and ties keep the earliest element
 * (so a signed zero comes out as on the CPU); amax / qmax and (hi - m) / qmax are __fdiv_rn; fp16_up /
 * fp16_down are __float2half_ru / __float2half_rd with kvq_half_up / kvq_half_down's saturation at
 * +-65504 (both give the nearest fp16 on the required side, which is what the C "nearest, then one step"
 * computes); the fp16 -> fp32 of the stored scale is exact; inv = __fdiv_rn(1, s); (x - m) * inv is
 * __fsub_rn then __fmul_rn (no contraction to an FMA); roundf is round-half-away-from-zero on both. So for
 * the same fp32 row the GPU writes the same slot bytes as kvq_encode (tests/test_cuda.c checks it).
 * Shapes: HS <= 128 (ATTN_MAX_HS), NG = HS / G groups. */
#ifndef KVH_CUDA_QUANT_CUH
#define KVH_CUDA_QUANT_CUH

#include <stdint.h>

#include "common.cuh"
#include "tables.cuh"

extern "C" {
#include "quant_format.h"
}

#define QENC_MAX_HS 128
#define QENC_WARPS 4 /* rows per encode block (one warp each) */

/* ================================ device helpers ================================ */

/* The smallest fp16 >= v (v finite), saturating at 65504: kvq_half_up. */
__device__ __forceinline__ uint16_t q_half_up(float v) {
    if (v >= 65504.0f) return 0x7bffu;
    return __half_as_ushort(__float2half_ru(v));
}
/* The largest fp16 <= v (v finite), saturating at -65504: kvq_half_down. */
__device__ __forceinline__ uint16_t q_half_down(float v) {
    if (v <= -65504.0f) return 0xfbffu;
    return __half_as_ushort(__float2half_rd(v));
}
__device__ __forceinline__ float q_half_value(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/* fp16 at byte offset off of p (any alignment: slots of some formats are only byte-aligned). */
__device__ __forceinline__ float q_load_half(const unsigned char *p, int off) {
    return q_half_value((uint16_t)(p[off] | ((uint16_t)p[off + 1] << 8)));
}
__device__ __forceinline__ void q_store_half(unsigned char *p, int off, uint16_t h) {
    p[off] = (unsigned char)(h & 0xffu);
    p[off + 1] = (unsigned char)(h >> 8);
}

/* Scale and (asymmetric) min of group g of a slot. */
template <int ASYM>
__device__ __forceinline__ void q_header(const unsigned char *slot, int g, float *s, float *m) {
    if (ASYM) {
        *s = q_load_half(slot, g * 4);
        *m = q_load_half(slot, g * 4 + 2);
    } else {
        *s = q_load_half(slot, g * 2);
        *m = 0.0f;
    }
}

/* ================================ encode ================================ */

/* One warp quantizes one row x[d] = src[d] (+ bias[d] when bias is not NULL: the QKV epilogue's fp32 add)
 * of HS floats into `slot` with format f, exactly as kvq_encode. Scratch (this warp's, shared memory):
 * sa / sb / sinv [NG] floats, code [HS] bytes. Every lane of the warp must call it. */
__device__ void q_encode_row_warp(const kvh_cuda_kvfmt f, int HS, const float *src, const float *bias,
                                  unsigned char *slot, float *sa, float *sb, float *sinv, unsigned char *code) {
    const int lane = threadIdx.x & 31, G = f.group, NG = f.n_groups;
    const bool asym = f.asym != 0;
    float xv[QENC_MAX_HS / 32];
#pragma unroll
    for (int k = 0; k < QENC_MAX_HS / 32; k++) {
        const int d = lane + 32 * k;
        xv[k] = d < HS ? (bias ? src[d] + bias[d] : src[d]) : 0.0f;
    }
    /* Group statistics: sym: absmax; asym: max (sa) and min (sb). Per 32-element chunk, a segmented
     * suffix reduction with shuffles (the groups are contiguous lane ranges); the lane at the start of a
     * group's range in the chunk then holds the chunk's part and merges it into sa / sb (chunks in index
     * order, strict comparisons: ties keep the earlier element, like kvq_encode's loops). */
#pragma unroll
    for (int k = 0; k < QENC_MAX_HS / 32; k++) {
        if (32 * k >= HS) break; /* warp-uniform */
        const int d = lane + 32 * k;
        const bool valid = d < HS;
        const int g = valid ? d / G : -1;
        float a = asym ? xv[k] : fabsf(xv[k]), b = xv[k];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float a2 = __shfl_down_sync(0xffffffffu, a, o);
            const float b2 = __shfl_down_sync(0xffffffffu, b, o);
            const int g2 = __shfl_down_sync(0xffffffffu, g, o);
            if (lane + o < 32 && g2 == g) {
                a = a2 > a ? a2 : a;
                b = b2 < b ? b2 : b;
            }
        }
        if (valid) {
            if (d == g * G) { /* the group's first element: its chunk part starts the group */
                sa[g] = a;
                sb[g] = b;
            } else if (lane == 0) { /* the group began in an earlier chunk */
                sa[g] = a > sa[g] ? a : sa[g];
                sb[g] = b < sb[g] ? b : sb[g];
            }
        }
        __syncwarp();
    }
    /* Headers: one lane per group. sa -> s, sb -> m. */
    const float qmax = (float)f.qmax;
    for (int g = lane; g < NG; g += 32) {
        uint16_t sh, mh = 0;
        float m = 0.0f;
        if (asym) {
            mh = q_half_down(sb[g]);
            m = q_half_value(mh);
            sh = q_half_up(__fdiv_rn(__fsub_rn(sa[g], m), qmax));
            q_store_half(slot, g * 4, sh);
            q_store_half(slot, g * 4 + 2, mh);
        } else {
            sh = q_half_up(__fdiv_rn(sa[g], qmax));
            q_store_half(slot, g * 2, sh);
        }
        const float s = q_half_value(sh);
        sa[g] = s;
        sb[g] = m;
        sinv[g] = s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f;
    }
    __syncwarp();
    /* Codes: u = clamp(roundf((x - m) * inv), lo, qmax), stored as the byte / nibble kvq_encode writes. */
    const float lo = asym ? 0.0f : -qmax;
#pragma unroll
    for (int k = 0; k < QENC_MAX_HS / 32; k++) {
        const int d = lane + 32 * k;
        if (d < HS) {
            const int g = d / G;
            float u = roundf(__fmul_rn(__fsub_rn(xv[k], sb[g]), sinv[g]));
            u = u < lo ? lo : (u > qmax ? qmax : u);
            const int iu = (int)u;
            if (f.bits == 8) code[d] = asym ? (unsigned char)iu : (unsigned char)(int8_t)iu;
            else code[d] = (unsigned char)(asym ? iu : iu + 8);
        }
    }
    __syncwarp();
    unsigned char *vals = slot + f.header;
    if (f.bits == 8) {
        for (int d = lane; d < HS; d += 32) vals[d] = code[d];
    } else {
        /* group g: bytes g*G/2 .. ; byte i = element i (low nibble) | element i + G/2 (high nibble) */
        const int H = G / 2;
        for (int bi = lane; bi < HS / 2; bi += 32) {
            const int g = bi / H, i = bi % H;
            vals[bi] = (unsigned char)(code[g * G + i] | (code[g * G + i + H] << 4));
        }
    }
    __syncwarp(); /* scratch is reused by the caller's next row */
}

/* The K and V rows of the new tokens of a quantized layer, from the QKV GEMM output y[R, 3C] + bias, into
 * their packed slots (the epilogue kernel wrote Q and the slot metadata and skipped K/V). grid
 * (R, ceil(2 NH / QENC_WARPS)), block 32 * QENC_WARPS; warp w of block (r, y) encodes row r's
 * (K if i < NH else V) of head i % NH, i = y * QENC_WARPS + w. */
__global__ void __launch_bounds__(32 * QENC_WARPS) kv_quant_encode_kernel(const float *y, const float *bias,
                                                                          const cuda_row *rows, const cuda_head *heads,
                                                                          const kvh_cuda_kvfmt f, int C, int HS, int NH) {
    __shared__ float sa[QENC_WARPS][QENC_MAX_HS], sb[QENC_WARPS][QENC_MAX_HS], sinv[QENC_WARPS][QENC_MAX_HS];
    __shared__ unsigned char code[QENC_WARPS][QENC_MAX_HS];
    const int w = threadIdx.x / 32, i = blockIdx.y * QENC_WARPS + w, r = blockIdx.x;
    if (i >= 2 * NH) return; /* warp-uniform: the encoder synchronizes only its own warp */
    const int which = i / NH, h = i % NH;
    const cuda_row row = rows[r];
    const cuda_head hd = heads[row.entry * NH + h];
    const uint32_t slot = hd.first + (uint32_t)row.t;
    unsigned char *dst = (unsigned char *)(which == 0 ? hd.k : hd.v) + (size_t)slot * (size_t)f.slot_bytes;
    const size_t col = (size_t)C + (size_t)which * C + (size_t)h * HS;
    q_encode_row_warp(f, HS, y + (size_t)r * 3 * C + col, bias + col, dst, sa[w], sb[w], sinv[w], code[w]);
}

/* Test kernel: row r of rows[n, HS] into slot r of out. grid n, block 32. */
__global__ void kv_quant_encode_rows_kernel(const float *rows, unsigned char *out, const kvh_cuda_kvfmt f, int HS) {
    __shared__ float sa[QENC_MAX_HS], sb[QENC_MAX_HS], sinv[QENC_MAX_HS];
    __shared__ unsigned char code[QENC_MAX_HS];
    const int r = blockIdx.x;
    q_encode_row_warp(f, HS, rows + (size_t)r * HS, NULL, out + (size_t)r * f.slot_bytes, sa, sb, sinv, code);
}

/* ================================ attention readers ================================ */

/* q·k over one packed K slot, fp32: sum_g ( s_g * sum_{d in g} q_d u_d + (m_g - s_g z) * Q_g ), Q_g = qg[g]
 * (the group sums of q). The same function serves the attention and the score kernels, so both see
 * bit-identical scores. Equals q·(decoded k) up to fp32 summation order (the factoring of kvq_attend). */
template <int BITS, int ASYM>
__device__ __forceinline__ float q_slot_dot(const float *qs, const float *qg, const unsigned char *slot,
                                            const kvh_cuda_kvfmt &f) {
    constexpr float z = (BITS == 4 && !ASYM) ? 8.0f : 0.0f;
    constexpr bool has_offset = ASYM || BITS == 4;
    const int G = f.group, NG = f.n_groups, gbytes = G * BITS / 8;
    const unsigned char *vals = slot + f.header;
    float dot = 0.0f;
    for (int g = 0; g < NG; g++) {
        float s, m;
        q_header<ASYM>(slot, g, &s, &m);
        const unsigned char *v = vals + g * gbytes;
        const float *q = qs + g * G;
        float part = 0.0f;
        if (BITS == 8) {
            if (f.words) {
                const uint32_t *w = (const uint32_t *)v;
                for (int i = 0; i < G / 4; i++) {
                    const uint32_t x = w[i];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const uint32_t byte = (x >> (8 * e)) & 0xffu;
                        const float u = ASYM ? (float)byte : (float)(int8_t)byte;
                        part += q[4 * i + e] * u;
                    }
                }
            } else {
                for (int i = 0; i < G; i++) part += q[i] * (ASYM ? (float)v[i] : (float)(int8_t)v[i]);
            }
        } else {
            const int H = G / 2;
            const float *qh = q + H;
            if (f.words) {
                const uint32_t *w = (const uint32_t *)v;
                for (int i = 0; i < H / 4; i++) {
                    const uint32_t x = w[i];
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const uint32_t byte = (x >> (8 * e)) & 0xffu;
                        part += q[4 * i + e] * (float)(byte & 0x0fu) + qh[4 * i + e] * (float)(byte >> 4);
                    }
                }
            } else {
                for (int i = 0; i < H; i++) part += q[i] * (float)(v[i] & 0x0fu) + qh[i] * (float)(v[i] >> 4);
            }
        }
        dot += s * part;
        if (has_offset) dot += (m - s * z) * qg[g];
    }
    return dot;
}

/* Where element d of a slot lives: its group, its byte in the slot, and (int4) the nibble's shift. */
typedef struct q_elem {
    int g, byte, shift;
} q_elem;

template <int BITS>
__device__ __forceinline__ q_elem q_elem_of(int d, const kvh_cuda_kvfmt &f) {
    q_elem e;
    e.g = d / f.group;
    const int i = d - e.g * f.group;
    if (BITS == 8) {
        e.byte = f.header + d;
        e.shift = 0;
    } else {
        const int H = f.group / 2;
        e.byte = f.header + e.g * H + (i < H ? i : i - H);
        e.shift = i < H ? 0 : 4;
    }
    return e;
}

/* Dequantized element e of a slot: s * (u - z) + m (kvq_decode's rule), fp32. */
template <int BITS, int ASYM>
__device__ __forceinline__ float q_dequant(const unsigned char *slot, const q_elem &e) {
    constexpr float z = (BITS == 4 && !ASYM) ? 8.0f : 0.0f;
    float s, m;
    q_header<ASYM>(slot, e.g, &s, &m);
    const unsigned b = slot[e.byte];
    float u;
    if (BITS == 8) u = ASYM ? (float)b : (float)(int8_t)b;
    else u = (float)((b >> e.shift) & 0x0fu);
    return s * (u - z) + m;
}

/* ================================ launchers ================================ */

static int launch_kv_quant_encode(cudaStream_t st, const float *y, const float *bias, const cuda_row *rows,
                                  const cuda_head *heads, const kvh_cuda_kvfmt &f, int R, int C, int HS, int NH,
                                  kvh_err *err) {
    if (HS > QENC_MAX_HS)
        return kvh_fail(err, "cuda backend: head size %d is above the quantized encoder's limit of %d", HS,
                        QENC_MAX_HS);
    dim3 grid(R, (2 * NH + QENC_WARPS - 1) / QENC_WARPS);
    kv_quant_encode_kernel<<<grid, 32 * QENC_WARPS, 0, st>>>(y, bias, rows, heads, f, C, HS, NH);
    KVH_CUDA_LAUNCHED(err, "kv_quant_encode_kernel");
    return 0;
}

#endif
