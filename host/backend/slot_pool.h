/* slot_pool.h — a sub-allocator for K/V slot blocks in memory that is costly to obtain and to give back
 * (a GPU's: cudaMalloc takes tens of microseconds, cudaFree synchronizes the device), while a cache's heads
 * grow and shrink at every step. Owns: carving blocks out of large regions, size classes, free lists, the
 * block -> class map, byte counts. Does not own: where regions come from (the caller's callbacks).
 *
 * Size classes: a request is rounded up to a multiple of 256 bytes (every block starts 256-byte aligned
 * relative to its region, as cudaMalloc's own blocks do) and, above 4 KiB, to one of 16 sizes per
 * doubling (2^k + j * 2^(k-4)), so no block wastes more than 1/16 of itself. The heads a cache holds
 * most (fp16, int8 and int4 slots of head size 64 at 1024 slots; a 256 + 32 budget) are classes exactly.
 * Coarser classes waste what a store saves: with powers of two, an int8 head of 1024 slots (68 B each,
 * 69,632 B) took 128 KiB, what the fp16 head takes. Exact classes would keep, in a long-running server, a
 * free list for every prompt length ever seen; sixteen per doubling keep their number small.
 *
 * Blocks smaller than the region size come from the current region (bump allocation; a region's tail too
 * small for the next block is split onto the free lists); larger ones get a region of their own. Freed
 * blocks go back to their class's free list and are reused by the next request of that class; regions
 * are returned only by kvh_slot_pool_destroy. Not thread-safe (one backend, one thread). */
#ifndef KVH_SLOT_POOL_H
#define KVH_SLOT_POOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvh_slot_pool_region {
    void *(*alloc)(void *ctx, size_t bytes); /* a region of `bytes`, 256-byte aligned, or NULL */
    void (*free)(void *ctx, void *p);
    void *ctx;
} kvh_slot_pool_region;

typedef struct kvh_slot_pool_class {
    size_t size;
    void **free;           /* blocks of this size ready for reuse */
    size_t n_free, cap_free;
} kvh_slot_pool_class;

typedef struct kvh_slot_pool {
    kvh_slot_pool_region region;
    size_t region_bytes;        /* size of the shared regions blocks are carved from */
    kvh_slot_pool_class *cls;   /* sorted by size */
    size_t n_cls, cap_cls;
    void **regions;             /* every region obtained, returned at destroy */
    size_t n_regions, cap_regions;
    char *bump;                 /* unused tail of the current shared region */
    size_t bump_left;
    uintptr_t *keys;            /* block -> class size map, open addressing (key 0 = empty) */
    size_t *vals;
    size_t map_cap, map_n;
    size_t reserved;            /* bytes obtained from region.alloc */
    size_t in_use;              /* class bytes of the blocks handed out and not freed */
} kvh_slot_pool;

/* The class a request of `bytes` is served from (bytes rounded up as the header says); 0 for 0 or for a
 * size beyond 2^62. */
size_t kvh_slot_pool_class_size(size_t bytes);

/* region_bytes: size of the shared regions (a multiple of 256; e.g. 32 MiB). */
void kvh_slot_pool_init(kvh_slot_pool *pl, kvh_slot_pool_region region, size_t region_bytes);
/* A block of at least `bytes` (>= 1), 256-byte aligned relative to its region; NULL when the region
 * callback fails or host memory for the bookkeeping runs out (the pool stays usable). */
void *kvh_slot_pool_alloc(kvh_slot_pool *pl, size_t bytes);
/* Returns p (from kvh_slot_pool_alloc) to its free list; NULL and unknown pointers are ignored. */
void kvh_slot_pool_free(kvh_slot_pool *pl, void *p);
/* Returns every region; the pool is empty and may be initialized again. */
void kvh_slot_pool_destroy(kvh_slot_pool *pl);

#ifdef __cplusplus
}
#endif

#endif
