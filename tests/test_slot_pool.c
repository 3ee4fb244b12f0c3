/* test_slot_pool.c — the K/V slot block sub-allocator of the CUDA backend (host/backend/slot_pool.c),
 * on host memory: class sizes against values worked out by hand and against the 1/8 waste bound; blocks
 * 256-byte aligned, inside their regions, never overlapping, through a long random alloc/free sequence;
 * freed blocks reused by their class; a double free or a foreign pointer ignored; large blocks in regions
 * of their own; a failing region callback answered with NULL and a usable pool; every region returned. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/slot_pool.h"

typedef struct fake_regions {
    int allocs, frees;
    int fail_after; /* region allocations that succeed before failures start; -1 = never fail */
    void *base[4096];
    size_t len[4096];
} fake_regions;

static void *fake_alloc(void *ctx, size_t bytes) {
    fake_regions *f = ctx;
    if (f->fail_after >= 0 && f->allocs >= f->fail_after) return NULL;
    void *p = aligned_alloc(256, bytes);
    cr_assert_not_null(p);
    memset(p, 0xA5, bytes);
    f->base[f->allocs] = p;
    f->len[f->allocs] = bytes;
    f->allocs++;
    return p;
}

static void fake_free(void *ctx, void *p) {
    fake_regions *f = ctx;
    f->frees++;
    free(p);
}

static kvh_slot_pool_region region_of(fake_regions *f) {
    kvh_slot_pool_region r = {.alloc = fake_alloc, .free = fake_free, .ctx = f};
    return r;
}

static int in_region(const fake_regions *f, const void *p, size_t n) {
    for (int i = 0; i < f->allocs; i++) {
        const char *b = f->base[i];
        if ((const char *)p >= b && (const char *)p + n <= b + f->len[i]) return 1;
    }
    return 0;
}

Test(slot_pool, class_sizes) {
    /* up to 4 KiB: multiples of 256 */
    cr_assert_eq(kvh_slot_pool_class_size(1), 256);
    cr_assert_eq(kvh_slot_pool_class_size(256), 256);
    cr_assert_eq(kvh_slot_pool_class_size(257), 512);
    cr_assert_eq(kvh_slot_pool_class_size(2049), 2304);
    cr_assert_eq(kvh_slot_pool_class_size(4096), 4096);
    /* (4096, 8192]: steps of 256; (2^16, 2^17]: steps of 2^12 */
    cr_assert_eq(kvh_slot_pool_class_size(4097), 4352);
    cr_assert_eq(kvh_slot_pool_class_size(65537), 65536 + 4096);
    /* the K/V heads that matter: fp16 HS 64 at 1024 slots, int8 (68 B) and int4 (36 B) slots at 1024,
     * a 256 + 32 budget of fp16 slots: all exact */
    cr_assert_eq(kvh_slot_pool_class_size(1024 * 128), 131072);
    cr_assert_eq(kvh_slot_pool_class_size(1024 * 68), 69632);
    cr_assert_eq(kvh_slot_pool_class_size(1024 * 36), 36864);
    cr_assert_eq(kvh_slot_pool_class_size(288 * 128), 36864);
    cr_assert_eq(kvh_slot_pool_class_size(0), 0);
    cr_assert_eq(kvh_slot_pool_class_size(SIZE_MAX), 0);
    uint64_t s = 12345;
    for (int i = 0; i < 100000; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        size_t b = 1 + (size_t)(s % (64u << 20));
        size_t c = kvh_slot_pool_class_size(b);
        cr_assert(c >= b && c % 256 == 0, "%zu -> %zu", b, c);
        if (b > 4096) cr_assert(c - b <= c / 16, "%zu -> %zu wastes more than 1/16", b, c);
        else cr_assert(c - b < 256, "%zu -> %zu", b, c);
        cr_assert_eq(kvh_slot_pool_class_size(c), c, "a class size is its own class");
    }
}

Test(slot_pool, random_sequence_no_overlap_reuse_and_counts) {
    fake_regions f = {.fail_after = -1};
    kvh_slot_pool pl;
    kvh_slot_pool_init(&pl, region_of(&f), 1 << 20);
    enum { N = 3000 };
    void *live[N] = {0};
    size_t want[N] = {0};
    uint64_t s = 99;
    size_t in_use = 0;
    for (int step = 0; step < 40000; step++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        int i = (int)(s % N);
        if (live[i]) {
            kvh_slot_pool_free(&pl, live[i]);
            in_use -= kvh_slot_pool_class_size(want[i]);
            live[i] = NULL;
        } else {
            /* mostly the few sizes a cache uses, sometimes anything up to 1.5 regions */
            size_t sizes[] = {16 * 128, 32 * 128, 64 * 68, 1024 * 68, 288 * 128, 1024 * 36};
            want[i] = (s >> 20) % 8 ? sizes[(s >> 8) % 6] : 1 + (size_t)((s >> 24) % (3 << 19));
            live[i] = kvh_slot_pool_alloc(&pl, want[i]);
            cr_assert_not_null(live[i]);
            in_use += kvh_slot_pool_class_size(want[i]);
            cr_assert(in_region(&f, live[i], want[i]), "block outside every region");
            memset(live[i], step & 0xff, want[i]); /* ASan would see a write past a region */
        }
        cr_assert_eq(pl.in_use, in_use);
    }
    /* no two live blocks overlap (sorted by address) */
    void *ptr[N];
    size_t len[N];
    int n = 0;
    for (int i = 0; i < N; i++)
        if (live[i]) ptr[n] = live[i], len[n] = want[i], n++;
    for (int a = 0; a < n; a++)
        for (int b = a + 1; b < n; b++) {
            uintptr_t x = (uintptr_t)ptr[a], y = (uintptr_t)ptr[b];
            cr_assert(x + len[a] <= y || y + len[b] <= x, "blocks %p (+%zu) and %p (+%zu) overlap", ptr[a], len[a],
                      ptr[b], len[b]);
        }
    /* 256-byte alignment relative to the region (the regions themselves are 256-aligned here) */
    for (int a = 0; a < n; a++) cr_assert_eq((uintptr_t)ptr[a] % 256, 0);
    cr_assert(pl.reserved >= pl.in_use);
    kvh_slot_pool_destroy(&pl);
    cr_assert_eq(f.frees, f.allocs, "every region returned");
    cr_assert_eq(pl.reserved, 0);
}

Test(slot_pool, reuse_double_free_foreign_pointer) {
    fake_regions f = {.fail_after = -1};
    kvh_slot_pool pl;
    kvh_slot_pool_init(&pl, region_of(&f), 1 << 20);
    void *a = kvh_slot_pool_alloc(&pl, 1024 * 68);
    void *b = kvh_slot_pool_alloc(&pl, 1024 * 68);
    cr_assert_neq(a, b);
    kvh_slot_pool_free(&pl, a);
    kvh_slot_pool_free(&pl, a); /* a second free is ignored: a is handed out once */
    int foreign;
    kvh_slot_pool_free(&pl, &foreign); /* not ours: ignored */
    kvh_slot_pool_free(&pl, NULL);
    cr_assert_eq(pl.in_use, 69632);
    void *c = kvh_slot_pool_alloc(&pl, 1024 * 68 - 100); /* same class: reuses a */
    cr_assert_eq(c, a);
    void *d = kvh_slot_pool_alloc(&pl, 1024 * 68);
    cr_assert(d != a && d != b, "a freed once is reused once");
    void *e = kvh_slot_pool_alloc(&pl, 1024 * 36); /* another class: not a's */
    cr_assert(e != a && e != b && e != d);
    cr_assert_eq(f.allocs, 1, "one region serves them all");
    kvh_slot_pool_destroy(&pl);
    cr_assert_eq(f.frees, 1);
}

Test(slot_pool, region_tail_is_reused_and_large_blocks_get_their_own) {
    fake_regions f = {.fail_after = -1};
    kvh_slot_pool pl;
    kvh_slot_pool_init(&pl, region_of(&f), 1 << 20);
    /* 7 blocks of 139,264 B (a class: 2^17 + 2^13) leave 73,728 B (a class) of the first 1 MiB region */
    for (int i = 0; i < 7; i++) cr_assert_not_null(kvh_slot_pool_alloc(&pl, 139264));
    void *big = kvh_slot_pool_alloc(&pl, 139264); /* needs a second region; the tail goes to free lists */
    cr_assert_eq(f.allocs, 2);
    cr_assert(in_region(&f, big, 139264));
    void *tail = kvh_slot_pool_alloc(&pl, 73728); /* served from the first region's tail */
    cr_assert_eq((char *)tail, (char *)f.base[0] + 7 * 139264);
    cr_assert_eq(f.allocs, 2);
    void *huge = kvh_slot_pool_alloc(&pl, 3 << 20); /* beyond a region: a region of its own */
    cr_assert_eq(f.allocs, 3);
    cr_assert_eq(huge, f.base[2]);
    cr_assert_eq(f.len[2], 3u << 20);
    kvh_slot_pool_free(&pl, huge);
    cr_assert_eq(kvh_slot_pool_alloc(&pl, 3 << 20), huge, "kept for reuse, not returned");
    cr_assert_eq(pl.reserved, (size_t)(2 << 20) + (3 << 20));
    kvh_slot_pool_destroy(&pl);
    cr_assert_eq(f.frees, 3);
}

Test(slot_pool, failing_region_returns_null_and_pool_stays_usable) {
    fake_regions f = {.fail_after = 1};
    kvh_slot_pool pl;
    kvh_slot_pool_init(&pl, region_of(&f), 1 << 20);
    void *a = kvh_slot_pool_alloc(&pl, 512 << 10);
    cr_assert_not_null(a);
    cr_assert_null(kvh_slot_pool_alloc(&pl, 768 << 10), "no room and no new region");
    cr_assert_null(kvh_slot_pool_alloc(&pl, 2 << 20), "a large block needs a region too");
    cr_assert_eq(pl.in_use, 512u << 10);
    void *b = kvh_slot_pool_alloc(&pl, 256 << 10); /* still fits the first region */
    cr_assert_not_null(b);
    kvh_slot_pool_free(&pl, a);
    cr_assert_eq(kvh_slot_pool_alloc(&pl, 512 << 10), a);
    kvh_slot_pool_destroy(&pl);
    cr_assert_eq(f.frees, 1);
}
