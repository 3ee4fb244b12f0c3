/* kvq_kivi.h — THE definition of kvhost's KIVI-style quantized KV format (Liu et al. 2024, "KIVI: a
 * tuning-free asymmetric 2bit quantization for KV cache"): keys quantized PER CHANNEL over groups of G
 * consecutive tokens, values PER TOKEN (groups of G along head_dim, the kvq_format.h asymmetric format),
 * both asymmetric (scale + min), the newest tokens kept in fp32 in a residual window. Static inline C11
 * (libc + libm + kvq_format.h). plugins/quant/kivi_store.c keeps the bookkeeping (which group or window
 * entry holds which token, memory through the host); the tests check this header directly.
 * Owns: the handle encoding of a slot, the byte layout of a quantized group, the quantization rule, the
 * dequantization rule, attention over handles. Does not own: the per-token value format (kvq_format.h,
 * used unchanged with asymmetric = true), memory, eviction.
 *
 * ---- Handles: one slot (K and V alike) = one uint32 -------------------------------------------------
 *   bit 31 = 1: the token is in the fp32 window of head-state hs (= seq * n_kv_head + head):
 *               bits 16..30 = hs (< KIVI_MAX_HEADS), bits 0..15 = window entry (< 65536)
 *   bit 31 = 0: the token is row r of quantized group gid: bits 9..30 = gid (< 2^22), bits 0..8 = r (< G)
 *   A K slot and a V slot of the same token hold the same handle, so decode() works from either alone.
 *
 * ---- One quantized group = G tokens of one (seq, head), HS = head_dim, bits = 8 or 4 -----------------
 *   [live:u32][reserved:u32]                           8 bytes   live rows (the block is freed at 0)
 *   [K scale:fp16 x HS][K min:fp16 x HS]               4*HS      one (scale, min) per CHANNEL
 *   [K codes: G rows x HS*bits/8]                                row r = token r; bits 8: byte d = u_d;
 *                                                                bits 4: byte i = u_i (low nibble) |
 *                                                                u_{i+HS/2} (high nibble)
 *   [V: G slots of the kvq_format (bits, group G, asymmetric), one per token]
 *   group bytes = 8 + 4*HS + G*HS*bits/8 + G*(4*HS/G + HS*bits/8) = 8 + 8*HS + 2*G*HS*bits/8
 *   i.e. per quantized token and head: 2*HS*bits/8 + (8 + 8*HS)/G bytes (HS 64, G 32: int8 144.25,
 *   int4 80.25), plus the host's two 4-byte handle slots and 4-byte position.
 *
 * ---- Quantization (once, when G tokens leave the window together) -----------------------------------
 *   Keys, channel d over the group's G rows: m_d = fp16_down(min_t k_td), s_d = fp16_up((max_t k_td -
 *   m_d) / qmax), u_td = clamp(round((k_td - m_d) / s_d), 0, qmax), qmax = 255 (8 bits) or 15 (4 bits);
 *   the same rounding as kvq_format.h's asymmetric groups (scale up, min down: nothing clips), so
 *   |k - k^| <= s_d / 2 plus fp32 rounding, per channel. Values: kvq_encode(asymmetric, group G) per token,
 *   |v - v^| <= s_g / 2 per token and channel group. Dequantization: k^_td = s_d * u_td + m_d.
 *
 * ---- Attention over handles -------------------------------------------------------------------------
 *   score_j = scale * ( sum_d (q_d s_d) u_jd + sum_d q_d m_d )  for a quantized token (q_d s_d and the
 *   offset computed once per group and query, kept in a small direct-mapped cache on the stack), and
 *   scale * q . k_j for a window token (fp32); masked where pos_j > q_pos; softmax in two passes, p_j
 *   written to probs[j]; out = sum_j p_j v^_j, quantized values accumulated as kvq_format.h does
 *   ((p s_g) * u plus a per-group offset sum_j p_j m_jg added at the end). Equals fp32 attention over
 *   the decoded rows up to fp32 summation order. */
#ifndef KVQ_KIVI_H
#define KVQ_KIVI_H

#include "kvq_format.h"

#define KIVI_WINDOW_BIT 0x80000000u
#define KIVI_ROW_BITS 9u                /* G <= 512 (G divides HS <= KVQ_MAX_HEAD_DIM) */
#define KIVI_MAX_GROUPS (1u << 22)      /* live groups per layer */
#define KIVI_MAX_HEADS 32767u           /* n_seq * n_kv_head per layer (hs 32767 would alias 0xffffffff) */
#define KIVI_MAX_WINDOW 65536u          /* R + G */
#define KIVI_MAX_RESIDUAL 32768u
#define KIVI_GROUP_HEADER 8u
#define KIVI_DEAD_POS INT32_MAX         /* position of a released window entry */
#define KIVI_QCACHE 8u                  /* groups whose (q*s, offset) a query keeps at once */

typedef struct kivi_format {
    uint32_t bits;        /* 8 or 4 */
    uint32_t group;       /* G: tokens per key group, channels per value group */
    uint32_t residual;    /* R: window tokens kept in fp32 after a group is quantized */
    uint32_t head_dim;    /* HS */
    uint32_t qmax;        /* 255 or 15 */
    uint32_t k_row_bytes; /* HS * bits / 8 */
    kvq_format v;         /* per-token value format (asymmetric, group G) */
    size_t off_kmin, off_kcodes, off_v; /* byte offsets in a group block (K scales at KIVI_GROUP_HEADER) */
    size_t group_bytes;
} kivi_format;

/* Fills f, or returns -1 with a message in err[cap] naming the bad value. */
static inline int kivi_format_init(kivi_format *f, int64_t bits, int64_t group, int64_t residual, int64_t head_dim,
                                   char *err, size_t cap) {
    memset(f, 0, sizeof *f);
    if (residual < 0 || residual > (int64_t)KIVI_MAX_RESIDUAL) {
        snprintf(err, cap, "residual = %lld: must be 0..%u", (long long)residual, KIVI_MAX_RESIDUAL);
        return -1;
    }
    if (kvq_format_init(&f->v, bits, group, 1, head_dim, err, cap) != 0) return -1;
    f->bits = (uint32_t)bits;
    f->group = (uint32_t)group;
    f->residual = (uint32_t)residual;
    f->head_dim = (uint32_t)head_dim;
    f->qmax = bits == 8 ? 255u : 15u;
    f->k_row_bytes = f->head_dim * f->bits / 8u;
    f->off_kmin = KIVI_GROUP_HEADER + (size_t)2 * f->head_dim;
    f->off_kcodes = f->off_kmin + (size_t)2 * f->head_dim;
    f->off_v = f->off_kcodes + (size_t)f->group * f->k_row_bytes;
    f->group_bytes = f->off_v + (size_t)f->group * f->v.slot_bytes;
    return 0;
}

/* ---- handles ------------------------------------------------------------------------------------- */
static inline uint32_t kivi_handle_group(uint32_t gid, uint32_t row) { return gid << KIVI_ROW_BITS | row; }
static inline uint32_t kivi_handle_window(uint32_t hs, uint32_t idx) { return KIVI_WINDOW_BIT | hs << 16 | idx; }
static inline int kivi_handle_in_window(uint32_t h) { return (h & KIVI_WINDOW_BIT) != 0; }
static inline uint32_t kivi_handle_head(uint32_t h) { return (h >> 16) & 0x7fffu; }
static inline uint32_t kivi_handle_index(uint32_t h) { return h & 0xffffu; }
static inline uint32_t kivi_handle_gid(uint32_t h) { return h >> KIVI_ROW_BITS; }
static inline uint32_t kivi_handle_row(uint32_t h) { return h & ((1u << KIVI_ROW_BITS) - 1u); }
static inline uint32_t kivi_slot_handle(const void *slot) {
    uint32_t h;
    memcpy(&h, slot, sizeof h);
    return h;
}

/* ---- the fp32 window of one (seq, head) ------------------------------------------------------------ */
typedef struct kivi_window {
    void *block;     /* one allocation: k[cap * HS], v[cap * HS] floats, pos[cap] */
    float *k, *v;    /* entry i at k + i * HS */
    int32_t *pos;    /* KIVI_DEAD_POS for a released entry */
    uint32_t n;      /* entries in use (live or dead) */
    uint32_t live;
    uint32_t cap;
} kivi_window;

/* ---- a quantized group ------------------------------------------------------------------------------ */
static inline uint32_t *kivi_group_live(void *block) { return (uint32_t *)block; }
static inline uint16_t kivi__get16(const unsigned char *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}
static inline float kivi_key_scale(const kivi_format *f, const void *block, uint32_t d) {
    (void)f;
    return kvq_half_to_float(kivi__get16((const unsigned char *)block + KIVI_GROUP_HEADER + (size_t)2 * d));
}
static inline float kivi_key_min(const kivi_format *f, const void *block, uint32_t d) {
    return kvq_half_to_float(kivi__get16((const unsigned char *)block + f->off_kmin + (size_t)2 * d));
}
static inline const unsigned char *kivi_key_codes(const kivi_format *f, const void *block, uint32_t row) {
    return (const unsigned char *)block + f->off_kcodes + (size_t)row * f->k_row_bytes;
}
static inline const unsigned char *kivi_value_slot(const kivi_format *f, const void *block, uint32_t row) {
    return (const unsigned char *)block + f->off_v + (size_t)row * f->v.slot_bytes;
}
/* Stored integer of channel d in a key code row. */
static inline uint32_t kivi_key_code(const kivi_format *f, const unsigned char *codes, uint32_t d) {
    if (f->bits == 8) return codes[d];
    const uint32_t H = f->head_dim / 2u;
    return d < H ? (codes[d] & 0x0fu) : (uint32_t)(codes[d - H] >> 4);
}

/* Quantizes G tokens into block (group_bytes, any contents): row r = window entry idx[r] of the fp32
 * arrays k_rows / v_rows (entry i at + i * HS). Sets live = G. */
static inline void kivi_quantize_group(const kivi_format *f, const float *k_rows, const float *v_rows,
                                       const uint32_t *idx, void *block) {
    const uint32_t HS = f->head_dim, G = f->group, H = HS / 2u;
    unsigned char *b = block;
    const float qmax = (float)f->qmax;
    memset(b + f->off_kcodes, 0, (size_t)G * f->k_row_bytes);
    for (uint32_t d = 0; d < HS; d++) {
        float lo = k_rows[(size_t)idx[0] * HS + d], hi = lo;
        for (uint32_t r = 1; r < G; r++) {
            const float x = k_rows[(size_t)idx[r] * HS + d];
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const uint16_t mh = kvq_half_down(lo);
        const float m = kvq_half_to_float(mh);
        const uint16_t sh = kvq_half_up((hi - m) / qmax);
        const float s = kvq_half_to_float(sh);
        memcpy(b + KIVI_GROUP_HEADER + (size_t)2 * d, &sh, 2);
        memcpy(b + f->off_kmin + (size_t)2 * d, &mh, 2);
        const float inv = s > 0.0f ? 1.0f / s : 0.0f;
        for (uint32_t r = 0; r < G; r++) {
            float u = roundf((k_rows[(size_t)idx[r] * HS + d] - m) * inv);
            u = u < 0.0f ? 0.0f : (u > qmax ? qmax : u);
            const unsigned iu = (unsigned)u;
            unsigned char *row = b + f->off_kcodes + (size_t)r * f->k_row_bytes;
            if (f->bits == 8) row[d] = (unsigned char)iu;
            else if (d < H) row[d] = (unsigned char)(row[d] | iu);
            else row[d - H] = (unsigned char)(row[d - H] | (iu << 4));
        }
    }
    for (uint32_t r = 0; r < G; r++)
        kvq_encode(&f->v, v_rows + (size_t)idx[r] * HS, b + f->off_v + (size_t)r * f->v.slot_bytes);
    *kivi_group_live(block) = G;
}

/* Dequantizes row `row` of a group: k^_d = s_d * u_d + m_d; values through kvq_decode. */
static inline void kivi_decode_key(const kivi_format *f, const void *block, uint32_t row, float *out) {
    const unsigned char *codes = kivi_key_codes(f, block, row);
    for (uint32_t d = 0; d < f->head_dim; d++)
        out[d] = kivi_key_scale(f, block, d) * (float)kivi_key_code(f, codes, d) + kivi_key_min(f, block, d);
}
static inline void kivi_decode_value(const kivi_format *f, const void *block, uint32_t row, float *out) {
    kvq_decode(&f->v, kivi_value_slot(f, block, row), out);
}

/* The row a handle stands for (which: 0 = K, 1 = V). windows[hs], groups[gid]. */
static inline void kivi_decode_handle(const kivi_format *f, const kivi_window *windows, void *const *groups,
                                      uint32_t which, uint32_t h, float *out) {
    if (kivi_handle_in_window(h)) {
        const kivi_window *w = &windows[kivi_handle_head(h)];
        memcpy(out, (which ? w->v : w->k) + (size_t)kivi_handle_index(h) * f->head_dim, f->head_dim * sizeof(float));
        return;
    }
    const void *block = groups[kivi_handle_gid(h)];
    if (which) kivi_decode_value(f, block, kivi_handle_row(h), out);
    else kivi_decode_key(f, block, kivi_handle_row(h), out);
}

/* ---- attention ----------------------------------------------------------------------------------- */

static inline float kivi__dot(const float *a, const float *b, uint32_t n) {
    float part[KVQ_LANES] = {0}, tail = 0.0f;
    const uint32_t full = n - n % KVQ_LANES;
    for (uint32_t i = 0; i < full; i += KVQ_LANES)
        for (int l = 0; l < KVQ_LANES; l++) part[l] += a[i + l] * b[i + l];
    for (uint32_t i = full; i < n; i++) tail += a[i] * b[i];
    for (int l = 0; l < KVQ_LANES; l++) tail += part[l];
    return tail;
}

/* sum_d qs_d * u_d over one key code row. */
static inline float kivi__dot_codes(const kivi_format *f, const float *qs, const unsigned char *codes) {
    const uint32_t HS = f->head_dim;
    float part[KVQ_LANES] = {0}, tail = 0.0f;
    if (f->bits == 8) {
        const uint32_t full = HS - HS % KVQ_LANES;
        for (uint32_t i = 0; i < full; i += KVQ_LANES)
            for (int l = 0; l < KVQ_LANES; l++) part[l] += qs[i + l] * (float)codes[i + l];
        for (uint32_t i = full; i < HS; i++) tail += qs[i] * (float)codes[i];
    } else {
        const uint32_t H = HS / 2u, full = H - H % KVQ_LANES;
        const float *qh = qs + H;
        for (uint32_t i = 0; i < full; i += KVQ_LANES)
            for (int l = 0; l < KVQ_LANES; l++)
                part[l] += qs[i + l] * (float)(codes[i + l] & 0x0f) + qh[i + l] * (float)(codes[i + l] >> 4);
        for (uint32_t i = full; i < H; i++) tail += qs[i] * (float)(codes[i] & 0x0f) + qh[i] * (float)(codes[i] >> 4);
    }
    for (int l = 0; l < KVQ_LANES; l++) tail += part[l];
    return tail;
}

/* One query over n handle slots (slots[j] = handle of slot j). Writes out[HS] and probs[n] (0 where
 * pos[j] > q_pos). No allocation: the per-group (q*s, offset) cache lives on the stack. */
static inline void kivi_attend(const kivi_format *f, const kivi_window *windows, void *const *groups, const float *q,
                               int32_t q_pos, float scale, uint32_t n, const int32_t *pos, const void *slots,
                               float *out, float *probs) {
    const uint32_t HS = f->head_dim, G = f->group, NG = HS / G;
    uint32_t tag[KIVI_QCACHE];
    float qs[KIVI_QCACHE][KVQ_MAX_HEAD_DIM], qoff[KIVI_QCACHE];
    for (uint32_t c = 0; c < KIVI_QCACHE; c++) {
        tag[c] = UINT32_MAX;
        qoff[c] = 0.0f;
    }
    float mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > q_pos) {
            probs[j] = -INFINITY;
            continue;
        }
        const uint32_t h = kivi_slot_handle((const unsigned char *)slots + (size_t)j * 4u);
        float dot;
        if (kivi_handle_in_window(h)) {
            const kivi_window *w = &windows[kivi_handle_head(h)];
            dot = kivi__dot(q, w->k + (size_t)kivi_handle_index(h) * HS, HS);
        } else {
            const uint32_t gid = kivi_handle_gid(h), c = gid % KIVI_QCACHE;
            const void *block = groups[gid];
            if (tag[c] != gid) {
                float o = 0.0f;
                for (uint32_t d = 0; d < HS; d++) {
                    qs[c][d] = q[d] * kivi_key_scale(f, block, d);
                    o += q[d] * kivi_key_min(f, block, d);
                }
                qoff[c] = o;
                tag[c] = gid;
            }
            dot = qoff[c] + kivi__dot_codes(f, qs[c], kivi_key_codes(f, block, kivi_handle_row(h)));
        }
        dot *= scale;
        probs[j] = dot;
        if (dot > mx) mx = dot;
    }
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        const float e = probs[j] == -INFINITY ? 0.0f : expf(probs[j] - mx);
        probs[j] = e;
        sum += e;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float off[KVQ_MAX_HEAD_DIM]; /* [NG] sum_j p_j m_jg over quantized tokens */
    for (uint32_t g = 0; g < NG; g++) off[g] = 0.0f;
    for (uint32_t d = 0; d < HS; d++) out[d] = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        const float p = probs[j] * inv;
        probs[j] = p;
        if (p == 0.0f) continue;
        const uint32_t h = kivi_slot_handle((const unsigned char *)slots + (size_t)j * 4u);
        if (kivi_handle_in_window(h)) {
            const kivi_window *w = &windows[kivi_handle_head(h)];
            const float *v = w->v + (size_t)kivi_handle_index(h) * HS;
            for (uint32_t d = 0; d < HS; d++) out[d] += p * v[d];
            continue;
        }
        const unsigned char *slot = kivi_value_slot(f, groups[kivi_handle_gid(h)], kivi_handle_row(h));
        for (uint32_t g = 0; g < NG; g++) {
            const float ps = p * kvq_scale(&f->v, slot, g);
            const unsigned char *v = kvq_values(&f->v, slot, g);
            float *o = out + (size_t)g * G;
            if (f->bits == 8) {
                for (uint32_t i = 0; i < G; i++) o[i] += ps * (float)v[i];
            } else {
                const uint32_t H = G / 2u;
                for (uint32_t i = 0; i < H; i++) {
                    o[i] += ps * (float)(v[i] & 0x0f);
                    o[i + H] += ps * (float)(v[i] >> 4);
                }
            }
            off[g] += p * kvq_min(&f->v, slot, g);
        }
    }
    for (uint32_t g = 0; g < NG; g++)
        for (uint32_t i = 0; i < G; i++) out[(size_t)g * G + i] += off[g];
}

#endif /* KVQ_KIVI_H */
