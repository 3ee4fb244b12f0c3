/* wformat.h — the packed weight formats of f16.so, bf16.so, w8.so and w4.so: layouts, sizes, packing
 * and the reference unpacking. Header-only so the tests (tests/test_weight_formats.c) check the plugins'
 * kernels against this exact definition. Kernels over the packed form live in wformat_kernels.c.
 *
 * A matrix W with k inputs and n outputs is packed output-major: one row per output j, holding W(., j)
 * (k values) in the format's encoding, rows of row_bytes each, back to back. k must be a multiple of 32
 * (every GPT-2 width is). Within a row:
 *   f16   k IEEE binary16 values                                     2 bytes / weight
 *   bf16  k bfloat16 values (fp32 rounded to nearest even)           2 bytes / weight
 *   w8    k/G binary16 scales d, then k int8 q:  W = q * d           (1 + 2/G) bytes / weight
 *         symmetric, d = max|W| / 127 over the group of G inputs (G = `group`, a multiple of 32)
 *   w4    k/G binary16 scales d, then k/2 bytes of 4-bit q (0..15):  W = (q - 8) * d
 *         d = m / -8 where m is the group's value of largest magnitude (so m itself is exact), as GGML's
 *         Q4_0.
 * Code order of w8/w4 (wf_code_pos): the inputs form blocks of 32 (block b: inputs 32b..32b+31) and the
 * blocks runs of 16 (the last run holds the m = k/32 mod 16 left, when that is not 0). Within a run the
 * codes are interleaved four inputs at a time, so that one 4-byte lane of a vector holds four inputs of
 * ONE block and lane l of every vector belongs to block l of the run: a kernel adds a block's 32
 * products in one int32 lane over eight vpdpbusd steps, and converts and scales each block sum once.
 *   w8: step t (inputs 4t..4t+3 of each block, t < 8) takes 4m bytes at 32*16*run + 4m*t: block l's four
 *       at + 4l. (A run is 512 bytes; a full run's step is one 64-byte vector.)
 *   w4: four vectors v < 4 of 4m bytes at 16*16*run + 4m*v: lane l of vector v holds block l's inputs
 *       4v..4v+3 in the low nibbles and 16+4v..16+4v+3 in the high ones (steps v and v + 4).
 * The scales of w8/w4 are quantized to binary16 BEFORE the weights are divided by them, so the stored
 * scale is the one every kernel multiplies by. */
#ifndef WFORMAT_H
#define WFORMAT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define WF_F16 1u
#define WF_BF16 2u
#define WF_W8 3u
#define WF_W4 4u

typedef struct wf_spec {
    uint32_t kind;  /* WF_* */
    uint32_t group; /* w8/w4: inputs per scale (multiple of 32); unused otherwise */
} wf_spec;

/* ---- binary16 and bfloat16 conversions (round to nearest even) ------------------------------------ */

static inline uint16_t wf_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t mag = x & 0x7fffffffu;
    if (mag >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0)); /* inf/nan */
    if (mag >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: infinity */
    if (mag < 0x38800000u) {                                     /* below 2^-14: subnormal half or zero */
        if (mag < 0x33000000u) return (uint16_t)sign;            /* below half the smallest subnormal */
        const uint32_t e = mag >> 23, m = (mag & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e; /* 14..24 */
        uint32_t h = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((mag - 0x38000000u) >> 13); /* rebias exponent 127 -> 15 */
    const uint32_t rem = mag & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline float wf_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        if (m == 0) {
            x = sign;
        } else { /* subnormal: normalize */
            float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
            memcpy(&x, &f, 4);
            x |= sign;
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (m << 13);
    } else {
        x = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline uint16_t wf_float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static inline float wf_bf16_to_float(uint16_t b) {
    const uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* ---- sizes ------------------------------------------------------------------------------------------ */

/* Bytes of one packed row of k inputs; 0 when the spec cannot hold k inputs. */
static inline size_t wf_row_bytes(wf_spec s, uint32_t k) {
    if (k == 0 || k % 32u) return 0;
    switch (s.kind) {
    case WF_F16:
    case WF_BF16: return (size_t)k * 2u;
    case WF_W8: return (s.group && k % s.group == 0) ? (size_t)(k / s.group) * 2u + k : 0;
    case WF_W4: return (s.group && k % s.group == 0) ? (size_t)(k / s.group) * 2u + k / 2u : 0;
    default: return 0;
    }
}

/* ---- w8/w4 code order ---------------------------------------------------------------------------------- */

/* Where input e (< k) of a w8/w4 row's codes lives: the byte offset from the first code, and (w4) the bit
 * shift of its nibble in that byte. */
static inline size_t wf_code_pos(uint32_t kind, uint32_t k, uint32_t e, uint32_t *shift) {
    const uint32_t b = e / 32u, i = e % 32u, run = b / 16u, l = b % 16u;
    const uint32_t left = k / 32u - 16u * run, m = left < 16u ? left : 16u;
    if (kind == WF_W8) {
        *shift = 0;
        return (size_t)512u * run + (size_t)4u * m * (i / 4u) + 4u * l + i % 4u;
    }
    *shift = 4u * (i / 16u);
    return (size_t)256u * run + (size_t)4u * m * ((i / 4u) % 4u) + 4u * l + i % 4u;
}

/* The signed integer of input e: W = code * d (w8: q; w4: q - 8). */
static inline int wf_code(uint32_t kind, uint32_t k, const uint8_t *codes, uint32_t e) {
    uint32_t sh;
    const size_t at = wf_code_pos(kind, k, e, &sh);
    return kind == WF_W8 ? (int)(int8_t)codes[at] : (int)((codes[at] >> sh) & 15u) - 8;
}

/* ---- packing one row (the fp32 values src[0..k-1] of one output) ------------------------------------- */

static inline void wf_pack_row(wf_spec s, uint32_t k, const float *src, uint8_t *dst) {
    if (s.kind == WF_F16 || s.kind == WF_BF16) {
        for (uint32_t i = 0; i < k; i++) {
            const uint16_t h = s.kind == WF_F16 ? wf_float_to_half(src[i]) : wf_float_to_bf16(src[i]);
            memcpy(dst + 2u * i, &h, 2);
        }
        return;
    }
    const uint32_t G = s.group, ng = k / G;
    uint8_t *q = dst + 2u * ng;
    for (uint32_t g = 0; g < ng; g++) {
        const float *w = src + (size_t)g * G;
        float amax = 0.0f, m = 0.0f;
        for (uint32_t i = 0; i < G; i++)
            if (fabsf(w[i]) > amax) {
                amax = fabsf(w[i]);
                m = w[i];
            }
        const uint16_t dh = wf_float_to_half(s.kind == WF_W8 ? amax / 127.0f : m / -8.0f);
        memcpy(dst + 2u * g, &dh, 2);
        const float d = wf_half_to_float(dh), inv = d != 0.0f ? 1.0f / d : 0.0f;
        for (uint32_t i = 0; i < G; i++) {
            const uint32_t e = g * G + i; /* input index within the row */
            uint32_t sh;
            const size_t at = wf_code_pos(s.kind, k, e, &sh);
            if (s.kind == WF_W8) {
                float r = roundf(w[i] * inv);
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                q[at] = (uint8_t)(int8_t)r;
            } else {
                float r = roundf(w[i] * inv) + 8.0f;
                r = r > 15.0f ? 15.0f : r < 0.0f ? 0.0f : r;
                q[at] = (uint8_t)(q[at] | ((uint32_t)r << sh));
            }
        }
    }
}

/* ---- the reference: row bytes back to k fp32 values ------------------------------------------------- */

static inline void wf_unpack_row(wf_spec s, uint32_t k, const uint8_t *row, float *dst) {
    if (s.kind == WF_F16 || s.kind == WF_BF16) {
        for (uint32_t i = 0; i < k; i++) {
            uint16_t h;
            memcpy(&h, row + 2u * i, 2);
            dst[i] = s.kind == WF_F16 ? wf_half_to_float(h) : wf_bf16_to_float(h);
        }
        return;
    }
    const uint32_t G = s.group, ng = k / G;
    const uint8_t *q = row + 2u * ng;
    for (uint32_t e = 0; e < k; e++) {
        uint16_t dh;
        memcpy(&dh, row + 2u * (e / G), 2);
        dst[e] = (float)wf_code(s.kind, k, q, e) * wf_half_to_float(dh);
    }
}

#endif
