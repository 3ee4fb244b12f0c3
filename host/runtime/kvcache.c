/* kvcache.c — implementation of the KV cache declared in kvcache.h. */
#include "runtime/kvcache.h"

#include <stdlib.h>
#include <string.h>

#include "kvp/kvp.h"

#include "runtime/plugin_guard.h"

static void *host_alloc(void *ctx, size_t bytes) {
    (void)ctx;
    return malloc(bytes ? bytes : 1);
}
static void host_free(void *ctx, void *p) {
    (void)ctx;
    free(p);
}
static void host_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    memcpy(dst, src, bytes);
}

kvh_kv_memory kvh_kv_memory_host(void) {
    kvh_kv_memory m = {.ctx = NULL, .alloc = host_alloc, .free = host_free, .copy = host_copy};
    return m;
}

/* Bytes one slot of a head's capacity costs: the metadata kept for its layer, plus the K and V data in
 * the contiguous layout (paged: data is counted per block by the pool). */
static size_t slot_bytes(const kvh_kvcache *c, int l) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    size_t b = sizeof(int32_t);
    if (!c->block_slots) b += (size_t)kvh_kvcache_k_slot_bytes(c, l) + kvh_kvcache_v_slot_bytes(c, l);
    if (ls->track_scores) b += sizeof(float);
    if (ls->obs_scores) b += sizeof(float);
    b += ls->slot_meta_bytes;
    return b;
}

/* ---- block pools (paged layout) ------------------------------------------------------------------- */

static int head_resize(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t new_cap);

static void count_held(kvh_kvcache *c, size_t add) {
    c->bytes_held += add;
    if (c->bytes_held > c->bytes_peak) c->bytes_peak = c->bytes_held;
}

/* Whether holding `bytes` more would pass the byte limit (written so that it cannot overflow). */
static bool passes_limit(const kvh_kvcache *c, size_t bytes) {
    return c->bytes_limit && (c->bytes_held > c->bytes_limit || bytes > c->bytes_limit - c->bytes_held);
}

/* Memory held beside the slots (a store's own, prefix-cache snapshots): counted in bytes_held and in its
 * part of it. */
static int grow_part(kvh_kvcache *c, size_t *part, size_t bytes) {
    if (passes_limit(c, bytes)) return -1;
    *part += bytes;
    count_held(c, bytes);
    return 0;
}

static void shrink_part(kvh_kvcache *c, size_t *part, size_t bytes) {
    if (bytes > *part) bytes = *part;
    *part -= bytes;
    c->bytes_held -= bytes;
}

/* A fresh block (reference count 1) of layer l, or -1 when the memory limit or memory runs out. */
static int pool_alloc(kvh_kvcache *c, int l, uint32_t *id_out) {
    kvh_block_pool *p = &c->pool[l];
    if (passes_limit(c, p->block_bytes)) return -1;
    uint32_t id;
    if (p->n_free) {
        id = p->free_ids[--p->n_free];
    } else {
        if (p->n_ids == p->cap_ids) {
            uint32_t nc = p->cap_ids ? p->cap_ids * 2 : 64;
            char **b = realloc(p->base, nc * sizeof *b);
            if (!b) return -1;
            p->base = b;
            uint32_t *r = realloc(p->ref, nc * sizeof *r);
            if (!r) return -1;
            p->ref = r;
            uint32_t *f = realloc(p->free_ids, nc * sizeof *f);
            if (!f) return -1;
            p->free_ids = f;
            p->cap_ids = nc;
        }
        char *mem = malloc(p->block_bytes);
        if (!mem) return -1;
        id = p->n_ids++;
        p->base[id] = mem;
    }
    p->ref[id] = 1;
    p->in_use++;
    count_held(c, p->block_bytes);
    *id_out = id;
    return 0;
}

void kvh_block_ref(kvh_kvcache *c, int l, uint32_t id) {
    kvh_block_pool *p = &c->pool[l];
    if (p->ref[id] == 1) p->shared++;
    p->ref[id]++;
}

void kvh_block_unref(kvh_kvcache *c, int l, uint32_t id) {
    kvh_block_pool *p = &c->pool[l];
    if (p->ref[id] == 2) p->shared--;
    if (--p->ref[id] == 0) {
        p->in_use--;
        c->bytes_held -= p->block_bytes;
        p->free_ids[p->n_free++] = id;
    }
}

int kvh_kvcache_set_paging(kvh_kvcache *c, uint32_t block_slots, kvh_err *err) {
    if (block_slots == 0) return 0;
    if (block_slots > 4096 || (block_slots & (block_slots - 1)))
        return kvh_fail(err, "kv cache: block size %u is not a power of two between 1 and 4096", block_slots);
    kvh_kv_memory host = kvh_kv_memory_host();
    if (c->mem.alloc != host.alloc)
        return kvh_fail(err, "kv cache: the paged layout needs host memory; this backend keeps K/V elsewhere "
                        "(set [cache] block_size = 0)");
    if (c->bytes_held) return kvh_fail(err, "kv cache: paging can only be switched on an empty cache");
    c->pool = calloc((size_t)c->n_layer, sizeof *c->pool);
    if (!c->pool) return kvh_fail(err, "kv cache: out of memory for block pools");
    c->block_slots = block_slots;
    c->block_shift = 0;
    while ((1u << c->block_shift) < block_slots) c->block_shift++;
    for (int l = 0; l < c->n_layer; l++)
        c->pool[l].block_bytes =
            (size_t)block_slots * ((size_t)kvh_kvcache_k_slot_bytes(c, l) + kvh_kvcache_v_slot_bytes(c, l));
    return 0;
}

/* Makes sure head hc of layer l has blocks for `slots` slots. On failure the blocks already taken stay
 * (the head is still valid, with spare capacity) and -1 is returned. */
static int head_blocks_ensure(kvh_kvcache *c, int l, kvh_head_cache *hc, uint64_t slots) {
    const uint32_t need = (uint32_t)((slots + c->block_slots - 1) >> c->block_shift);
    if (need > hc->blk_cap) {
        uint32_t nc = hc->blk_cap ? hc->blk_cap * 2 : 4;
        if (nc < need) nc = need;
        uint32_t *b = realloc(hc->blk, (size_t)nc * sizeof *b);
        if (!b) return -1;
        hc->blk = b;
        hc->blk_cap = nc;
    }
    while (hc->n_blk < need) {
        uint32_t id;
        if (pool_alloc(c, l, &id) != 0) return -1;
        hc->blk[hc->n_blk++] = id;
    }
    return 0;
}

/* Returns the blocks beyond the head's live slots to the pool. */
static void head_blocks_trim(kvh_kvcache *c, int l, kvh_head_cache *hc) {
    const uint32_t need = (hc->n + c->block_slots - 1) >> c->block_shift;
    while (hc->n_blk > need) kvh_block_unref(c, l, hc->blk[--hc->n_blk]);
}

int kvh_kvcache_make_private(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t first_slot, uint32_t end_slot,
                             kvh_err *err) {
    if (!c->block_slots || end_slot <= first_slot) return 0;
    kvh_block_pool *p = &c->pool[l];
    uint32_t last = (end_slot - 1) >> c->block_shift;
    if (last >= hc->n_blk) last = hc->n_blk ? hc->n_blk - 1 : 0;
    for (uint32_t b = first_slot >> c->block_shift; b <= last && b < hc->n_blk; b++) {
        const uint32_t old = hc->blk[b];
        if (p->ref[old] <= 1) continue;
        uint32_t id;
        if (pool_alloc(c, l, &id) != 0)
            return kvh_fail(err, "kv cache: a private copy of a shared block (layer %d) needs %zu bytes but the memory "
                            "limit of %zu bytes is reached (%zu held)", l, p->block_bytes, c->bytes_limit, c->bytes_held);
        memcpy(p->base[id], p->base[old], p->block_bytes);
        kvh_block_unref(c, l, old);
        hc->blk[b] = id;
        c->cow_copies++;
    }
    return 0;
}

int kvh_kvcache_attach_blocks(kvh_kvcache *c, int s, int l, int h, const uint32_t *ids, uint32_t n_blocks,
                              const int32_t *pos, kvh_err *err) {
    kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
    if (!c->block_slots) return kvh_fail(err, "kv cache: shared blocks need the paged layout");
    if (hc->n || hc->n_blk) return kvh_fail(err, "kv cache: blocks can only be attached to an empty head");
    const uint64_t slots = (uint64_t)n_blocks << c->block_shift;
    if (slots > (uint64_t)c->n_ctx) return kvh_fail(err, "kv cache: %u shared blocks exceed n_positions", n_blocks);
    if (slots > hc->cap) {
        const size_t grow = (size_t)(slots - hc->cap) * slot_bytes(c, l);
        if (c->bytes_limit && c->bytes_held + grow > c->bytes_limit)
            return kvh_fail(err, "kv cache: the metadata of %llu shared slots needs %zu bytes but the memory limit of %zu "
                            "bytes is reached (%zu held)", (unsigned long long)slots, grow, c->bytes_limit, c->bytes_held);
        if (head_resize(c, l, hc, (uint32_t)slots) != 0)
            return kvh_fail(err, "kv cache: out of memory for the metadata of sequence %d layer %d head %d", s, l, h);
    }
    if (n_blocks > hc->blk_cap) {
        uint32_t *b = realloc(hc->blk, (size_t)n_blocks * sizeof *b);
        if (!b) return kvh_fail(err, "kv cache: out of memory for a block table");
        hc->blk = b;
        hc->blk_cap = n_blocks;
    }
    for (uint32_t b = 0; b < n_blocks; b++) {
        kvh_block_ref(c, l, ids[b]);
        hc->blk[b] = ids[b];
    }
    hc->n_blk = n_blocks;
    for (uint32_t i = 0; i < (uint32_t)slots; i++) {
        hc->pos[i] = pos[i];
        if (hc->score) hc->score[i] = 0.0f;
        if (hc->obs_score) hc->obs_score[i] = 0.0f;
    }
    if (hc->meta) memset(hc->meta, 0, (size_t)slots * c->layer[l].slot_meta_bytes);
    hc->n = (uint32_t)slots;
    return 0;
}

void kvh_kvcache_gather(const kvh_kvcache *c, int l, const kvh_head_cache *hc, void *k_out, void *v_out) {
    const size_t kb = kvh_kvcache_k_slot_bytes(c, l), vb = kvh_kvcache_v_slot_bytes(c, l);
    const uint32_t spans = kvh_head_spans(c, hc);
    for (uint32_t b = 0; b < spans; b++) {
        const char *k, *v;
        const uint32_t cnt = kvh_head_span(c, l, hc, b, &k, &v);
        const size_t first = (size_t)b << c->block_shift;
        memcpy((char *)k_out + first * kb, k, cnt * kb);
        memcpy((char *)v_out + first * vb, v, cnt * vb);
    }
}

int kvh_kvcache_scatter(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t first, const void *k_in,
                        const void *v_in, kvh_err *err) {
    if (!c->block_slots) return 0;
    const size_t kb = kvh_kvcache_k_slot_bytes(c, l), vb = kvh_kvcache_v_slot_bytes(c, l);
    const kvh_block_pool *p = &c->pool[l];
    const uint32_t spans = kvh_head_spans(c, hc);
    for (uint32_t b = first >> c->block_shift; b < spans; b++) {
        const uint32_t s0 = b << c->block_shift;
        const uint32_t from = s0 > first ? s0 : first;
        uint32_t end = s0 + c->block_slots;
        if (end > hc->n) end = hc->n;
        const char *ks = (const char *)k_in + (size_t)from * kb, *vs = (const char *)v_in + (size_t)from * vb;
        if (p->ref[hc->blk[b]] > 1) {
            /* Shared: only a block whose bytes really change gets its own copy. */
            if (memcmp(kvh_slot_k(c, l, hc, from), ks, (end - from) * kb) == 0 &&
                memcmp(kvh_slot_v(c, l, hc, from), vs, (end - from) * vb) == 0)
                continue;
            if (kvh_kvcache_make_private(c, l, hc, s0, s0 + 1, err) != 0) return -1;
        }
        memcpy(kvh_slot_k(c, l, hc, from), ks, (end - from) * kb);
        memcpy(kvh_slot_v(c, l, hc, from), vs, (end - from) * vb);
    }
    return 0;
}

void kvh_kvcache_paging_stats_get(const kvh_kvcache *c, kvh_kvcache_paging_stats *out) {
    memset(out, 0, sizeof *out);
    if (!c->block_slots) return;
    for (int l = 0; l < c->n_layer; l++) {
        const kvh_block_pool *p = &c->pool[l];
        out->blocks_in_use += p->in_use;
        out->blocks_shared += p->shared;
        out->blocks_free += p->n_free;
        out->block_bytes_in_use += p->in_use * p->block_bytes;
        out->pool_bytes += (size_t)p->n_ids * p->block_bytes;
    }
    /* Unused slots are the free tails of the heads' last blocks (shared blocks are always full; a tail
     * block shared with the prefix cache is counted once, by the head). */
    size_t unused = 0;
    const size_t nh = (size_t)c->n_seq * (size_t)c->n_layer * (size_t)c->n_head;
    for (size_t i = 0; i < nh; i++) {
        const kvh_head_cache *hc = &c->heads[i];
        if (hc->n_blk) unused += ((size_t)hc->n_blk << c->block_shift) - hc->n;
    }
    out->slots_total = out->blocks_in_use << c->block_shift;
    out->slots_unused = unused;
}

int kvh_kvcache_init(kvh_kvcache *c, int n_seq, int n_layer, int n_head, int head_dim, int n_ctx,
                     const kvh_layer_policy_settings *settings, size_t bytes_limit, kvh_err *err) {
    kvh_kv_memory host = kvh_kv_memory_host();
    return kvh_kvcache_init_mem(c, n_seq, n_layer, n_head, head_dim, n_ctx, settings, bytes_limit, &host, err);
}

int kvh_kvcache_init_mem(kvh_kvcache *c, int n_seq, int n_layer, int n_head, int head_dim, int n_ctx,
                         const kvh_layer_policy_settings *settings, size_t bytes_limit, const kvh_kv_memory *mem,
                         kvh_err *err) {
    memset(c, 0, sizeof *c);
    c->mem = *mem;
    if (n_seq < 1 || n_layer < 1 || n_head < 1 || head_dim < 1 || n_ctx < 1)
        return kvh_fail(err, "kv cache: invalid shape (seq %d, layers %d, heads %d, head_dim %d, ctx %d)", n_seq,
                        n_layer, n_head, head_dim, n_ctx);
    c->n_seq = n_seq;
    c->n_layer = n_layer;
    c->n_head = n_head;
    c->head_dim = head_dim;
    c->n_ctx = n_ctx;
    c->bytes_limit = bytes_limit;
    c->layer = calloc((size_t)n_layer, sizeof *c->layer);
    c->heads = calloc((size_t)n_seq * (size_t)n_layer * (size_t)n_head, sizeof *c->heads);
    c->next_pos = calloc((size_t)n_seq, sizeof *c->next_pos);
    uint32_t max_slack = 0;
    for (int l = 0; l < n_layer; l++) {
        if (settings) {
            c->layer[l] = settings[l];
        } else {
            c->layer[l].budget = KVH_BUDGET_UNLIMITED;
        }
        if (c->layer[l].decode_scores || c->layer[l].prefill_scores) c->layer[l].track_scores = true;
        if (c->layer[l].slack > max_slack) max_slack = c->layer[l].slack;
    }
    /* A head never holds more than n_ctx tokens: positions are unique and below n_ctx. */
    c->scratch_len = (uint32_t)n_ctx + max_slack + 1;
    c->scratch_victims = malloc(c->scratch_len * sizeof *c->scratch_victims);
    c->scratch_mark = calloc(c->scratch_len, 1);
    if (!c->layer || !c->heads || !c->next_pos || !c->scratch_victims || !c->scratch_mark) {
        kvh_kvcache_free(c);
        return kvh_fail(err, "kv cache: out of memory for %d sequences x %d layers x %d heads", n_seq, n_layer,
                        n_head);
    }
    size_t nh = (size_t)n_seq * (size_t)n_layer * (size_t)n_head;
    for (size_t i = 0; i < nh; i++) {
        int l = (int)((i / (size_t)n_head) % (size_t)n_layer);
        c->heads[i].budget = c->layer[l].budget;
    }
    return 0;
}

static void head_release(kvh_kvcache *c, int l, kvh_head_cache *hc) {
    if (hc->k) c->mem.free(c->mem.ctx, hc->k);
    if (hc->v) c->mem.free(c->mem.ctx, hc->v);
    while (hc->n_blk) kvh_block_unref(c, l, hc->blk[--hc->n_blk]);
    free(hc->blk);
    hc->blk = NULL;
    hc->blk_cap = 0;
    free(hc->pos);
    free(hc->score);
    free(hc->obs_score);
    free(hc->meta);
    hc->meta = NULL;
    hc->report = NULL;
    hc->k = hc->v = NULL;
    hc->pos = NULL;
    hc->score = hc->obs_score = NULL;
    hc->n = hc->cap = 0;
}

void kvh_kvcache_free(kvh_kvcache *c) {
    if (c->heads) {
        size_t nh = (size_t)c->n_seq * (size_t)c->n_layer * (size_t)c->n_head;
        for (size_t i = 0; i < nh; i++) head_release(c, (int)((i / (size_t)c->n_head) % (size_t)c->n_layer), &c->heads[i]);
    }
    if (c->pool) {
        for (int l = 0; l < c->n_layer; l++) {
            kvh_block_pool *p = &c->pool[l];
            for (uint32_t i = 0; i < p->n_ids; i++) free(p->base[i]);
            free(p->base);
            free(p->ref);
            free(p->free_ids);
        }
        free(c->pool);
    }
    free(c->gather_buf);
    if (c->report_buf)
        for (size_t i = 0; i < (size_t)c->n_seq * (size_t)c->n_head; i++) free(c->report_buf[i]);
    free(c->report_buf);
    free(c->report_floats);
    free(c->heads);
    free(c->layer);
    free(c->next_pos);
    free(c->scratch_victims);
    free(c->scratch_mark);
    memset(c, 0, sizeof *c);
}

/* Tells the layer's store (ABI 1.2 release hook) that slots of head (s, l, h) are about to go. */
static void store_release(kvh_kvcache *c, int s, int l, int h, const uint32_t *slots, uint32_t n_slots) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    if (!ls->store || !ls->store->release || n_slots == 0) return;
    kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
    const void *k_slots = hc->k, *v_slots = hc->v;
    if (c->block_slots) {
        /* The hook reads the slots (handles) as one run: hand it a contiguous copy. */
        const size_t kb = kvh_kvcache_k_slot_bytes(c, l), vb = kvh_kvcache_v_slot_bytes(c, l);
        const size_t need = (size_t)hc->n * (kb + vb);
        if (need > c->gather_bytes) {
            void *g = realloc(c->gather_buf, need);
            if (!g) return; /* the store is then not told; its memory is freed at reset / destroy */
            c->gather_buf = g;
            c->gather_bytes = need;
        }
        k_slots = c->gather_buf;
        v_slots = (char *)c->gather_buf + (size_t)hc->n * kb;
        if (ls->store_flags & KVP_STORE_SELF_CONTAINED) { /* it reads at most the slots going away */
            for (uint32_t i = 0; i < n_slots; i++) {
                memcpy((char *)c->gather_buf + (size_t)slots[i] * kb, kvh_slot_k(c, l, hc, slots[i]), kb);
                memcpy((char *)v_slots + (size_t)slots[i] * vb, kvh_slot_v(c, l, hc, slots[i]), vb);
            }
        } else {
            kvh_kvcache_gather(c, l, hc, c->gather_buf, (char *)v_slots);
        }
    }
    kvp_release_args a = {.struct_size = sizeof a,
                          .seq = (uint32_t)s,
                          .head = (uint32_t)h,
                          .n_live = hc->n,
                          .pos = hc->pos,
                          .k_slots = k_slots,
                          .v_slots = v_slots,
                          .slots = slots,
                          .n_slots = n_slots};
    kvh_plugin_guard_enter(ls->store->name, kvh_plugin_site_of(ls->store_fail_ctx)->file, "release", l);
    ls->store->release(ls->store_state, &a);
    kvh_plugin_guard_leave();
}

int kvh_kvcache_store_grow(kvh_kvcache *c, size_t bytes) { return grow_part(c, &c->store_bytes, bytes); }
void kvh_kvcache_store_shrink(kvh_kvcache *c, size_t bytes) { shrink_part(c, &c->store_bytes, bytes); }
int kvh_kvcache_snapshot_grow(kvh_kvcache *c, size_t bytes) { return grow_part(c, &c->snapshot_bytes, bytes); }
void kvh_kvcache_snapshot_shrink(kvh_kvcache *c, size_t bytes) { shrink_part(c, &c->snapshot_bytes, bytes); }

size_t kvh_kvcache_policy_state_bytes(const kvh_kvcache *c, int l, uint32_t n) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    const size_t per_slot = (ls->track_scores ? sizeof(float) : 0) + (ls->obs_scores ? sizeof(float) : 0) +
                            ls->slot_meta_bytes;
    return sizeof(uint32_t) + (size_t)n * per_slot;
}

void kvh_kvcache_policy_state_save(const kvh_kvcache *c, int s, int l, int h, uint32_t n, void *out) {
    const kvh_head_cache *hc = &c->heads[kvh_kvcache_head_index(c, s, l, h)];
    const size_t mb = (size_t)n * c->layer[l].slot_meta_bytes;
    char *p = out;
    memcpy(p, &hc->budget, sizeof hc->budget);
    p += sizeof hc->budget;
    if (hc->score) {
        memcpy(p, hc->score, n * sizeof(float));
        p += n * sizeof(float);
    }
    if (hc->obs_score) {
        memcpy(p, hc->obs_score, n * sizeof(float));
        p += n * sizeof(float);
    }
    if (hc->meta) memcpy(p, hc->meta, mb);
}

void kvh_kvcache_policy_state_load(kvh_kvcache *c, int s, int l, int h, uint32_t n, const void *in) {
    kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
    const size_t mb = (size_t)n * c->layer[l].slot_meta_bytes;
    const char *p = in;
    memcpy(&hc->budget, p, sizeof hc->budget);
    p += sizeof hc->budget;
    if (hc->score) {
        memcpy(hc->score, p, n * sizeof(float));
        p += n * sizeof(float);
    }
    if (hc->obs_score) {
        memcpy(hc->obs_score, p, n * sizeof(float));
        p += n * sizeof(float);
    }
    if (hc->meta) memcpy(hc->meta, p, mb);
}

void kvh_kvcache_reset_seq(kvh_kvcache *c, int s) {
    for (int l = 0; l < c->n_layer; l++) {
        size_t per_slot = slot_bytes(c, l);
        for (int h = 0; h < c->n_head; h++) {
            kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
            if (c->layer[l].store && c->layer[l].store->release && hc->n > 0 && hc->n <= c->scratch_len) {
                for (uint32_t i = 0; i < hc->n; i++) c->scratch_victims[i] = i;
                store_release(c, s, l, h, c->scratch_victims, hc->n);
            }
            c->bytes_held -= (size_t)hc->cap * per_slot;
            head_release(c, l, hc);
            hc->budget = c->layer[l].budget;
        }
    }
    c->next_pos[s] = 0;
}

/* Reallocates one head to new_cap slots (>= n). Returns 0 or -1 (head unchanged) on allocation failure. */
static int head_resize(kvh_kvcache *c, int l, kvh_head_cache *hc, uint32_t new_cap) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    const size_t kb = kvh_kvcache_k_slot_bytes(c, l), vb = kvh_kvcache_v_slot_bytes(c, l);
    if (c->block_slots) goto metadata; /* paged: slot data lives in blocks, see head_blocks_ensure */
    /* slot data: allocate the new blocks, move the live slots, then free the old ones */
    void *k = c->mem.alloc(c->mem.ctx, (size_t)new_cap * kb);
    void *v = k ? c->mem.alloc(c->mem.ctx, (size_t)new_cap * vb) : NULL;
    if (!k || !v) {
        if (k) c->mem.free(c->mem.ctx, k);
        return -1;
    }
    if (hc->n) {
        c->mem.copy(c->mem.ctx, k, hc->k, (size_t)hc->n * kb);
        c->mem.copy(c->mem.ctx, v, hc->v, (size_t)hc->n * vb);
    }
    if (hc->k) c->mem.free(c->mem.ctx, hc->k);
    if (hc->v) c->mem.free(c->mem.ctx, hc->v);
    hc->k = k;
    hc->v = v;
metadata:;
    int32_t *pos = realloc(hc->pos, (size_t)new_cap * sizeof(int32_t));
    if (!pos && new_cap) return -1;
    hc->pos = pos;
    if (ls->track_scores) {
        float *sc = realloc(hc->score, (size_t)new_cap * sizeof(float));
        if (!sc && new_cap) return -1;
        hc->score = sc;
    }
    if (ls->obs_scores) {
        float *ob = realloc(hc->obs_score, (size_t)new_cap * sizeof(float));
        if (!ob && new_cap) return -1;
        hc->obs_score = ob;
    }
    if (ls->slot_meta_bytes) {
        unsigned char *mt = realloc(hc->meta, (size_t)new_cap * ls->slot_meta_bytes);
        if (!mt && new_cap) return -1;
        hc->meta = mt;
    }
    size_t per_slot = slot_bytes(c, l);
    c->bytes_held = c->bytes_held - (size_t)hc->cap * per_slot + (size_t)new_cap * per_slot;
    if (c->bytes_held > c->bytes_peak) c->bytes_peak = c->bytes_held;
    hc->cap = new_cap;
    return 0;
}

/* Points every head of (s, l) at its (seq, head) report buffer, grown to hold the column sums and
 * report_rows rows over the head's live slots after `extra` more arrive. One buffer per (seq, head)
 * serves every layer: layers run one after another and a report is consumed before the next layer. */
static int report_reserve(kvh_kvcache *c, int s, int l, uint32_t extra, kvh_err *err) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    if (!c->report_buf) {
        c->report_buf = calloc((size_t)c->n_seq * (size_t)c->n_head, sizeof *c->report_buf);
        c->report_floats = calloc((size_t)c->n_seq * (size_t)c->n_head, sizeof *c->report_floats);
        if (!c->report_buf || !c->report_floats) return kvh_fail(err, "kv cache: out of memory for score reports");
    }
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        const size_t i = (size_t)s * (size_t)c->n_head + (size_t)h;
        const size_t need = ((size_t)hc->n + extra) * (1 + (size_t)ls->report_rows);
        if (need > c->report_floats[i]) {
            const size_t grow = (need - c->report_floats[i]) * sizeof(float);
            if (c->bytes_limit && c->bytes_held + grow > c->bytes_limit)
                return kvh_fail(err, "kv cache: score reports need %zu more bytes (sequence %d layer %d) but the memory "
                                "limit of %zu bytes is reached (%zu held)", grow, s, l, c->bytes_limit, c->bytes_held);
            float *b = realloc(c->report_buf[i], need * sizeof(float));
            if (!b) return kvh_fail(err, "kv cache: out of memory for the score report of sequence %d head %d", s, h);
            c->report_buf[i] = b;
            c->report_floats[i] = need;
            c->bytes_held += grow;
            if (c->bytes_held > c->bytes_peak) c->bytes_peak = c->bytes_held;
        }
        hc->report = c->report_buf[i];
    }
    return 0;
}

/* Paged layout: blocks for `need` slots of head hc and a private tail block, within the byte limit. */
static int reserve_blocks(kvh_kvcache *c, int s, int l, int h, kvh_head_cache *hc, uint64_t need, kvh_err *err) {
    const kvh_block_pool *p = &c->pool[l];
    const uint64_t blocks = (need + c->block_slots - 1) >> c->block_shift;
    /* Appending writes from slot n on: a shared block holding it is copied first. */
    const bool tail_shared = (hc->n & (c->block_slots - 1)) && p->ref[hc->blk[hc->n >> c->block_shift]] > 1;
    const uint64_t fresh = (blocks > hc->n_blk ? blocks - hc->n_blk : 0) + (tail_shared ? 1 : 0);
    if (!fresh) return 0;
    const size_t grow = (size_t)fresh * p->block_bytes;
    if (c->bytes_limit && c->bytes_held + grow > c->bytes_limit)
        return kvh_fail(err,
                        "kv cache: needs %zu more bytes (sequence %d layer %d) but the memory limit of %zu bytes "
                        "is reached (%zu held)",
                        grow, s, l, c->bytes_limit, c->bytes_held);
    if (head_blocks_ensure(c, l, hc, need) != 0)
        return kvh_fail(err, "kv cache: out of memory for the blocks of sequence %d layer %d head %d", s, l, h);
    return kvh_kvcache_make_private(c, l, hc, hc->n, hc->n + 1, err);
}

/* The metadata capacity a head growing to `need` slots is given (>= need). */
static uint64_t grown_cap(const kvh_kvcache *c, int l, const kvh_head_cache *hc, uint64_t need) {
    if (c->block_slots) /* a block at a time: memory follows the blocks, predictably (the engine plans on it) */
        return ((need + c->block_slots - 1) >> c->block_shift) << c->block_shift;
    /* Grow geometrically, but never past what the head may ever hold (budget + slack, n_ctx). */
    uint64_t want = hc->cap < 16 ? 16 : (uint64_t)hc->cap * 2;
    if (want < need) want = need;
    uint64_t ceiling = (uint64_t)c->n_ctx;
    if (hc->budget != KVH_BUDGET_UNLIMITED) {
        uint64_t bs = (uint64_t)hc->budget + c->layer[l].slack;
        /* A prefill block may exceed budget + slack before its first eviction. */
        if (bs < need) bs = need;
        if (bs < ceiling) ceiling = bs;
    }
    return want > ceiling ? ceiling : want;
}

size_t kvh_kvcache_meta_bytes(const kvh_kvcache *c, uint32_t slots) {
    size_t total = 0;
    for (int l = 0; l < c->n_layer; l++) {
        size_t meta = slot_bytes(c, l);
        if (!c->block_slots) meta -= (size_t)kvh_kvcache_k_slot_bytes(c, l) + kvh_kvcache_v_slot_bytes(c, l);
        total += (size_t)c->n_head * slots * meta;
    }
    return total;
}

size_t kvh_kvcache_bytes_to_append(const kvh_kvcache *c, int s, uint32_t extra) {
    size_t total = 0;
    for (int l = 0; l < c->n_layer; l++) {
        const size_t per_slot = slot_bytes(c, l);
        for (int h = 0; h < c->n_head; h++) {
            const kvh_head_cache *hc = &c->heads[kvh_kvcache_head_index(c, s, l, h)];
            const uint64_t need = (uint64_t)hc->n + extra;
            if (need > hc->cap) total += (size_t)(grown_cap(c, l, hc, need) - hc->cap) * per_slot;
            if (c->block_slots) {
                const uint64_t blocks = (need + c->block_slots - 1) >> c->block_shift;
                if (blocks > hc->n_blk) total += (size_t)(blocks - hc->n_blk) * c->pool[l].block_bytes;
                if ((hc->n & (c->block_slots - 1)) && c->pool[l].ref[hc->blk[hc->n >> c->block_shift]] > 1)
                    total += c->pool[l].block_bytes;
            }
        }
    }
    return total;
}

int kvh_kvcache_reserve(kvh_kvcache *c, int s, int l, uint32_t extra, kvh_err *err) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    size_t per_slot = slot_bytes(c, l);
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        uint64_t need = (uint64_t)hc->n + extra;
        if (need > (uint64_t)c->n_ctx)
            return kvh_fail(err, "kv cache: sequence %d layer %d head %d would hold %llu tokens, more than n_positions %d",
                            s, l, h, (unsigned long long)need, c->n_ctx);
        if (need > hc->cap) {
            const uint64_t want = grown_cap(c, l, hc, need);
            size_t grow = (size_t)(want - hc->cap) * per_slot;
            if (c->bytes_limit && c->bytes_held + grow > c->bytes_limit)
                return kvh_fail(err,
                                "kv cache: needs %zu more bytes (sequence %d layer %d) but the memory limit of %zu bytes "
                                "is reached (%zu held)",
                                grow, s, l, c->bytes_limit, c->bytes_held);
            if (head_resize(c, l, hc, (uint32_t)want) != 0)
                return kvh_fail(err, "kv cache: out of memory growing sequence %d layer %d head %d to %llu slots", s, l,
                                h, (unsigned long long)want);
        }
        if (c->block_slots && reserve_blocks(c, s, l, h, hc, need, err) != 0) return -1;
    }
    return ls->report ? report_reserve(c, s, l, extra, err) : 0;
}

void kvh_kvcache_append_meta(kvh_kvcache *c, int s, int l, int T, const int32_t *pos) {
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        for (int t = 0; t < T; t++) {
            uint32_t slot = hc->n + (uint32_t)t;
            hc->pos[slot] = pos[t];
            if (hc->score) hc->score[slot] = 0.0f;
            if (hc->obs_score) hc->obs_score[slot] = 0.0f;
        }
        if (hc->meta) memset(hc->meta + (size_t)hc->n * c->layer[l].slot_meta_bytes, 0, (size_t)T * c->layer[l].slot_meta_bytes);
        hc->n += (uint32_t)T;
    }
}

void kvh_kvcache_append(kvh_kvcache *c, int s, int l, int T, const float *k_rows, const float *v_rows,
                        size_t row_stride, const int32_t *pos) {
    const int HS = c->head_dim;
    kvh_kvcache_append_meta(c, s, l, T, pos);
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        uint32_t first = hc->n - (uint32_t)T;
        for (int t = 0; t < T; t++) {
            uint32_t slot = first + (uint32_t)t;
            memcpy(kvh_slot_k(c, l, hc, slot), k_rows + (size_t)t * row_stride + (size_t)h * HS, (size_t)HS * sizeof(float));
            memcpy(kvh_slot_v(c, l, hc, slot), v_rows + (size_t)t * row_stride + (size_t)h * HS, (size_t)HS * sizeof(float));
        }
    }
}

int kvh_kvcache_validate_victims(kvh_kvcache *c, uint32_t n_live, uint32_t budget, const uint32_t *victims,
                                 uint32_t n_victims, kvh_err *err) {
    uint32_t need = n_live > budget ? n_live - budget : 0;
    if (n_victims < need)
        return kvh_fail(err, "returned %u victims, at least %u needed to reach budget %u from %u live slots", n_victims,
                        need, budget, n_live);
    if (n_victims > n_live) return kvh_fail(err, "returned %u victims but only %u slots are live", n_victims, n_live);
    if (n_live > c->scratch_len) return kvh_fail(err, "%u live slots exceed the cache's scratch", n_live);
    int rc = 0;
    uint32_t i;
    for (i = 0; i < n_victims; i++) {
        uint32_t v = victims[i];
        if (v >= n_live) {
            rc = kvh_fail(err, "victim #%u is slot %u, out of range (n_live %u)", i, v, n_live);
            break;
        }
        if (c->scratch_mark[v]) {
            rc = kvh_fail(err, "victim #%u is slot %u, listed twice", i, v);
            break;
        }
        c->scratch_mark[v] = 1;
    }
    /* clear the marks we set (only entries 0..i-1 were marked) */
    for (uint32_t j = 0; j < i; j++) c->scratch_mark[victims[j]] = 0;
    return rc;
}

static void move_slot(kvh_kvcache *c, int l, kvh_head_cache *hc, size_t kb, size_t vb, uint32_t from, uint32_t to) {
    c->mem.copy(c->mem.ctx, kvh_slot_k(c, l, hc, to), kvh_slot_k(c, l, hc, from), kb);
    c->mem.copy(c->mem.ctx, kvh_slot_v(c, l, hc, to), kvh_slot_v(c, l, hc, from), vb);
    hc->pos[to] = hc->pos[from];
    if (hc->score) hc->score[to] = hc->score[from];
    if (hc->obs_score) hc->obs_score[to] = hc->obs_score[from];
    if (hc->meta) {
        const size_t mb = c->layer[l].slot_meta_bytes;
        memcpy(hc->meta + (size_t)to * mb, hc->meta + (size_t)from * mb, mb);
    }
}

int kvh_kvcache_remove(kvh_kvcache *c, int s, int l, int h, const uint32_t *victims, uint32_t n_victims,
                       kvh_err *err) {
    kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
    const size_t kb = kvh_kvcache_k_slot_bytes(c, l), vb = kvh_kvcache_v_slot_bytes(c, l);
    uint32_t new_n = hc->n - n_victims;
    if (c->block_slots) {
        /* Holes below new_n are written: their shared blocks become private first (before anything
         * changes, so a refused copy leaves the head as it was). */
        for (uint32_t i = 0; i < n_victims; i++)
            if (victims[i] < new_n && kvh_kvcache_make_private(c, l, hc, victims[i], victims[i] + 1, err) != 0)
                return -1;
    }
    store_release(c, s, l, h, victims, n_victims);
    unsigned char *dead = c->scratch_mark;
    for (uint32_t i = 0; i < n_victims; i++) dead[victims[i]] = 1;
    /* Fill holes below the new live count with survivors from above it: each survivor moves once. */
    uint32_t src = hc->n;
    for (uint32_t hole = 0; hole < new_n; hole++) {
        if (!dead[hole]) continue;
        do {
            src--;
        } while (dead[src]);
        move_slot(c, l, hc, kb, vb, src, hole);
    }
    for (uint32_t i = 0; i < n_victims; i++) dead[victims[i]] = 0;
    hc->n = new_n;
    if (c->block_slots) head_blocks_trim(c, l, hc);
    return 0;
}

void kvh_kvcache_shrink(kvh_kvcache *c, int s, int l, int h) {
    kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
    const kvh_layer_policy_settings *ls = &c->layer[l];
    if (hc->budget == KVH_BUDGET_UNLIMITED) return;
    /* Keep exactly what the head may grow back to before its next eviction. */
    uint64_t keep = (uint64_t)hc->budget + ls->slack;
    if (keep < hc->n) keep = hc->n;
    if (keep > (uint64_t)c->n_ctx) keep = (uint64_t)c->n_ctx;
    if (keep >= hc->cap) return;
    /* A failed shrink keeps the larger block, which is still valid. */
    (void)head_resize(c, l, hc, (uint32_t)keep);
}

size_t kvh_kvcache_live_tokens(const kvh_kvcache *c) {
    size_t total = 0;
    size_t nh = (size_t)c->n_seq * (size_t)c->n_layer * (size_t)c->n_head;
    for (size_t i = 0; i < nh; i++) total += c->heads[i].n;
    return total;
}

uint32_t kvh_kvcache_max_live(const kvh_kvcache *c, int l) {
    uint32_t mx = 0;
    for (int s = 0; s < c->n_seq; s++)
        for (int h = 0; h < c->n_head; h++) {
            uint32_t n = c->heads[kvh_kvcache_head_index(c, s, l, h)].n;
            if (n > mx) mx = n;
        }
    return mx;
}

size_t kvh_kvcache_live_kv_bytes(const kvh_kvcache *c) {
    size_t total = 0;
    for (int s = 0; s < c->n_seq; s++)
        for (int l = 0; l < c->n_layer; l++) {
            size_t per = (size_t)kvh_kvcache_k_slot_bytes(c, l) + kvh_kvcache_v_slot_bytes(c, l);
            for (int h = 0; h < c->n_head; h++) total += (size_t)c->heads[kvh_kvcache_head_index(c, s, l, h)].n * per;
        }
    return total;
}

bool kvh_kvcache_over_budget(const kvh_kvcache *c, int s, int l) {
    const uint32_t slack = c->layer[l].slack;
    for (int h = 0; h < c->n_head; h++) {
        const kvh_head_cache *hc = &c->heads[kvh_kvcache_head_index(c, s, l, h)];
        if (hc->budget != KVH_BUDGET_UNLIMITED && (uint64_t)hc->n > (uint64_t)hc->budget + slack) return true;
    }
    return false;
}
