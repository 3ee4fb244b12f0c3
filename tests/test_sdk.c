/* test_sdk.c — the inline helpers of sdk/kvp/kvp.h: selection (checked against a full sort on many
 * random arrays, with ties, NaNs, k = 0 and k = n) and kvp_parse_layers (accepted and rejected lists).
 * Owns nothing else; the loader and hooks are tested in test_plugin_loader.c / test_router.c. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kvp/kvp.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 2685821657736338717ull) >> 32);
}

/* Reference order: a strict total order written independently of the SDK (NaN last, ties by index). */
typedef struct ref_item {
    double key;
    int nan;
    uint32_t idx;
} ref_item;
static int ref_cmp(const void *a, const void *b) {
    const ref_item *x = a, *y = b;
    if (x->nan != y->nan) return x->nan - y->nan;
    if (!x->nan && x->key != y->key) return x->key < y->key ? -1 : 1;
    return x->idx < y->idx ? -1 : (x->idx > y->idx ? 1 : 0);
}

/* mode: 0 smallest_f, 1 largest_f, 2 smallest_i, 3 largest_i */
static void check_select(int mode, const float *kf, const int32_t *ki, uint32_t n, uint32_t k) {
    uint32_t *idx = malloc((n + 1) * sizeof *idx);
    ref_item *ref = malloc((n + 1) * sizeof *ref);
    cr_assert(idx && ref);
    for (uint32_t i = 0; i < n; i++) {
        int is_nan = mode < 2 && isnan(kf[i]);
        double key = mode < 2 ? (double)kf[i] : (double)ki[i];
        /* largest: negate the key; NaN stays "largest", i.e. first for the largest modes */
        if (mode == 1 || mode == 3) key = -key;
        ref[i] = (ref_item){.key = key, .nan = is_nan, .idx = i};
        if (mode == 1 && is_nan) ref[i].nan = -1; /* NaN chosen first by _largest_ */
    }
    qsort(ref, n, sizeof *ref, ref_cmp);
    switch (mode) {
    case 0: kvp_select_smallest_f(kf, n, k, idx); break;
    case 1: kvp_select_largest_f(kf, n, k, idx); break;
    case 2: kvp_select_smallest_i(ki, n, k, idx); break;
    default: kvp_select_largest_i(ki, n, k, idx); break;
    }
    /* idx is a permutation of 0..n-1 */
    unsigned char *seen = calloc(n + 1, 1);
    for (uint32_t i = 0; i < n; i++) {
        cr_assert_lt(idx[i], n, "idx[%u] = %u out of range (n %u)", i, idx[i], n);
        cr_assert(!seen[idx[i]], "idx[%u] = %u repeated", i, idx[i]);
        seen[idx[i]] = 1;
    }
    /* when 0 < k < n: the chosen set equals the reference's first k (ties broken by index) */
    if (k > 0 && k < n) {
        memset(seen, 0, n + 1);
        for (uint32_t i = 0; i < k; i++) seen[ref[i].idx] = 1;
        for (uint32_t i = 0; i < k; i++)
            cr_assert(seen[idx[i]], "mode %d n %u k %u: slot %u chosen but not among the reference's first k", mode, n,
                      k, idx[i]);
    }
    free(seen);
    free(idx);
    free(ref);
}

Test(sdk, select_random_arrays_match_sort) {
    for (int trial = 0; trial < 3000; trial++) {
        uint32_t n = 1 + rnd() % (trial < 1000 ? 12 : 300);
        uint32_t k = rnd() % (n + 2); /* includes 0, n and n + 1 */
        int tie_range = (int)(1 + rnd() % (trial % 3 == 0 ? 3 : 1000)); /* many ties when small */
        float *kf = malloc(n * sizeof *kf);
        int32_t *ki = malloc(n * sizeof *ki);
        for (uint32_t i = 0; i < n; i++) {
            ki[i] = (int32_t)(rnd() % (uint32_t)tie_range) - tie_range / 2;
            kf[i] = (float)ki[i] * 0.25f;
        }
        for (int mode = 0; mode < 4; mode++) check_select(mode, kf, ki, n, k);
        free(kf);
        free(ki);
    }
}

Test(sdk, select_sorted_reversed_and_constant_inputs) {
    const uint32_t n = 1000;
    int32_t *ki = malloc(n * sizeof *ki);
    float *kf = malloc(n * sizeof *kf);
    for (int pattern = 0; pattern < 4; pattern++) {
        for (uint32_t i = 0; i < n; i++) {
            ki[i] = pattern == 0 ? (int32_t)i : pattern == 1 ? (int32_t)(n - i) : pattern == 2 ? 7 : (int32_t)(i % 2);
            kf[i] = (float)ki[i];
        }
        uint32_t ks[] = {0, 1, 2, n / 2, n - 1, n};
        for (size_t j = 0; j < sizeof ks / sizeof ks[0]; j++)
            for (int mode = 0; mode < 4; mode++) check_select(mode, kf, ki, n, ks[j]);
    }
    free(ki);
    free(kf);
}

Test(sdk, select_with_nan_and_inf) {
    for (int trial = 0; trial < 500; trial++) {
        uint32_t n = 1 + rnd() % 50;
        float *kf = malloc(n * sizeof *kf);
        for (uint32_t i = 0; i < n; i++) {
            uint32_t r = rnd() % 6;
            kf[i] = r == 0 ? NAN : r == 1 ? INFINITY : r == 2 ? -INFINITY : (float)(rnd() % 5);
        }
        uint32_t k = rnd() % (n + 1);
        check_select(0, kf, NULL, n, k);
        check_select(1, kf, NULL, n, k);
        free(kf);
    }
}

Test(sdk, select_concrete_examples) {
    /* independent of the reference sort: hand-written expectations */
    int32_t pos[] = {40, 3, 17, 3, 99, 0};
    uint32_t idx[6];
    kvp_select_smallest_i(pos, 6, 3, idx);
    int got[6] = {0};
    for (int i = 0; i < 3; i++) got[idx[i]] = 1;
    cr_assert(got[5] && got[1] && got[3], "smallest 3 of {40,3,17,3,99,0} are slots 5,1,3");
    kvp_select_largest_i(pos, 6, 2, idx);
    memset(got, 0, sizeof got);
    for (int i = 0; i < 2; i++) got[idx[i]] = 1;
    cr_assert(got[4] && got[0], "largest 2 are slots 4 and 0");
    /* tie on 3: with k = 2 the smaller index (1) wins over 3 */
    kvp_select_smallest_i(pos, 6, 2, idx);
    memset(got, 0, sizeof got);
    for (int i = 0; i < 2; i++) got[idx[i]] = 1;
    cr_assert(got[5] && got[1] && !got[3]);
    float sc[] = {0.5f, 0.1f, 0.9f, 0.1f};
    kvp_select_largest_f(sc, 4, 1, idx);
    cr_assert_eq(idx[0], 2);
    kvp_select_smallest_f(sc, 4, 1, idx);
    cr_assert_eq(idx[0], 1);
}

static int layers_ok(const char *text, uint32_t n, const char *expect) {
    unsigned char mask[64];
    if (kvp_parse_layers(text, n, mask) != 0) return 0;
    for (uint32_t i = 0; i < n; i++)
        if (mask[i] != (expect[i] == '1')) return 0;
    return 1;
}

Test(sdk, parse_layers_accepts) {
    cr_assert(layers_ok("all", 4, "1111"));
    cr_assert(layers_ok(" all  ", 4, "1111"));
    cr_assert(layers_ok("0", 4, "1000"));
    cr_assert(layers_ok("3", 4, "0001"));
    cr_assert(layers_ok("0-3", 4, "1111"));
    cr_assert(layers_ok("1-2", 4, "0110"));
    cr_assert(layers_ok("0,2", 4, "1010"));
    cr_assert(layers_ok("0-1, 3", 4, "1101"));
    cr_assert(layers_ok(" 2 - 2 ", 4, "0010"));
    cr_assert(layers_ok("12,14,16", 18, "000000000000101010"));
    cr_assert(layers_ok("0-3,8-11", 12, "111100001111"));
    cr_assert(layers_ok("1,1", 3, "010"), "repeats are harmless");
}

Test(sdk, parse_layers_rejects) {
    unsigned char mask[64];
    const char *bad[] = {"", " ", "4", "0-4", "3-1", "-1", "1-", "a", "all,1", "1,,2", "1,", ",1", "1 2",
                         "0x1", "1.5", "99999999999", "ALL", "al", "allx", "1-2-3", "+1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(kvp_parse_layers(bad[i], 4, mask), -1, "'%s' should be rejected", bad[i]);
    cr_assert_eq(kvp_parse_layers("all", 0, mask), -1, "no layers");
}

Test(sdk, host_has_and_param_int) {
    kvp_host h;
    memset(&h, 0, sizeof h);
    h.struct_size = (uint32_t)offsetof(kvp_host, alloc);
    cr_assert(KVP_HOST_HAS(&h, set_error));
    cr_assert(!KVP_HOST_HAS(&h, alloc));
    h.struct_size = sizeof h;
    cr_assert(KVP_HOST_HAS(&h, obs_scores));
}
