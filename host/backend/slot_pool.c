/* slot_pool.c — the K/V slot block sub-allocator (slot_pool.h says what and why). */
#include "backend/slot_pool.h"

#include <stdlib.h>
#include <string.h>

#define ALIGN 256u
#define SMALL_MAX 4096u /* up to here classes are the multiples of 256; above, 16 per doubling */
/* A block's map value is its class size; this bit marks it as sitting on a free list, so that a second
 * free of the same pointer is ignored instead of handing the block out twice. */
#define FREE_BIT ((size_t)1 << 63)

/* smallest k with 2^k >= x (x >= 2) */
static unsigned ceil_log2(size_t x) { return 64u - (unsigned)__builtin_clzll((unsigned long long)(x - 1)); }

size_t kvh_slot_pool_class_size(size_t bytes) {
    if (bytes == 0 || bytes > ((size_t)1 << 62)) return 0;
    size_t r = (bytes + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    if (r <= SMALL_MAX) return r;
    size_t step = (size_t)1 << (ceil_log2(r) - 5); /* 2^(k-1) < r <= 2^k: sixteen steps of 2^(k-5) */
    return (r + step - 1) & ~(step - 1);
}

/* The largest class size <= x (x >= ALIGN). */
static size_t class_floor(size_t x) {
    size_t r = x & ~(size_t)(ALIGN - 1);
    if (r <= SMALL_MAX) return r;
    size_t step = (size_t)1 << (ceil_log2(r) - 5);
    return r & ~(step - 1); /* >= 2^(k-1), itself a class */
}

static int grow_array(void **arr, size_t *cap, size_t elem, size_t need) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap * 2 : 16;
    while (nc < need) nc *= 2;
    void *np = realloc(*arr, nc * elem);
    if (!np) return -1;
    *arr = np;
    *cap = nc;
    return 0;
}

/* The class of exactly `size`, created (kept sorted) when `create`; NULL if absent or out of memory. */
static kvh_slot_pool_class *class_of(kvh_slot_pool *pl, size_t size, int create) {
    size_t lo = 0, hi = pl->n_cls;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (pl->cls[mid].size < size) lo = mid + 1;
        else hi = mid;
    }
    if (lo < pl->n_cls && pl->cls[lo].size == size) return &pl->cls[lo];
    if (!create || grow_array((void **)&pl->cls, &pl->cap_cls, sizeof *pl->cls, pl->n_cls + 1) != 0) return NULL;
    memmove(&pl->cls[lo + 1], &pl->cls[lo], (pl->n_cls - lo) * sizeof *pl->cls);
    memset(&pl->cls[lo], 0, sizeof *pl->cls);
    pl->cls[lo].size = size;
    pl->n_cls++;
    return &pl->cls[lo];
}

static int push_free(kvh_slot_pool_class *c, void *p) {
    if (grow_array((void **)&c->free, &c->cap_free, sizeof *c->free, c->n_free + 1) != 0) return -1;
    c->free[c->n_free++] = p;
    return 0;
}

/* ---- block -> value map (open addressing, linear probing; blocks are never removed) ---------------- */

static size_t ptr_hash(uintptr_t k, size_t cap) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return (size_t)k & (cap - 1);
}

/* Slot of key p, or of the empty slot where it would go. */
static size_t map_slot(const kvh_slot_pool *pl, const void *p) {
    size_t i = ptr_hash((uintptr_t)p, pl->map_cap);
    while (pl->keys[i] && pl->keys[i] != (uintptr_t)p) i = (i + 1) & (pl->map_cap - 1);
    return i;
}

static int map_put(kvh_slot_pool *pl, const void *p, size_t val);

static int map_grow(kvh_slot_pool *pl) {
    size_t oc = pl->map_cap, nc = oc ? oc * 2 : 1024;
    uintptr_t *ok = pl->keys;
    size_t *ov = pl->vals;
    uintptr_t *nk = (uintptr_t *)calloc(nc, sizeof *nk);
    size_t *nv = (size_t *)calloc(nc, sizeof *nv);
    if (!nk || !nv) {
        free(nk);
        free(nv);
        return -1;
    }
    pl->keys = nk;
    pl->vals = nv;
    pl->map_cap = nc;
    pl->map_n = 0;
    for (size_t i = 0; i < oc; i++)
        if (ok[i]) (void)map_put(pl, (const void *)ok[i], ov[i]); /* room is certain: no growth */
    free(ok);
    free(ov);
    return 0;
}

static int map_put(kvh_slot_pool *pl, const void *p, size_t val) {
    if ((pl->map_n + 1) * 2 > pl->map_cap && map_grow(pl) != 0) return -1;
    size_t i = map_slot(pl, p);
    if (!pl->keys[i]) pl->map_n++;
    pl->keys[i] = (uintptr_t)p;
    pl->vals[i] = val;
    return 0;
}

/* ---- pool --------------------------------------------------------------------------------------- */

void kvh_slot_pool_init(kvh_slot_pool *pl, kvh_slot_pool_region region, size_t region_bytes) {
    memset(pl, 0, sizeof *pl);
    pl->region = region;
    pl->region_bytes = region_bytes & ~(size_t)(ALIGN - 1);
}

static void *new_region(kvh_slot_pool *pl, size_t bytes) {
    if (grow_array((void **)&pl->regions, &pl->cap_regions, sizeof *pl->regions, pl->n_regions + 1) != 0)
        return NULL;
    void *p = pl->region.alloc(pl->region.ctx, bytes);
    if (!p) return NULL;
    pl->regions[pl->n_regions++] = p;
    pl->reserved += bytes;
    return p;
}

/* Splits the current region's tail onto the free lists (largest classes first), so it is not lost. */
static void retire_bump(kvh_slot_pool *pl) {
    while (pl->bump_left >= ALIGN) {
        size_t s = class_floor(pl->bump_left);
        kvh_slot_pool_class *c = class_of(pl, s, 1);
        if (!c || map_put(pl, pl->bump, s | FREE_BIT) != 0) break;
        if (push_free(c, pl->bump) != 0) break; /* mapped as free but on no list: unused until destroy */
        pl->bump += s;
        pl->bump_left -= s;
    }
    pl->bump = NULL;
    pl->bump_left = 0;
}

void *kvh_slot_pool_alloc(kvh_slot_pool *pl, size_t bytes) {
    const size_t sz = kvh_slot_pool_class_size(bytes ? bytes : 1);
    if (!sz) return NULL;
    kvh_slot_pool_class *c = class_of(pl, sz, 0);
    if (c && c->n_free) {
        void *p = c->free[--c->n_free];
        pl->vals[map_slot(pl, p)] = sz; /* in use again */
        pl->in_use += sz;
        return p;
    }
    void *p;
    if (sz >= pl->region_bytes) {
        p = new_region(pl, sz);
        if (!p) return NULL;
    } else {
        if (pl->bump_left < sz) {
            void *r = new_region(pl, pl->region_bytes);
            if (!r) return NULL;
            retire_bump(pl);
            pl->bump = (char *)r;
            pl->bump_left = pl->region_bytes;
        }
        p = pl->bump;
        pl->bump += sz;
        pl->bump_left -= sz;
    }
    /* the class exists before the block is handed out, so its free always finds a list */
    if (!class_of(pl, sz, 1) || map_put(pl, p, sz) != 0) return NULL; /* the block stays unused until destroy */
    pl->in_use += sz;
    return p;
}

void kvh_slot_pool_free(kvh_slot_pool *pl, void *p) {
    if (!p || !pl->map_cap) return;
    size_t i = map_slot(pl, p);
    if (!pl->keys[i] || (pl->vals[i] & FREE_BIT)) return; /* not ours, or already free */
    const size_t sz = pl->vals[i];
    kvh_slot_pool_class *c = class_of(pl, sz, 0);
    if (!c || push_free(c, p) != 0) return; /* off every list: unused until destroy, never handed out twice */
    pl->vals[i] = sz | FREE_BIT;
    pl->in_use -= sz;
}

void kvh_slot_pool_destroy(kvh_slot_pool *pl) {
    for (size_t i = 0; i < pl->n_regions; i++) pl->region.free(pl->region.ctx, pl->regions[i]);
    for (size_t i = 0; i < pl->n_cls; i++) free(pl->cls[i].free);
    free(pl->cls);
    free(pl->regions);
    free(pl->keys);
    free(pl->vals);
    kvh_slot_pool_region region = pl->region;
    size_t region_bytes = pl->region_bytes;
    kvh_slot_pool_init(pl, region, region_bytes);
}
