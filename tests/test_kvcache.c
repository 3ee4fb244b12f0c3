/* test_kvcache.c — the cache's own promises: compaction after any valid victim set keeps exactly the
 * survivors with their K, V, positions and scores together (checked against a plain reference set),
 * victim validation names what is wrong, byte accounting equals what is allocated, growth respects
 * the memory limit, and shrinking returns memory after eviction. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/kvcache.h"

enum { NH = 2, HS = 4, CTX = 256 };

static void fill(kvh_kvcache *c, int l, int T, int first_pos) {
    float k[CTX * NH * HS], v[CTX * NH * HS];
    int32_t pos[CTX];
    for (int t = 0; t < T; t++) {
        pos[t] = first_pos + t;
        for (int h = 0; h < NH; h++)
            for (int d = 0; d < HS; d++) {
                k[(size_t)t * NH * HS + h * HS + d] = (float)(pos[t] * 100 + h * 10 + d);
                v[(size_t)t * NH * HS + h * HS + d] = -(float)(pos[t] * 100 + h * 10 + d);
            }
    }
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_reserve(c, 0, l, (uint32_t)T, &err), 0, "%s", err.msg);
    kvh_kvcache_append(c, 0, l, T, k, v, NH * HS, pos);
}

/* Random appends and evictions in one layout (block_slots 0: contiguous; else paged). */
static void random_evictions(uint32_t block_slots) {
    kvh_layer_policy_settings st = {.budget = 64, .slack = 16, .track_scores = true, .decode_scores = true};
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 1, 1, NH, HS, CTX, &st, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_set_paging(&c, block_slots, &err), 0, "%s", err.msg);
    srand(5);
    int next_pos = 0;
    for (int round = 0; round < 40; round++) {
        int T = 1 + rand() % 12;
        if (next_pos + T > CTX) break;
        fill(&c, 0, T, next_pos);
        next_pos += T;
        for (int h = 0; h < NH; h++) {
            kvh_head_cache *hc = kvh_kvcache_head(&c, 0, 0, h);
            for (uint32_t i = 0; i < hc->n; i++) hc->score[i] = (float)hc->pos[i] + 0.5f; /* score tracks position */
            if (hc->n <= 20) continue;
            /* remove a random subset: reference = the positions that must survive */
            uint32_t n = hc->n, victims[CTX], nv = 0;
            unsigned char keep_pos[CTX] = {0};
            for (uint32_t i = 0; i < n; i++) {
                if (rand() % 3 == 0) victims[nv++] = i;
                else keep_pos[hc->pos[i]] = 1;
            }
            cr_assert_eq(kvh_kvcache_validate_victims(&c, n, n - nv, victims, nv, &err), 0, "%s", err.msg);
            cr_assert_eq(kvh_kvcache_remove(&c, 0, 0, h, victims, nv, &err), 0, "%s", err.msg);
            cr_assert_eq(hc->n, n - nv);
            if (block_slots) cr_assert_eq(hc->n_blk, (hc->n + block_slots - 1) / block_slots, "empty blocks kept");
            unsigned char seen[CTX] = {0};
            for (uint32_t i = 0; i < hc->n; i++) {
                int32_t p = hc->pos[i];
                cr_assert(keep_pos[p] && !seen[p], "slot %u holds position %d, which should not be there", i, p);
                seen[p] = 1;
                const float *k = (const float *)kvh_slot_k(&c, 0, hc, i), *v = (const float *)kvh_slot_v(&c, 0, hc, i);
                for (int d = 0; d < HS; d++) {
                    cr_assert_eq(k[d], (float)(p * 100 + h * 10 + d), "K of position %d moved without it", p);
                    cr_assert_eq(v[d], -(float)(p * 100 + h * 10 + d), "V of position %d moved without it", p);
                }
                cr_assert_eq(hc->score[i], (float)p + 0.5f, "score of position %d moved without it", p);
            }
            for (int p = 0; p < CTX; p++) cr_assert_eq(seen[p], keep_pos[p], "position %d lost", p);
        }
    }
    kvh_kvcache_free(&c);
}

Test(kvcache, random_evictions_keep_slots_aligned) { random_evictions(0); }
Test(kvcache, random_evictions_keep_slots_aligned_paged) {
    const uint32_t sizes[] = {1, 4, 16, 64};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) random_evictions(sizes[i]);
}

Test(kvcache, victim_validation_names_the_problem) {
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 1, 1, NH, HS, CTX, NULL, 0, &err), 0, "%s", err.msg);
    uint32_t out_of_range[] = {1, 2, 30};
    cr_assert_eq(kvh_kvcache_validate_victims(&c, 30, 27, out_of_range, 3, &err), -1);
    cr_assert(strstr(err.msg, "slot 30, out of range"), "%s", err.msg);
    uint32_t dup[] = {4, 5, 4};
    cr_assert_eq(kvh_kvcache_validate_victims(&c, 30, 27, dup, 3, &err), -1);
    cr_assert(strstr(err.msg, "slot 4, listed twice"), "%s", err.msg);
    uint32_t few[] = {4, 5};
    cr_assert_eq(kvh_kvcache_validate_victims(&c, 30, 27, few, 2, &err), -1);
    cr_assert(strstr(err.msg, "at least 3 needed"), "%s", err.msg);
    /* a failed validation leaves no marks behind: a good list passes afterwards */
    uint32_t good[] = {4, 5, 6};
    cr_assert_eq(kvh_kvcache_validate_victims(&c, 30, 27, good, 3, &err), 0, "%s", err.msg);
    kvh_kvcache_free(&c);
}

Test(kvcache, bytes_held_match_allocations_and_shrink_after_eviction) {
    kvh_layer_policy_settings st = {.budget = 32, .slack = 8};
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 1, 1, NH, HS, CTX, &st, 0, &err), 0, "%s", err.msg);
    fill(&c, 0, 100, 0); /* a prefill larger than budget + slack */
    size_t per_slot = 2 * HS * sizeof(float) + sizeof(int32_t);
    size_t expect = 0;
    for (int h = 0; h < NH; h++) expect += kvh_kvcache_head(&c, 0, 0, h)->cap * per_slot;
    cr_assert_eq(c.bytes_held, expect);
    cr_assert(kvh_kvcache_over_budget(&c, 0, 0));
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(&c, 0, 0, h);
        uint32_t victims[100];
        for (uint32_t i = 0; i < 68; i++) victims[i] = i;
        cr_assert_eq(kvh_kvcache_remove(&c, 0, 0, h, victims, 68, &err), 0, "%s", err.msg);
        kvh_kvcache_shrink(&c, 0, 0, h);
        cr_assert_eq(hc->n, 32u);
        cr_assert_eq(hc->cap, 40u, "after eviction a head keeps budget + slack slots, not %u", hc->cap);
    }
    cr_assert_eq(c.bytes_held, (size_t)NH * 40 * per_slot);
    cr_assert_geq(c.bytes_peak, (size_t)NH * 100 * per_slot);
    cr_assert(!kvh_kvcache_over_budget(&c, 0, 0));
    kvh_kvcache_free(&c);
}

Test(kvcache, growth_beyond_the_limit_is_an_error) {
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 1, 1, NH, HS, CTX, NULL, 2000, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_reserve(&c, 0, 0, 100, &err), -1);
    cr_assert(strstr(err.msg, "memory limit of 2000 bytes"), "%s", err.msg);
    cr_assert_eq(c.bytes_held, 0u, "a refused growth must not leave half an allocation");
    cr_assert_eq(kvh_kvcache_reserve(&c, 0, 0, CTX + 1, &err), -1);
    kvh_kvcache_free(&c);
}
