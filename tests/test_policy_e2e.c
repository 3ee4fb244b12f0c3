/* test_policy_e2e.c — every policy plugin, end to end through the session and the real .so files:
 * with a budget at least the sequence length it is a no-op (logits bit-identical to the run without
 * plugins), and under a small budget the invariant live <= budget + slack holds on every layer, head
 * and sequence after every step of a 300-token generation. New policies join by adding their file to
 * kPolicies. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "model/sampler.h"
#include "runtime/session.h"

static const char *const kPolicies[] = {"window.so", "sink.so", "h2o.so", "pyramid.so", "tova.so",
                                        "scissorhands.so"};
/* Extra settings per policy for the no-op test: pyramid's layer budgets spread around the average,
 * so its observation window is widened until the smallest layer budget covers the 55-token sequence. */
static const char *const kNoopExtra[] = {NULL, NULL, NULL, "pyramid.window=56", NULL, NULL};
#define N_POLICIES (sizeof kPolicies / sizeof kPolicies[0])

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 512, .n_embd = 32, .n_head = 4, .n_layer = 3,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                                 int n_seq) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = n_seq;
    o.threads = 1;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err), 0, "session with %s: %s",
                 plugins ? plugins : "no plugins", err.msg);
    return s;
}

/* Greedy generation of n_new tokens for n_seq sequences (different prompts); logits of every step
 * are written to trace (n_seq * V floats per step) when trace != NULL. Checks the invariant after
 * every step when check_budget > 0. */
static void run_generation(kvh_session *s, int n_seq, int n_new, float *trace, uint32_t check_budget,
                           uint32_t slack) {
    const kvh_model *m = s->model;
    const int V = m->cfg.n_vocab;
    float *logits = malloc((size_t)n_seq * V * sizeof(float));
    int32_t prompts[4][24];
    int lens[4];
    const int32_t *pp[4];
    int seqs[4];
    for (int b = 0; b < n_seq; b++) {
        lens[b] = 10 + 5 * b;
        for (int t = 0; t < lens[b]; t++) prompts[b][t] = (int32_t)((t * 31 + b * 7 + 3) % V);
        pp[b] = prompts[b];
        seqs[b] = b;
    }
    kvh_err err = {{0}};
    kvh_batch pre = {.n = n_seq, .seq = seqs, .tokens = pp, .n_tokens = lens, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &pre, logits, &err), 0, "%s", err.msg);
    int32_t next[4];
    const int32_t *np[4];
    int ones[4] = {1, 1, 1, 1};
    for (int step = 0; step < n_new; step++) {
        if (trace) memcpy(trace + (size_t)step * n_seq * V, logits, (size_t)n_seq * V * sizeof(float));
        for (int b = 0; b < n_seq; b++) {
            next[b] = kvh_argmax(logits + (size_t)b * V, V);
            np[b] = &next[b];
        }
        kvh_batch d = {.n = n_seq, .seq = seqs, .tokens = np, .n_tokens = ones, .all_logits = false};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "step %d: %s", step, err.msg);
        if (check_budget) {
            for (int l = 0; l < s->cache.n_layer; l++) {
                uint32_t mx = kvh_kvcache_max_live(&s->cache, l);
                /* each layer against its own budget (pyramid gives layers different ones) */
                uint32_t layer_budget = s->cache.layer[l].budget;
                cr_assert_leq(mx, layer_budget + slack, "step %d layer %d: %u live > budget %u + slack %u", step, l, mx,
                              layer_budget, slack);
            }
        }
    }
    free(logits);
}

/* Parameters are indices into kPolicies: Criterion runs each test in a fresh process, where a pointer
 * from the parent would not be valid. */
ParameterizedTestParameters(policy_e2e, budget_at_least_length_is_bit_identical) {
    static int params[N_POLICIES];
    for (size_t i = 0; i < N_POLICIES; i++) params[i] = (int)i;
    return cr_make_param_array(int, params, N_POLICIES);
}

ParameterizedTest(int *policy_index, policy_e2e, budget_at_least_length_is_bit_identical) {
    const char *const *plugin = &kPolicies[*policy_index];
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 5, "random:small", &err), 0, "%s", err.msg);
    const int n_seq = 2, n_new = 40, V = c.n_vocab;
    float *base = malloc((size_t)n_new * n_seq * V * sizeof(float));
    float *with = malloc((size_t)n_new * n_seq * V * sizeof(float));
    kvh_session *s0 = session_with(&m, NULL, NULL, 0, n_seq);
    run_generation(s0, n_seq, n_new, base, 0, 0);
    kvh_session_free(s0);
    /* longest sequence: 15 prompt + 40 new = 55 tokens; budget 64 keeps everything */
    const char *sets[] = {"cache.budget=64", "cache.slack=0", kNoopExtra[*policy_index]};
    kvh_session *s1 = session_with(&m, *plugin, sets, sets[2] ? 3 : 2, n_seq);
    run_generation(s1, n_seq, n_new, with, 0, 0);
    kvh_session_free(s1);
    cr_assert(memcmp(base, with, (size_t)n_new * n_seq * V * sizeof(float)) == 0,
              "%s with budget >= length changed the logits", *plugin);
    free(base);
    free(with);
    kvh_model_free(&m);
}

/* Parameters are indices into kPolicies: Criterion runs each test in a fresh process, where a pointer
 * from the parent would not be valid. */
ParameterizedTestParameters(policy_e2e, live_never_exceeds_budget_plus_slack) {
    static int params[N_POLICIES];
    for (size_t i = 0; i < N_POLICIES; i++) params[i] = (int)i;
    return cr_make_param_array(int, params, N_POLICIES);
}

ParameterizedTest(int *policy_index, policy_e2e, live_never_exceeds_budget_plus_slack) {
    const char *const *plugin = &kPolicies[*policy_index];
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 9, "random:small", &err), 0, "%s", err.msg);
    const char *sets[] = {"cache.budget=24", "cache.slack=5"};
    kvh_session *s = session_with(&m, *plugin, sets, 2, 3);
    run_generation(s, 3, 300, NULL, 24, 5);
    /* and it really evicted: no head holds more than budget + slack at the end */
    for (int l = 0; l < c.n_layer; l++) {
        cr_assert_leq(s->cache.layer[l].budget, 24u * 3, "layer %d budget %u is implausible", l, s->cache.layer[l].budget);
        cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), s->cache.layer[l].budget + 5);
    }
    cr_assert_lt(s->cache.bytes_held, (size_t)3 * c.n_layer * c.n_head * 64 * (2 * 8 * 4 + 4),
                 "memory was not reclaimed: %zu bytes held", s->cache.bytes_held);
    kvh_session_free(s);
    kvh_model_free(&m);
}

/* ---- stores (plugins/quant) under every policy: index = policy * N_STORES + store ----------------
 * A store changes how K/V are held, never which tokens stay: with budget >= length the policy is still
 * a no-op (bit-identical to the store alone), and under a small budget the invariant still holds. The
 * small model's head_dim is 8, so the stores run with group = 8. */
static const char *const kStores[] = {"int8", "int4"};
#define N_STORES (sizeof kStores / sizeof kStores[0])

static kvh_session *session_with_store(const kvh_model *m, int combo, const char *budget, const char *slack, bool policy) {
    char plugins[128], group[64], b[64], sl[64];
    const char *store = kStores[combo % (int)N_STORES];
    if (policy) snprintf(plugins, sizeof plugins, "%s,%s.so", kPolicies[combo / (int)N_STORES], store);
    else snprintf(plugins, sizeof plugins, "%s.so", store);
    snprintf(group, sizeof group, "%s.group=8", store);
    snprintf(b, sizeof b, "cache.budget=%s", budget);
    snprintf(sl, sizeof sl, "cache.slack=%s", slack);
    const char *extra = policy && strcmp(budget, "64") == 0 ? kNoopExtra[combo / (int)N_STORES] : NULL;
    const char *sets[] = {group, b, sl, extra};
    return session_with(m, plugins, sets, extra ? 4 : 3, 2);
}

ParameterizedTestParameters(policy_e2e, with_store_noop_and_invariant) {
    static int params[N_POLICIES * N_STORES];
    for (size_t i = 0; i < N_POLICIES * N_STORES; i++) params[i] = (int)i;
    return cr_make_param_array(int, params, N_POLICIES * N_STORES);
}

ParameterizedTest(int *combo, policy_e2e, with_store_noop_and_invariant) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 5, "random:small", &err), 0, "%s", err.msg);
    const int n_seq = 2, n_new = 40, V = c.n_vocab;
    float *alone = malloc((size_t)n_new * n_seq * V * sizeof(float));
    float *with = malloc((size_t)n_new * n_seq * V * sizeof(float));
    kvh_session *s0 = session_with_store(&m, *combo, "64", "0", false);
    run_generation(s0, n_seq, n_new, alone, 0, 0);
    kvh_session_free(s0);
    kvh_session *s1 = session_with_store(&m, *combo, "64", "0", true);
    run_generation(s1, n_seq, n_new, with, 0, 0);
    kvh_session_free(s1);
    cr_assert(memcmp(alone, with, (size_t)n_new * n_seq * V * sizeof(float)) == 0,
              "%s with budget >= length changed the logits of store %s", kPolicies[*combo / (int)N_STORES],
              kStores[*combo % (int)N_STORES]);
    kvh_session *s2 = session_with_store(&m, *combo, "24", "5", true);
    run_generation(s2, n_seq, 300, NULL, 24, 5);
    kvh_session_free(s2);
    free(alone);
    free(with);
    kvh_model_free(&m);
}
