/* prefix_cache.c — implementation of the prompt-block cache declared in prefix_cache.h. */
#include "engine/prefix_cache.h"

#include <stdlib.h>
#include <string.h>

uint64_t kvh_prefix_hash_fnv(uint64_t parent_key, const int32_t *tokens, uint32_t n) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char *p = (const unsigned char *)&parent_key;
    for (size_t i = 0; i < sizeof parent_key; i++) h = (h ^ p[i]) * 1099511628211ull;
    p = (const unsigned char *)tokens;
    for (size_t i = 0; i < (size_t)n * sizeof *tokens; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

int kvh_prefix_cache_init(kvh_prefix_cache *pc, kvh_kvcache *cache, kvh_err *err) {
    memset(pc, 0, sizeof *pc);
    if (!cache->block_slots) return kvh_fail(err, "prefix sharing needs the paged KV layout ([cache] block_size > 0)");
    pc->cache = cache;
    pc->block_slots = cache->block_slots;
    pc->n_layer = cache->n_layer;
    pc->n_head = cache->n_head;
    pc->free_head = -1;
    pc->hash = kvh_prefix_hash_fnv;
    pc->n_buckets = 1024;
    pc->bucket = malloc(pc->n_buckets * sizeof *pc->bucket);
    if (!pc->bucket) return kvh_fail(err, "prefix cache: out of memory");
    for (uint32_t i = 0; i < pc->n_buckets; i++) pc->bucket[i] = -1;
    return 0;
}

static void entry_drop(kvh_prefix_cache *pc, int32_t i);

void kvh_prefix_cache_free(kvh_prefix_cache *pc) {
    if (!pc->bucket) return;
    for (int32_t i = 0; i < pc->n; i++) {
        if (pc->e[i].live) {
            /* Drop without unlinking one by one: the cache may be freed right after. */
            for (size_t b = 0; b < (size_t)pc->n_layer * (size_t)pc->n_head; b++)
                kvh_block_unref(pc->cache, (int)(b / (size_t)pc->n_head), pc->e[i].blocks[b]);
        }
        if (pc->e[i].live && pc->e[i].snap) kvh_kvcache_snapshot_shrink(pc->cache, pc->e[i].snap_bytes);
        free(pc->e[i].snap);
        free(pc->e[i].tokens);
        free(pc->e[i].blocks);
    }
    free(pc->e);
    free(pc->bucket);
    memset(pc, 0, sizeof *pc);
}

static uint32_t bucket_of(const kvh_prefix_cache *pc, uint64_t key) { return (uint32_t)(key ^ (key >> 29)) & (pc->n_buckets - 1); }

/* The live entry after `parent` holding exactly `tokens`, or -1. Entries whose key matches but whose
 * parent or tokens differ (a hash collision) are counted and skipped. */
static int32_t find(kvh_prefix_cache *pc, uint64_t key, int32_t parent, const int32_t *tokens) {
    for (int32_t i = pc->bucket[bucket_of(pc, key)]; i >= 0; i = pc->e[i].next) {
        const kvh_prefix_entry *e = &pc->e[i];
        if (e->key != key) continue;
        if (e->parent == parent && memcmp(e->tokens, tokens, pc->block_slots * sizeof *tokens) == 0) return i;
        pc->verify_rejects++;
    }
    return -1;
}

uint32_t kvh_prefix_cache_match(kvh_prefix_cache *pc, const int32_t *tokens, uint32_t max_blocks, int32_t *chain) {
    uint64_t key = 0;
    int32_t parent = -1;
    uint32_t n = 0;
    pc->blocks_looked_up += max_blocks;
    for (; n < max_blocks; n++) {
        const int32_t *blk = tokens + (size_t)n * pc->block_slots;
        key = pc->hash(key, blk, pc->block_slots);
        const int32_t i = find(pc, key, parent, blk);
        if (i < 0) break;
        chain[n] = i;
        parent = i;
    }
    pc->blocks_hit += n;
    return n;
}

void kvh_prefix_cache_use(kvh_prefix_cache *pc, const int32_t *chain, uint32_t n) {
    pc->clock++;
    for (uint32_t j = 0; j < n; j++) {
        pc->e[chain[j]].users++;
        pc->e[chain[j]].last_use = pc->clock;
    }
}

void kvh_prefix_cache_release(kvh_prefix_cache *pc, const int32_t *chain, uint32_t n) {
    pc->clock++;
    for (uint32_t j = 0; j < n; j++) {
        kvh_prefix_entry *e = &pc->e[chain[j]];
        if (e->users) e->users--;
        e->last_use = pc->clock;
    }
}

static int32_t entry_new(kvh_prefix_cache *pc, kvh_err *err) {
    if (pc->free_head >= 0) {
        const int32_t i = pc->free_head;
        pc->free_head = pc->e[i].next;
        return i;
    }
    if (pc->n == pc->cap) {
        const int32_t nc = pc->cap ? pc->cap * 2 : 64;
        kvh_prefix_entry *e = realloc(pc->e, (size_t)nc * sizeof *e);
        if (!e) return kvh_fail(err, "prefix cache: out of memory"), -1;
        memset(e + pc->cap, 0, (size_t)(nc - pc->cap) * sizeof *e);
        pc->e = e;
        pc->cap = nc;
    }
    kvh_prefix_entry *e = &pc->e[pc->n];
    e->tokens = malloc(pc->block_slots * sizeof *e->tokens);
    e->blocks = malloc((size_t)pc->n_layer * (size_t)pc->n_head * sizeof *e->blocks);
    if (!e->tokens || !e->blocks) {
        free(e->tokens);
        free(e->blocks);
        e->tokens = NULL;
        e->blocks = NULL;
        return kvh_fail(err, "prefix cache: out of memory"), -1;
    }
    return pc->n++;
}

/* Doubles the bucket table when it is more than full, so chains stay short. */
static void maybe_rehash(kvh_prefix_cache *pc) {
    if ((uint32_t)pc->n_live < pc->n_buckets) return;
    const uint32_t nb = pc->n_buckets * 2;
    int32_t *b = malloc(nb * sizeof *b);
    if (!b) return; /* longer chains, still correct */
    for (uint32_t i = 0; i < nb; i++) b[i] = -1;
    free(pc->bucket);
    pc->bucket = b;
    pc->n_buckets = nb;
    for (int32_t i = 0; i < pc->n; i++)
        if (pc->e[i].live) {
            const uint32_t k = bucket_of(pc, pc->e[i].key);
            pc->e[i].next = b[k];
            b[k] = i;
        }
}

int kvh_prefix_cache_insert(kvh_prefix_cache *pc, int s, const int32_t *tokens, uint32_t from, uint32_t to,
                            int32_t *chain, kvh_err *err) {
    const uint32_t B = pc->block_slots;
    uint64_t key = 0;
    for (uint32_t j = 0; j < from; j++) key = pc->hash(key, tokens + (size_t)j * B, B);
    int32_t parent = from ? chain[from - 1] : -1;
    if (from && pc->e[parent].key != key) return (int)from; /* the chain is not this prompt's: insert nothing */
    pc->clock++;
    uint32_t j = from;
    for (; j < to; j++) {
        const int32_t *blk = tokens + (size_t)j * B;
        key = pc->hash(key, blk, B);
        if (find(pc, key, parent, blk) >= 0) break;
        /* The sequence's slots must be the prompt in position order (no eviction yet). */
        const kvh_head_cache *h0 = kvh_kvcache_head(pc->cache, s, 0, 0);
        if (h0->n < (j + 1) * B || h0->pos[j * B] != (int32_t)(j * B) || h0->pos[(j + 1) * B - 1] != (int32_t)((j + 1) * B - 1))
            break;
        const int32_t i = entry_new(pc, err);
        if (i < 0) return -1;
        kvh_prefix_entry *e = &pc->e[i];
        e->key = key;
        e->parent = parent;
        e->depth = j;
        memcpy(e->tokens, blk, B * sizeof *blk);
        for (int l = 0; l < pc->n_layer; l++)
            for (int h = 0; h < pc->n_head; h++) {
                const kvh_head_cache *hc = kvh_kvcache_head(pc->cache, s, l, h);
                const uint32_t id = hc->blk[j];
                kvh_block_ref(pc->cache, l, id);
                e->blocks[(size_t)l * pc->n_head + h] = id;
            }
        e->users = 1;
        e->children = 0;
        e->snap = NULL;
        e->snap_bytes = 0;
        e->last_use = pc->clock;
        e->live = 1;
        if (parent >= 0) pc->e[parent].children++;
        const uint32_t k = bucket_of(pc, key);
        e->next = pc->bucket[k];
        pc->bucket[k] = i;
        pc->n_live++;
        chain[j] = i;
        parent = i;
        maybe_rehash(pc);
    }
    return (int)j;
}

/* Unlinks entry i from its bucket, gives back its block references and puts it on the free list. */
static void entry_drop(kvh_prefix_cache *pc, int32_t i) {
    kvh_prefix_entry *e = &pc->e[i];
    const uint32_t k = bucket_of(pc, e->key);
    for (int32_t *p = &pc->bucket[k]; *p >= 0; p = &pc->e[*p].next)
        if (*p == i) {
            *p = e->next;
            break;
        }
    for (size_t b = 0; b < (size_t)pc->n_layer * (size_t)pc->n_head; b++)
        kvh_block_unref(pc->cache, (int)(b / (size_t)pc->n_head), e->blocks[b]);
    if (e->parent >= 0) pc->e[e->parent].children--;
    if (e->snap) kvh_kvcache_snapshot_shrink(pc->cache, e->snap_bytes);
    free(e->snap);
    e->snap = NULL;
    e->snap_bytes = 0;
    e->live = 0;
    e->next = pc->free_head;
    pc->free_head = i;
    pc->n_live--;
    pc->entries_reclaimed++;
}

int kvh_prefix_cache_snapshot(kvh_prefix_cache *pc, int32_t i, int s, kvh_err *err) {
    kvh_prefix_entry *e = &pc->e[i];
    kvh_kvcache *c = pc->cache;
    const uint32_t n = (e->depth + 1) * pc->block_slots;
    size_t bytes = 0;
    for (int l = 0; l < pc->n_layer; l++) bytes += (size_t)pc->n_head * kvh_kvcache_policy_state_bytes(c, l, n);
    if (kvh_kvcache_snapshot_grow(c, bytes) != 0) return 1;
    char *snap = malloc(bytes);
    if (!snap) {
        kvh_kvcache_snapshot_shrink(c, bytes);
        return kvh_fail(err, "prefix cache: out of memory for a policy-state snapshot of %zu bytes", bytes);
    }
    char *p = snap;
    for (int l = 0; l < pc->n_layer; l++)
        for (int h = 0; h < pc->n_head; h++) {
            kvh_kvcache_policy_state_save(c, s, l, h, n, p);
            p += kvh_kvcache_policy_state_bytes(c, l, n);
        }
    if (e->snap) kvh_kvcache_snapshot_shrink(c, e->snap_bytes);
    free(e->snap);
    e->snap = snap;
    e->snap_bytes = bytes;
    return 0;
}

void kvh_prefix_cache_load_snapshot(const kvh_prefix_cache *pc, int32_t i, int s) {
    const kvh_prefix_entry *e = &pc->e[i];
    const uint32_t n = (e->depth + 1) * pc->block_slots;
    const char *p = e->snap;
    for (int l = 0; l < pc->n_layer; l++)
        for (int h = 0; h < pc->n_head; h++) {
            kvh_kvcache_policy_state_load(pc->cache, s, l, h, n, p);
            p += kvh_kvcache_policy_state_bytes(pc->cache, l, n);
        }
}

size_t kvh_prefix_cache_reclaim(kvh_prefix_cache *pc, size_t bytes) {
    const size_t before = pc->cache->bytes_held;
    while (before - pc->cache->bytes_held < bytes) {
        int32_t victim = -1;
        for (int32_t i = 0; i < pc->n; i++) {
            const kvh_prefix_entry *e = &pc->e[i];
            if (!e->live || e->users || e->children) continue;
            if (victim < 0 || e->last_use < pc->e[victim].last_use) victim = i;
        }
        if (victim < 0) break;
        entry_drop(pc, victim);
    }
    return before - pc->cache->bytes_held;
}

uint32_t kvh_prefix_cache_entries_in_use(const kvh_prefix_cache *pc) {
    uint32_t n = 0;
    for (int32_t i = 0; i < pc->n; i++) n += pc->e[i].live && pc->e[i].users;
    return n;
}

size_t kvh_prefix_cache_idle_bytes(const kvh_prefix_cache *pc) {
    size_t total = 0;
    for (int32_t i = 0; i < pc->n; i++) {
        const kvh_prefix_entry *e = &pc->e[i];
        if (!e->live || e->users) continue;
        total += e->snap_bytes;
        for (size_t b = 0; b < (size_t)pc->n_layer * (size_t)pc->n_head; b++) {
            const int l = (int)(b / (size_t)pc->n_head);
            if (pc->cache->pool[l].ref[e->blocks[b]] == 1) total += pc->cache->pool[l].block_bytes;
        }
    }
    return total;
}
