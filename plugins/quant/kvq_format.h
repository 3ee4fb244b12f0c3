/* kvq_format.h — THE definition of kvhost's quantized KV slot format (int8 / int4, symmetric or
 * asymmetric, groups along head_dim) with its reference encode, decode and attend, as static inline
 * C11 (libc + libm only). plugins/quant/quant.c wraps it as the int8.so / int4.so store plugins; the
 * tests check it directly; the CUDA backend implements the same bytes and the same arithmetic.
 * Owns: the byte layout of one slot, the fp16 conversion of scales, the quantization rule, the
 * dequantization rule, attention over packed slots. Does not own: where slots live, eviction or
 * compaction (the host moves whole slots; every slot is self-contained, so that is always safe).
 *
 * ---- One slot = one token's K (or V) row of one head, head_dim (HS) floats, G = group ----------------
 *
 *   NG = HS / G groups. Byte layout, little-endian:
 *     [NG x header][packed values]
 *     header (symmetric)  = scale:fp16                    2 bytes
 *     header (asymmetric) = scale:fp16, min:fp16          4 bytes
 *     packed values, bits = 8: HS bytes, byte d = value d
 *                             symmetric:  int8  u in [-127, 127]
 *                             asymmetric: uint8 u in [0, 255]
 *     packed values, bits = 4: HS/2 bytes; group g occupies bytes g*G/2 .. g*G/2 + G/2 - 1 and, within
 *                             it, byte i holds element i of the group in its LOW nibble and element
 *                             i + G/2 in its HIGH nibble (llama.cpp q4_0 order: both halves of a group
 *                             are contiguous runs, which vectorizes). Nibble u in [0, 15]:
 *                             symmetric:  value u - 8 in [-7, 7] (u = 0 never written)
 *                             asymmetric: value u in [0, 15]
 *   slot bytes = NG * 2 * (asym ? 2 : 1) + HS * bits / 8.
 *   Constraints: G divides HS; with bits = 4, G is even; HS <= KVQ_MAX_HEAD_DIM.
 *
 * ---- Dequantization (decode; the meaning of a slot) -----------------------------------------------
 *   element d of group g, s = float(scale_g), m = float(min_g) (0 when symmetric), z = zero point
 *   (8 for symmetric int4, 0 otherwise):   x^_d = s * (float)(u_d - z) + m
 *
 * ---- Quantization (encode) --------------------------------------------------------------------------
 *   qmax = 127 (sym int8) | 7 (sym int4) | 255 (asym int8) | 15 (asym int4)
 *   symmetric:  s = fp16_up(absmax_g / qmax)            u = clamp(round(x / s), -qmax, qmax)
 *   asymmetric: m = fp16_down(min_g), s = fp16_up((max_g - m) / qmax), u = clamp(round((x - m) / s), 0, qmax)
 *   fp16_up / fp16_down: the nearest fp16 (round to nearest even), then moved one fp16 step up / down
 *   if it landed on the wrong side. Rounding the scale UP and the min DOWN means no value clips, so
 *   every element obeys |x - x^| <= s / 2 (plus fp32 rounding of the order 2^-23 * (|x| + |m|)), with
 *   s the STORED scale: s <= (range / qmax) * (1 + 2^-10) + 2^-24. An all-zero (or constant, when
 *   asymmetric) group stores s = 0 and decodes exactly. round() is round-half-away-from-zero (roundf).
 *   Limits: scales saturate at 65504 (the largest fp16), so symmetric int8 clips values beyond
 *   |x| = 65504 * 127 (int4: * 7) and asymmetric mins below -65504 clip; GPT-2 K/V are far smaller.
 *   NaN / Inf inputs are not supported (their group decodes to garbage, other groups are unaffected).
 *
 * ---- Attention over packed slots (attend) -----------------------------------------------------------
 *   For one query q (HS floats) at position q_pos over n slots with positions pos[]:
 *     score_j = scale * sum_g ( s_jg * sum_{d in g} q_d * u_jd  +  o_jg * Q_g ),
 *         o_jg = m_jg - s_jg * z,  Q_g = sum_{d in g} q_d        (o = 0 for symmetric int8)
 *     masked (p_j = 0) where pos[j] > q_pos; p = softmax(score) in two passes (max, then exp/sum),
 *     written to probs[j];
 *     out_d = sum_j (p_j * s_jg) * u_jd  +  sum_j p_j * o_jg        (g the group of d)
 *   computed slot by slot, group by group: no head-sized fp32 copy of K or V is ever made. This equals
 *   fp32 attention over the decoded rows up to fp32 summation order. Inner loops run over the G
 *   elements of a group with KVQ_LANES independent partial sums, so compilers vectorize them without
 *   -ffast-math. */
#ifndef KVQ_FORMAT_H
#define KVQ_FORMAT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define KVQ_MAX_HEAD_DIM 512u
#define KVQ_LANES 8

/* ---- fp16 (IEEE binary16) <-> fp32 ------------------------------------------------------------- */

/* fp32 -> fp16, round to nearest, ties to even. Overflow -> +-Inf, NaN -> quiet NaN. */
static inline uint16_t kvq_half_from_float(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to Inf */
    if (ax < 0x38800000u) {                                     /* below 2^-14: fp16 subnormal or zero */
        if (ax <= 0x33000000u) return (uint16_t)sign;           /* <= 2^-25: zero (2^-25 ties to even 0) */
        const uint32_t e = ax >> 23, mant = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e; /* value = mant * 2^(e-150) = (mant >> shift) * 2^-24 */
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (q & 1u))) q++; /* q == 0x400 is the smallest normal: right */
        return (uint16_t)(sign | q);
    }
    uint32_t h = (ax - 0x38000000u) >> 13; /* rebias the exponent 127 -> 15, keep 10 mantissa bits */
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is correct */
    return (uint16_t)(sign | h);
}

/* fp16 -> fp32 (exact). */
static inline float kvq_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    if (e == 31) x = sign | 0x7f800000u | (m << 13);
    else x = sign | ((e + 112u) << 23) | (m << 13);
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* The next fp16 toward +Inf / -Inf from a finite h (saturating at +-65504). */
static inline uint16_t kvq__half_step_up(uint16_t h) {
    if (h == 0x7bffu) return h;
    if (h & 0x8000u) return h == 0x8000u ? (uint16_t)0x0001u : (uint16_t)(h - 1u);
    return (uint16_t)(h + 1u);
}
static inline uint16_t kvq__half_step_down(uint16_t h) {
    if (h == 0xfbffu) return h;
    if (h & 0x8000u) return (uint16_t)(h + 1u);
    return h == 0x0000u ? (uint16_t)0x8001u : (uint16_t)(h - 1u);
}

/* The smallest fp16 >= v (v finite; saturates at 65504). */
static inline uint16_t kvq_half_up(float v) {
    if (v >= 65504.0f) return 0x7bffu;
    uint16_t h = kvq_half_from_float(v);
    if (kvq_half_to_float(h) < v) h = kvq__half_step_up(h);
    return h;
}
/* The largest fp16 <= v (v finite; saturates at -65504). */
static inline uint16_t kvq_half_down(float v) {
    if (v <= -65504.0f) return 0xfbffu;
    uint16_t h = kvq_half_from_float(v);
    if (kvq_half_to_float(h) > v) h = kvq__half_step_down(h);
    return h;
}

/* ---- the format ---------------------------------------------------------------------------------- */

typedef struct kvq_format {
    uint32_t bits;        /* 8 or 4 */
    uint32_t group;       /* G: elements per scale */
    uint32_t asym;        /* 0 symmetric (scale), 1 asymmetric (scale + min) */
    uint32_t head_dim;    /* HS */
    uint32_t n_groups;    /* NG = HS / G */
    uint32_t header_bytes;/* NG * 2 * (asym ? 2 : 1) */
    uint32_t slot_bytes;  /* header_bytes + HS * bits / 8 */
    uint32_t qmax;        /* largest |u| (symmetric) or largest u (asymmetric) */
} kvq_format;

/* Fills f, or returns -1 with a message in err[cap] naming the bad value. */
static inline int kvq_format_init(kvq_format *f, int64_t bits, int64_t group, int asym, int64_t head_dim, char *err,
                                  size_t cap) {
    memset(f, 0, sizeof *f);
    if (bits != 8 && bits != 4) {
        snprintf(err, cap, "bits = %lld: must be 8 or 4", (long long)bits);
        return -1;
    }
    if (head_dim < 1 || head_dim > (int64_t)KVQ_MAX_HEAD_DIM) {
        snprintf(err, cap, "head_dim %lld is not supported (1..%u)", (long long)head_dim, KVQ_MAX_HEAD_DIM);
        return -1;
    }
    if (group < 1) {
        snprintf(err, cap, "group = %lld: must be >= 1", (long long)group);
        return -1;
    }
    if (head_dim % group != 0) {
        /* name the divisors that would work (bits 4 needs an even one), nearest below the request first */
        int64_t near = 0;
        char list[160];
        size_t used = 0;
        list[0] = '\0';
        for (int64_t d = 1; d <= head_dim; d++) {
            if (head_dim % d != 0 || (bits == 4 && d % 2 != 0)) continue;
            if (d < group) near = d;
            int w = snprintf(list + used, sizeof list - used, "%s%lld", used ? ", " : "", (long long)d);
            if (w < 0 || (size_t)w >= sizeof list - used) break;
            used += (size_t)w;
        }
        if (used == 0) { /* bits 4 and an odd head_dim: no even group divides it */
            snprintf(err, cap, "group = %lld does not divide head_dim %lld, and no even group does (bits = 4 needs "
                     "one); use bits = 8", (long long)group, (long long)head_dim);
            return -1;
        }
        if (near == 0) near = bits == 4 ? 2 : 1;
        snprintf(err, cap, "group = %lld does not divide head_dim %lld (the model's head size); use a group that "
                 "divides %lld, such as %lld (possible: %s)", (long long)group, (long long)head_dim,
                 (long long)head_dim, (long long)near, list);
        return -1;
    }
    if (bits == 4 && group % 2 != 0) {
        snprintf(err, cap, "group = %lld: with bits = 4 the group must be even (two values share a byte)", (long long)group);
        return -1;
    }
    f->bits = (uint32_t)bits;
    f->group = (uint32_t)group;
    f->asym = asym ? 1u : 0u;
    f->head_dim = (uint32_t)head_dim;
    f->n_groups = (uint32_t)(head_dim / group);
    f->header_bytes = f->n_groups * 2u * (f->asym ? 2u : 1u);
    f->slot_bytes = f->header_bytes + f->head_dim * f->bits / 8u;
    f->qmax = bits == 8 ? (f->asym ? 255u : 127u) : (f->asym ? 15u : 7u);
    return 0;
}

/* Header fields of group g of a slot. */
static inline float kvq_scale(const kvq_format *f, const void *slot, uint32_t g) {
    uint16_t h;
    memcpy(&h, (const unsigned char *)slot + (size_t)g * (f->asym ? 4u : 2u), 2);
    return kvq_half_to_float(h);
}
static inline float kvq_min(const kvq_format *f, const void *slot, uint32_t g) {
    if (!f->asym) return 0.0f;
    uint16_t h;
    memcpy(&h, (const unsigned char *)slot + (size_t)g * 4u + 2u, 2);
    return kvq_half_to_float(h);
}
/* Zero point z of the stored integers (see the header comment). */
static inline float kvq_zero_point(const kvq_format *f) { return (f->bits == 4 && !f->asym) ? 8.0f : 0.0f; }
/* Packed values of group g. */
static inline const unsigned char *kvq_values(const kvq_format *f, const void *slot, uint32_t g) {
    return (const unsigned char *)slot + f->header_bytes + (size_t)g * f->group * f->bits / 8u;
}

/* Quantizes one row of head_dim floats into slot (slot_bytes bytes). */
static inline void kvq_encode(const kvq_format *f, const float *row, void *slot) {
    unsigned char *hdr = slot;
    const uint32_t G = f->group;
    const float qmax = (float)f->qmax;
    for (uint32_t g = 0; g < f->n_groups; g++) {
        const float *x = row + (size_t)g * G;
        unsigned char *vals = (unsigned char *)slot + f->header_bytes + (size_t)g * G * f->bits / 8u;
        uint16_t sh, mh = 0;
        float m = 0.0f;
        if (f->asym) {
            float lo = x[0], hi = x[0];
            for (uint32_t i = 1; i < G; i++) {
                lo = x[i] < lo ? x[i] : lo;
                hi = x[i] > hi ? x[i] : hi;
            }
            mh = kvq_half_down(lo);
            m = kvq_half_to_float(mh);
            sh = kvq_half_up((hi - m) / qmax);
        } else {
            float amax = 0.0f;
            for (uint32_t i = 0; i < G; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
            sh = kvq_half_up(amax / qmax);
        }
        const float s = kvq_half_to_float(sh);
        if (f->bits == 4) memset(vals, 0, G / 2);
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        if (f->asym) {
            memcpy(hdr + (size_t)g * 4u, &sh, 2);
            memcpy(hdr + (size_t)g * 4u + 2u, &mh, 2);
        } else {
            memcpy(hdr + (size_t)g * 2u, &sh, 2);
        }
        for (uint32_t i = 0; i < G; i++) {
            float u = roundf((x[i] - m) * inv);
            const float lo = f->asym ? 0.0f : -qmax;
            u = u < lo ? lo : (u > qmax ? qmax : u);
            const int iu = (int)u;
            if (f->bits == 8) {
                if (f->asym) vals[i] = (unsigned char)iu;
                else {
                    int8_t sv = (int8_t)iu;
                    memcpy(&vals[i], &sv, 1);
                }
            } else {
                const unsigned nib = (unsigned)(f->asym ? iu : iu + 8);
                if (i < G / 2) vals[i] = (unsigned char)(vals[i] | nib);
                else vals[i - G / 2] = (unsigned char)(vals[i - G / 2] | (nib << 4));
            }
        }
    }
}

/* Dequantizes one slot into row[head_dim]: x^ = s * (u - z) + m. */
static inline void kvq_decode(const kvq_format *f, const void *slot, float *row) {
    const uint32_t G = f->group;
    const float z = kvq_zero_point(f);
    for (uint32_t g = 0; g < f->n_groups; g++) {
        const float s = kvq_scale(f, slot, g), m = kvq_min(f, slot, g);
        const unsigned char *v = kvq_values(f, slot, g);
        float *x = row + (size_t)g * G;
        for (uint32_t i = 0; i < G; i++) {
            float u;
            if (f->bits == 8) u = f->asym ? (float)v[i] : (float)(int8_t)v[i];
            else u = (float)(i < G / 2 ? (v[i] & 0x0fu) : (v[i - G / 2] >> 4));
            x[i] = s * (u - z) + m;
        }
    }
}

/* ---- inner kernels ---------------------------------------------------------------------------------
 * Written once, for any format, with the format's constants (BITS, ASYM, G) as arguments. kvq_attend
 * calls the kernel with literal constants for the default group size, so after inlining the compiler
 * removes every format branch, unrolls the group loops and vectorizes them (KVQ_LANES independent
 * partial sums: no -ffast-math needed); other group sizes run the same code with runtime values. */

#if defined(__GNUC__)
#define KVQ_ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define KVQ_ALWAYS_INLINE static inline
#endif

#if defined(__F16C__)
#include <immintrin.h>
/* The hardware conversion: exact like kvq_half_to_float, without its branches. */
static inline float kvq__scale_value(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float kvq__scale_value(uint16_t h) { return kvq_half_to_float(h); }
#endif

/* Header of group g: scale and (asymmetric) min, as floats. */
KVQ_ALWAYS_INLINE void kvq__header(uint32_t ASYM, const unsigned char *slot, uint32_t g, float *s, float *m) {
    uint16_t h[2] = {0, 0};
    memcpy(h, slot + (size_t)g * (ASYM ? 4u : 2u), ASYM ? 4u : 2u);
    *s = kvq__scale_value(h[0]);
    *m = ASYM ? kvq__scale_value(h[1]) : 0.0f;
}

/* part[l] += q[i] * u[i] over the group's stored integers (i = l mod KVQ_LANES), tail for the rest. */
KVQ_ALWAYS_INLINE void kvq__dot_lanes(uint32_t BITS, uint32_t ASYM, uint32_t G, const float *q, const unsigned char *v,
                                      float *part, float *tail) {
    if (BITS == 8) {
        const uint32_t full = G - G % KVQ_LANES;
        if (ASYM) {
            for (uint32_t i = 0; i < full; i += KVQ_LANES)
                for (int l = 0; l < KVQ_LANES; l++) part[l] += q[i + l] * (float)v[i + l];
            for (uint32_t i = full; i < G; i++) *tail += q[i] * (float)v[i];
        } else {
            const int8_t *sv = (const int8_t *)v;
            for (uint32_t i = 0; i < full; i += KVQ_LANES)
                for (int l = 0; l < KVQ_LANES; l++) part[l] += q[i + l] * (float)sv[i + l];
            for (uint32_t i = full; i < G; i++) *tail += q[i] * (float)sv[i];
        }
    } else {
        const uint32_t H = G / 2, full = H - H % KVQ_LANES;
        const float *qh = q + H;
        for (uint32_t i = 0; i < full; i += KVQ_LANES)
            for (int l = 0; l < KVQ_LANES; l++)
                part[l] += q[i + l] * (float)(v[i + l] & 0x0f) + qh[i + l] * (float)(v[i + l] >> 4);
        for (uint32_t i = full; i < H; i++) *tail += q[i] * (float)(v[i] & 0x0f) + qh[i] * (float)(v[i] >> 4);
    }
}

/* o[i] += c * u[i] over one group. */
KVQ_ALWAYS_INLINE void kvq__axpy(uint32_t BITS, uint32_t ASYM, uint32_t G, float c, const unsigned char *v, float *o) {
    if (BITS == 8) {
        if (ASYM)
            for (uint32_t i = 0; i < G; i++) o[i] += c * (float)v[i];
        else {
            const int8_t *sv = (const int8_t *)v;
            for (uint32_t i = 0; i < G; i++) o[i] += c * (float)sv[i];
        }
    } else {
        const uint32_t H = G / 2;
        float *oh = o + H;
        for (uint32_t i = 0; i < H; i++) {
            o[i] += c * (float)(v[i] & 0x0f);
            oh[i] += c * (float)(v[i] >> 4);
        }
    }
}

/* ---- attention ----------------------------------------------------------------------------------- */

/* Pass 2 of both kernels: probs[j] = exp(probs[j] - mx) (0 for masked -inf slots); returns 1 / sum. */
static inline float kvq__exp_and_sum(float *probs, uint32_t n, float mx) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        const float e = probs[j] == -INFINITY ? 0.0f : expf(probs[j] - mx);
        probs[j] = e;
        sum += e;
    }
    return sum > 0.0f ? 1.0f / sum : 0.0f;
}


KVQ_ALWAYS_INLINE void kvq__attend(uint32_t BITS, uint32_t ASYM, uint32_t G, uint32_t HS, const float *q, int32_t q_pos,
                                   float scale, uint32_t n, const int32_t *pos, const void *k_slots,
                                   const void *v_slots, float *out, float *probs) {
    const uint32_t NG = HS / G;
    const uint32_t header = NG * 2u * (ASYM ? 2u : 1u);
    const size_t sb = header + (size_t)HS * BITS / 8u;
    const float z = (BITS == 4 && !ASYM) ? 8.0f : 0.0f;
    const int has_offset = ASYM || BITS == 4;
    float qsum[KVQ_MAX_HEAD_DIM]; /* [NG] Q_g */
    float off[KVQ_MAX_HEAD_DIM];  /* [NG] sum_j p_j * o_jg */
    for (uint32_t g = 0; g < NG; g++) {
        float s = 0.0f;
        for (uint32_t i = 0; i < G; i++) s += q[(size_t)g * G + i];
        qsum[g] = s;
        off[g] = 0.0f;
    }
    /* pass 1: scores and their max. Per slot: the groups' lane sums, each scaled by its s_g, are
     * added lane-wise; one horizontal sum per slot. */
    float mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > q_pos) {
            probs[j] = -INFINITY;
            continue;
        }
        const unsigned char *slot = (const unsigned char *)k_slots + (size_t)j * sb;
        float acc[KVQ_LANES] = {0};
        float extra = 0.0f;
        for (uint32_t g = 0; g < NG; g++) {
            float s, m;
            kvq__header(ASYM, slot, g, &s, &m);
            float part[KVQ_LANES] = {0}, tail = 0.0f;
            kvq__dot_lanes(BITS, ASYM, G, q + (size_t)g * G, slot + header + (size_t)g * G * BITS / 8u, part, &tail);
            for (int l = 0; l < KVQ_LANES; l++) acc[l] += s * part[l];
            extra += s * tail;
            if (has_offset) extra += (m - s * z) * qsum[g];
        }
        float dot = extra;
        for (int l = 0; l < KVQ_LANES; l++) dot += acc[l];
        dot *= scale;
        probs[j] = dot;
        if (dot > mx) mx = dot;
    }
    /* pass 2: exp and sum */
    const float inv = kvq__exp_and_sum(probs, n, mx);
    /* pass 3: normalize and accumulate V block by block */
    for (uint32_t d = 0; d < HS; d++) out[d] = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        const float p = probs[j] * inv;
        probs[j] = p;
        if (p == 0.0f) continue;
        const unsigned char *slot = (const unsigned char *)v_slots + (size_t)j * sb;
        for (uint32_t g = 0; g < NG; g++) {
            float s, m;
            kvq__header(ASYM, slot, g, &s, &m);
            kvq__axpy(BITS, ASYM, G, p * s, slot + header + (size_t)g * G * BITS / 8u, out + (size_t)g * G);
            if (has_offset) off[g] += p * (m - s * z);
        }
    }
    if (has_offset)
        for (uint32_t g = 0; g < NG; g++)
            for (uint32_t i = 0; i < G; i++) out[(size_t)g * G + i] += off[g];
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVQ_HAVE_AVX2 1
/* ---- the same attention with AVX2 + FMA intrinsics, for groups of 32 (the default) -----------------
 * Chosen at compile time (the build targets the host CPU, -march=native); kvq_attend_portable is the
 * fallback everywhere else and the tests check both against a double-precision reference. */

/* The 32 stored integers of one group as four vectors of 8 floats (elements 0-7, 8-15, 16-23, 24-31). */
KVQ_ALWAYS_INLINE void kvq__unpack32(uint32_t BITS, uint32_t ASYM, const unsigned char *v, __m256 *u) {
    if (BITS == 8) {
        const __m128i a = _mm_loadu_si128((const __m128i *)(const void *)v);
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(v + 16));
        if (ASYM) {
            u[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
            u[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
            u[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
            u[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
        } else {
            u[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
            u[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)));
            u[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            u[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
        }
    } else {
        /* byte i: element i in the low nibble, element i + 16 in the high nibble */
        const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)v), nib = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
        u[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        u[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        u[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        u[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
}

static inline float kvq__hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

KVQ_ALWAYS_INLINE void kvq__attend_avx2(uint32_t BITS, uint32_t ASYM, uint32_t HS, const float *q, int32_t q_pos,
                                        float scale, uint32_t n, const int32_t *pos, const void *k_slots,
                                        const void *v_slots, float *out, float *probs) {
    enum { G = 32 };
    const uint32_t NG = HS / G, NV = HS / 8;
    const uint32_t header = NG * 2u * (ASYM ? 2u : 1u);
    const size_t sb = header + (size_t)HS * BITS / 8u;
    const float z = (BITS == 4 && !ASYM) ? 8.0f : 0.0f;
    const int has_offset = ASYM || BITS == 4;
    __m256 qv[KVQ_MAX_HEAD_DIM / 8], ov[KVQ_MAX_HEAD_DIM / 8];
    float qsum[KVQ_MAX_HEAD_DIM / G], off[KVQ_MAX_HEAD_DIM / G];
    for (uint32_t i = 0; i < NV; i++) {
        qv[i] = _mm256_loadu_ps(q + 8 * i);
        ov[i] = _mm256_setzero_ps();
    }
    for (uint32_t g = 0; g < NG; g++) {
        qsum[g] = kvq__hsum(_mm256_add_ps(_mm256_add_ps(qv[4 * g], qv[4 * g + 1]),
                                          _mm256_add_ps(qv[4 * g + 2], qv[4 * g + 3])));
        off[g] = 0.0f;
    }
    float mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > q_pos) {
            probs[j] = -INFINITY;
            continue;
        }
        const unsigned char *slot = (const unsigned char *)k_slots + (size_t)j * sb;
        __m256 acc = _mm256_setzero_ps();
        float extra = 0.0f;
        for (uint32_t g = 0; g < NG; g++) {
            float s, m;
            kvq__header(ASYM, slot, g, &s, &m);
            __m256 u[4];
            kvq__unpack32(BITS, ASYM, slot + header + (size_t)g * G * BITS / 8u, u);
            __m256 part = _mm256_mul_ps(qv[4 * g], u[0]);
            part = _mm256_fmadd_ps(qv[4 * g + 1], u[1], part);
            part = _mm256_fmadd_ps(qv[4 * g + 2], u[2], part);
            part = _mm256_fmadd_ps(qv[4 * g + 3], u[3], part);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(s), part, acc);
            if (has_offset) extra += (m - s * z) * qsum[g];
        }
        const float dot = (kvq__hsum(acc) + extra) * scale;
        probs[j] = dot;
        if (dot > mx) mx = dot;
    }
    const float inv = kvq__exp_and_sum(probs, n, mx);
    for (uint32_t j = 0; j < n; j++) {
        const float p = probs[j] * inv;
        probs[j] = p;
        if (p == 0.0f) continue;
        const unsigned char *slot = (const unsigned char *)v_slots + (size_t)j * sb;
        for (uint32_t g = 0; g < NG; g++) {
            float s, m;
            kvq__header(ASYM, slot, g, &s, &m);
            __m256 u[4];
            kvq__unpack32(BITS, ASYM, slot + header + (size_t)g * G * BITS / 8u, u);
            const __m256 c = _mm256_set1_ps(p * s);
            for (int k = 0; k < 4; k++) ov[4 * g + k] = _mm256_fmadd_ps(c, u[k], ov[4 * g + k]);
            if (has_offset) off[g] += p * (m - s * z);
        }
    }
    for (uint32_t g = 0; g < NG; g++) {
        const __m256 o = _mm256_set1_ps(has_offset ? off[g] : 0.0f);
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * (4 * g + k), _mm256_add_ps(ov[4 * g + k], o));
    }
}
#endif /* AVX2 */

/* One query over n packed slots (k_slots / v_slots: n consecutive slots of f->slot_bytes). Writes
 * out[head_dim] and probs[n] (0 where pos[j] > q_pos). With every slot masked (cannot happen in the
 * host: a query always sees itself) out is 0 and probs are 0. The portable C kernel. */
static inline void kvq_attend_portable(const kvq_format *f, const float *q, int32_t q_pos, float scale, uint32_t n,
                                       const int32_t *pos, const void *k_slots, const void *v_slots, float *out,
                                       float *probs) {
    const uint32_t HS = f->head_dim;
    if (f->group == 32) {
        switch (f->bits * 2u + f->asym) {
        case 16: kvq__attend(8, 0, 32, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 17: kvq__attend(8, 1, 32, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 8: kvq__attend(4, 0, 32, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 9: kvq__attend(4, 1, 32, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        default: break;
        }
    }
    kvq__attend(f->bits, f->asym, f->group, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs);
}

/* kvq_attend_portable's contract, with the AVX2 kernel where the build has it and the group is 32. */
static inline void kvq_attend(const kvq_format *f, const float *q, int32_t q_pos, float scale, uint32_t n,
                              const int32_t *pos, const void *k_slots, const void *v_slots, float *out, float *probs) {
#ifdef KVQ_HAVE_AVX2
    if (f->group == 32) {
        const uint32_t HS = f->head_dim;
        switch (f->bits * 2u + f->asym) {
        case 16: kvq__attend_avx2(8, 0, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 17: kvq__attend_avx2(8, 1, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 8: kvq__attend_avx2(4, 0, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        case 9: kvq__attend_avx2(4, 1, HS, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs); return;
        default: break;
        }
    }
#endif
    kvq_attend_portable(f, q, q_pos, scale, n, pos, k_slots, v_slots, out, probs);
}

#endif /* KVQ_FORMAT_H */
