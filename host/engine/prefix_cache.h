/* prefix_cache.h — full blocks of prompt tokens kept for reuse by later sequences (prefix sharing).
 * Owns: the table of cached prompt blocks, keyed by a hash of the whole token prefix up to and including
 * the block and verified on every hit (the entry's own tokens and its parent entry must match, so equal
 * keys never give a wrong block), the count of running sequences using each entry, and the LRU order in
 * which unused entries give their blocks back when memory is needed (leaves first: a parent outlives its
 * children).
 * Does not own: the blocks themselves (the KV cache's pools; an entry holds one reference on the block of
 * every (layer, head)), deciding when sharing is exact (the engine), or sequences.
 *
 * An entry at depth d covers prompt positions d*B .. d*B + B - 1 (B = the cache's block_slots).
 *
 * Under an evicting policy an entry can also keep a snapshot of the registering sequence's policy state
 * (scores, observation scores, policy metadata, budgets of every head over slots 0 .. (d+1)*B - 1), taken
 * right after a prompt piece ended at the end of its block and before that sequence evicted anything: a
 * sequence attaching the chain up to this entry loads it and so starts where that sequence stood. */
#ifndef KVH_PREFIX_CACHE_H
#define KVH_PREFIX_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/kvcache.h"
#include "util/util.h"

typedef struct kvh_prefix_entry {
    uint64_t key;      /* hash of every token from position 0 to the end of this block */
    int32_t parent;    /* entry of the previous block, -1 at depth 0 */
    uint32_t depth;
    int32_t *tokens;   /* [B] this block's tokens */
    uint32_t *blocks;  /* [L * NH] block ids, index l * NH + h; one reference each */
    uint32_t users;    /* running sequences whose heads hold these blocks */
    uint32_t children; /* entries whose parent this is */
    uint64_t last_use; /* LRU clock of the last match or release */
    void *snap;        /* policy-state snapshot (see above), NULL when none was taken here */
    size_t snap_bytes; /* its size, counted in the cache's bytes_held */
    int32_t next;      /* next entry in the same hash bucket, or in the free list */
    int live;
} kvh_prefix_entry;

typedef uint64_t (*kvh_prefix_hash_fn)(uint64_t parent_key, const int32_t *tokens, uint32_t n);

typedef struct kvh_prefix_cache {
    kvh_kvcache *cache; /* borrowed; paged */
    uint32_t block_slots;
    int n_layer, n_head;
    kvh_prefix_entry *e;
    int32_t n, cap;     /* entries allocated (live or free) */
    int32_t free_head;
    int32_t *bucket;    /* [n_buckets] first entry per bucket, -1 = empty */
    uint32_t n_buckets; /* power of two */
    kvh_prefix_hash_fn hash; /* FNV-1a by default; tests force collisions with a constant */
    uint64_t clock;
    /* statistics */
    uint64_t blocks_looked_up, blocks_hit, verify_rejects, entries_reclaimed;
    int32_t n_live;
} kvh_prefix_cache;

int kvh_prefix_cache_init(kvh_prefix_cache *pc, kvh_kvcache *cache, kvh_err *err);
void kvh_prefix_cache_free(kvh_prefix_cache *pc);

/* The longest run of cached blocks equal to tokens[0 .. max_blocks * B): entry indices into chain[],
 * count returned. Takes nothing; counts the lookup in the statistics. */
uint32_t kvh_prefix_cache_match(kvh_prefix_cache *pc, const int32_t *tokens, uint32_t max_blocks, int32_t *chain);

/* A running sequence starts / stops using the entries chain[0..n). */
void kvh_prefix_cache_use(kvh_prefix_cache *pc, const int32_t *chain, uint32_t n);
void kvh_prefix_cache_release(kvh_prefix_cache *pc, const int32_t *chain, uint32_t n);

/* Registers blocks from..to-1 of sequence s (its heads hold tokens[0 .. to * B) in position order, slot
 * i = position i) as entries after chain[from - 1], and makes s a user of them. Stops early when a block
 * is cached already (another sequence computed the same prefix meanwhile): returns the new chain length
 * (<= to), with chain[from .. result) filled. -1 only when out of memory. */
int kvh_prefix_cache_insert(kvh_prefix_cache *pc, int s, const int32_t *tokens, uint32_t from, uint32_t to,
                            int32_t *chain, kvh_err *err);

/* Takes the snapshot of entry i from sequence s (its heads hold the prompt in position order, slot j =
 * position j, up to the entry's end). Returns 0, 1 when it would pass the memory limit (nothing taken:
 * the entry just has no snapshot), -1 when out of memory. */
int kvh_prefix_cache_snapshot(kvh_prefix_cache *pc, int32_t i, int s, kvh_err *err);
/* Loads entry i's snapshot into sequence s, whose heads hold the entry's chain (attached blocks). */
void kvh_prefix_cache_load_snapshot(const kvh_prefix_cache *pc, int32_t i, int s);

/* Drops least-recently-used unused leaf entries until `bytes` have gone back to the pools or none is
 * left; returns the bytes returned. */
size_t kvh_prefix_cache_reclaim(kvh_prefix_cache *pc, size_t bytes);

/* Entries with at least one user (their blocks are live tokens of running sequences, counted once). */
uint32_t kvh_prefix_cache_entries_in_use(const kvh_prefix_cache *pc);
/* Bytes held by unused entries' blocks that reclaiming would return (blocks no head holds), and their
 * snapshots. */
size_t kvh_prefix_cache_idle_bytes(const kvh_prefix_cache *pc);

/* The default hash: FNV-1a 64 over the parent key's and the tokens' bytes. */
uint64_t kvh_prefix_hash_fnv(uint64_t parent_key, const int32_t *tokens, uint32_t n);

#endif
