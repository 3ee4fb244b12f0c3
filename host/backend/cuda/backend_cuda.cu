/* backend_cuda.cu — the CUDA backend: GPT-2 forward pass on one NVIDIA GPU behind the kvh_backend vtable.
 * fp16 weights (converted from the model's fp32 at create) and fp16 activations between layers, with an fp32
 * residual stream and fp32 accumulation everywhere; cuBLAS cublasGemmEx (CUBLAS_COMPUTE_32F) for QKV,
 * attention projection, MLP and the tied LM head; own kernels for the rest (layers.cuh, attention.cuh).
 * Owns: the device weight arenas, the activation workspace, the device memory of K/V slots (a pooled
 * allocator handed to the cache as its kvh_kv_memory, with compaction copies batched into one launch),
 * the device copies of slot positions and score accumulators (synced with the host metadata only around
 * evictions: before_evict / after_evict), the CUDA graph of a decode step, logits back to the host, and
 * for layers whose policy asked (ABI 1.3) the score reports back to the host, then the policy's insert and
 * score_report hooks, layer by layer, after the step.
 * Does not own: which tokens are evicted (policy plugins, CPU-side), the cache's host metadata
 * (kvcache.c), sampling (the decode loop samples on the host).
 * Shapes: B entries, R = Ttot rows, C, NH, HS, F, V, L, P as in model.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.cuh"
#include "common.cuh"
#include "layers.cuh"
#include "quant.cuh"
#include "graph_stats.h"
#include "report.h"
#include "tables.cuh"

extern "C" {
#include "backend/backend.h"
#include "backend/slot_pool.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "util/util.h"
}
#include "kvp/kvp.h"

extern "C" int kvh_backend_cuda_create(kvh_backend **out, const kvh_model *model, int threads, kvh_err *err);
extern "C" int kvh_backend_cuda_available(char *why, size_t cap);

/* ---- device memory for K/V slots --------------------------------------------------------------------
 * Slot blocks come and go at every head growth and shrink; cudaMalloc / cudaFree per block would cost
 * tens of microseconds each and cudaFree synchronizes the device. host/backend/slot_pool.c (plain C,
 * tested on the CPU) carves them from 32 MiB regions in size classes that waste at most 1/16 of a block
 * and keeps freed blocks for reuse until the backend is destroyed; these are its region callbacks. */

#define POOL_REGION ((size_t)32 << 20)

static void *region_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    void *p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        (void)cudaGetLastError(); /* an allocation failure is not sticky; clear it for the next call */
        return NULL;
    }
    return p;
}

static void region_free(void *ctx, void *p) {
    (void)ctx;
    cudaFree(p);
}

/* ---- backend state ------------------------------------------------------------------------------ */

typedef struct cuda_layer {
    const __half *attn_w, *proj_w, *fc_w, *fcproj_w; /* [C,3C], [C,C], [C,F], [F,C] fp16, input-major */
    const float *ln1_w, *ln1_b, *attn_b, *proj_b, *ln2_w, *ln2_b, *fc_b, *fcproj_b;
} cuda_layer;

typedef struct cuda_backend {
    const kvh_model *model;
    int device, n_sm;
    cudaStream_t st;
    cublasHandle_t blas;
    void *blas_ws; /* cuBLAS workspace (set explicitly so graph capture never allocates) */
    __half *w16;   /* fp16 arena: wte, wpe, matrices */
    float *w32;    /* fp32 arena: LayerNorm parameters and biases */
    const __half *wte, *wpe;
    const float *lnf_w, *lnf_b;
    cuda_layer *layers; /* [L] */
    kvh_cuda_kvfmt *lfmt; /* [L] slot format of each layer of the current cache (dense fp16 or int8/int4) */

    /* activations, sized for rows_cap rows / out_cap logit rows / part_cap (row, split) pairs */
    size_t rows_cap, out_cap;
    size_t part_cap;
    float *x;        /* [R, C] residual stream, fp32 */
    __half *xn;      /* [R, C] LayerNorm output */
    float *y;        /* [R, max(3C, F)] fp32 GEMM output before its epilogue */
    __half *q;       /* [R, C] */
    __half *att;     /* [R, C] attention output */
    __half *h;       /* [R, F] MLP hidden after GELU */
    float *part_acc; /* [R, NH, S, HS] at the step's R and S */
    float *part_ml;  /* [R, NH, S, 2] */
    float *stat;     /* [R, NH, 2] */
    float *logits;   /* [out_cap, V] */
    uint64_t ws_gen; /* bumped whenever a device buffer above (or the tables, or the metadata) moves */

    /* per-forward tables: one pinned host buffer, one device buffer, one upload */
    size_t tab_cap;
    void *tab_host, *tab_dev;

    /* device slot metadata [n_seq, L, NH, n_ctx] */
    int meta_seq, meta_ctx;
    int32_t *dpos;
    float *dscore, *dobs;

    kvh_slot_pool pool;
    kvh_kv_memory mem;
    copy_list pending;  /* compaction copies not yet launched */
    kvh_err sticky;     /* first error raised inside a kv_memory callback (they return nothing) */
    bool sticky_set;

    /* CUDA graph of a decode step (every entry with one token) */
    bool graphs;        /* enabled (KVH_CUDA_GRAPH=0 disables) */
    cudaGraphExec_t gexec;
    int g_B, g_S, g_G, g_all;
    int *g_seq;         /* [g_B] */
    uint64_t g_gen;
    const kvh_kvcache *g_cache;
    kvh_cuda_graph_stats g_stats;

    /* score reports (ABI 1.3) of the layers whose policy asked: attn_report_kernel writes them into drep
     * (offsets in the heads table), one transfer per forward brings them to hrep, the host then hands each
     * layer's to the cache's report buffers and the policy. Grown (never shrunk) like the workspace. */
    float *drep;        /* device [rep_cap] */
    float *hrep;        /* pinned host [rep_cap] */
    size_t rep_cap;     /* floats */
    kvh_cuda_report_stats rep_stats;

    bool phases;        /* KVH_CUDA_PHASES=1: synchronize at phase boundaries to fill be->times */
    int32_t *pos_scratch; /* host [pos_cap] positions of one entry's new tokens */
    size_t pos_cap;
} cuda_backend;

/* ---- kv_memory callbacks ------------------------------------------------------------------------ */

static void set_sticky(cuda_backend *cb, const kvh_err *e) {
    if (!cb->sticky_set) {
        cb->sticky = *e;
        cb->sticky_set = true;
    }
}

static void flush_copies(cuda_backend *cb) {
    if (cb->pending.n == 0) return;
    kvh_err e;
    if (launch_batched_copy(cb->st, &cb->pending, &e) != 0) set_sticky(cb, &e);
    cb->pending.n = 0;
}

static void *mem_alloc(void *ctx, size_t bytes) { return kvh_slot_pool_alloc(&((cuda_backend *)ctx)->pool, bytes); }

static void mem_free(void *ctx, void *p) {
    cuda_backend *cb = (cuda_backend *)ctx;
    /* pending copies may read p (resize moves old -> new, then frees old): launch them first, so a later
     * reuse of p is ordered after them on the stream */
    flush_copies(cb);
    kvh_slot_pool_free(&cb->pool, p);
}

static bool overlap(const void *a, size_t na, const void *b, size_t nb) {
    const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + nb && y < x + na;
}

static void mem_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    cuda_backend *cb = (cuda_backend *)ctx;
    if (bytes == 0) return;
    if (bytes > UINT32_MAX) {
        flush_copies(cb); /* queued moves come first, as they would in a batch */
        kvh_err e;
        if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cb->st) != cudaSuccess) {
            kvh_fail(&e, "cuda backend: device copy of %zu bytes failed: %s", bytes, cudaGetErrorString(cudaGetLastError()));
            set_sticky(cb, &e);
        }
        return;
    }
    copy_list *pl = &cb->pending;
    /* The moves of one launch run in parallel: a move that touches what a pending one reads or writes
     * (compaction inside a block, then the shrink that copies the block elsewhere) waits for a new launch. */
    for (int i = 0; i < pl->n; i++)
        if (overlap(dst, bytes, pl->src[i], pl->bytes[i]) || overlap(dst, bytes, pl->dst[i], pl->bytes[i]) ||
            overlap(src, bytes, pl->dst[i], pl->bytes[i])) {
            flush_copies(cb);
            break;
        }
    pl->dst[pl->n] = dst;
    pl->src[pl->n] = src;
    pl->bytes[pl->n] = (uint32_t)bytes;
    if (++pl->n == COPY_BATCH) flush_copies(cb);
}

static int take_sticky(cuda_backend *cb, kvh_err *err) {
    if (!cb->sticky_set) return 0;
    cb->sticky_set = false;
    if (err) *err = cb->sticky;
    return -1;
}

/* ---- workspace ---------------------------------------------------------------------------------- */

static void dfree(void *pp) {
    void **p = (void **)pp;
    if (*p) cudaFree(*p);
    *p = NULL;
}

static void workspace_free(cuda_backend *cb) {
    dfree(&cb->x);
    dfree(&cb->xn);
    dfree(&cb->y);
    dfree(&cb->q);
    dfree(&cb->att);
    dfree(&cb->h);
    dfree(&cb->part_acc);
    dfree(&cb->part_ml);
    dfree(&cb->stat);
    dfree(&cb->logits);
    cb->rows_cap = cb->out_cap = 0;
    cb->part_cap = 0;
}

#define DALLOC(err, ptr, bytes) KVH_CUDA_CHECK(err, cudaMalloc((void **)&(ptr), (bytes)))

static int workspace_reserve(cuda_backend *cb, const kvh_model_config *cfg, size_t rows, size_t out_rows, int splits,
                             kvh_err *err) {
    /* The attention partials hold one (row, split) pair per row and split of this step: many splits come
     * with few rows (decode), one split with many (prefill: attn_choose_splits gives 1 once the rows fill
     * the GPU), so they are sized by the product. Sized by rows x the most splits instead, a 30,720-row
     * prefill of gpt2-medium took 3.75 GiB of partials to use 117 MiB, memory the K/V cache then lacked. */
    const size_t part = rows * (size_t)splits;
    if (rows <= cb->rows_cap && out_rows <= cb->out_cap && part <= cb->part_cap) return 0;
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    size_t R = rows > cb->rows_cap ? rows : cb->rows_cap;
    size_t O = out_rows > cb->out_cap ? out_rows : cb->out_cap;
    size_t P = part > cb->part_cap ? part : cb->part_cap;
    if (R < 64) R = 64;
    if (O < 32) O = 32;
    if (P < 64 * (size_t)ATTN_MAX_SPLITS) P = 64 * (size_t)ATTN_MAX_SPLITS; /* decode up to 64 rows never regrows */
    workspace_free(cb);
    const size_t C = (size_t)cfg->n_embd, F = (size_t)cfg->n_inner, NH = (size_t)cfg->n_head;
    const size_t HS = C / NH, V = (size_t)cfg->n_vocab;
    const size_t Y = 3 * C > F ? 3 * C : F;
    cb->ws_gen++;
    DALLOC(err, cb->x, R * C * sizeof(float));
    DALLOC(err, cb->xn, R * C * sizeof(__half));
    DALLOC(err, cb->y, R * Y * sizeof(float));
    DALLOC(err, cb->q, R * C * sizeof(__half));
    DALLOC(err, cb->att, R * C * sizeof(__half));
    DALLOC(err, cb->h, R * F * sizeof(__half));
    DALLOC(err, cb->part_acc, P * NH * HS * sizeof(float));
    DALLOC(err, cb->part_ml, P * NH * 2 * sizeof(float));
    DALLOC(err, cb->stat, R * NH * 2 * sizeof(float));
    DALLOC(err, cb->logits, O * V * sizeof(float));
    cb->rows_cap = R;
    cb->out_cap = O;
    cb->part_cap = P;
    return 0;
}

static int tables_reserve(cuda_backend *cb, size_t bytes, kvh_err *err) {
    if (bytes <= cb->tab_cap) return 0;
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    size_t nb = bytes * 2;
    if (cb->tab_host) cudaFreeHost(cb->tab_host);
    cb->tab_host = NULL;
    dfree(&cb->tab_dev);
    cb->tab_cap = 0;
    cb->ws_gen++;
    KVH_CUDA_CHECK(err, cudaMallocHost(&cb->tab_host, nb));
    KVH_CUDA_CHECK(err, cudaMalloc(&cb->tab_dev, nb));
    cb->tab_cap = nb;
    return 0;
}

/* Report buffers for `floats` floats (device and pinned host). A move bumps ws_gen (graphs re-capture). */
static int report_reserve(cuda_backend *cb, size_t floats, kvh_err *err) {
    if (floats <= cb->rep_cap) return 0;
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    size_t nf = floats * 2 < 4096 ? 4096 : floats * 2;
    if (cb->hrep) cudaFreeHost(cb->hrep);
    cb->hrep = NULL;
    dfree(&cb->drep);
    cb->rep_cap = 0;
    cb->ws_gen++;
    KVH_CUDA_CHECK(err, cudaMallocHost((void **)&cb->hrep, nf * sizeof(float)));
    DALLOC(err, cb->drep, nf * sizeof(float));
    cb->rep_cap = nf;
    return 0;
}

/* Floats of the score report of one (entry, head) with n live slots and T queries (kvcache.h layout). */
static size_t report_floats(uint32_t n, int T, uint32_t report_rows) {
    if (T == 1) return n;
    const uint32_t R = (uint32_t)T < report_rows ? (uint32_t)T : report_rows;
    return (size_t)n * (1 + (size_t)R);
}

/* Device metadata for the cache's shape; allocated on first use (the cache is made after the backend). */
static int meta_reserve(cuda_backend *cb, const kvh_kvcache *cache, kvh_err *err) {
    bool any_score = false, any_obs = false;
    for (int l = 0; l < cache->n_layer; l++) {
        any_score |= cache->layer[l].track_scores;
        any_obs |= cache->layer[l].obs_scores;
    }
    if (cb->dpos && cb->meta_seq == cache->n_seq && cb->meta_ctx == cache->n_ctx && (!any_score || cb->dscore) &&
        (!any_obs || cb->dobs))
        return 0;
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    dfree(&cb->dpos);
    dfree(&cb->dscore);
    dfree(&cb->dobs);
    cb->ws_gen++;
    size_t n = (size_t)cache->n_seq * (size_t)cache->n_layer * (size_t)cache->n_head * (size_t)cache->n_ctx;
    DALLOC(err, cb->dpos, n * sizeof(int32_t));
    KVH_CUDA_CHECK(err, cudaMemsetAsync(cb->dpos, 0, n * sizeof(int32_t), cb->st));
    if (any_score) {
        DALLOC(err, cb->dscore, n * sizeof(float));
        KVH_CUDA_CHECK(err, cudaMemsetAsync(cb->dscore, 0, n * sizeof(float), cb->st));
    }
    if (any_obs) {
        DALLOC(err, cb->dobs, n * sizeof(float));
        KVH_CUDA_CHECK(err, cudaMemsetAsync(cb->dobs, 0, n * sizeof(float), cb->st));
    }
    cb->meta_seq = cache->n_seq;
    cb->meta_ctx = cache->n_ctx;
    return 0;
}

/* ---- the forward pass --------------------------------------------------------------------------- */

/* Y[T, N] (fp32) = X[T, K] · W[K, N] + beta * Y, W input-major fp16. Column-major cuBLAS sees
 * Y^T[N, T] = W^T[N, K] · X^T[K, T], which is W (ld N) times X (ld K) without transposes. */
static int gemm(cuda_backend *cb, float *Y, const __half *X, const __half *W, int T, int K, int N, float beta,
                kvh_err *err) {
    const float alpha = 1.0f;
    KVH_CUBLAS_CHECK(err, cublasGemmEx(cb->blas, CUBLAS_OP_N, CUBLAS_OP_N, N, T, K, &alpha, W, CUDA_R_16F, N, X,
                                       CUDA_R_16F, K, &beta, Y, CUDA_R_32F, N, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    return 0;
}

/* Where the per-forward tables sit inside the table buffer. */
typedef struct tab_layout {
    size_t heads, rows, entries, last, total; /* byte offsets */
} tab_layout;

static tab_layout layout_tables(int L, int B, int NH, size_t R) {
    tab_layout t;
    t.heads = 0;
    t.rows = t.heads + (size_t)L * B * NH * sizeof(cuda_head);
    t.entries = t.rows + R * sizeof(cuda_row);
    t.last = t.entries + (size_t)B * sizeof(cuda_entry);
    t.total = t.last + (size_t)B * sizeof(int32_t);
    t.total = (t.total + 255) & ~(size_t)255;
    return t;
}


/* With KVH_CUDA_PHASES=1: waits for the device and adds the time since *t to *acc. */
static int phase_end(cuda_backend *cb, uint64_t *acc, uint64_t *t, kvh_err *err) {
    if (!cb->phases) return 0;
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    uint64_t now = kvh_now_ns();
    *acc += now - *t;
    *t = now;
    return 0;
}

/* Everything from the embedding to the device logits, in stream order: launched eagerly or captured into a
 * graph (no host synchronization in here unless phases are timed, which disables graphs). */
static int launch_step(kvh_backend *be, const kvh_kvcache *cache, const tab_layout *tl, const kvh_batch *batch,
                       int R, int n_out, int S, int G, kvh_err *err) {
    cuda_backend *cb = (cuda_backend *)be->impl;
    const kvh_model_config *cfg = &cb->model->cfg;
    const int C = cfg->n_embd, NH = cfg->n_head, HS = C / NH, F = cfg->n_inner, V = cfg->n_vocab, L = cfg->n_layer;
    const int B = batch->n;
    const float eps = cfg->ln_eps;
    char *tab = (char *)cb->tab_dev;
    const cuda_head *heads = (const cuda_head *)(tab + tl->heads);
    const cuda_row *rows = (const cuda_row *)(tab + tl->rows);
    const cuda_entry *entries = (const cuda_entry *)(tab + tl->entries);
    const int32_t *last = (const int32_t *)(tab + tl->last);
    bool any_prefill = false, any_decode = false;
    for (int b = 0; b < B; b++) {
        if (batch->n_tokens[b] > 1) any_prefill = true;
        else any_decode = true;
    }

    uint64_t t = kvh_now_ns();
    if (launch_embed(cb->st, cb->x, cb->wte, cb->wpe, rows, R, C, err) != 0) return -1;
    if (phase_end(cb, &be->times.embed, &t, err) != 0) return -1;
    for (int l = 0; l < L; l++) {
        const cuda_layer *w = &cb->layers[l];
        const kvh_layer_policy_settings *ls = &cache->layer[l];
        const cuda_head *hl = heads + (size_t)l * B * NH;
        const kvh_cuda_kvfmt &fmt = cb->lfmt[l];
        const bool packed = fmt.bits != KVH_CUDA_DENSE_BITS;
        float *dscore = ls->track_scores ? cb->dscore : NULL;
        float *dobs = ls->obs_scores ? cb->dobs : NULL;
        if (launch_layernorm(cb->st, cb->xn, cb->x, l > 0 ? cb->layers[l - 1].fcproj_b : NULL, w->ln1_w, w->ln1_b,
                             NULL, R, C, eps, err) != 0)
            return -1;
        if (gemm(cb, cb->y, cb->xn, w->attn_w, R, C, 3 * C, 0.0f, err) != 0) return -1;
        if (launch_qkv_epilogue(cb->st, cb->q, cb->y, w->attn_b, rows, entries, hl, cb->dpos, dscore, dobs, R, C, HS,
                                NH, L, l, cache->n_ctx, packed ? 0 : 1, err) != 0)
            return -1;
        /* quantized layer: K/V rows (fp32, bias added) encoded into their packed slots */
        if (packed && launch_kv_quant_encode(cb->st, cb->y, w->attn_b, rows, hl, fmt, R, C, HS, NH, err) != 0)
            return -1;
        if (phase_end(cb, &be->times.attn_proj, &t, err) != 0) return -1;
        if (launch_attention(cb->st, cb->att, cb->stat, cb->part_acc, cb->part_ml, cb->q, rows, entries, hl, cb->dpos,
                             R, C, HS, NH, L, l, cache->n_ctx, S, fmt, err) != 0)
            return -1;
        const bool scores = (dscore && ((any_prefill && ls->prefill_scores) || (any_decode && ls->decode_scores))) ||
                            (dobs && any_prefill && ls->obs_window > 0);
        if (scores && launch_attn_scores(cb->st, dscore, dobs, cb->stat, cb->q, rows, entries, hl, cb->dpos, R, C, HS,
                                         NH, L, l, cache->n_ctx, S, ls->decode_scores, ls->prefill_scores,
                                         (int)(ls->obs_window > (uint32_t)INT32_MAX ? INT32_MAX : ls->obs_window),
                                         fmt, err) != 0)
            return -1;
        /* the policy reads this step's probabilities (ABI 1.3): only its layers launch anything */
        if (ls->report && launch_attn_report(cb->st, cb->drep, cb->stat, cb->q, rows, entries, hl, cb->dpos, B, C, HS,
                                             NH, L, l, cache->n_ctx, G,
                                             (int)(ls->report_rows > (uint32_t)INT32_MAX ? INT32_MAX : ls->report_rows),
                                             fmt, err) != 0)
            return -1;
        if (phase_end(cb, &be->times.attn_core, &t, err) != 0) return -1;
        if (gemm(cb, cb->x, cb->att, w->proj_w, R, C, C, 1.0f, err) != 0) return -1; /* residual: beta = 1 */
        if (phase_end(cb, &be->times.attn_proj, &t, err) != 0) return -1;
        if (launch_layernorm(cb->st, cb->xn, cb->x, w->proj_b, w->ln2_w, w->ln2_b, NULL, R, C, eps, err) != 0)
            return -1;
        if (gemm(cb, cb->y, cb->xn, w->fc_w, R, C, F, 0.0f, err) != 0) return -1;
        if (launch_bias_gelu(cb->st, cb->h, cb->y, w->fc_b, R, F, err) != 0) return -1;
        if (gemm(cb, cb->x, cb->h, w->fcproj_w, R, F, C, 1.0f, err) != 0) return -1;
        if (phase_end(cb, &be->times.mlp, &t, err) != 0) return -1;
    }
    /* ln_f on the rows whose logits are wanted (the last block's c_proj bias folded in), then the tied head:
     * logits^T[V, n_out] = wte[V, C] · xn^T[C, n_out] -> cuBLAS op T on wte seen column-major as [C, V]. */
    if (launch_layernorm(cb->st, cb->xn, cb->x, cb->layers[L - 1].fcproj_b, cb->lnf_w, cb->lnf_b,
                         batch->all_logits ? NULL : last, n_out, C, eps, err) != 0)
        return -1;
    const float one = 1.0f, zero = 0.0f;
    KVH_CUBLAS_CHECK(err, cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, V, n_out, C, &one, cb->wte, CUDA_R_16F, C,
                                       cb->xn, CUDA_R_16F, C, &zero, cb->logits, CUDA_R_32F, V, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    if (phase_end(cb, &be->times.lm_head, &t, err) != 0) return -1;
    return 0;
}

static void graph_drop(cuda_backend *cb) {
    if (cb->gexec) cudaGraphExecDestroy(cb->gexec);
    cb->gexec = NULL;
    free(cb->g_seq);
    cb->g_seq = NULL;
    cb->g_B = 0;
}

static bool graph_matches(const cuda_backend *cb, const kvh_kvcache *cache, const kvh_batch *batch, int S, int G) {
    if (!cb->gexec || cb->g_B != batch->n || cb->g_all != (int)batch->all_logits || cb->g_gen != cb->ws_gen ||
        cb->g_cache != cache || cb->g_S != S || cb->g_G != G)
        return false;
    for (int b = 0; b < batch->n; b++)
        if (cb->g_seq[b] != batch->seq[b]) return false;
    return true;
}

/* Graphs off for the rest of this backend's life; said once on stderr and counted (graph_stats.h), so a
 * run without graphs is never mistaken for one with them. Returns 1 (graph_capture's "not possible"). */
static int graph_fallback(cuda_backend *cb, const char *why, const char *stage) {
    cb->graphs = false;
    if (cb->g_stats.fallbacks++ == 0) {
        snprintf(cb->g_stats.fallback_reason, sizeof cb->g_stats.fallback_reason, "%s: %s", stage, why);
        fprintf(stderr, "kvhost: cuda backend: CUDA graph %s failed (%s); decode steps launch kernel by kernel "
                        "from now on\n", stage, why);
    }
    return 1;
}

/* Captures launch_step into a graph for this decode batch shape. Returns 0 with cb->gexec set, 1 when capture
 * is not possible here (graphs are then switched off for this backend), -1 on a real error. */
static int graph_capture(kvh_backend *be, const kvh_kvcache *cache, const tab_layout *tl, const kvh_batch *batch,
                         int R, int n_out, int S, int G, kvh_err *err) {
    cuda_backend *cb = (cuda_backend *)be->impl;
    graph_drop(cb);
    KVH_CUDA_CHECK(err, cudaStreamBeginCapture(cb->st, cudaStreamCaptureModeThreadLocal));
    kvh_err cap_err = {{0}};
    int rc = launch_step(be, cache, tl, batch, R, n_out, S, G, &cap_err);
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(cb->st, &g);
    if (rc != 0 || e != cudaSuccess || !g) {
        if (g) cudaGraphDestroy(g);
        (void)cudaGetLastError();
        return graph_fallback(cb, rc != 0 ? cap_err.msg : cudaGetErrorName(e != cudaSuccess ? e : cudaErrorUnknown),
                              "capture");
    }
    e = cudaGraphInstantiate(&cb->gexec, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        cb->gexec = NULL;
        return graph_fallback(cb, cudaGetErrorName(e), "instantiate");
    }
    cb->g_stats.captures++;
    cb->g_seq = (int *)malloc((size_t)batch->n * sizeof(int));
    if (!cb->g_seq) {
        graph_drop(cb);
        return kvh_fail(err, "cuda backend: out of memory");
    }
    memcpy(cb->g_seq, batch->seq, (size_t)batch->n * sizeof(int));
    cb->g_B = batch->n;
    cb->g_all = (int)batch->all_logits;
    cb->g_gen = cb->ws_gen;
    cb->g_cache = cache;
    cb->g_S = S;
    cb->g_G = G;
    return 0;
}

/* The ABI 1.3 policy hooks of a finished step, in the order kvp.h promises (layers 0..L-1; within a layer
 * insert() for every entry, then score_report() for every entry), which is the CPU backend's order: the
 * device ran the whole step first, but neither hook sees device state, and each layer's host metadata is
 * what it was right after that layer's attention (appended before the step, untouched since). Each
 * reporting layer's reports are copied from hrep into the cache's per-(seq, head) report buffers, shared by
 * all layers; kvh_kvcache_reserve with no extra slot points the layer's heads at them again (a later
 * layer's reserve may have moved them). qpos: the entry's query positions (next_pos is not advanced yet). */
static int deliver_hooks(cuda_backend *cb, kvh_kvcache *cache, const kvh_batch *batch, const cuda_head *hh,
                         kvh_err *err) {
    const int L = cache->n_layer, NH = cache->n_head, B = batch->n;
    for (int l = 0; l < L; l++) {
        const kvh_layer_policy_settings *ls = &cache->layer[l];
        if (ls->policy_insert)
            for (int b = 0; b < B; b++)
                if (ls->policy_insert(ls->policy_ctx, cache, batch->seq[b], l, batch->n_tokens[b], err) != 0) return -1;
        if (!ls->report) continue;
        for (int b = 0; b < B; b++) {
            const int s = batch->seq[b], T = batch->n_tokens[b];
            if (kvh_kvcache_reserve(cache, s, l, 0, err) != 0) return -1;
            for (int h = 0; h < NH; h++) {
                kvh_head_cache *hc = kvh_kvcache_head(cache, s, l, h);
                const cuda_head *d = &hh[((size_t)l * B + b) * NH + h];
                memcpy(hc->report, cb->hrep + d->rep, report_floats(d->n, T, ls->report_rows) * sizeof(float));
            }
            for (int t = 0; t < T; t++) cb->pos_scratch[t] = cache->next_pos[s] + t;
            if (ls->policy_report(ls->policy_ctx, cache, s, l, T, cb->pos_scratch, err) != 0) return -1;
        }
    }
    return 0;
}

static int cuda_forward(kvh_backend *be, kvh_kvcache *cache, const kvh_batch *batch, float *logits, kvh_err *err) {
    cuda_backend *cb = (cuda_backend *)be->impl;
    const kvh_model_config *cfg = &cb->model->cfg;
    const int C = cfg->n_embd, NH = cfg->n_head, HS = C / NH, V = cfg->n_vocab, L = cfg->n_layer;
    const int B = batch->n;
    if (take_sticky(cb, err) != 0) return -1;
    if (B < 1) return kvh_fail(err, "cuda backend: empty batch");
    if (cache->mem.ctx != (void *)cb || cache->mem.alloc != mem_alloc)
        return kvh_fail(err, "cuda backend: the KV cache does not live in this backend's device memory (create it "
                             "with the backend's kv_memory, as kvh_session does)");
    if (cache->n_layer != L || cache->n_head != NH || cache->head_dim != HS)
        return kvh_fail(err, "cuda backend: cache shape (L %d, NH %d, HS %d) does not match the model (%d, %d, %d)",
                        cache->n_layer, cache->n_head, cache->head_dim, L, NH, HS);
    /* Each layer's slot format: dense fp16, or an int8 / int4 store of plugins/quant (kvq_format.h) whose
     * kernels are in quant.cuh. A change of format (another cache) forces a new graph capture. */
    bool fmt_changed = false;
    for (int l = 0; l < L; l++) {
        const kvh_layer_policy_settings *ls = &cache->layer[l];
        kvh_cuda_kvfmt f;
        if (ls->store) {
            if (kvh_cuda_store_format(ls, l, HS, &f, err) != 0) return -1;
        } else {
            if (kvh_kvcache_k_slot_bytes(cache, l) != (uint32_t)HS * 2 ||
                kvh_kvcache_v_slot_bytes(cache, l) != (uint32_t)HS * 2)
                return kvh_fail(err, "cuda backend: layer %d has %u/%u-byte K/V slots; dense fp16 needs %d", l,
                                kvh_kvcache_k_slot_bytes(cache, l), kvh_kvcache_v_slot_bytes(cache, l), HS * 2);
            memset(&f, 0, sizeof f);
            f.bits = KVH_CUDA_DENSE_BITS;
            f.slot_bytes = HS * 2;
        }
        if (memcmp(&f, &cb->lfmt[l], sizeof f) != 0) {
            cb->lfmt[l] = f;
            fmt_changed = true;
        }
    }
    if (fmt_changed) cb->ws_gen++;

    /* Validate the batch and count rows (same rules as the CPU backend). */
    size_t R = 0;
    int max_T = 0;
    bool all_decode = true;
    for (int b = 0; b < B; b++) {
        int s = batch->seq[b];
        if (s < 0 || s >= cache->n_seq) return kvh_fail(err, "batch entry %d: sequence %d out of range", b, s);
        for (int bb = 0; bb < b; bb++)
            if (batch->seq[bb] == s) return kvh_fail(err, "batch entries %d and %d name the same sequence %d", bb, b, s);
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
        R += (size_t)T;
        if (T > max_T) max_T = T;
        if (T != 1) all_decode = false;
    }
    const int n_out = batch->all_logits ? (int)R : B;
    if (meta_reserve(cb, cache, err) != 0) return -1;

    /* Host metadata first, for every layer: room, positions, live counts. Slot data follows on the device. */
    if ((size_t)max_T > cb->pos_cap) {
        int32_t *p = (int32_t *)realloc(cb->pos_scratch, (size_t)max_T * sizeof(int32_t));
        if (!p) return kvh_fail(err, "cuda backend: out of memory");
        cb->pos_scratch = p;
        cb->pos_cap = (size_t)max_T;
    }
    for (int l = 0; l < L; l++)
        for (int b = 0; b < B; b++) {
            int s = batch->seq[b], T = batch->n_tokens[b];
            if (kvh_kvcache_reserve(cache, s, l, (uint32_t)T, err) != 0) return -1;
            for (int t = 0; t < T; t++) cb->pos_scratch[t] = cache->next_pos[s] + t;
            kvh_kvcache_append_meta(cache, s, l, T, cb->pos_scratch);
        }
    flush_copies(cb);
    if (take_sticky(cb, err) != 0) return -1;

    /* Tables: heads [L][B][NH], rows [R], entries [B], last rows [B]. */
    tab_layout tl = layout_tables(L, B, NH, R);
    if (tables_reserve(cb, tl.total, err) != 0) return -1;
    char *th = (char *)cb->tab_host;
    cuda_head *hh = (cuda_head *)(th + tl.heads);
    cuda_row *rr = (cuda_row *)(th + tl.rows);
    cuda_entry *ee = (cuda_entry *)(th + tl.entries);
    int32_t *lr = (int32_t *)(th + tl.last);
    uint32_t n_max = 1;
    size_t rep_total = 0; /* floats of this step's score reports, over the layers that asked */
    int rep_layers = 0;
    for (int l = 0; l < L; l++) {
        const kvh_layer_policy_settings *ls = &cache->layer[l];
        rep_layers += ls->report ? 1 : 0;
        for (int b = 0; b < B; b++)
            for (int h = 0; h < NH; h++) {
                kvh_head_cache *hc = kvh_kvcache_head(cache, batch->seq[b], l, h);
                cuda_head *d = &hh[((size_t)l * B + b) * NH + h];
                d->k = hc->k; /* the CUDA backend keeps the contiguous layout (session.c refuses paging) */
                d->v = hc->v;
                d->n = hc->n;
                d->first = hc->n - (uint32_t)batch->n_tokens[b];
                d->rep = 0;
                if (ls->report) {
                    d->rep = rep_total;
                    rep_total += report_floats(hc->n, batch->n_tokens[b], ls->report_rows);
                }
                if (hc->n > n_max) n_max = hc->n;
            }
    }
    {
        int row = 0;
        for (int b = 0; b < B; b++) {
            int s = batch->seq[b], T = batch->n_tokens[b];
            ee[b].seq = s;
            ee[b].row0 = row;
            ee[b].T = T;
            ee[b].last = row + T - 1;
            lr[b] = row + T - 1;
            for (int t = 0; t < T; t++, row++) {
                rr[row].tok = batch->tokens[b][t];
                rr[row].pos = cache->next_pos[s] + t;
                rr[row].entry = b;
                rr[row].t = t;
            }
        }
    }
    const bool use_graph = cb->graphs && !cb->phases && all_decode;
    /* A captured step may not depend on the live counts: its split count is fixed by n_ctx. */
    const int S = attn_choose_splits((int)R, NH, use_graph ? (uint32_t)cache->n_ctx : n_max, cb->n_sm);
    const int G = attn_report_blocks(use_graph ? (uint32_t)cache->n_ctx : n_max);
    if (workspace_reserve(cb, cfg, R, (size_t)n_out, S, err) != 0) return -1;
    if (rep_total && report_reserve(cb, rep_total, err) != 0) return -1;
    KVH_CUDA_CHECK(err, cudaMemcpyAsync(cb->tab_dev, cb->tab_host, tl.total, cudaMemcpyHostToDevice, cb->st));

    int ran = 0;
    if (use_graph && cb->graphs) {
        if (!graph_matches(cb, cache, batch, S, G)) {
            int rc = graph_capture(be, cache, &tl, batch, (int)R, n_out, S, G, err);
            if (rc < 0) return -1;
        }
        if (cb->gexec) {
            KVH_CUDA_CHECK(err, cudaGraphLaunch(cb->gexec, cb->st));
            cb->g_stats.replays++;
            ran = 1;
        }
    }
    if (!ran && launch_step(be, cache, &tl, batch, (int)R, n_out, S, G, err) != 0) return -1;
    /* every reporting layer's reports in one transfer, outside the graph (its size follows the live counts) */
    if (rep_total) {
        KVH_CUDA_CHECK(err, cudaMemcpyAsync(cb->hrep, cb->drep, rep_total * sizeof(float), cudaMemcpyDeviceToHost,
                                            cb->st));
        cb->rep_stats.copies++;
        cb->rep_stats.bytes += rep_total * sizeof(float);
        cb->rep_stats.layer_steps += (uint64_t)rep_layers;
    }
    KVH_CUDA_CHECK(err, cudaMemcpyAsync(logits, cb->logits, (size_t)n_out * V * sizeof(float), cudaMemcpyDeviceToHost,
                                        cb->st));
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    if (deliver_hooks(cb, cache, batch, hh, err) != 0) return -1;
    for (int b = 0; b < B; b++) cache->next_pos[batch->seq[b]] += batch->n_tokens[b];
    return 0;
}

/* ---- eviction hooks ----------------------------------------------------------------------------- */

/* The policy is about to read (seq, layer)'s scores: bring the host copies up to date. */
static int cuda_before_evict(kvh_backend *be, kvh_kvcache *cache, int seq, int layer, kvh_err *err) {
    cuda_backend *cb = (cuda_backend *)be->impl;
    flush_copies(cb);
    if (take_sticky(cb, err) != 0) return -1;
    if (!cb->dpos || seq < 0 || seq >= cb->meta_seq) return 0;
    const kvh_layer_policy_settings *ls = &cache->layer[layer];
    const bool sc = ls->track_scores && cb->dscore, ob = ls->obs_scores && cb->dobs;
    if (!sc && !ob) return 0;
    for (int h = 0; h < cache->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(cache, seq, layer, h);
        if (!hc->n) continue;
        size_t mi = cuda_meta_index(seq, layer, h, 0, cache->n_layer, cache->n_head, cache->n_ctx);
        if (sc && hc->score)
            KVH_CUDA_CHECK(err, cudaMemcpyAsync(hc->score, cb->dscore + mi, hc->n * sizeof(float),
                                                cudaMemcpyDeviceToHost, cb->st));
        if (ob && hc->obs_score)
            KVH_CUDA_CHECK(err, cudaMemcpyAsync(hc->obs_score, cb->dobs + mi, hc->n * sizeof(float),
                                                cudaMemcpyDeviceToHost, cb->st));
    }
    KVH_CUDA_CHECK(err, cudaStreamSynchronize(cb->st));
    return 0;
}

/* The host compacted (seq, layer): launch the slot moves and re-upload the compacted metadata. */
static int cuda_after_evict(kvh_backend *be, kvh_kvcache *cache, int seq, int layer, kvh_err *err) {
    cuda_backend *cb = (cuda_backend *)be->impl;
    flush_copies(cb);
    if (take_sticky(cb, err) != 0) return -1;
    if (!cb->dpos || seq < 0 || seq >= cb->meta_seq) return 0;
    const kvh_layer_policy_settings *ls = &cache->layer[layer];
    for (int h = 0; h < cache->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(cache, seq, layer, h);
        if (!hc->n) continue;
        size_t mi = cuda_meta_index(seq, layer, h, 0, cache->n_layer, cache->n_head, cache->n_ctx);
        KVH_CUDA_CHECK(err, cudaMemcpyAsync(cb->dpos + mi, hc->pos, hc->n * sizeof(int32_t), cudaMemcpyHostToDevice,
                                            cb->st));
        if (ls->track_scores && cb->dscore && hc->score)
            KVH_CUDA_CHECK(err, cudaMemcpyAsync(cb->dscore + mi, hc->score, hc->n * sizeof(float),
                                                cudaMemcpyHostToDevice, cb->st));
        if (ls->obs_scores && cb->dobs && hc->obs_score)
            KVH_CUDA_CHECK(err, cudaMemcpyAsync(cb->dobs + mi, hc->obs_score, hc->n * sizeof(float),
                                                cudaMemcpyHostToDevice, cb->st));
    }
    return 0;
}

static const kvh_kv_memory *cuda_kv_memory(kvh_backend *be) { return &((cuda_backend *)be->impl)->mem; }

/* ---- create / destroy --------------------------------------------------------------------------- */

static void cuda_destroy(kvh_backend *be) {
    if (!be) return;
    cuda_backend *cb = (cuda_backend *)be->impl;
    if (cb) {
        if (cb->st) {
            flush_copies(cb);
            cudaStreamSynchronize(cb->st);
        }
        graph_drop(cb);
        kvh_slot_pool_destroy(&cb->pool);
        workspace_free(cb);
        if (cb->tab_host) cudaFreeHost(cb->tab_host);
        dfree(&cb->tab_dev);
        dfree(&cb->dpos);
        dfree(&cb->dscore);
        dfree(&cb->dobs);
        if (cb->hrep) cudaFreeHost(cb->hrep);
        dfree(&cb->drep);
        dfree(&cb->w16);
        dfree(&cb->w32);
        dfree(&cb->blas_ws);
        free(cb->layers);
        free(cb->lfmt);
        free(cb->pos_scratch);
        if (cb->blas) cublasDestroy(cb->blas);
        if (cb->st) cudaStreamDestroy(cb->st);
        free(cb);
    }
    free(be);
}

static size_t cuda_kv_memory_reserved(kvh_backend *be) { return ((cuda_backend *)be->impl)->pool.reserved; }

static const kvh_backend_ops cuda_ops = {"cuda", cuda_forward, cuda_destroy, cuda_kv_memory, cuda_before_evict,
                                         cuda_after_evict, cuda_kv_memory_reserved};

extern "C" int kvh_backend_cuda_available(char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && cap) snprintf(why, cap, "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
        (void)cudaGetLastError();
        return 0;
    }
    if (n < 1) {
        if (why && cap) snprintf(why, cap, "no CUDA device found");
        return 0;
    }
    cudaDeviceProp p;
    e = cudaGetDeviceProperties(&p, 0);
    if (e != cudaSuccess) {
        if (why && cap) snprintf(why, cap, "cudaGetDeviceProperties: %s", cudaGetErrorString(e));
        return 0;
    }
    if (p.major < 8) {
        if (why && cap)
            snprintf(why, cap, "device 0 (%s) has compute capability %d.%d; this build needs 8.0 or newer", p.name,
                     p.major, p.minor);
        return 0;
    }
    return 1;
}

/* Uploads n fp32 values as fp16 through a device staging buffer of stage_n floats. */
static int upload_f16(cuda_backend *cb, __half *dst, const float *src, size_t n, float *stage, size_t stage_n,
                      kvh_err *err) {
    for (size_t off = 0; off < n; off += stage_n) {
        size_t k = n - off < stage_n ? n - off : stage_n;
        KVH_CUDA_CHECK(err, cudaMemcpyAsync(stage, src + off, k * sizeof(float), cudaMemcpyHostToDevice, cb->st));
        if (launch_f32_to_f16(cb->st, dst + off, stage, k, err) != 0) return -1;
    }
    return 0;
}

static int upload_weights(cuda_backend *cb, const kvh_model *m, kvh_err *err) {
    const kvh_model_config *cfg = &m->cfg;
    const size_t C = (size_t)cfg->n_embd, F = (size_t)cfg->n_inner, V = (size_t)cfg->n_vocab;
    const size_t P = (size_t)cfg->n_positions, L = (size_t)cfg->n_layer;
    /* every tensor starts on a 256-byte boundary (cuBLAS picks its fastest kernels for aligned operands) */
#define PAD16(n) (((n) + 127) / 128 * 128)
#define PAD32(n) (((n) + 63) / 64 * 64)
    const size_t n16 = PAD16(V * C) + PAD16(P * C) +
                       L * (PAD16(3 * C * C) + PAD16(C * C) + PAD16(C * F) + PAD16(F * C));
    const size_t n32 = L * (6 * PAD32(C) + PAD32(3 * C) + PAD32(F)) + 2 * PAD32(C);
    DALLOC(err, cb->w16, n16 * sizeof(__half));
    DALLOC(err, cb->w32, n32 * sizeof(float));
    cb->layers = (cuda_layer *)calloc(L, sizeof(cuda_layer));
    cb->lfmt = (kvh_cuda_kvfmt *)calloc(L, sizeof(kvh_cuda_kvfmt));
    if (!cb->layers || !cb->lfmt) return kvh_fail(err, "cuda backend: out of memory");
    const size_t stage_n = (size_t)16 << 20;
    float *stage = NULL;
    DALLOC(err, stage, stage_n * sizeof(float));
    int rc = 0;
    __half *p16 = cb->w16;
    float *p32 = cb->w32;
#define UP16(dstf, src, n)                                                                  \
    do {                                                                                    \
        if (rc == 0) rc = upload_f16(cb, p16, (src), (n), stage, stage_n, err);             \
        dstf = p16;                                                                         \
        p16 += PAD16(n);                                                                    \
    } while (0)
#define UP32(dstf, src, n)                                                                                       \
    do {                                                                                                         \
        if (rc == 0 && cudaMemcpyAsync(p32, (src), (n) * sizeof(float), cudaMemcpyHostToDevice, cb->st) != cudaSuccess) \
            rc = kvh_fail(err, "cuda backend: uploading %s failed: %s", #src, cudaGetErrorString(cudaGetLastError()));    \
        dstf = p32;                                                                                              \
        p32 += PAD32(n);                                                                                         \
    } while (0)
    UP16(cb->wte, m->wte, V * C);
    UP16(cb->wpe, m->wpe, P * C);
    for (size_t l = 0; l < L; l++) {
        const kvh_layer_weights *w = &m->layers[l];
        cuda_layer *d = &cb->layers[l];
        UP16(d->attn_w, w->attn_w, C * 3 * C);
        UP16(d->proj_w, w->proj_w, C * C);
        UP16(d->fc_w, w->fc_w, C * F);
        UP16(d->fcproj_w, w->fcproj_w, F * C);
        UP32(d->ln1_w, w->ln1_w, C);
        UP32(d->ln1_b, w->ln1_b, C);
        UP32(d->attn_b, w->attn_b, 3 * C);
        UP32(d->proj_b, w->proj_b, C);
        UP32(d->ln2_w, w->ln2_w, C);
        UP32(d->ln2_b, w->ln2_b, C);
        UP32(d->fc_b, w->fc_b, F);
        UP32(d->fcproj_b, w->fcproj_b, C);
    }
    UP32(cb->lnf_w, m->lnf_w, C);
    UP32(cb->lnf_b, m->lnf_b, C);
#undef UP16
#undef UP32
#undef PAD16
#undef PAD32
    cudaError_t e = cudaStreamSynchronize(cb->st);
    cudaFree(stage);
    if (rc != 0) return -1;
    if (e != cudaSuccess) return kvh_fail(err, "cuda backend: weight upload failed: %s", cudaGetErrorString(e));
    return 0;
}

static int cuda_init(kvh_backend *be, cuda_backend *cb, const kvh_model *model, kvh_err *err) {
    const kvh_model_config *cfg = &model->cfg;
    const int HS = cfg->n_embd / cfg->n_head;
    if (HS > ATTN_MAX_HS)
        return kvh_fail(err, "cuda backend: head size %d is above the attention kernel's limit of %d", HS, ATTN_MAX_HS);
    KVH_CUDA_CHECK(err, cudaSetDevice(cb->device));
    cudaDeviceProp p;
    KVH_CUDA_CHECK(err, cudaGetDeviceProperties(&p, cb->device));
    cb->n_sm = p.multiProcessorCount;
    KVH_CUDA_CHECK(err, cudaStreamCreateWithFlags(&cb->st, cudaStreamNonBlocking));
    KVH_CUBLAS_CHECK(err, cublasCreate(&cb->blas));
    KVH_CUBLAS_CHECK(err, cublasSetStream(cb->blas, cb->st));
    const size_t blas_ws = (size_t)32 << 20;
    DALLOC(err, cb->blas_ws, blas_ws);
    KVH_CUBLAS_CHECK(err, cublasSetWorkspace(cb->blas, cb->blas_ws, blas_ws));
    if (upload_weights(cb, model, err) != 0) return -1;
    size_t free_b = 0, total_b = 0;
    KVH_CUDA_CHECK(err, cudaMemGetInfo(&free_b, &total_b));
    const kvh_model_config *mc = &model->cfg;
    const double w_mib = (double)kvh_model_config_param_count(mc) * 2.0 / (1024.0 * 1024.0);
    snprintf(be->device, sizeof be->device, "cuda: %.60s (sm_%d%d, %d SMs, %.1f GiB), fp16 weights %.0f MiB", p.name,
             p.major, p.minor, p.multiProcessorCount, (double)total_b / (1024.0 * 1024.0 * 1024.0), w_mib);
    return 0;
}

extern "C" int kvh_backend_cuda_create(kvh_backend **out, const kvh_model *model, int threads, kvh_err *err) {
    *out = NULL;
    char why[256] = "";
    if (!kvh_backend_cuda_available(why, sizeof why))
        return kvh_fail(err, "backend 'cuda': no usable CUDA device (%s). HINT: use --backend cpu", why);
    kvh_backend *be = (kvh_backend *)calloc(1, sizeof *be);
    cuda_backend *cb = (cuda_backend *)calloc(1, sizeof *cb);
    if (!be || !cb) {
        free(be);
        free(cb);
        return kvh_fail(err, "cuda backend: out of memory");
    }
    be->ops = &cuda_ops;
    be->model = model;
    be->threads = threads;
    be->impl = cb;
    be->kv_dense_elem_bytes = 2; /* dense fp16 K/V slots */
    cb->model = model;
    cb->device = 0;
    cb->mem.ctx = cb;
    cb->mem.alloc = mem_alloc;
    cb->mem.free = mem_free;
    cb->mem.copy = mem_copy;
    kvh_slot_pool_region region = {region_alloc, region_free, NULL};
    kvh_slot_pool_init(&cb->pool, region, POOL_REGION);
    const char *g = getenv("KVH_CUDA_GRAPH");
    cb->graphs = !(g && strcmp(g, "0") == 0);
    const char *ph = getenv("KVH_CUDA_PHASES");
    cb->phases = ph && strcmp(ph, "1") == 0;
    if (cuda_init(be, cb, model, err) != 0) {
        kvh_fail_prefix(err, "backend 'cuda' for %s", model->name);
        cuda_destroy(be);
        return -1;
    }
    *out = be;
    return 0;
}

extern "C" int kvh_cuda_report_stats_get(const kvh_backend *be, kvh_cuda_report_stats *out) {
    memset(out, 0, sizeof *out);
    if (!be || be->ops != &cuda_ops) return -1;
    *out = ((const cuda_backend *)be->impl)->rep_stats;
    return 0;
}

extern "C" int kvh_cuda_graph_stats_get(const kvh_backend *be, kvh_cuda_graph_stats *out) {
    memset(out, 0, sizeof *out);
    if (!be || be->ops != &cuda_ops) return -1;
    *out = ((const cuda_backend *)be->impl)->g_stats;
    return 0;
}

/* ---- test entry point of the quantized encoder (quant_format.h) ------------------------------------ */

extern "C" int kvh_cuda_quant_encode_rows(const float *rows, int n_rows, int head_dim, int bits, int group, int asym,
                                          void *slots, kvh_err *err) {
    kvh_cuda_kvfmt f;
    char msg[300];
    if (kvh_cuda_kvfmt_init(&f, bits, group, asym, head_dim, msg, sizeof msg) != 0)
        return kvh_fail(err, "kvh_cuda_quant_encode_rows: %s", msg);
    if (head_dim > QENC_MAX_HS)
        return kvh_fail(err, "kvh_cuda_quant_encode_rows: head_dim %d is above the encoder's limit of %d", head_dim,
                        QENC_MAX_HS);
    if (n_rows < 1) return 0;
    const size_t in_bytes = (size_t)n_rows * (size_t)head_dim * sizeof(float);
    const size_t out_bytes = (size_t)n_rows * (size_t)f.slot_bytes;
    float *din = NULL;
    unsigned char *dout = NULL;
    int rc = -1;
    cudaError_t e = cudaMalloc((void **)&din, in_bytes);
    if (e == cudaSuccess) e = cudaMalloc((void **)&dout, out_bytes);
    if (e == cudaSuccess) e = cudaMemcpy(din, rows, in_bytes, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemset(dout, 0xa5, out_bytes); /* every byte must be written */
    if (e == cudaSuccess) {
        kv_quant_encode_rows_kernel<<<n_rows, 32>>>(din, dout, f, head_dim);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) e = cudaMemcpy(slots, dout, out_bytes, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess) rc = 0;
    else kvh_fail(err, "kvh_cuda_quant_encode_rows: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    if (din) cudaFree(din);
    if (dout) cudaFree(dout);
    return rc;
}
