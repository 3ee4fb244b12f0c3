/* scissorhands.c — Scissorhands (Liu et al., NeurIPS 2023, "Exploiting the Persistence of Importance
 * Hypothesis for LLM KV Cache Compression at Test Time"), Algorithm 2 as a per-head policy: over the
 * last `history` queries (the history window w), count for each token how many times its attention fell
 * below a threshold ("unimportant"); when over budget, keep the `recent` newest tokens (the paper's
 * recent window r) and drop, among the others, the tokens with the HIGHEST counts.
 * Threshold: `threshold` > 0 is used as given; 0 (default) is the paper's choice, the uniform share
 * 1/t of the query, t = the number of tokens that query sees (so "below average attention").
 * Owns: the per-slot history (ABI 1.3 slot metadata: one 64-bit mask per slot, bit i = "unimportant at
 * the i-th most recent query", so the window slides exactly with no per-position arrays) and the victim
 * choice. A query that cannot see a token (a later token of the same prefill block) does not count for
 * it: the window is made of the queries that saw the token, and a token younger than w queries has had
 * fewer chances to be counted (it is also protected by the recent window in the usual settings).
 * Prefill: the last min(T, history) rows of the block enter the window (score_report's report_rows).
 * Ties in count: the smaller slot index is dropped first. No allocation after create(). */
#include <stdio.h>

#include <kvp/kvp.h>

typedef struct sh_state {
    const kvp_host *host;
    uint32_t budget, recent, history;
    float threshold;   /* 0: 1/t per query */
    uint32_t cap;      /* entries in cand[] and key[] */
    uint32_t *cand;    /* [cap] candidate slots (outside the recent window) */
    int32_t *key;      /* [cap] their counts */
} sh_state;

static const kvp_param params[] = {
    {.name = "budget", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "tokens kept per head (0 = the run's [cache] budget)"},
    {.name = "history", .type = KVP_PARAM_INT, .default_value = 32, .min_value = 1, .max_value = 64,
     .help = "history window w: how many most recent queries count (at most 64)"},
    {.name = "recent", .type = KVP_PARAM_INT, .default_value = 8, .min_value = 0, .max_value = 1 << 30,
     .help = "newest tokens never dropped (recent window r), < budget"},
    {.name = "threshold", .type = KVP_PARAM_FLOAT, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "attention below this counts as unimportant (0 = 1/t, the uniform share of each query)"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

static int sh_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    char msg[200];
    if (!KVP_HOST_HAS(host, slot_meta) || !host->slot_meta)
        return fail(host, "this host predates ABI 1.3 (no score_report / slot metadata): upgrade kvhost");
    int64_t b = kvp_param_int(host, "budget");
    if (b == 0) b = layer->cache_budget;
    if (b == 0) return fail(host, "no budget: set scissorhands.budget = N or [cache] budget = N");
    int64_t r = kvp_param_int(host, "recent");
    if (r >= b) {
        snprintf(msg, sizeof msg, "recent = %lld leaves no room in budget %lld: recent must be smaller", (long long)r,
                 (long long)b);
        return fail(host, msg);
    }
    sh_state *s = host->alloc(host->ctx, sizeof *s);
    uint32_t cap = layer->n_ctx + layer->slack + 1;
    uint32_t *cand = s ? host->alloc(host->ctx, (size_t)cap * sizeof *cand) : NULL;
    int32_t *key = cand ? host->alloc(host->ctx, (size_t)cap * sizeof *key) : NULL;
    if (!key) return fail(host, "out of memory");
    s->host = host;
    s->budget = (uint32_t)b;
    s->recent = (uint32_t)r;
    s->history = (uint32_t)kvp_param_int(host, "history");
    s->threshold = (float)host->param(host->ctx, "threshold");
    s->cap = cap;
    s->cand = cand;
    s->key = key;
    out->state = s;
    out->budget = s->budget;
    out->slot_meta_bytes = sizeof(uint64_t);
    out->report_rows = s->history;
    return KVP_OK;
}

static void sh_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

static int sh_report(void *state, const kvp_score_report *r) {
    sh_state *s = state;
    uint64_t *bits = r->slot_meta;
    if (!bits) return fail(s->host, "score_report without slot metadata");
    const uint64_t window = s->history >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << s->history) - 1);
    for (uint32_t q = 0; q < r->n_rows; q++) {
        const float *row = r->rows + (size_t)q * r->n_live;
        const int32_t qp = r->q_pos[q];
        float thr = s->threshold;
        if (thr == 0.0f) {
            uint32_t seen = 0;
            for (uint32_t j = 0; j < r->n_live; j++) seen += r->pos[j] <= qp;
            thr = 1.0f / (float)(seen ? seen : 1);
        }
        for (uint32_t j = 0; j < r->n_live; j++)
            if (r->pos[j] <= qp) bits[j] = ((bits[j] << 1) | (uint64_t)(row[j] < thr)) & window;
    }
    return KVP_OK;
}

static int popcount64(uint64_t x) {
    int c = 0;
    for (; x; x &= x - 1) c++;
    return c;
}

/* Recent window as in h2o: the `recent` largest positions stay; the rest are candidates, ranked by count. */
static int sh_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    sh_state *s = state;
    const uint32_t n = req->n_live, k = req->min_victims;
    const uint64_t *bits = req->slot_meta;
    if (n > s->cap) return fail(s->host, "more live slots than the scratch allocated in create");
    if (!bits) return fail(s->host, "the host passed no slot metadata");
    int32_t start = INT32_MAX;
    if (s->recent > 0) {
        kvp_select_largest_i(req->pos, n, s->recent, victims);
        for (uint32_t i = 0; i < s->recent; i++)
            if (req->pos[victims[i]] < start) start = req->pos[victims[i]];
    }
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (s->recent == 0 || req->pos[i] < start) {
            s->cand[m] = i;
            s->key[m] = popcount64(bits[i]);
            m++;
        }
    if (m < k) return fail(s->host, "fewer candidates than victims needed (budget smaller than the recent window)");
    kvp_select_largest_i(s->key, m, k, victims);
    for (uint32_t j = 0; j < k; j++) victims[j] = s->cand[victims[j]];
    *n_victims = k;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_SCORE_REPORT,
    .n_params = sizeof params / sizeof params[0],
    .name = "scissorhands",
    .version = "1.0.0",
    .summary = "Scissorhands: drop the tokens most often below the threshold in the last `history` queries",
    .params = params,
    .create = sh_create,
    .destroy = sh_destroy,
    .evict = sh_evict,
    .score_report = sh_report,
};

KVP_PLUGIN(descriptor)
