/* test_kv_paging.c — the paged KV layout ([cache] block_size, kvcache.h): every shipped policy and store
 * gives bit-identical logits with contiguous slots and with blocks of 1, 4 and 16 slots (ragged prefill,
 * decode with evictions); blocks are counted once in bytes_held and go back to the pool; a shared block is
 * copied before a head evicts from it or appends into it, and the other holder never sees the change. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "helpers/test_util.h"
#include "model/model.h"
#include "runtime/kvcache.h"
#include "runtime/session.h"

static kvh_model small_model(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 256, .n_embd = 128, .n_head = 4, .n_layer = 3,
                          .n_inner = 256, .ln_eps = 1e-5f, .bos_id = 0};
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 21, "random:small", &err), 0, "%s", err.msg);
    return m;
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                                 uint32_t block_slots) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 3;
    o.block_slots = block_slots;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins[0] ? plugins : NULL, sets, n_sets, &o, &err), 0, "session %s: %s", plugins,
                 err.msg);
    cr_assert_eq(s->cache.block_slots, block_slots);
    return s;
}

/* A ragged prefill (41, 7 and 66 tokens) then `steps` greedy decode steps of all three sequences; every
 * step's logits appended to out ([(1 + steps) * 3 * V]). */
static void run(kvh_session *s, int steps, float *out) {
    const int V = s->model->cfg.n_vocab;
    const int lens[3] = {41, 7, 66};
    static int32_t p[3][80];
    const int32_t *pp[3];
    int seqs[3] = {0, 1, 2};
    for (int b = 0; b < 3; b++) {
        for (int t = 0; t < lens[b]; t++) p[b][t] = (int32_t)((t * 17 + b * 31 + 3) % V);
        pp[b] = p[b];
    }
    kvh_err err = {{0}};
    kvh_batch b = {.n = 3, .seq = seqs, .tokens = pp, .n_tokens = lens};
    cr_assert_eq(kvh_session_forward(s, &b, out, &err), 0, "%s", err.msg);
    const int ones[3] = {1, 1, 1};
    for (int st = 0; st < steps; st++) {
        int32_t next[3];
        const int32_t *np[3];
        const float *last = out + (size_t)st * 3 * V;
        for (int q = 0; q < 3; q++) {
            int best = 0;
            for (int v = 1; v < V; v++)
                if (last[(size_t)q * V + v] > last[(size_t)q * V + best]) best = v;
            next[q] = best;
            np[q] = &next[q];
        }
        kvh_batch d = {.n = 3, .seq = seqs, .tokens = np, .n_tokens = ones};
        cr_assert_eq(kvh_session_forward(s, &d, out + (size_t)(st + 1) * 3 * V, &err), 0, "%s", err.msg);
    }
}

Test(kv_paging, every_policy_and_store_is_bit_identical_to_contiguous_slots) {
    kvh_model m = small_model();
    static const char *const stacks[] = {"",           "window.so",       "sink.so",  "h2o.so",
                                         "pyramid.so", "tova.so",         "scissorhands.so", "minicache.so",
                                         "int8.so",    "int4.so",         "lorc.so",  "h2o.so,int8.so"};
    const char *sets[] = {"cache.budget=24", "cache.slack=5"};
    const char *kivi_sets[] = {"cache.budget=24", "cache.slack=5", "int4.kivi=true", "int4.residual=8", "int4.group=8"};
    const int steps = 20, V = m.cfg.n_vocab;
    const size_t n = (size_t)(1 + steps) * 3 * (size_t)V;
    float *ref = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    cr_assert(ref && got);
    const uint32_t blocks[] = {1, 4, 16};
    for (size_t i = 0; i <= sizeof stacks / sizeof stacks[0]; i++) {
        const bool kivi = i == sizeof stacks / sizeof stacks[0];
        const char *stack = kivi ? "int4.so" : stacks[i];
        const char *const *st = kivi ? kivi_sets : sets;
        const int n_sets = !stack[0] ? 0 : kivi ? 5 : 2;
        kvh_session *c = session_with(&m, stack, st, n_sets, 0);
        run(c, steps, ref);
        for (size_t bi = 0; bi < sizeof blocks / sizeof blocks[0]; bi++) {
            kvh_session *p = session_with(&m, stack, st, n_sets, blocks[bi]);
            run(p, steps, got);
            cr_assert(memcmp(ref, got, n * sizeof(float)) == 0, "stack '%s'%s, blocks of %u: logits differ", stack,
                      kivi ? " (kivi)" : "", blocks[bi]);
            for (int s = 0; s < 3; s++)
                for (int l = 0; l < m.cfg.n_layer; l++)
                    for (int h = 0; h < m.cfg.n_head; h++)
                        cr_assert_eq(kvh_kvcache_head(&p->cache, s, l, h)->n, kvh_kvcache_head(&c->cache, s, l, h)->n,
                                     "stack '%s': live counts differ", stack);
            /* bytes: the pools' in-use blocks, no more (metadata aside) */
            kvh_kvcache_paging_stats ps;
            kvh_kvcache_paging_stats_get(&p->cache, &ps);
            size_t want_blocks = 0;
            for (int s = 0; s < 3; s++)
                for (int l = 0; l < m.cfg.n_layer; l++)
                    for (int h = 0; h < m.cfg.n_head; h++)
                        want_blocks += (kvh_kvcache_head(&p->cache, s, l, h)->n + blocks[bi] - 1) / blocks[bi];
            cr_assert_eq(ps.blocks_in_use, want_blocks, "stack '%s': %zu blocks in use, live slots need %zu", stack,
                         ps.blocks_in_use, want_blocks);
            kvh_session_free(p);
        }
        kvh_session_free(c);
    }
    free(ref);
    free(got);
    kvh_model_free(&m);
}

/* ---- copy-on-write at the cache level ---------------------------------------------------------------- */

enum { NH = 2, HS = 4, CTX = 64, BS = 4 };

static void fill(kvh_kvcache *c, int s, int T, int first_pos) {
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
    cr_assert_eq(kvh_kvcache_reserve(c, s, 0, (uint32_t)T, &err), 0, "%s", err.msg);
    kvh_kvcache_append(c, s, 0, T, k, v, NH * HS, pos);
    c->next_pos[s] = first_pos + T;
}

static void expect_slot(const kvh_kvcache *c, int s, int h, uint32_t i, int p) {
    const kvh_head_cache *hc = &c->heads[kvh_kvcache_head_index(c, s, 0, h)];
    cr_assert_eq(hc->pos[i], p, "seq %d head %d slot %u: position %d, expected %d", s, h, i, hc->pos[i], p);
    const float *k = (const float *)kvh_slot_k(c, 0, hc, i), *v = (const float *)kvh_slot_v(c, 0, hc, i);
    for (int d = 0; d < HS; d++) {
        cr_assert_eq(k[d], (float)(p * 100 + h * 10 + d), "seq %d head %d slot %u: K of position %d wrong", s, h, i, p);
        cr_assert_eq(v[d], -(float)(p * 100 + h * 10 + d), "seq %d head %d slot %u: V wrong", s, h, i);
    }
}

/* Sequence 1 takes sequence 0's first two blocks (8 slots) as shared prefix blocks. */
static void share_prefix(kvh_kvcache *c) {
    kvh_err err = {{0}};
    fill(c, 0, 10, 0); /* blocks 0, 1 full, block 2 holds 2 */
    int32_t pos[2 * BS];
    for (int i = 0; i < 2 * BS; i++) pos[i] = i;
    for (int h = 0; h < NH; h++) {
        const kvh_head_cache *src = kvh_kvcache_head(c, 0, 0, h);
        cr_assert_eq(kvh_kvcache_attach_blocks(c, 1, 0, h, src->blk, 2, pos, &err), 0, "%s", err.msg);
    }
    c->next_pos[1] = 2 * BS;
}

Test(kv_paging, shared_blocks_are_counted_once_and_copied_before_a_write) {
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 2, 1, NH, HS, CTX, NULL, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_set_paging(&c, BS, &err), 0, "%s", err.msg);
    share_prefix(&c);
    kvh_kvcache_paging_stats ps;
    kvh_kvcache_paging_stats_get(&c, &ps);
    cr_assert_eq(ps.blocks_in_use, (size_t)NH * 3, "seq 0 holds 3 blocks per head, seq 1 only shares");
    cr_assert_eq(ps.blocks_shared, (size_t)NH * 2);
    const size_t held_shared = c.bytes_held;

    /* seq 1 appends: its tail is a new private block; the shared ones are untouched */
    fill(&c, 1, 3, 2 * BS);
    kvh_kvcache_paging_stats_get(&c, &ps);
    cr_assert_eq(ps.blocks_in_use, (size_t)NH * 4);
    cr_assert_eq(c.cow_copies, 0u, "appending after full shared blocks copies nothing");
    for (int h = 0; h < NH; h++)
        for (uint32_t i = 0; i < 11; i++) expect_slot(&c, 1, h, i, (int)i);

    /* seq 1 evicts position 1 (in shared block 0): block 0 becomes its own copy; seq 0 still sees its data */
    for (int h = 0; h < NH; h++) {
        uint32_t victim = 1;
        cr_assert_eq(kvh_kvcache_remove(&c, 1, 0, h, &victim, 1, &err), 0, "%s", err.msg);
    }
    cr_assert_eq(c.cow_copies, (size_t)NH, "one private copy per head");
    kvh_kvcache_paging_stats_get(&c, &ps);
    cr_assert_eq(ps.blocks_shared, (size_t)NH, "block 1 is still shared");
    for (int h = 0; h < NH; h++) {
        for (uint32_t i = 0; i < 10; i++) expect_slot(&c, 0, h, i, (int)i);
        expect_slot(&c, 1, h, 1, 10); /* the last slot filled the hole */
        expect_slot(&c, 1, h, 0, 0);
        for (uint32_t i = 2; i < 10; i++) expect_slot(&c, 1, h, i, (int)i);
    }
    cr_assert_gt(c.bytes_held, held_shared);

    /* resetting seq 0 keeps seq 1's reference alive; resetting both empties the pool */
    kvh_kvcache_reset_seq(&c, 0);
    for (int h = 0; h < NH; h++) expect_slot(&c, 1, h, 4, 4);
    kvh_kvcache_reset_seq(&c, 1);
    kvh_kvcache_paging_stats_get(&c, &ps);
    cr_assert_eq(ps.blocks_in_use, 0u);
    cr_assert_gt(ps.blocks_free, 0u, "freed blocks go back to the pool");
    cr_assert_eq(c.bytes_held, 0u);
    kvh_kvcache_free(&c);
}

Test(kv_paging, a_refused_copy_leaves_the_head_unchanged) {
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 2, 1, NH, HS, CTX, NULL, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_set_paging(&c, BS, &err), 0, "%s", err.msg);
    share_prefix(&c);
    c.bytes_limit = c.bytes_held; /* no room for a private copy */
    uint32_t victim = 0;
    cr_assert_eq(kvh_kvcache_remove(&c, 1, 0, 0, &victim, 1, &err), -1);
    cr_assert(strstr(err.msg, "shared block") && strstr(err.msg, "memory limit"), "%s", err.msg);
    for (uint32_t i = 0; i < 8; i++) expect_slot(&c, 1, 0, i, (int)i);
    cr_assert_eq(kvh_kvcache_head(&c, 1, 0, 0)->n, 8u);
    kvh_kvcache_free(&c);
}

Test(kv_paging, block_size_must_be_a_power_of_two_on_an_empty_host_cache) {
    kvh_kvcache c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_kvcache_init(&c, 1, 1, NH, HS, CTX, NULL, 0, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_kvcache_set_paging(&c, 12, &err), -1);
    cr_assert(strstr(err.msg, "power of two"), "%s", err.msg);
    fill(&c, 0, 3, 0);
    cr_assert_eq(kvh_kvcache_set_paging(&c, 4, &err), -1);
    cr_assert(strstr(err.msg, "empty"), "%s", err.msg);
    kvh_kvcache_free(&c);
}
