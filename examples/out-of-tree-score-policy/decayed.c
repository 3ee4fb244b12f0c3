/* decayed.c — an out-of-tree policy on the ABI 1.3 score reports: H2O with a DECAYED attention sum, a
 * statistic the host's plain running sum (score[]) cannot give. Each slot keeps one float of metadata,
 *   s <- decay * s + (attention the step's queries gave the token),
 * updated in score_report; evict keeps the `recent` newest tokens and the largest s among the others.
 * Built against the installed SDK only (see CMakeLists.txt / Makefile); test it with
 *   kvhost plugins check ./decayed.so */
#include <kvp/kvp.h>

typedef struct st {
    const kvp_host *host;
    float decay;
    uint32_t recent, cap;
    uint32_t *cand; /* [cap] candidate slots */
    float *key;     /* [cap] their decayed sums */
} st;

static const kvp_param params[] = {
    {.name = "decay", .type = KVP_PARAM_FLOAT, .default_value = 0.9, .min_value = 0, .max_value = 1,
     .help = "weight of the past at each step (1 = plain H2O sum)"},
    {.name = "recent", .type = KVP_PARAM_INT, .default_value = 4, .min_value = 1, .max_value = 1 << 20,
     .help = "newest tokens always kept (< budget)"},
};

static int fail(const kvp_host *h, const char *m) { h->set_error(h->ctx, m); return KVP_ERROR; }

static int create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    if (!KVP_HOST_HAS(host, slot_meta)) return fail(host, "needs a kvhost with ABI 1.3 score reports");
    if (layer->cache_budget == 0) return fail(host, "decayed needs a budget: set [cache] budget = N");
    st *s = host->alloc(host->ctx, sizeof *s);
    uint32_t cap = layer->n_ctx + layer->slack + 1;
    uint32_t *cand = s ? host->alloc(host->ctx, cap * sizeof *cand) : NULL;
    float *key = cand ? host->alloc(host->ctx, cap * sizeof *key) : NULL;
    if (!key) return fail(host, "out of memory");
    *s = (st){.host = host, .decay = (float)host->param(host->ctx, "decay"),
              .recent = (uint32_t)kvp_param_int(host, "recent"), .cap = cap, .cand = cand, .key = key};
    if (s->recent >= layer->cache_budget) return fail(host, "recent must be smaller than [cache] budget");
    out->state = s;
    out->budget = layer->cache_budget;
    out->slot_meta_bytes = sizeof(float); /* s, zeroed by the host for new tokens, moved with its slot */
    out->report_rows = 1;                 /* column sums are enough: no prefill rows needed */
    return KVP_OK;
}

static void destroy(void *state) { (void)state; /* the host frees host->alloc memory */ }

static int report(void *state, const kvp_score_report *r) {
    st *s = state;
    float *acc = r->slot_meta;
    for (uint32_t j = 0; j < r->n_live; j++) acc[j] = s->decay * acc[j] + r->col_sum[j];
    return KVP_OK;
}

static int evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    st *s = state;
    const float *acc = req->slot_meta;
    if (req->n_live > s->cap) return fail(s->host, "more live slots than create() planned for");
    kvp_select_largest_i(req->pos, req->n_live, s->recent, victims); /* the recent window */
    int32_t start = INT32_MAX;
    for (uint32_t i = 0; i < s->recent; i++)
        if (req->pos[victims[i]] < start) start = req->pos[victims[i]];
    uint32_t m = 0;
    for (uint32_t i = 0; i < req->n_live; i++)
        if (req->pos[i] < start) s->cand[m] = i, s->key[m++] = acc[i];
    if (m < req->min_victims) return fail(s->host, "budget smaller than the recent window");
    kvp_select_smallest_f(s->key, m, req->min_victims, victims);
    for (uint32_t j = 0; j < req->min_victims; j++) victims[j] = s->cand[victims[j]];
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_SCORE_REPORT,
    .n_params = sizeof params / sizeof params[0],
    .name = "decayed",
    .version = "0.1.0",
    .summary = "H2O with an exponentially decayed attention sum (ABI 1.3 score reports)",
    .params = params,
    .create = create,
    .destroy = destroy,
    .evict = evict,
    .score_report = report,
};

KVP_PLUGIN(descriptor)
