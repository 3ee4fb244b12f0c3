/* smoothquant.c — smoothquant.so: SmoothQuant W8A8 weights (Xiao et al. 2023) as a weight-format plugin.
 *
 * The paper's observation: activations have a few input channels with huge magnitudes, weights do not, so
 * int8 activations lose the small channels. Migrate the difficulty with a per-input factor
 *     s_i = max|X_i|^alpha / max_j |W_ij|^(1 - alpha)       (alpha = 0.5 by default, as the paper)
 * (X / s) (s W) = X W, then quantize s W per output channel and X / s per token, both symmetric int8, and
 * multiply in integers with int32 accumulation. max|X_i| comes from calibration statistics the host hands
 * to pack() (kvp_weight_info.act_absmax: `kvhost calibrate`, [model] calibration = FILE).
 * In GPT-2 the division by s cannot be folded into every preceding operation (attn c_proj and mlp c_proj
 * have none), so this plugin applies 1/s to the input row itself before quantizing it: k multiplies per
 * row, the same arithmetic as folding.
 *
 * Packed matrix: k floats 1/s_i, then per output j: float d_j (its weight scale), int32 sum_i q_ij (for the
 * unsigned-times-signed VNNI trick below), k int8 q_ij, so W_ij ~ d_j q_ij / s_i.
 * matmul: per input row, x'_i = x_i / s_i, a = max|x'|/127, u_i = round(x'_i / a) + 128 in 0..255;
 * vpdpbusd sums u_i * q_ij in int32 (AVX-512 VNNI), and sum_i (u_i - 128) q_ij = that - 128 * sum_i q_ij;
 * y_j += a d_j acc_j. The portable build computes the same integers, so both give the same bits.
 * The host calls matmul for prefill pieces too (KVP_CAP_MATMUL_PREFILL, SDK 1.5; before, prefill ran the
 * unpacked weights with fp32 activations, W8A16), so every token runs W8A8 however the prompt is split.
 * unpack (embedding rows, references): d_j q_ij / s_i as fp32. */
#include <kvp/kvp.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SQ_MAX_K 8192u /* inputs one matrix may have: a decode row is quantized into a stack buffer */

static const kvp_param params[] = {
    {.name = "alpha", .type = KVP_PARAM_FLOAT, .default_value = 0.5, .min_value = 0.0, .max_value = 1.0,
     .help = "migration strength: s_i = max|X_i|^alpha / max|W_i|^(1-alpha) (the paper's default 0.5)"},
    {.name = "lm_head", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "also hold the tied LM head (needs its input statistics in the calibration file)"},
};

typedef struct sq_state {
    float alpha;
    int vnni;
    const kvp_host *host;
} sq_state;

static size_t row_bytes(uint32_t k) { return 8u + k; }

static int sq_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    (void)layer;
    sq_state *st = host->alloc(host->ctx, sizeof *st);
    if (!st) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    st->alpha = (float)host->param(host->ctx, "alpha");
    st->host = host;
    st->vnni = 0;
#if defined(__x86_64__)
    const uint32_t level = KVP_HOST_HAS(host, cpu_level) ? host->cpu_level : KVP_CPU_PORTABLE;
    __builtin_cpu_init();
    st->vnni = level >= KVP_CPU_AVX512 && __builtin_cpu_supports("avx512vnni");
#endif
    out->state = st;
    out->budget = 1;
    return KVP_OK;
}

static void sq_destroy(void *state) {
    sq_state *st = state;
    if (st) st->host->free(st->host->ctx, st);
}

static size_t sq_packed_size(void *state, const kvp_weight_info *w) {
    sq_state *st = state;
    char msg[300];
    if (w->k == 0 || w->k % 32u || w->k > SQ_MAX_K) {
        snprintf(msg, sizeof msg, "%s of layer %u: %u inputs (smoothquant needs a multiple of 32, at most %u)",
                 kvp_matrix_name(w->which), (unsigned)w->layer, (unsigned)w->k, SQ_MAX_K);
        st->host->set_error(st->host->ctx, msg);
        return 0;
    }
    if (w->struct_size < offsetof(kvp_weight_info, act_absmax) + sizeof w->act_absmax || !w->act_absmax) {
        snprintf(msg, sizeof msg, "%s of layer %u: no calibration statistics. HINT: run `kvhost calibrate --model M "
                 "--text-file F --out stats.kvcal` and set [model] calibration = stats.kvcal",
                 kvp_matrix_name(w->which), (unsigned)w->layer);
        st->host->set_error(st->host->ctx, msg);
        return 0;
    }
    return (size_t)w->k * sizeof(float) + (size_t)w->n * row_bytes(w->k);
}

static int sq_pack(void *state, const kvp_weight_info *w, const float *src, uint32_t layout, void *dst) {
    sq_state *st = state;
    const uint32_t k = w->k, n = w->n;
    float *inv_s = dst;
    uint8_t *rows = (uint8_t *)dst + (size_t)k * sizeof(float);
#define W_AT(i, j) (layout == KVP_LAYOUT_OUT_MAJOR ? src[(size_t)(j) * k + (i)] : src[(size_t)(i) * n + (j)])
    /* per input: weight magnitude, then the smoothing factor */
    for (uint32_t i = 0; i < k; i++) {
        float wmax = 0.0f;
        for (uint32_t j = 0; j < n; j++) {
            const float v = W_AT(i, j);
            if (!isfinite(v)) {
                char msg[200];
                snprintf(msg, sizeof msg, "%s of layer %u: weight (input %u, output %u) is %g, not finite",
                         kvp_matrix_name(w->which), (unsigned)w->layer, (unsigned)i, (unsigned)j, (double)v);
                st->host->set_error(st->host->ctx, msg);
                return KVP_ERROR;
            }
            if (fabsf(v) > wmax) wmax = fabsf(v);
        }
        const float a = w->act_absmax[i];
        float s = 1.0f;
        if (isfinite(a) && a > 0.0f && wmax > 0.0f) s = powf(a, st->alpha) / powf(wmax, 1.0f - st->alpha);
        if (!(s >= 1e-5f && s <= 1e5f)) s = s > 1e5f ? 1e5f : 1e-5f; /* also catches NaN */
        inv_s[i] = 1.0f / s;
    }
    /* per output: the smoothed column s_i W_ij quantized symmetrically */
    for (uint32_t j = 0; j < n; j++) {
        uint8_t *row = rows + (size_t)j * row_bytes(k);
        float amax = 0.0f;
        for (uint32_t i = 0; i < k; i++) {
            const float v = fabsf(W_AT(i, j) / inv_s[i]);
            if (v > amax) amax = v;
        }
        const float d = amax / 127.0f, inv_d = d > 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        int8_t *q = (int8_t *)(row + 8);
        for (uint32_t i = 0; i < k; i++) {
            float r = roundf(W_AT(i, j) / inv_s[i] * inv_d);
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            q[i] = (int8_t)r;
            sum += q[i];
        }
        memcpy(row, &d, 4);
        memcpy(row + 4, &sum, 4);
    }
#undef W_AT
    return KVP_OK;
}

static void sq_unpack(void *state, const kvp_weight_info *w, const void *packed, uint32_t n0, uint32_t n1, float *dst) {
    (void)state;
    const uint32_t k = w->k;
    const float *inv_s = packed;
    const uint8_t *rows = (const uint8_t *)packed + (size_t)k * sizeof(float);
    for (uint32_t j = n0; j < n1; j++) {
        const uint8_t *row = rows + (size_t)j * row_bytes(k);
        float d;
        memcpy(&d, row, 4);
        const int8_t *q = (const int8_t *)(row + 8);
        for (uint32_t i = 0; i < k; i++) dst[(size_t)(j - n0) * k + i] = d * (float)q[i] * inv_s[i];
    }
}

/* One input row quantized: u_i = round(x_i / s_i / a) + 128; returns a (0 when the row is all zero). */
static float quantize_row(const float *x, const float *inv_s, uint32_t k, uint8_t *u) {
    float amax = 0.0f;
    for (uint32_t i = 0; i < k; i++) {
        const float v = fabsf(x[i] * inv_s[i]);
        if (v > amax) amax = v;
    }
    if (!(amax > 0.0f)) return 0.0f; /* zero row (or NaN, which the logits check reports) */
    const float a = amax / 127.0f, inv_a = 127.0f / amax;
    for (uint32_t i = 0; i < k; i++) {
        float r = roundf(x[i] * inv_s[i] * inv_a);
        r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
        u[i] = (uint8_t)((int)r + 128);
    }
    return a;
}

static int32_t dot_portable(const uint8_t *u, const int8_t *q, uint32_t k) {
    int32_t s = 0;
    for (uint32_t i = 0; i < k; i++) s += (int32_t)u[i] * q[i];
    return s;
}

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512Q __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
/* quantize_row with AVX-512, the same bits: the same products in the same order, max of |x / s| (a NaN
 * never becomes the maximum, as there), and roundf's half-away-from-zero rounding as trunc(|v|) + (the
 * fraction, exact, >= 0.5), the sign put back. */
AVX512Q static float quantize_row_avx512(const float *x, const float *inv_s, uint32_t k, uint8_t *u) {
    __m512 m = _mm512_setzero_ps();
    for (uint32_t i = 0; i < k; i += 16) /* k is a multiple of 32 */
        m = _mm512_max_ps(_mm512_abs_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(inv_s + i))), m);
    const float amax = _mm512_reduce_max_ps(m);
    if (!(amax > 0.0f)) return 0.0f;
    const float a = amax / 127.0f, inv_a = 127.0f / amax;
    const __m512 ia = _mm512_set1_ps(inv_a), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i off = _mm512_set1_epi32(128);
    for (uint32_t i = 0; i < k; i += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(inv_s + i)), ia);
        const __m512 av = _mm512_abs_ps(v);
        __m512 t = _mm512_roundscale_ps(av, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        t = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(_mm512_sub_ps(av, t), half, _CMP_GE_OQ), t, one);
        const __m512 r = _mm512_or_ps(t, _mm512_and_ps(v, _mm512_set1_ps(-0.0f))); /* v's sign back */
        const __m512 c = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        _mm_storeu_si128((__m128i *)(u + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(c), off)));
    }
    return a;
}
#endif

/* The integer sums of a tile: dp[r][o] = sum_i u_r[i] q_o[i] for RB rows (us bytes apart) and JB outputs. */
static void dots_portable(const uint8_t *u, size_t us, const int8_t *const *q, uint32_t k, int RB, int JB,
                          int32_t dp[4][4]) {
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) dp[r][o] = dot_portable(u + (size_t)r * us, q[o], k);
}

#if defined(__x86_64__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
/* The same with vpdpbusd: 64 products per instruction into one int32 vector per (row, output), every
 * weight vector used by RB rows and every row vector by JB outputs; a k % 64 tail of 32 as a 256-bit
 * vpdpbusd. Exact in int32, so the same sums as the portable build in any order. */
VNNI static inline __attribute__((always_inline)) void dots_tile_vnni(const uint8_t *u, size_t us, const int8_t *const *q,
                                                                     uint32_t k, int32_t dp[4][4], const int RB,
                                                                     const int JB) {
    __m512i acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) acc[r][o] = _mm512_setzero_si512();
    uint32_t i = 0;
    for (; i + 64 <= k; i += 64) {
        __m512i w[4];
        for (int o = 0; o < JB; o++) w[o] = _mm512_loadu_si512(q[o] + i);
        for (int r = 0; r < RB; r++) {
            const __m512i a = _mm512_loadu_si512(u + (size_t)r * us + i);
            for (int o = 0; o < JB; o++) acc[r][o] = _mm512_dpbusd_epi32(acc[r][o], a, w[o]);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int o = 0; o < JB; o++) dp[r][o] = _mm512_reduce_add_epi32(acc[r][o]);
    if (i < k) /* k is a multiple of 32 */
        for (int r = 0; r < RB; r++)
            for (int o = 0; o < JB; o++) {
                const __m256i t = _mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                      _mm256_loadu_si256((const __m256i *)(u + (size_t)r * us + i)),
                                                      _mm256_loadu_si256((const __m256i *)(q[o] + i)));
                __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
                h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
                dp[r][o] += _mm_cvtsi128_si32(h);
            }
}

VNNI static void dots_vnni(const uint8_t *u, size_t us, const int8_t *const *q, uint32_t k, int RB, int JB,
                           int32_t dp[4][4]) {
    if (JB == 4) switch (RB) {
        case 1: dots_tile_vnni(u, us, q, k, dp, 1, 4); return;
        case 2: dots_tile_vnni(u, us, q, k, dp, 2, 4); return;
        case 3: dots_tile_vnni(u, us, q, k, dp, 3, 4); return;
        default: dots_tile_vnni(u, us, q, k, dp, 4, 4); return;
        }
    for (int o = 0; o < JB; o++) { /* one output at a time: its column of dp as a [RB][4] array */
        int32_t(*col)[4] = (int32_t(*)[4]) & dp[0][o];
        switch (RB) {
        case 1: dots_tile_vnni(u, us, q + o, k, col, 1, 1); break;
        case 2: dots_tile_vnni(u, us, q + o, k, col, 2, 1); break;
        case 3: dots_tile_vnni(u, us, q + o, k, col, 3, 1); break;
        default: dots_tile_vnni(u, us, q + o, k, col, 4, 1); break;
        }
    }
}
#endif

/* Rows are quantized a chunk at a time: up to SQ_ROWS (decode) into a stack buffer, more (prefill) into
 * one heap buffer of as many rows as SQ_CHUNK_BYTES hold (or SQ_ROWS at a time when that allocation
 * fails). Within a chunk: four outputs at a time, for each the rows in tiles of four. Every (row, output)
 * is an exact integer sum finished by the one statement below, so a prefill row's products are its
 * decode products bit for bit, and the host may call matmul() for any number of rows
 * (KVP_CAP_MATMUL_PREFILL). */
#define SQ_ROWS 4u
#define SQ_CHUNK_BYTES ((size_t)512 << 10)

static void sq_matmul(void *state, const kvp_matmul_args *a) {
    const sq_state *st = state;
    const uint32_t k = a->w->k;
    const float *inv_s = a->packed;
    const uint8_t *rows = (const uint8_t *)a->packed + (size_t)k * sizeof(float);
    const size_t us = ((size_t)k + 63u) & ~(size_t)63u;
    uint8_t stack_u[SQ_ROWS * SQ_MAX_K] __attribute__((aligned(64)));
    float stack_ax[SQ_ROWS];
    uint8_t *u = stack_u;
    float *ax = stack_ax;
    uint32_t cap = SQ_ROWS;
    void *heap = NULL;
    if (a->rows > SQ_ROWS) {
        size_t c = SQ_CHUNK_BYTES / us;
        c = c < 16u ? 16u : c > 512u ? 512u : c;
        if (c > a->rows) c = a->rows;
        heap = malloc(c * (us + sizeof(float)));
        if (heap) {
            u = heap;
            ax = (float *)(u + c * us);
            cap = (uint32_t)c;
        }
    }
    for (uint32_t r0 = 0; r0 < a->rows; r0 += cap) {
        const uint32_t nr = a->rows - r0 < cap ? a->rows - r0 : cap;
        for (uint32_t r = 0; r < nr; r++) {
#if defined(__x86_64__)
            if (st->vnni) ax[r] = quantize_row_avx512(a->x + (size_t)(r0 + r) * k, inv_s, k, u + (size_t)r * us);
            else
#endif
                ax[r] = quantize_row(a->x + (size_t)(r0 + r) * k, inv_s, k, u + (size_t)r * us);
            if (ax[r] == 0.0f) memset(u + (size_t)r * us, 128, k); /* skipped below; keeps the sums defined */
        }
        for (uint32_t j0 = a->n0; j0 < a->n1; j0 += 4) {
            const int JB = a->n1 - j0 < 4 ? (int)(a->n1 - j0) : 4;
            const int8_t *q[4];
            float d[4];
            int32_t sum[4];
            for (int o = 0; o < JB; o++) {
                const uint8_t *row = rows + (size_t)(j0 + (uint32_t)o) * row_bytes(k);
                memcpy(&d[o], row, 4);
                memcpy(&sum[o], row + 4, 4);
                q[o] = (const int8_t *)(row + 8);
            }
            for (uint32_t t0 = 0; t0 < nr; t0 += 4) {
                const int RB = nr - t0 < 4 ? (int)(nr - t0) : 4;
                int32_t dp[4][4];
#if defined(__x86_64__)
                if (st->vnni) dots_vnni(u + (size_t)t0 * us, us, q, k, RB, JB, dp);
                else
#endif
                    dots_portable(u + (size_t)t0 * us, us, q, k, RB, JB, dp);
                for (int r = 0; r < RB; r++) {
                    if (ax[t0 + (uint32_t)r] == 0.0f) continue;
                    float *y = a->y + (size_t)(r0 + t0 + (uint32_t)r) * a->ldy;
                    for (int o = 0; o < JB; o++) y[j0 + (uint32_t)o] += ax[t0 + (uint32_t)r] * d[o] * (float)(dp[r][o] - 128 * sum[o]);
                }
            }
        }
    }
    free(heap);
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_WEIGHTS,
    .caps = KVP_CAP_MATMUL_PREFILL, /* W8A8 for every product, decode and prefill: no KVP_CAP_ACT_QUANT */
    .n_params = sizeof params / sizeof params[0],
    .name = "smoothquant",
    .version = "1.0",
    .summary = "SmoothQuant W8A8: per-input smoothing from calibration, int8 weights per output, int8 activations "
               "per token, int32 products (AVX-512 VNNI), decode and prefill",
    .params = params,
    .create = sq_create,
    .destroy = sq_destroy,
    .packed_size = sq_packed_size,
    .pack = sq_pack,
    .unpack = sq_unpack,
    .matmul = sq_matmul,
};

KVP_PLUGIN(descriptor)
