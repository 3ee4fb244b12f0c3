/* plugin_check.c — implementation of plugin_check.h: `kvhost plugins check`.
 * A run: random small shape (layers, heads, sequences, n_ctx), random budget and slack, one INI section
 * holding the plugin on every layer. Each step gives every sequence a prefill block (its first step)
 * or one decode token; per layer the driver appends the tokens, calls the policy's insert hook, makes up
 * causal attention (random logits, softmax over the slots each query sees) and feeds it exactly as the
 * CPU backend does (score[] / obs_score[] accumulators, score-report rows), calls score_report, then
 * lets the router enforce the budget (it validates every victim list and names plugin, layer, seq, head
 * and hook on any failure). Sequences restart at random and when n_ctx is near (reset hooks). After
 * every step: live <= budget + slack on every head. Warns once when a policy drops the newest token or
 * empties a head (legal, rarely meant). */
#include "runtime/plugin_check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "runtime/router.h"

kvh_plugin_check_options kvh_plugin_check_default_options(void) {
    kvh_plugin_check_options o = {.seed = 1, .runs = 20, .steps = 200, .budget = 0, .sets = NULL, .n_sets = 0};
    return o;
}

static uint64_t rnd(uint64_t *s) { /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ull;
}
static uint32_t below(uint64_t *s, uint32_t n) { return n ? (uint32_t)(rnd(s) % n) : 0; }

/* What the CPU backend's accumulate_scores does with one query's probabilities (backend_cpu.c). */
static void feed(kvh_head_cache *hc, const kvh_layer_policy_settings *ls, int t, int T, const float *probs) {
    const uint32_t n = hc->n;
    const int pre = T > 1;
    if (hc->score && ((pre && ls->prefill_scores) || (!pre && ls->decode_scores)))
        for (uint32_t j = 0; j < n; j++) hc->score[j] += probs[j];
    if (hc->obs_score && pre && T - t <= (int)ls->obs_window)
        for (uint32_t j = 0; j < n; j++) hc->obs_score[j] += probs[j];
    if (hc->report) {
        const int R = T < (int)ls->report_rows ? T : (int)ls->report_rows;
        float *col = kvh_report_col(hc);
        if (T > 1) {
            if (t == 0) memcpy(col, probs, (size_t)n * sizeof(float));
            else
                for (uint32_t j = 0; j < n; j++) col[j] += probs[j];
        }
        if (t >= T - R) memcpy(kvh_report_row(hc, T, (uint32_t)(t - (T - R))), probs, (size_t)n * sizeof(float));
    }
}

/* Random causal attention of T queries at positions qpos over every head of (s, l). probs: scratch of
 * n_ctx floats. Some steps give ties (equal logits) or a near one-hot row, the cases policies get wrong. */
static void attend(kvh_kvcache *c, int s, int l, int T, const int32_t *qpos, float *probs, uint64_t *rng) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        const uint32_t kind = below(rng, 8);
        for (int t = 0; t < T; t++) {
            float mx = -INFINITY, sum = 0.0f;
            for (uint32_t j = 0; j < hc->n; j++) {
                float x = kind == 0 ? 0.0f : kind == 1 ? (below(rng, 16) == 0 ? 30.0f : 0.0f)
                                                       : (float)below(rng, 1000) / 100.0f - 5.0f;
                probs[j] = hc->pos[j] > qpos[t] ? -INFINITY : x;
                if (probs[j] > mx) mx = probs[j];
            }
            for (uint32_t j = 0; j < hc->n; j++) {
                probs[j] = probs[j] == -INFINITY ? 0.0f : expf(probs[j] - mx);
                sum += probs[j];
            }
            for (uint32_t j = 0; j < hc->n; j++) probs[j] /= sum;
            feed(hc, ls, t, T, probs);
        }
    }
}

typedef struct check_run {
    int n_layer, n_head, n_ctx, n_seq;
    uint32_t budget, slack;
} check_run;

static int one_run(const char *ref, const char *plugin_path, const kvh_plugin_check_options *o, uint64_t seed,
                   FILE *out, int *warned_newest, int *warned_empty, kvh_err *err) {
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    check_run g = {.n_layer = 1 + (int)below(&rng, 3), .n_head = 1 + (int)below(&rng, 4),
                   .n_ctx = 48 + (int)below(&rng, 80), .n_seq = 1 + (int)below(&rng, 3),
                   .budget = 12 + below(&rng, 28), .slack = below(&rng, 3) == 0 ? 0 : below(&rng, 6)};
    if (o->budget) g.budget = o->budget;
    const int HS = 64; /* GPT-2's head size: stores' group sizes divide it (their create must succeed to be named) */
    size_t cap = 256 + (size_t)o->n_sets * 256;
    char *ini = malloc(cap);
    if (!ini) return kvh_fail(err, "plugins check: out of memory");
    size_t u = (size_t)snprintf(ini, cap, "[cache]\nbudget = %u\nslack = %u\n[check]\nplugin = %s\nlayers = all\n",
                                g.budget, g.slack, ref);
    for (int i = 0; i < o->n_sets && u < cap; i++) {
        const char *eq = strchr(o->sets[i], '=');
        if (!eq) {
            free(ini);
            return kvh_fail(err, "plugins check: --set %s: expected KEY=VALUE", o->sets[i]);
        }
        u += (size_t)snprintf(ini + u, cap - u, "%.*s = %s\n", (int)(eq - o->sets[i]), o->sets[i], eq + 1);
    }
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    int rc = kvh_config_load_string(&cfg, ini, "plugins-check", err);
    free(ini);
    if (rc != 0) {
        kvh_config_free(&cfg);
        return -1;
    }
    kvh_router *r = NULL;
    if (kvh_router_create_ex(&r, &cfg, plugin_path, g.n_layer, g.n_head, HS, g.n_ctx, g.n_seq, err) != 0) {
        kvh_config_free(&cfg);
        return kvh_fail_prefix(err, "plugins check %s: seed %llu ([cache] budget %u, slack %u; --budget N and --set "
                               "KEY=VALUE choose others)", ref, (unsigned long long)seed, g.budget, g.slack);
    }
    if (!kvh_router_layer_policy_name(r, 0)) {
        const char *what = kvh_router_layer_store_name(r, 0) ? "a store" : "a weight format";
        kvh_router_free(r);
        kvh_config_free(&cfg);
        return kvh_fail(err, "plugins check: %s is %s; the check drives policies only (stores: see "
                        "tests/test_store_abi.c, weight formats: tests/test_weight_formats.c)", ref, what);
    }
    kvh_layer_policy_settings *st = calloc((size_t)g.n_layer, sizeof *st);
    int32_t *qpos = malloc((size_t)g.n_ctx * sizeof *qpos);
    float *probs = malloc((size_t)g.n_ctx * sizeof *probs);
    float *rows = calloc((size_t)g.n_ctx * (size_t)g.n_head * HS, sizeof *rows);
    kvh_kvcache c;
    memset(&c, 0, sizeof c);
    if (!st || !qpos || !probs || !rows) {
        rc = kvh_fail(err, "plugins check: out of memory");
        goto done;
    }
    kvh_router_layer_settings(r, st);
    if ((rc = kvh_kvcache_init(&c, g.n_seq, g.n_layer, g.n_head, HS, g.n_ctx, st, 0, err)) != 0) goto done;
    if ((rc = kvh_router_bind_cache(r, &c, err)) != 0) goto done;
    uint64_t evicts0 = kvh_router_evict_calls(r);
    int step = 0, s = 0, resets = 0;
    for (step = 0; step < o->steps && rc == 0; step++) {
        for (s = 0; s < g.n_seq && rc == 0; s++) {
            const int32_t p0 = c.next_pos[s];
            const int first = p0 == 0;
            int T = first ? 1 + (int)below(&rng, (uint32_t)(g.n_ctx / 2)) : 1;
            if (p0 + T > g.n_ctx || (!first && below(&rng, 64) == 0)) { /* the sequence slot starts over */
                if ((rc = kvh_router_reset_seq(r, s, err)) != 0) break;
                kvh_kvcache_reset_seq(&c, s);
                resets++;
                continue;
            }
            for (int t = 0; t < T; t++) qpos[t] = p0 + t;
            for (int l = 0; l < g.n_layer && rc == 0; l++) {
                const kvh_layer_policy_settings *ls = &c.layer[l];
                if ((rc = kvh_kvcache_reserve(&c, s, l, (uint32_t)T, err)) != 0) break;
                kvh_kvcache_append(&c, s, l, T, rows, rows, (size_t)g.n_head * HS, qpos);
                if (ls->policy_insert && (rc = ls->policy_insert(ls->policy_ctx, &c, s, l, T, err)) != 0) break;
                attend(&c, s, l, T, qpos, probs, &rng);
                if (ls->report && (rc = ls->policy_report(ls->policy_ctx, &c, s, l, T, qpos, err)) != 0) break;
            }
            if (rc != 0) break;
            c.next_pos[s] = p0 + T;
            if (T > 1 || first) rc = kvh_router_after_prefill(r, &c, s, err);
            else
                for (int l = 0; l < g.n_layer && rc == 0; l++) rc = kvh_router_enforce(r, &c, s, l, 0, err);
            for (int l = 0; l < g.n_layer && rc == 0; l++)
                for (int h = 0; h < g.n_head && rc == 0; h++) {
                    const kvh_head_cache *hc = kvh_kvcache_head(&c, s, l, h);
                    if (hc->budget != KVH_BUDGET_UNLIMITED && (uint64_t)hc->n > (uint64_t)hc->budget + g.slack)
                        rc = kvh_fail(err, "layer %d seq %d head %d holds %u tokens after eviction, more than budget "
                                      "%u + slack %u", l, s, h, hc->n, hc->budget, g.slack);
                    int newest = 0;
                    for (uint32_t j = 0; j < hc->n; j++) newest |= hc->pos[j] == p0 + T - 1;
                    if (hc->n == 0 && !(*warned_empty)++)
                        fprintf(out, "warning: %s emptied layer %d seq %d head %d (legal, but every token is gone)\n",
                                ref, l, s, h);
                    else if (!newest && !(*warned_newest)++)
                        fprintf(out, "warning: %s evicted the newest token (position %d) of layer %d seq %d head %d "
                                "(legal: TOVA does; usually a bug)\n", ref, p0 + T - 1, l, s, h);
                }
        }
    }
    if (rc != 0) {
        kvh_fail_prefix(err, "plugins check %s: seed %llu (layers %d, heads %d, seqs %d, n_ctx %d, budget %u, slack "
                        "%u), step %d, seq %d", ref, (unsigned long long)seed, g.n_layer, g.n_head, g.n_seq, g.n_ctx,
                        g.budget, g.slack, step, s);
    } else {
        fprintf(out, "ok  seed %-6llu layers %d heads %d seqs %d n_ctx %3d budget %2u slack %u: %d steps, %llu evict "
                "calls, %d resets\n", (unsigned long long)seed, g.n_layer, g.n_head, g.n_seq, g.n_ctx, g.budget,
                g.slack, o->steps, (unsigned long long)(kvh_router_evict_calls(r) - evicts0), resets);
    }
done:
    kvh_kvcache_free(&c);
    kvh_router_free(r);
    kvh_config_free(&cfg);
    free(st);
    free(qpos);
    free(probs);
    free(rows);
    return rc;
}

int kvh_plugin_check(const char *ref, const char *plugin_path, const kvh_plugin_check_options *o, FILE *out,
                     kvh_err *err) {
    int warned_newest = 0, warned_empty = 0; /* each warning once per check */
    for (int i = 0; i < o->runs; i++)
        if (one_run(ref, plugin_path, o, o->seed + (uint64_t)i, out, &warned_newest, &warned_empty, err) != 0) return -1;
    fprintf(out, "%s: %d runs x %d steps, every answer valid\n", ref, o->runs, o->steps);
    return 0;
}
