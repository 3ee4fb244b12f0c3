/* kvcache.h — the per-sequence, per-layer, per-head KV cache: slot data and slot metadata.
 * Owns: slot storage (K and V slots of a fixed byte size per layer, position, score accumulators)
 * ragged per head, growth on demand up to the head's cap, dense compaction after eviction (data and
 * metadata kept in step), validation of victim lists, and the byte accounting (bytes held, peak).
 * Does not own: deciding who is evicted (policy plugins via router.h), how a token is encoded into a
 * slot or attended (the backend, or a store plugin), where K/V memory lives: that is a kvh_kv_memory
 * (host malloc by default; a GPU backend passes device memory, the metadata always stays on the host).
 *
 * Layout: for sequence s, layer l, head h: slot i has K and V data (dense fp32 by default: head_dim
 * floats each), pos[i], score[i], obs_score[i]; live slots are 0..n-1. Eviction fills each hole with the
 * last live slot, so slot order is not chronological; GPT-2 bakes positions into K, so attention does not
 * care. Where slot data lives depends on the cache's paging (kvh_kvcache_set_paging):
 *   contiguous (block_slots 0, the default and what device memory uses): K slot i at k + i * k_slot_bytes,
 *     V likewise, one allocation each per head, regrown geometrically;
 *   paged (block_slots B, a power of two): slot i in block blk[i / B] of the layer's block pool, K at
 *     base + (i % B) * k_slot_bytes, V at base + B * k_slot_bytes + (i % B) * v_slot_bytes. Blocks are
 *     reference counted: a full block of prompt tokens can be shared by several sequences (prefix
 *     sharing), and a head about to write into a shared block takes a private copy first (copy-on-write).
 * Metadata (pos, scores, policy metadata) is always per head and contiguous. Use kvh_slot_k / kvh_slot_v
 * (or kvh_head_span for a run of slots) rather than the k / v pointers, which only the contiguous layout
 * has. */
#ifndef KVH_KVCACHE_H
#define KVH_KVCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/util.h"

#define KVH_BUDGET_UNLIMITED UINT32_MAX

/* Where K/V slot data lives. copy() moves bytes inside that memory (never across to the host). */
typedef struct kvh_kv_memory {
    void *ctx;
    void *(*alloc)(void *ctx, size_t bytes); /* NULL on failure */
    void (*free)(void *ctx, void *p);
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);
} kvh_kv_memory;

typedef struct kvh_head_cache {
    void *k;           /* contiguous layout: [cap] K slots of the layer's k_slot_bytes (dense: [cap, HS] floats) */
    void *v;           /* contiguous layout: [cap] V slots */
    uint32_t *blk;     /* paged layout: [blk_cap] block ids in the layer's pool, n_blk of them in use */
    uint32_t n_blk, blk_cap;
    int32_t *pos;      /* [cap] absolute positions */
    float *score;      /* [cap] accumulated attention, NULL unless the layer tracks scores */
    float *obs_score;  /* [cap] observation-window scores, NULL unless the layer tracks them */
    unsigned char *meta; /* [cap * slot_meta_bytes] policy metadata (ABI 1.3), NULL unless declared */
    float *report;     /* this step's probabilities for the policy's score_report (kvh_report_col /
                        * kvh_report_row): the cache's per-(seq, head) report buffer, shared by all
                        * layers (they run one after another), pointed at by kvh_kvcache_reserve on
                        * layers whose policy asked; NULL elsewhere. Not owned by the head. */
    uint32_t n;        /* live slots */
    uint32_t cap;      /* allocated slots */
    uint32_t budget;   /* target live count after eviction (KVH_BUDGET_UNLIMITED: keep all) */
} kvh_head_cache;

struct kvh_kvcache;

/* Fixed-size blocks of one layer's slot data (paged layout). A block id is an index into base[]; ref[]
 * counts the heads and prefix-cache entries holding it. Freed blocks go to free_ids and are reused. */
typedef struct kvh_block_pool {
    size_t block_bytes;   /* block_slots * (k_slot_bytes + v_slot_bytes) */
    char **base;          /* [n_ids] block memory */
    uint32_t *ref;        /* [n_ids] holders; 0 = on the free list */
    uint32_t *free_ids;   /* [n_free] ids whose memory is kept for reuse */
    uint32_t n_free, n_ids, cap_ids;
    size_t in_use;        /* blocks with ref > 0 */
    size_t shared;        /* blocks with ref > 1 */
} kvh_block_pool;

/* Per-layer settings, identical for every sequence. */
typedef struct kvh_layer_policy_settings {
    uint32_t budget;        /* per-head budget (KVH_BUDGET_UNLIMITED: keep all) */
    uint32_t slack;         /* heads grow to budget + slack before eviction */
    bool track_scores;      /* score[] kept (decode and/or prefill sums) */
    bool decode_scores;     /* add decode attention probabilities to score[] */
    bool prefill_scores;    /* add prefill column sums to score[] */
    bool obs_scores;        /* obs_score[] kept */
    uint32_t obs_window;    /* last queries of a prefill block summed into obs_score[] */
    /* ---- policy hooks of ABI 1.3, filled by the router (0 / NULL elsewhere) ---- */
    uint32_t slot_meta_bytes; /* per-slot policy metadata kept beside pos[] */
    bool report;            /* the backend fills head->report and calls policy_report after attention */
    uint32_t report_rows;   /* rows of a prefill block's last queries kept (>= 1 when report) */
    /* Called by the backend for one (seq, layer) after the T new tokens' slots are written (insert
     * hook), and after the layer's attention for every head (score_report hook; qpos[T] are the
     * queries' positions). Return 0, or -1 with err naming plugin, file, layer, seq, head and hook. */
    int (*policy_insert)(void *ctx, struct kvh_kvcache *c, int seq, int layer, int T, kvh_err *err);
    int (*policy_report)(void *ctx, struct kvh_kvcache *c, int seq, int layer, int T, const int32_t *qpos,
                         kvh_err *err);
    void *policy_ctx;
    const struct kvp_descriptor *policy; /* the policy plugin of this layer (NULL: none) */
    uint32_t k_slot_bytes;  /* bytes of one token's K in one head; 0 = dense fp32 (head_dim * 4) */
    uint32_t v_slot_bytes;  /* same for V */
    const struct kvp_descriptor *store; /* store plugin holding this layer (NULL: dense fp32) */
    void *store_state;      /* its per-layer state */
    uint32_t store_flags;   /* the instance's KVP_STORE_* promises (ABI 1.4; 0 for older stores) */
    /* Formats a failed store hook (append) as "plugin 'x' (x.so) layer L seq S head H: append failed: <its
     * message>" into err and returns -1. Filled by the router next to `store`. */
    int (*store_fail)(void *ctx, int seq, int head, const char *hook, kvh_err *err);
    void *store_fail_ctx;   /* also the ctx of store_param */
    /* The store's parameter values as parsed by the host (e.g. "bits"), for backends that implement a
     * known store format natively (the CUDA backend's int8/int4 kernels). Unknown names give 0. */
    double (*store_param)(void *ctx, const char *name);
} kvh_layer_policy_settings;

typedef struct kvh_kvcache {
    int n_seq, n_layer, n_head, head_dim, n_ctx;
    kvh_layer_policy_settings *layer; /* [L] */
    kvh_head_cache *heads;            /* [n_seq * L * NH], index kvh_kvcache_head_index */
    int32_t *next_pos;                /* [n_seq] position of the next token of each sequence */
    size_t bytes_held;                /* bytes allocated for slots right now (data + metadata) */
    size_t bytes_peak;                /* largest bytes_held seen */
    size_t bytes_limit;               /* 0 = none; growth beyond it fails (emulates a smaller memory) */
    size_t store_bytes;               /* part of bytes_held: memory store plugins hold outside the slots */
    size_t snapshot_bytes;            /* part of bytes_held: policy-state snapshots of shared prompt blocks */
    float **report_buf;               /* [n_seq * NH] score-report buffers (ABI 1.3), counted in bytes_held */
    size_t *report_floats;            /* [n_seq * NH] their sizes */
    uint32_t *scratch_victims;        /* [n_ctx + max slack] scratch for victim lists */
    unsigned char *scratch_mark;      /* [same] scratch for validation */
    uint32_t scratch_len;
    kvh_kv_memory mem;                /* where slot data lives */
    /* ---- paged layout (kvh_kvcache_set_paging; 0 / NULL: contiguous) ---- */
    uint32_t block_slots;             /* slots per block, a power of two */
    uint32_t block_shift;             /* log2(block_slots) */
    kvh_block_pool *pool;             /* [L] one pool per layer (slot sizes differ between layers) */
    size_t cow_copies;                /* blocks copied because a head wrote into a shared one */
    void *gather_buf;                 /* paged: one head's slots as contiguous runs for store release hooks */
    size_t gather_bytes;
} kvh_kvcache;

/* Host memory: malloc / free / memcpy. */
kvh_kv_memory kvh_kv_memory_host(void);

/* Creates an empty cache in host memory. settings[L] may be NULL (keep all, no scores, dense fp32). */
int kvh_kvcache_init(kvh_kvcache *c, int n_seq, int n_layer, int n_head, int head_dim, int n_ctx,
                     const kvh_layer_policy_settings *settings, size_t bytes_limit, kvh_err *err);
/* Same with slot data in `mem` (e.g. device memory). */
int kvh_kvcache_init_mem(kvh_kvcache *c, int n_seq, int n_layer, int n_head, int head_dim, int n_ctx,
                         const kvh_layer_policy_settings *settings, size_t bytes_limit, const kvh_kv_memory *mem,
                         kvh_err *err);
void kvh_kvcache_free(kvh_kvcache *c);
/* Switches an empty cache in host memory to the paged layout with block_slots slots per block (a power
 * of two, 1..4096). 0 keeps the contiguous layout. Fails on device memory or a non-empty cache. */
int kvh_kvcache_set_paging(kvh_kvcache *c, uint32_t block_slots, kvh_err *err);
/* Empties sequence s (keeps nothing, frees its slots, next_pos = 0). Stores with a release hook are
 * told every live slot goes. */
void kvh_kvcache_reset_seq(kvh_kvcache *c, int s);

static inline size_t kvh_kvcache_head_index(const kvh_kvcache *c, int s, int l, int h) {
    return ((size_t)s * (size_t)c->n_layer + (size_t)l) * (size_t)c->n_head + (size_t)h;
}
static inline kvh_head_cache *kvh_kvcache_head(kvh_kvcache *c, int s, int l, int h) {
    return &c->heads[kvh_kvcache_head_index(c, s, l, h)];
}

/* Makes room for `extra` more slots in every head of (s, l). Fails when the byte limit would be
 * exceeded ("KV cache needs N bytes, limit is M") or memory runs out. */
int kvh_kvcache_reserve(kvh_kvcache *c, int s, int l, uint32_t extra, kvh_err *err);

/* Bytes kvh_kvcache_reserve(c, s, l, extra) would add over all layers of sequence s right now: slot
 * data and metadata (not score-report buffers or a store plugin's own memory). Planners use it to keep
 * a step inside the byte limit. */
size_t kvh_kvcache_bytes_to_append(const kvh_kvcache *c, int s, uint32_t extra);

/* Bytes of per-slot metadata `slots` slots take in every head of one sequence (what attaching shared
 * blocks costs: the blocks themselves are held already). */
size_t kvh_kvcache_meta_bytes(const kvh_kvcache *c, uint32_t slots);

/* Appends T tokens' metadata to every head of (s, l) (positions, zero scores, n += T) and returns the
 * first new slot index; the caller writes the slot data (backend or store encode). Call reserve first.
 * All heads of a layer hold the same count after an append only when they did before: the returned
 * slot is per head, so use kvh_kvcache_head(c, s, l, h)->n - T for each head. */
void kvh_kvcache_append_meta(kvh_kvcache *c, int s, int l, int T, const int32_t *pos);

/* Host-memory dense fp32 convenience: appends T tokens to every head of (s, l). k_rows/v_rows point at
 * row 0 of a [T, row_stride] matrix whose head h occupies columns h*HS..h*HS+HS-1. */
void kvh_kvcache_append(kvh_kvcache *c, int s, int l, int T, const float *k_rows, const float *v_rows,
                        size_t row_stride, const int32_t *pos);

/* Checks a victim list for head (n_live slots, must reach `budget`): every index < n_live, no duplicates,
 * count >= n_live - budget, count <= n_live. On failure names the problem (first bad index). */
int kvh_kvcache_validate_victims(kvh_kvcache *c, uint32_t n_live, uint32_t budget, const uint32_t *victims,
                                 uint32_t n_victims, kvh_err *err);
/* Removes the (validated) victims from head (s, l, h), keeping K, V, pos and scores in step. A store
 * with a release hook (ABI 1.2) is told which slots go first. Paged: shared blocks that compaction writes
 * into are copied first, and blocks left empty go back to the pool; fails only when such a copy does not
 * fit the memory limit (the head is then unchanged). */
int kvh_kvcache_remove(kvh_kvcache *c, int s, int l, int h, const uint32_t *victims, uint32_t n_victims,
                       kvh_err *err);
/* Gives memory back when a head holds far fewer slots than its capacity (after eviction). */
void kvh_kvcache_shrink(kvh_kvcache *c, int s, int l, int h);

/* Memory a store plugin holds outside the slots (its host->alloc calls), counted in bytes_held and
 * bytes_peak. grow fails (-1, nothing counted) when bytes_limit would be passed. */
int kvh_kvcache_store_grow(kvh_kvcache *c, size_t bytes);
void kvh_kvcache_store_shrink(kvh_kvcache *c, size_t bytes);

/* True when some head of (s, l) holds more than budget + slack slots (a policy must evict). */
bool kvh_kvcache_over_budget(const kvh_kvcache *c, int s, int l);

/* Live-token statistics for records and invariant checks. */
size_t kvh_kvcache_live_tokens(const kvh_kvcache *c);          /* sum of n over all heads */
uint32_t kvh_kvcache_max_live(const kvh_kvcache *c, int l);    /* max n over sequences and heads of l */
/* Bytes of K and V data in live slots (what a perfectly tight store would hold). */
size_t kvh_kvcache_live_kv_bytes(const kvh_kvcache *c);
/* The score-report buffer of a head during one step of T queries (kvh_layer_policy_settings.report):
 * column sums over the T queries, then the rows of the last min(T, report_rows) queries. A decode step
 * (T == 1) keeps only its row, which is then also the column sum. n = the head's live count. */
static inline float *kvh_report_col(kvh_head_cache *hc) { return hc->report; }
static inline float *kvh_report_row(kvh_head_cache *hc, int T, uint32_t r) {
    return T == 1 ? hc->report : hc->report + (size_t)(1 + r) * hc->n;
}

/* Slot sizes of layer l (resolving the dense default). */
static inline uint32_t kvh_kvcache_k_slot_bytes(const kvh_kvcache *c, int l) {
    uint32_t b = c->layer[l].k_slot_bytes;
    return b ? b : (uint32_t)c->head_dim * (uint32_t)sizeof(float);
}
static inline uint32_t kvh_kvcache_v_slot_bytes(const kvh_kvcache *c, int l) {
    uint32_t b = c->layer[l].v_slot_bytes;
    return b ? b : (uint32_t)c->head_dim * (uint32_t)sizeof(float);
}

/* K / V data of slot i of a head of layer l, in either layout. */
static inline char *kvh_slot_k(const kvh_kvcache *c, int l, const kvh_head_cache *hc, uint32_t i) {
    if (!c->block_slots) return (char *)hc->k + (size_t)i * kvh_kvcache_k_slot_bytes(c, l);
    return c->pool[l].base[hc->blk[i >> c->block_shift]] +
           (size_t)(i & (c->block_slots - 1)) * kvh_kvcache_k_slot_bytes(c, l);
}
static inline char *kvh_slot_v(const kvh_kvcache *c, int l, const kvh_head_cache *hc, uint32_t i) {
    const size_t kb = kvh_kvcache_k_slot_bytes(c, l);
    if (!c->block_slots) return (char *)hc->v + (size_t)i * kvh_kvcache_v_slot_bytes(c, l);
    return c->pool[l].base[hc->blk[i >> c->block_shift]] + (size_t)c->block_slots * kb +
           (size_t)(i & (c->block_slots - 1)) * kvh_kvcache_v_slot_bytes(c, l);
}
/* Slots are stored in spans of consecutive K and V slots: span b holds slots first..first+count-1 with
 * K at *k and V at *v. The contiguous layout has one span; the paged layout one per block. Returns the
 * number of spans covering the head's n live slots. */
static inline uint32_t kvh_head_spans(const kvh_kvcache *c, const kvh_head_cache *hc) {
    if (!c->block_slots) return hc->n ? 1u : 0u;
    return (hc->n + c->block_slots - 1) >> c->block_shift;
}
static inline uint32_t kvh_head_span(const kvh_kvcache *c, int l, const kvh_head_cache *hc, uint32_t b,
                                     const char **k, const char **v) {
    if (!c->block_slots) {
        *k = (const char *)hc->k;
        *v = (const char *)hc->v;
        return hc->n;
    }
    const uint32_t first = b << c->block_shift, left = hc->n - first;
    const char *base = c->pool[l].base[hc->blk[b]];
    *k = base;
    *v = base + (size_t)c->block_slots * kvh_kvcache_k_slot_bytes(c, l);
    return left < c->block_slots ? left : c->block_slots;
}

/* Copies the head's n live K slots into k_out and V slots into v_out as one contiguous run each (what a
 * store plugin's hooks expect), and back: scatter writes slots first..n-1 of the runs into the head's
 * blocks, taking private copies of shared blocks whose bytes change. Contiguous layout: no-ops. */
void kvh_kvcache_gather(const kvh_kvcache *c, int l, const kvh_head_cache *hc, void *k_out, void *v_out);
int kvh_kvcache_scatter(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t first, const void *k_in,
                        const void *v_in, kvh_err *err);

/* ---- prefix sharing (paged layout) ---- */
/* Makes blocks [0, n_blocks) of head (s, l, h) private: a block another holder also references is
 * copied first. Used before writing into a head's slots. */
int kvh_kvcache_make_private(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t first_slot, uint32_t end_slot,
                             kvh_err *err);
/* A reference on block `id` of layer l's pool (prefix cache entries hold blocks this way). */
void kvh_block_ref(kvh_kvcache *c, int l, uint32_t id);
void kvh_block_unref(kvh_kvcache *c, int l, uint32_t id);
/* Gives the empty head (s, l, h) the n_blocks full blocks ids[] (taking a reference on each), with
 * positions pos[n_blocks * block_slots] and zero scores / metadata: the head then holds those slots. */
int kvh_kvcache_attach_blocks(kvh_kvcache *c, int s, int l, int h, const uint32_t *ids, uint32_t n_blocks,
                              const int32_t *pos, kvh_err *err);

/* ---- policy state of shared prompt blocks (prefix sharing under an evicting policy) ----
 * A head's policy state over slots [0, n): scores, observation scores, policy metadata (as the layer keeps
 * them) and the head's budget, saved to / loaded from a flat buffer of kvh_kvcache_policy_state_bytes(c, l, n)
 * bytes. Load overwrites what attaching blocks set (zeros); the slots must exist. */
size_t kvh_kvcache_policy_state_bytes(const kvh_kvcache *c, int l, uint32_t n);
void kvh_kvcache_policy_state_save(const kvh_kvcache *c, int s, int l, int h, uint32_t n, void *out);
void kvh_kvcache_policy_state_load(kvh_kvcache *c, int s, int l, int h, uint32_t n, const void *in);
/* Memory held for such snapshots, counted in bytes_held (and snapshot_bytes): grow fails (-1, nothing
 * counted) when bytes_limit would be passed. */
int kvh_kvcache_snapshot_grow(kvh_kvcache *c, size_t bytes);
void kvh_kvcache_snapshot_shrink(kvh_kvcache *c, size_t bytes);

/* Paged layout figures for records: blocks in use, of them shared, kept free in the pools, and slots in
 * in-use blocks that hold no live token (internal fragmentation). Contiguous: zeros. */
typedef struct kvh_kvcache_paging_stats {
    size_t blocks_in_use, blocks_shared, blocks_free, slots_unused, slots_total;
    size_t block_bytes_in_use; /* data bytes of in-use blocks (each shared block once) */
    size_t pool_bytes;         /* data bytes the pools hold, free blocks included */
} kvh_kvcache_paging_stats;
void kvh_kvcache_paging_stats_get(const kvh_kvcache *c, kvh_kvcache_paging_stats *out);

#endif
