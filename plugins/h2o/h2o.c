/* h2o.c — Heavy-Hitter Oracle (Zhang et al., NeurIPS 2023): per KV head, keep the `recent` most recent
 * tokens (by position) plus the `heavy` tokens with the largest accumulated attention among the rest;
 * budget = heavy + recent.
 * Owns: its budget rule and victim choice. The score itself is the host's: with KVP_CAP_PREFILL_SCORES
 * and KVP_CAP_DECODE_SCORES, score[] of a slot is the plain sum of every attention probability any
 * query of the sequence gave it (prefill column sums + each decode step), as the reference code's
 * hh_score (no decay, no normalisation). Each head selects its own heavy hitters.
 * Ties in score: the smaller slot index is evicted first (deterministic; slot order is arbitrary).
 * A NaN score counts as the largest (kept), so a corrupt score cannot empty the cache.
 * evict() is O(n) expected (two quickselects) and allocation-free: scratch comes from create(). */
#include <stdio.h>

#include <kvp/kvp.h>

typedef struct h2o_state {
    const kvp_host *host;
    uint32_t heavy, recent;
    uint32_t cap;    /* entries in cand[] and key[] */
    uint32_t *cand;  /* [cap] slots outside the recent window, in increasing slot order */
    float *key;      /* [cap] their scores */
} h2o_state;

static const kvp_param params[] = {
    {.name = "heavy", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "heavy hitters kept per head (0 = derive from [cache] budget, see heavy_ratio)"},
    {.name = "recent", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "most recent tokens kept per head (0 = derive from [cache] budget)"},
    {.name = "heavy_ratio", .type = KVP_PARAM_FLOAT, .default_value = 0.5, .min_value = 0, .max_value = 1,
     .help = "share of [cache] budget given to heavy hitters when heavy and recent are both 0"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

/* heavy/recent from the parameters and the run's budget; see docs/policies.md. */
static int h2o_sizes(const kvp_host *host, const kvp_layer_info *layer, uint32_t *heavy, uint32_t *recent) {
    char msg[256];
    int64_t h = kvp_param_int(host, "heavy"), r = kvp_param_int(host, "recent");
    int64_t b = layer->cache_budget;
    if (h > 0 && r > 0) {
        if (h + r > (int64_t)1 << 30) return fail(host, "heavy + recent is larger than 2^30 tokens");
    } else if (h == 0 && r == 0) {
        if (b == 0)
            return fail(host, "heavy and recent are 0 and the run sets no [cache] budget: set [cache] budget = N "
                              "(split by heavy_ratio) or heavy = N and recent = M");
        double ratio = host->param(host->ctx, "heavy_ratio");
        h = (int64_t)((double)b * ratio);
        if (h > b - 1) h = b - 1; /* the newest token always stays: recent >= 1 */
        if (h < 0) h = 0;
        r = b - h;
    } else {
        const char *given = h > 0 ? "heavy" : "recent", *derived = h > 0 ? "recent" : "heavy";
        int64_t g = h > 0 ? h : r;
        if (b == 0) {
            snprintf(msg, sizeof msg, "%s is 0 and the run sets no [cache] budget: set %s = N or [cache] budget",
                     derived, derived);
            return fail(host, msg);
        }
        if (b <= g) {
            snprintf(msg, sizeof msg, "[cache] budget %lld leaves no room for %s after %s = %lld: raise the budget or "
                     "set %s = N", (long long)b, derived, given, (long long)g, derived);
            return fail(host, msg);
        }
        if (h > 0) r = b - h;
        else h = b - r;
    }
    *heavy = (uint32_t)h;
    *recent = (uint32_t)r;
    return KVP_OK;
}

static int h2o_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    uint32_t heavy = 0, recent = 0;
    if (h2o_sizes(host, layer, &heavy, &recent) != KVP_OK) return KVP_ERROR;
    h2o_state *s = host->alloc(host->ctx, sizeof *s);
    uint32_t cap = layer->n_ctx + layer->slack + 1;
    uint32_t *cand = s ? host->alloc(host->ctx, (size_t)cap * sizeof *cand) : NULL;
    float *key = cand ? host->alloc(host->ctx, (size_t)cap * sizeof *key) : NULL;
    if (!key) return fail(host, "out of memory"); /* the host frees what was allocated */
    s->host = host;
    s->heavy = heavy;
    s->recent = recent;
    s->cap = cap;
    s->cand = cand;
    s->key = key;
    out->state = s;
    out->budget = heavy + recent;
    return KVP_OK;
}

static void h2o_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

/* 1. The `recent` largest positions stay: select them into victims[0..recent-1] (scratch), and take
 *    the smallest of their positions as the window's start p_r (positions are unique per head).
 * 2. The other m slots (pos < p_r) are the candidates, listed in slot order with their scores.
 * 3. Victims: the n_live - budget candidates with the smallest score; heavy hitters are the rest. */
static int h2o_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    h2o_state *s = state;
    const uint32_t n = req->n_live, k = req->min_victims;
    if (n > s->cap) return fail(s->host, "more live slots than the scratch allocated in create");
    if (!req->score) return fail(s->host, "the host passed no attention scores (KVP_CAP_*_SCORES ignored)");
    int32_t start = INT32_MAX; /* positions >= start are the recent window (recent < n: n > budget + slack) */
    if (s->recent > 0) {
        kvp_select_largest_i(req->pos, n, s->recent, victims);
        for (uint32_t i = 0; i < s->recent; i++)
            if (req->pos[victims[i]] < start) start = req->pos[victims[i]];
    }
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (s->recent == 0 || req->pos[i] < start) {
            s->cand[m] = i;
            s->key[m] = req->score[i];
            m++;
        }
    if (m < k) return fail(s->host, "fewer candidates than victims needed (budget smaller than the recent window)");
    kvp_select_smallest_f(s->key, m, k, victims);
    for (uint32_t j = 0; j < k; j++) victims[j] = s->cand[victims[j]];
    *n_victims = k;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_DECODE_SCORES | KVP_CAP_PREFILL_SCORES,
    .n_params = sizeof params / sizeof params[0],
    .name = "h2o",
    .version = "1.0.0",
    .summary = "Heavy-Hitter Oracle: keep the `recent` newest tokens and the `heavy` most-attended others, per head",
    .params = params,
    .create = h2o_create,
    .destroy = h2o_destroy,
    .evict = h2o_evict,
};

KVP_PLUGIN(descriptor)
