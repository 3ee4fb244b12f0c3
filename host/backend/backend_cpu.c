/* backend_cpu.c — the CPU backend: GPT-2 forward pass in fp32 with OpenBLAS for the projections and
 * MLP (sgemv for one row, host/backend/matmul_small.c for 2..kvh_matmul_small_max() rows — decode batches —,
 * sgemm above; OpenBLAS is loaded with kernels kvhost chose, host/backend/blas.h), vector GELU (host/backend/gelu.h), and
 * hand-written cache-friendly loops for LayerNorm and decode attention.
 * Owns: the activation workspace, the attention over the dense fp32 cache (with causal masking by
 * position and score accumulation), per-phase timing. Does not own: eviction or sampling. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend/backend.h"
#include "backend/blas.h"
#include "runtime/calibration.h"
#include "backend/gelu.h"
#include "kvp/kvp.h"
#include "backend/matmul_small.h"
#include "backend/softmax.h"
#include "runtime/plugin_guard.h"
#include "runtime/weights.h"

typedef struct cpu_workspace {
    size_t rows;      /* Ttot capacity of the activation buffers */
    float *x;         /* [Ttot, C] residual stream */
    float *xn;        /* [Ttot, C] normalized input of a sub-layer */
    float *qkv;       /* [Ttot, 3C] */
    float *att;       /* [Ttot, C] attention output before projection */
    float *h;         /* [Ttot, F] MLP hidden */
    int32_t *pos;     /* [Ttot] positions of the new tokens */
    size_t scores_cap;/* per-thread score scratch capacity (floats) */
    float *scores;    /* [threads, scores_cap] */
    float *panel;     /* [threads, panel_cap]: weight-format columns unpacked for a GEMM */
    size_t panel_cap; /* floats per thread */
    char *gather;     /* [threads, gather_cap]: a paged head's K and V slots as contiguous runs */
    size_t gather_cap;/* bytes per thread */
    int n_threads;
} cpu_workspace;

static void workspace_free(cpu_workspace *w) {
    free(w->x);
    free(w->xn);
    free(w->qkv);
    free(w->att);
    free(w->h);
    free(w->pos);
    free(w->scores);
    free(w->panel);
    free(w->gather);
    memset(w, 0, sizeof *w);
}

static int workspace_reserve(cpu_workspace *w, const kvh_model_config *cfg, size_t rows, size_t score_floats,
                             kvh_err *err) {
    if (rows > w->rows) {
        size_t C = (size_t)cfg->n_embd, F = (size_t)cfg->n_inner;
        float *x = realloc(w->x, rows * C * sizeof(float));
        if (x) w->x = x;
        float *xn = realloc(w->xn, rows * C * sizeof(float));
        if (xn) w->xn = xn;
        float *qkv = realloc(w->qkv, rows * 3 * C * sizeof(float));
        if (qkv) w->qkv = qkv;
        float *att = realloc(w->att, rows * C * sizeof(float));
        if (att) w->att = att;
        float *h = realloc(w->h, rows * F * sizeof(float));
        if (h) w->h = h;
        int32_t *pos = realloc(w->pos, rows * sizeof(int32_t));
        if (pos) w->pos = pos;
        if (!x || !xn || !qkv || !att || !h || !pos)
            return kvh_fail(err, "cpu backend: out of memory for activations of %zu tokens", rows);
        w->rows = rows;
    }
    if (score_floats > w->scores_cap) {
        float *s = realloc(w->scores, score_floats * (size_t)w->n_threads * sizeof(float));
        if (!s) return kvh_fail(err, "cpu backend: out of memory for attention scratch (%zu floats)", score_floats);
        w->scores = s;
        w->scores_cap = score_floats;
    }
    return 0;
}

/* Paged caches: room for one head's slots (max_ctx of the widest layer's K + V) per thread; layers whose
 * store lets the host decode its slots for a prefill (KVP_STORE_DECODE_ATTEND), paged or not: room for
 * them decoded to fp32. */
static int workspace_reserve_gather(cpu_workspace *w, const kvh_kvcache *cache, size_t max_ctx, kvh_err *err) {
    size_t widest = 0;
    for (int l = 0; l < cache->n_layer; l++) {
        size_t b = cache->block_slots ? (size_t)kvh_kvcache_k_slot_bytes(cache, l) + kvh_kvcache_v_slot_bytes(cache, l) : 0;
        if (cache->layer[l].store && (cache->layer[l].store_flags & KVP_STORE_DECODE_ATTEND)) {
            const size_t dec = (size_t)2 * (size_t)cache->head_dim * sizeof(float);
            if (dec > b) b = dec;
        }
        if (b > widest) widest = b;
    }
    if (widest == 0) return 0;
    const size_t need = max_ctx * widest;
    if (need <= w->gather_cap) return 0;
    char *g = realloc(w->gather, need * (size_t)w->n_threads);
    if (!g) return kvh_fail(err, "cpu backend: out of memory for paged-attention scratch (%zu bytes)", need);
    w->gather = g;
    w->gather_cap = need;
    return 0;
}

/* A thread unpacks a weight format's columns for sgemm (prefill) in panels of up to PANEL_FLOATS fp32
 * values (8 MiB: 2048 columns of 1024 inputs, 512 of 4096), reused for every panel. Wide panels matter:
 * sgemm packs the activation rows again on every call, and with 64-column panels that repacking made a
 * 512-token prefill 25-40% slower than fp32 (docs/results/weights). */
#define PANEL_FLOATS ((size_t)1 << 21)
#define PANEL_MIN_COLS 16

/* ---- small kernels ------------------------------------------------------------------------------ */

/* out[t] = LayerNorm(in[t]) * w + b for T rows of C. */
static void layernorm(float *out, const float *in, const float *w, const float *b, int T, int C, float eps) {
#pragma omp parallel for if (T > 4)
    for (int t = 0; t < T; t++) {
        const float *x = in + (size_t)t * C;
        float *y = out + (size_t)t * C;
        float mean = 0.0f;
        for (int i = 0; i < C; i++) mean += x[i];
        mean /= (float)C;
        float var = 0.0f;
        for (int i = 0; i < C; i++) {
            float d = x[i] - mean;
            var += d * d;
        }
        var /= (float)C;
        float rstd = 1.0f / sqrtf(var + eps);
        for (int i = 0; i < C; i++) y[i] = (x[i] - mean) * rstd * w[i] + b[i];
    }
}

/* Splits [0, n) into equal chunks (multiples of 16 columns, for whole cache lines) and returns this
 * thread's share. OpenBLAS runs single-threaded inside each chunk: one OpenMP pool does all the
 * threading, so BLAS threads and OpenMP threads never spin against each other on the same cores. */
static void thread_range(int n, int *lo, int *hi) {
    int nt = 1, tid = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads();
    tid = omp_get_thread_num();
#endif
    int chunk = (n + nt - 1) / nt;
    chunk = (chunk + 15) & ~15;
    *lo = tid * chunk < n ? tid * chunk : n;
    *hi = *lo + chunk < n ? *lo + chunk : n;
}

/* y[T, N] += x[T, K] · W over output columns [n0, n1) of a weight-format matrix: the plugin's own product
 * for a few rows (decode) or for any number when the format declares KVP_CAP_MATMUL_PREFILL (w8/w4's
 * integer products), else panels of columns unpacked to fp32 ([cols, K], output-major, as many as
 * panel_cap floats hold) and multiplied by sgemm (prefill), which the unpack cost does not dominate at
 * many rows. */
static void packed_range(const kvh_blas *blas, const kvh_packed_matrix *pm, float *y, size_t ldy, const float *x,
                         int T, int n0, int n1, float beta, float *panel, size_t panel_cap, int small_max) {
    const int K = (int)pm->info.k;
    if (T <= small_max || (pm->desc->caps & KVP_CAP_MATMUL_PREFILL)) {
        if (beta == 0.0f)
            for (int t = 0; t < T; t++) memset(y + (size_t)t * ldy + n0, 0, (size_t)(n1 - n0) * sizeof(float));
        kvp_matmul_args a = {.struct_size = sizeof a, .w = &pm->info, .packed = pm->packed, .x = x,
                             .rows = (uint32_t)T, .n0 = (uint32_t)n0, .n1 = (uint32_t)n1, .y = y, .ldy = ldy};
        kvh_plugin_guard_enter(pm->desc->name, pm->file, "matmul", (int)pm->info.layer);
        pm->desc->matmul(pm->state, &a);
        kvh_plugin_guard_leave();
        return;
    }
    const int cols = (int)(panel_cap / (size_t)K) & ~(PANEL_MIN_COLS - 1);
    for (int c0 = n0; c0 < n1; c0 += cols) {
        const int c1 = c0 + cols < n1 ? c0 + cols : n1;
        kvh_plugin_guard_enter(pm->desc->name, pm->file, "unpack", (int)pm->info.layer);
        pm->desc->unpack(pm->state, &pm->info, pm->packed, (uint32_t)c0, (uint32_t)c1, panel);
        kvh_plugin_guard_leave();
        blas->sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, c1 - c0, K, 1.0f, x, K, panel, K, beta, y + c0,
                    (int)ldy);
    }
}

/* y[T, N] = x[T, K] · W[K, N] + bias[N] (+ y when accumulate: the residual add fused into the GEMM).
 * W is the model's fp32 matrix, or pm's packed form when a weight format holds it (pm != NULL). */
static void linear(const kvh_blas *blas, cpu_workspace *ws, const kvh_packed_matrix *pm, float *y, const float *x,
                   const float *W, const float *bias, int T, int K, int N, int accumulate) {
    const int small_max = kvh_matmul_small_max();
#pragma omp parallel
    {
        int n0, n1;
        thread_range(N, &n0, &n1);
        if (n1 > n0) {
            const int w = n1 - n0;
            for (int t = 0; t < T; t++) {
                float *row = y + (size_t)t * N + n0;
                if (accumulate)
                    for (int n = 0; n < w; n++) row[n] += bias[n0 + n];
                else
                    memcpy(row, bias + n0, (size_t)w * sizeof(float));
            }
            if (pm) {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                packed_range(blas, pm, y, (size_t)N, x, T, n0, n1, 1.0f, ws->panel + (size_t)tid * ws->panel_cap,
                             ws->panel_cap, small_max);
            } else if (T == 1)
                blas->sgemv(CblasRowMajor, CblasTrans, K, w, 1.0f, W + n0, N, x, 1, 1.0f, y + n0, 1);
            else if (T <= small_max) /* sgemm would repack the whole weight: see matmul_small.h */
                kvh_matmul_small(y, (size_t)N, x, W, T, K, N, n0, n1);
            else
                blas->sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, w, K, 1.0f, x, K, W + n0, N, 1.0f, y + n0, N);
        }
    }
}

/* logits[R, V] = xn[R, C] · wte[V, C]^T: the tied LM head, split over vocabulary rows. */
static void lm_head(const kvh_blas *blas, cpu_workspace *ws, const kvh_packed_matrix *pm, float *logits, const float *xn,
                    const float *wte, int R, int C, int V) {
    const int small_max = kvh_matmul_small_max();
#pragma omp parallel
    {
        int v0, v1;
        thread_range(V, &v0, &v1);
        if (v1 > v0) {
            if (pm) {
                int tid = 0;
#ifdef _OPENMP
                tid = omp_get_thread_num();
#endif
                packed_range(blas, pm, logits, (size_t)V, xn, R, v0, v1, 0.0f, ws->panel + (size_t)tid * ws->panel_cap,
                             ws->panel_cap, small_max);
            } else if (R == 1)
                blas->sgemv(CblasRowMajor, CblasNoTrans, v1 - v0, C, 1.0f, wte + (size_t)v0 * C, C, xn, 1, 0.0f,
                            logits + v0, 1);
            else if (R <= small_max)
                kvh_matmul_small_t(logits, (size_t)V, xn, wte, R, C, v0, v1);
            else
                blas->sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, R, v1 - v0, C, 1.0f, xn, C, wte + (size_t)v0 * C, C,
                            0.0f, logits + v0, V);
        }
    }
}

/* GELU over n floats (host/backend/gelu.c), in equal pieces per thread for long arrays (prefill). */
static void gelu_inplace(float *x, size_t n) {
    if (n <= 65536) {
        kvh_gelu(x, n);
        return;
    }
#pragma omp parallel
    {
        int lo, hi;
        thread_range((int)(n / 16), &lo, &hi); /* in 16-float units: whole vectors per thread */
        size_t end = (size_t)hi * 16 == (n / 16) * 16 ? n : (size_t)hi * 16;
        if (end > (size_t)lo * 16) kvh_gelu(x + (size_t)lo * 16, end - (size_t)lo * 16);
    }
}

/* Adds one query's attention probabilities to the head's accumulators as the layer asks. */
static void accumulate_scores(kvh_head_cache *hc, const kvh_layer_policy_settings *ls, bool in_prefill, int t, int T,
                              const float *probs) {
    const uint32_t n = hc->n;
    if (hc->score && ((in_prefill && ls->prefill_scores) || (!in_prefill && ls->decode_scores)))
        for (uint32_t j = 0; j < n; j++) hc->score[j] += probs[j];
    if (hc->obs_score && in_prefill && T - t <= (int)ls->obs_window)
        for (uint32_t j = 0; j < n; j++) hc->obs_score[j] += probs[j];
    if (hc->report) { /* the policy's score_report (ABI 1.3): column sums + the last rows, see kvcache.h */
        const int R = T < (int)ls->report_rows ? T : (int)ls->report_rows;
        float *col = kvh_report_col(hc);
        if (T > 1) {
            if (t == 0) memcpy(col, probs, (size_t)n * sizeof(float));
            else
                for (uint32_t j = 0; j < n; j++) col[j] += probs[j];
        }
        if (t >= T - R) memcpy(kvh_report_row(hc, T, (uint32_t)(t - (T - R))), probs, (size_t)n * sizeof(float));
    }
}

/* Softmax numerators in place: x[j] = exp(x[j] - mx), 0 for masked (-inf) entries; returns 1 / their sum
 * (a query always sees at least itself, so the sum is positive). Vectorised in softmax.c. */
static float exp_and_sum(float *x, uint32_t n, float mx) { return 1.0f / kvh_softmax_exp_sum(x, n, mx); }

/* Attention of T queries through a store plugin: it reads K/V in their stored form. */
static void attend_head_store(const kvh_kvcache *cache, int l, const float *q, size_t q_stride, const int32_t *qpos,
                              int T, kvh_head_cache *hc, int HS, const kvh_layer_policy_settings *ls, bool in_prefill,
                              float *out, size_t out_stride, float *probs, char *gather) {
    const void *k_slots = hc->k, *v_slots = hc->v;
    if (cache->block_slots) { /* the hook reads one run of slots: hand it a contiguous copy */
        const size_t kb = kvh_kvcache_k_slot_bytes(cache, l);
        kvh_kvcache_gather(cache, l, hc, gather, gather + (size_t)hc->n * kb);
        k_slots = gather;
        v_slots = gather + (size_t)hc->n * kb;
    }
    kvp_attend_args a = {.struct_size = sizeof a,
                         .head_dim = (uint32_t)HS,
                         .n = hc->n,
                         .scale = 1.0f / sqrtf((float)HS),
                         .pos = hc->pos,
                         .k_slots = k_slots,
                         .v_slots = v_slots,
                         .probs = probs};
    kvh_plugin_guard_enter(ls->store->name, kvh_plugin_site_of(ls->store_fail_ctx)->file, "attend",
                           kvh_plugin_site_of(ls->store_fail_ctx)->layer);
    for (int t = 0; t < T; t++) {
        a.q = q + (size_t)t * q_stride;
        a.q_pos = qpos[t];
        a.out = out + (size_t)t * out_stride;
        ls->store->attend(ls->store_state, &a);
        accumulate_scores(hc, ls, in_prefill, t, T, probs);
    }
    kvh_plugin_guard_leave();
}

/* Attention of T new queries (rows of q with stride q_stride, positions qpos[T]) over one head's cache.
 * Slots whose position is beyond a query's position are masked (causal). Writes out rows (stride
 * out_stride). scores: scratch of n floats. Adds probabilities to the head's accumulators as asked. */
static void attend_head(const kvh_kvcache *cache, int l, const float *q, size_t q_stride, const int32_t *qpos, int T,
                        kvh_head_cache *hc, int HS, const kvh_layer_policy_settings *ls, bool in_prefill, float *out,
                        size_t out_stride, float *scores) {
    const float scale = 1.0f / sqrtf((float)HS);
    const uint32_t n = hc->n, spans = kvh_head_spans(cache, hc);
    for (int t = 0; t < T; t++) {
        const float *qt = q + (size_t)t * q_stride;
        const int32_t p = qpos[t];
        float mx = -INFINITY;
        /* Slots in spans (one for contiguous slots, a block each when paged), in slot order, so both
         * layouts do the same arithmetic in the same order. */
        for (uint32_t b = 0, j0 = 0; b < spans; b++) {
            const char *kc, *vc;
            const uint32_t cnt = kvh_head_span(cache, l, hc, b, &kc, &vc);
            const float *K = (const float *)kc;
            for (uint32_t i = 0; i < cnt; i++) {
                const uint32_t j = j0 + i;
                if (hc->pos[j] > p) {
                    scores[j] = -INFINITY;
                    continue;
                }
                const float s = kvh_dot_lanes8(qt, K + (size_t)i * HS, HS) * scale;
                scores[j] = s;
                if (s > mx) mx = s;
            }
            j0 += cnt;
        }
        const float inv = exp_and_sum(scores, n, mx);
        float *o = out + (size_t)t * out_stride;
        for (int d = 0; d < HS; d++) o[d] = 0.0f;
        for (uint32_t b = 0, j0 = 0; b < spans; b++) {
            const char *kc, *vc;
            const uint32_t cnt = kvh_head_span(cache, l, hc, b, &kc, &vc);
            const float *Vd = (const float *)vc;
            for (uint32_t i = 0; i < cnt; i++) {
                const uint32_t j = j0 + i;
                const float pj = scores[j] * inv;
                scores[j] = pj;
                if (pj == 0.0f) continue;
                const float *vj = Vd + (size_t)i * HS;
                for (int d = 0; d < HS; d++) o[d] += pj * vj[d];
            }
            j0 += cnt;
        }
        accumulate_scores(hc, ls, in_prefill, t, T, scores);
    }
}

/* Queries per block of the GEMM prefill path: its score scratch is PREFILL_BLOCK x n floats per thread. */
#define PREFILL_BLOCK 64

/* attend_head for a prefill block on the dense fp32 layout, with two GEMMs per block of queries:
 * S = scale * Q K^T (rows: queries, columns: slots), causal mask by position, row softmax (probabilities
 * go to the score accumulators as in attend_head), then O = P V. Same result as attend_head up to fp32
 * summation order; it never holds more than PREFILL_BLOCK x n scores. */
static void attend_head_gemm(const kvh_blas *blas, const kvh_kvcache *cache, int l, const float *q, size_t q_stride,
                             const int32_t *qpos, int T, kvh_head_cache *hc, int HS, const kvh_layer_policy_settings *ls,
                             float *out, size_t out_stride, float *scratch, char *gather) {
    const float scale = 1.0f / sqrtf((float)HS);
    const int n = (int)hc->n;
    const float *K = hc->k, *Vd = hc->v;
    if (ls->store) {
        /* A store that allows it (KVP_STORE_DECODE_ATTEND): its slots decoded to fp32 once for the T
         * queries, where attend() would read every slot T times. Slot order, as attend_head walks them. */
        float *kd = (float *)gather, *vd = (float *)gather + (size_t)n * HS;
        const uint32_t spans = kvh_head_spans(cache, hc);
        const size_t kb = kvh_kvcache_k_slot_bytes(cache, l), vb = kvh_kvcache_v_slot_bytes(cache, l);
        kvh_plugin_guard_enter(ls->store->name, kvh_plugin_site_of(ls->store_fail_ctx)->file, "decode", l);
        for (uint32_t b = 0, j0 = 0; b < spans; b++) {
            const char *kc, *vc;
            const uint32_t cnt = kvh_head_span(cache, l, hc, b, &kc, &vc);
            for (uint32_t i = 0; i < cnt; i++) {
                ls->store->decode(ls->store_state, KVP_WHICH_K, kc + (size_t)i * kb, kd + (size_t)(j0 + i) * HS);
                ls->store->decode(ls->store_state, KVP_WHICH_V, vc + (size_t)i * vb, vd + (size_t)(j0 + i) * HS);
            }
            j0 += cnt;
        }
        kvh_plugin_guard_leave();
        K = kd;
        Vd = vd;
    } else if (cache->block_slots) {
        /* Paged: the GEMMs want K and V as matrices; a copy costs n*HS against the T*n*HS of the products. */
        const size_t kb = kvh_kvcache_k_slot_bytes(cache, l);
        kvh_kvcache_gather(cache, l, hc, gather, gather + (size_t)n * kb);
        K = (const float *)gather;
        Vd = (const float *)(gather + (size_t)n * kb);
    }
    for (int t0 = 0; t0 < T; t0 += PREFILL_BLOCK) {
        const int tb = T - t0 < PREFILL_BLOCK ? T - t0 : PREFILL_BLOCK;
        blas->sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, tb, n, HS, scale, q + (size_t)t0 * q_stride,
                    (int)q_stride, K, HS, 0.0f, scratch, n);
        for (int i = 0; i < tb; i++) {
            float *row = scratch + (size_t)i * n;
            const int32_t p = qpos[t0 + i];
            float mx = -INFINITY;
            for (int j = 0; j < n; j++) {
                if (hc->pos[j] > p) row[j] = -INFINITY;
                else if (row[j] > mx) mx = row[j];
            }
            const float inv = exp_and_sum(row, (uint32_t)n, mx);
            for (int j = 0; j < n; j++) row[j] *= inv;
            accumulate_scores(hc, ls, true, t0 + i, T, row);
        }
        blas->sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, tb, HS, n, 1.0f, scratch, n, Vd, HS, 0.0f,
                    out + (size_t)t0 * out_stride, (int)out_stride);
    }
}

/* Writes T new tokens' K and V (rows of a [T, 3C] qkv matrix) into the slots just appended to every head
 * of (s, l): a plain copy for the dense fp32 layout, the store's append hook (ABI 1.2) or its per-row
 * encoder otherwise. */
static int write_new_slots(kvh_kvcache *cache, int s, int l, int T, const float *k_rows, const float *v_rows,
                           size_t row_stride, char *gather, kvh_err *err) {
    const int HS = cache->head_dim;
    const kvh_layer_policy_settings *ls = &cache->layer[l];
    const size_t kb = kvh_kvcache_k_slot_bytes(cache, l);
    for (int h = 0; h < cache->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(cache, s, l, h);
        uint32_t first = hc->n - (uint32_t)T;
        if (ls->store && ls->store->append) {
            /* Paged: the hook sees the head's slots as one run (it may rewrite earlier ones: KIVI's groups),
             * which goes back into the blocks afterwards; a self-contained store writes only the new ones,
             * so only they are copied back (the older bytes of the run are not read). */
            const bool own = (ls->store_flags & KVP_STORE_SELF_CONTAINED) != 0;
            void *k_slots = hc->k, *v_slots = hc->v;
            if (cache->block_slots) {
                k_slots = gather;
                v_slots = gather + (size_t)hc->n * kb;
                if (!own) kvh_kvcache_gather(cache, l, hc, k_slots, v_slots);
            }
            kvp_append_args a = {.struct_size = sizeof a,
                                 .seq = (uint32_t)s,
                                 .head = (uint32_t)h,
                                 .head_dim = (uint32_t)HS,
                                 .n_new = (uint32_t)T,
                                 .first_slot = first,
                                 .pos = hc->pos,
                                 .k_rows = k_rows + (size_t)h * HS,
                                 .v_rows = v_rows + (size_t)h * HS,
                                 .row_stride = row_stride,
                                 .k_slots = k_slots,
                                 .v_slots = v_slots};
            kvh_plugin_guard_enter(ls->store->name, kvh_plugin_site_of(ls->store_fail_ctx)->file, "append", l);
            int rc = ls->store->append(ls->store_state, &a);
            kvh_plugin_guard_leave();
            if (rc != KVP_OK) {
                if (ls->store_fail) return ls->store_fail(ls->store_fail_ctx, s, h, "append", err);
                return kvh_fail(err, "store '%s' layer %d seq %d head %d: append failed", ls->store->name, l, s, h);
            }
            if (cache->block_slots && kvh_kvcache_scatter(cache, l, hc, own ? first : 0, k_slots, v_slots, err) != 0)
                return -1;
            continue;
        }
        for (int t = 0; t < T; t++) {
            const float *kr = k_rows + (size_t)t * row_stride + (size_t)h * HS;
            const float *vr = v_rows + (size_t)t * row_stride + (size_t)h * HS;
            char *kd = kvh_slot_k(cache, l, hc, first + (uint32_t)t);
            char *vd = kvh_slot_v(cache, l, hc, first + (uint32_t)t);
            if (ls->store) {
                kvh_plugin_guard_enter(ls->store->name, kvh_plugin_site_of(ls->store_fail_ctx)->file, "encode", l);
                ls->store->encode(ls->store_state, KVP_WHICH_K, kr, kd);
                ls->store->encode(ls->store_state, KVP_WHICH_V, vr, vd);
                kvh_plugin_guard_leave();
            } else {
                memcpy(kd, kr, (size_t)HS * sizeof(float));
                memcpy(vd, vr, (size_t)HS * sizeof(float));
            }
        }
    }
    return 0;
}

/* ---- the forward pass --------------------------------------------------------------------------- */

typedef struct cpu_backend {
    cpu_workspace ws;
    const kvh_blas *blas;
} cpu_backend;

static int cpu_forward(kvh_backend *be, kvh_kvcache *cache, const kvh_batch *batch, float *logits, kvh_err *err) {
    cpu_backend *cb = be->impl;
    cpu_workspace *ws = &cb->ws;
#ifdef _OPENMP
    /* The thread count is an OpenMP setting of the calling thread: set it on whichever thread runs the
     * forward (kvhost serve's engine thread is not the one that created the backend), so teams never
     * outnumber the per-thread scratch sized for ws->n_threads. */
    omp_set_num_threads(ws->n_threads < be->threads ? ws->n_threads : be->threads);
#endif
    const kvh_blas *blas = cb->blas;
    const kvh_model *m = be->model;
    const kvh_model_config *cfg = &m->cfg;
    const int C = cfg->n_embd, NH = cfg->n_head, HS = C / NH, F = cfg->n_inner, V = cfg->n_vocab;
    const int L = cfg->n_layer;

    /* Validate the batch and lay its tokens out as rows 0..Ttot-1. */
    size_t Ttot = 0;
    size_t max_ctx = 0;
    for (int b = 0; b < batch->n; b++) {
        int s = batch->seq[b];
        if (s < 0 || s >= cache->n_seq) return kvh_fail(err, "batch entry %d: sequence %d out of range", b, s);
        int T = batch->n_tokens[b];
        if (T < 1) return kvh_fail(err, "batch entry %d: no tokens", b);
        if ((int64_t)cache->next_pos[s] + T > cfg->n_positions)
            return kvh_fail(err,
                            "sequence %d would reach position %lld, past n_positions %d (the model's learned position "
                            "table ends there)",
                            s, (long long)cache->next_pos[s] + T, cfg->n_positions);
        for (int t = 0; t < T; t++) {
            int32_t id = batch->tokens[b][t];
            if (id < 0 || id >= V) return kvh_fail(err, "batch entry %d: token id %d out of range [0, %d)", b, id, V);
        }
        Ttot += (size_t)T;
        size_t ctx = 0;
        for (int l = 0; l < L; l++) {
            uint32_t mx = 0;
            for (int h = 0; h < NH; h++) {
                uint32_t n = kvh_kvcache_head(cache, s, l, h)->n;
                if (n > mx) mx = n;
            }
            if (mx > ctx) ctx = mx;
        }
        if (ctx + (size_t)T > max_ctx) max_ctx = ctx + (size_t)T;
    }
    /* score scratch per thread: one query's n scores, or a GEMM block's PREFILL_BLOCK x n */
    size_t max_T = 0;
    for (int b = 0; b < batch->n; b++)
        if ((size_t)batch->n_tokens[b] > max_T) max_T = (size_t)batch->n_tokens[b];
    size_t block = max_T > 1 ? (max_T < PREFILL_BLOCK ? max_T : PREFILL_BLOCK) : 1;
    if (workspace_reserve(ws, cfg, Ttot, max_ctx * block, err) != 0) return -1;
    if (workspace_reserve_gather(ws, cache, max_ctx, err) != 0) return -1;
    if (be->weights && !ws->panel) { /* weight formats' panels: sized once; no larger than the widest matrix */
        const size_t kmax = (size_t)(F > C ? F : C), nmax = (size_t)(V > F ? V : F);
        size_t cap = PANEL_FLOATS < kmax * nmax ? PANEL_FLOATS : kmax * nmax;
        if (cap < kmax * PANEL_MIN_COLS) cap = kmax * PANEL_MIN_COLS;
        ws->panel = malloc((size_t)ws->n_threads * cap * sizeof(float));
        if (!ws->panel) return kvh_fail(err, "cpu backend: out of memory for weight-format panels");
        ws->panel_cap = cap;
    }

    const kvh_weight_set *wset = be->weights;
    const kvh_packed_matrix *head = kvh_weights_matrix(wset, L, KVP_MAT_LM_HEAD);
    uint64_t t0 = kvh_now_ns();
    /* Embedding: x[t] = wte[token] + wpe[position]. */
    {
        size_t row = 0;
        for (int b = 0; b < batch->n; b++) {
            int s = batch->seq[b];
            for (int t = 0; t < batch->n_tokens[b]; t++, row++) {
                int32_t id = batch->tokens[b][t];
                int32_t p = cache->next_pos[s] + t;
                ws->pos[row] = p;
                const float *pe = m->wpe + (size_t)p * C;
                float *x = ws->x + row * C;
                if (head) { /* the tied LM head is packed: the embedding row comes from the same values */
                    kvh_plugin_guard_enter(head->desc->name, head->file, "unpack", L);
                    head->desc->unpack(head->state, &head->info, head->packed, (uint32_t)id, (uint32_t)id + 1, x);
                    kvh_plugin_guard_leave();
                    for (int i = 0; i < C; i++) x[i] += pe[i];
                } else {
                    const float *te = m->wte + (size_t)id * C;
                    for (int i = 0; i < C; i++) x[i] = te[i] + pe[i];
                }
            }
        }
    }
    uint64_t t1 = kvh_now_ns();
    be->times.embed += t1 - t0;

    const int T_all = (int)Ttot;
    for (int l = 0; l < L; l++) {
        const kvh_layer_weights *w = &m->layers[l];
        const kvh_layer_policy_settings *ls = &cache->layer[l];
        uint64_t a0 = kvh_now_ns();
        layernorm(ws->xn, ws->x, w->ln1_w, w->ln1_b, T_all, C, cfg->ln_eps);
        if (be->calibration) kvh_calibration_observe(be->calibration, l, KVP_MAT_ATTN_QKV, ws->xn, T_all, C);
        linear(blas, ws, kvh_weights_matrix(wset, l, KVP_MAT_ATTN_QKV), ws->qkv, ws->xn, w->attn_w, w->attn_b, T_all, C,
               3 * C, 0);
        uint64_t a1 = kvh_now_ns();

        /* Append this step's K/V, then attend over the cache. */
        size_t row0 = 0;
        for (int b = 0; b < batch->n; b++) {
            int s = batch->seq[b];
            int T = batch->n_tokens[b];
            if (kvh_kvcache_reserve(cache, s, l, (uint32_t)T, err) != 0) return -1;
            kvh_kvcache_append_meta(cache, s, l, T, ws->pos + row0);
            if (write_new_slots(cache, s, l, T, ws->qkv + row0 * 3 * C + C, ws->qkv + row0 * 3 * C + 2 * C,
                                (size_t)3 * C, ws->gather, err) != 0)
                return -1;
            if (ls->policy_insert && ls->policy_insert(ls->policy_ctx, cache, s, l, T, err) != 0) return -1;
            row0 += (size_t)T;
        }
        /* Work items: (entry, head). Entry row offsets computed up front so items are independent. */
        int n_items = batch->n * NH;
#pragma omp parallel
        {
            int tid = 0;
#ifdef _OPENMP
            tid = omp_get_thread_num();
#endif
            float *scratch = ws->scores + (size_t)tid * ws->scores_cap;
            char *gather = ws->gather ? ws->gather + (size_t)tid * ws->gather_cap : NULL;
#pragma omp for schedule(dynamic, 1)
            for (int item = 0; item < n_items; item++) {
                int b = item / NH, h = item % NH;
                size_t r0 = 0;
                for (int bb = 0; bb < b; bb++) r0 += (size_t)batch->n_tokens[bb];
                int s = batch->seq[b];
                int T = batch->n_tokens[b];
                kvh_head_cache *hc = kvh_kvcache_head(cache, s, l, h);
                if (ls->store && !(T > 1 && (ls->store_flags & KVP_STORE_DECODE_ATTEND)))
                    attend_head_store(cache, l, ws->qkv + r0 * 3 * C + (size_t)h * HS, (size_t)3 * C, ws->pos + r0, T, hc,
                                      HS, ls, T > 1, ws->att + r0 * C + (size_t)h * HS, (size_t)C, scratch, gather);
                else if (T > 1)
                    attend_head_gemm(blas, cache, l, ws->qkv + r0 * 3 * C + (size_t)h * HS, (size_t)3 * C, ws->pos + r0, T,
                                     hc, HS, ls, ws->att + r0 * C + (size_t)h * HS, (size_t)C, scratch, gather);
                else
                    attend_head(cache, l, ws->qkv + r0 * 3 * C + (size_t)h * HS, (size_t)3 * C, ws->pos + r0, T, hc, HS,
                                ls, T > 1, ws->att + r0 * C + (size_t)h * HS, (size_t)C, scratch);
            }
        }
        if (ls->report) { /* the policy sees this step's rows before any eviction (kvp.h: call order) */
            size_t rr = 0;
            for (int b = 0; b < batch->n; b++) {
                if (ls->policy_report(ls->policy_ctx, cache, batch->seq[b], l, batch->n_tokens[b], ws->pos + rr, err) != 0)
                    return -1;
                rr += (size_t)batch->n_tokens[b];
            }
        }
        uint64_t a2 = kvh_now_ns();
        if (be->calibration) kvh_calibration_observe(be->calibration, l, KVP_MAT_ATTN_PROJ, ws->att, T_all, C);
        linear(blas, ws, kvh_weights_matrix(wset, l, KVP_MAT_ATTN_PROJ), ws->x, ws->att, w->proj_w, w->proj_b, T_all, C,
               C, 1);
        uint64_t a3 = kvh_now_ns();

        layernorm(ws->xn, ws->x, w->ln2_w, w->ln2_b, T_all, C, cfg->ln_eps);
        if (be->calibration) kvh_calibration_observe(be->calibration, l, KVP_MAT_MLP_FC, ws->xn, T_all, C);
        linear(blas, ws, kvh_weights_matrix(wset, l, KVP_MAT_MLP_FC), ws->h, ws->xn, w->fc_w, w->fc_b, T_all, C, F, 0);
        gelu_inplace(ws->h, (size_t)T_all * F);
        if (be->calibration) kvh_calibration_observe(be->calibration, l, KVP_MAT_MLP_PROJ, ws->h, T_all, F);
        linear(blas, ws, kvh_weights_matrix(wset, l, KVP_MAT_MLP_PROJ), ws->x, ws->h, w->fcproj_w, w->fcproj_b, T_all, F,
               C, 1);
        uint64_t a4 = kvh_now_ns();
        be->times.attn_proj += (a1 - a0) + (a3 - a2);
        be->times.attn_core += a2 - a1;
        be->times.mlp += a4 - a3;
    }

    uint64_t h0 = kvh_now_ns();
    /* Final LayerNorm and tied LM head on the rows whose logits are wanted. */
    if (batch->all_logits) {
        layernorm(ws->xn, ws->x, m->lnf_w, m->lnf_b, T_all, C, cfg->ln_eps);
        if (be->calibration) kvh_calibration_observe(be->calibration, L, KVP_MAT_LM_HEAD, ws->xn, T_all, C);
        lm_head(blas, ws, head, logits, ws->xn, m->wte, T_all, C, V);
    } else {
        size_t row = 0;
        for (int b = 0; b < batch->n; b++) {
            row += (size_t)batch->n_tokens[b];
            layernorm(ws->xn + (size_t)b * C, ws->x + (row - 1) * C, m->lnf_w, m->lnf_b, 1, C, cfg->ln_eps);
        }
        if (be->calibration) kvh_calibration_observe(be->calibration, L, KVP_MAT_LM_HEAD, ws->xn, batch->n, C);
        lm_head(blas, ws, head, logits, ws->xn, m->wte, batch->n, C, V);
    }
    be->times.lm_head += kvh_now_ns() - h0;

    for (int b = 0; b < batch->n; b++) cache->next_pos[batch->seq[b]] += batch->n_tokens[b];
    return 0;
}

static void cpu_destroy(kvh_backend *be) {
    cpu_backend *cb = be->impl;
    if (cb) {
        workspace_free(&cb->ws);
        free(cb);
    }
    free(be);
}

static const kvh_backend_ops cpu_ops = {.name = "cpu", .forward = cpu_forward, .destroy = cpu_destroy};

int kvh_backend_cpu_create(kvh_backend **out, const kvh_model *model, int threads, kvh_err *err) {
    *out = NULL;
    kvh_backend *be = calloc(1, sizeof *be);
    cpu_backend *cb = calloc(1, sizeof *cb);
    if (!be || !cb) {
        free(be);
        free(cb);
        return kvh_fail(err, "cpu backend: out of memory");
    }
    const char *isa_error = kvh_isa_env_error();
    if (isa_error) {
        free(be);
        free(cb);
        return kvh_fail(err, "cpu backend: %s", isa_error);
    }
    cb->blas = kvh_blas_load(err);
    if (!cb->blas) {
        free(be);
        free(cb);
        return -1;
    }
    if (threads < 1) threads = 1;
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    /* BLAS calls run inside our OpenMP chunks, so OpenBLAS itself stays single-threaded. */
    cb->blas->set_num_threads(1);
    cb->ws.n_threads = threads;
#ifdef _OPENMP
    if (omp_get_max_threads() > cb->ws.n_threads) cb->ws.n_threads = omp_get_max_threads();
#endif
    be->ops = &cpu_ops;
    be->model = model;
    be->threads = threads;
    be->impl = cb;
    be->kv_dense_elem_bytes = sizeof(float);
    kvh_blas_describe(be->kernels, sizeof be->kernels);
    snprintf(be->device, sizeof be->device, "cpu (%d threads, %.100s)", threads, be->kernels);
    *out = be;
    return 0;
}
