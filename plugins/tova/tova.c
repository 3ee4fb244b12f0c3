/* tova.c — TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs"):
 * when the cache is over budget, drop the tokens the CURRENT query attends to least. The paper's
 * default is layer-wise: the score of a token is its attention from the current query averaged over
 * the layer's heads, so every head of the layer drops the same tokens; `per_head = true` lets each head
 * judge by its own attention (the paper's head-wise variant).
 * Owns: the per-slot "last attention" metadata (4 bytes per slot, ABI 1.3) and the victim choice.
 * How it uses the host: score_report() stores, for each slot, the probability the step's LAST query
 * gave it (a decode step's one row; the last row of a prefill block); in layer-wise mode the report of
 * the layer's last head replaces every head's value by the mean over heads (the host reports all heads
 * of a layer before any eviction, kvp.h). evict() keeps the `budget` slots with the largest value.
 * Exactness: the value is always the most recent query's attention, whatever [cache] slack is; with
 * slack = 0 eviction happens at every step, one token at a time, which is the paper's algorithm. With
 * slack > 0 the cache briefly holds up to budget + slack tokens and then drops the slack lowest at once.
 * The newest token is a candidate like any other (as in the paper). Ties: smaller slot index first.
 * No allocation after create(); evict() is O(n) expected (one quickselect). */
#include <stdio.h>
#include <string.h>

#include <kvp/kvp.h>

typedef struct tova_state {
    const kvp_host *host;
    uint32_t budget;
    uint32_t n_head;
    int per_head;
} tova_state;

static const kvp_param params[] = {
    {.name = "budget", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "tokens kept per head (0 = the run's [cache] budget)"},
    {.name = "per_head", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "each head judges by its own attention (false: the paper's layer-wise mean over heads)"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

static int tova_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    if (!KVP_HOST_HAS(host, slot_meta) || !host->slot_meta)
        return fail(host, "this host predates ABI 1.3 (no score_report / slot metadata): upgrade kvhost");
    int64_t b = kvp_param_int(host, "budget");
    if (b == 0) b = layer->cache_budget;
    if (b == 0) return fail(host, "no budget: set tova.budget = N or [cache] budget = N");
    tova_state *s = host->alloc(host->ctx, sizeof *s);
    if (!s) return fail(host, "out of memory");
    s->host = host;
    s->budget = (uint32_t)b;
    s->n_head = layer->n_kv_head;
    s->per_head = host->param(host->ctx, "per_head") != 0;
    out->state = s;
    out->budget = s->budget;
    out->slot_meta_bytes = sizeof(float);
    out->report_rows = 1;
    return KVP_OK;
}

static void tova_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

static int tova_report(void *state, const kvp_score_report *r) {
    tova_state *s = state;
    float *last = r->slot_meta;
    if (!last || r->n_rows < 1) return fail(s->host, "score_report without slot metadata or rows");
    memcpy(last, r->rows + (size_t)(r->n_rows - 1) * r->n_live, (size_t)r->n_live * sizeof(float));
    if (s->per_head || r->head + 1 != s->n_head) return KVP_OK;
    /* Layer-wise: every head has reported this step and none has evicted yet, so all heads hold the same
     * tokens in the same slots (they always drop the same ones); check it rather than assume it. */
    for (uint32_t h = 0; h < s->n_head; h++) {
        const int32_t *pos = s->host->positions(s->host->ctx, r->seq, h);
        if (s->host->live_count(s->host->ctx, r->seq, h) != r->n_live || !pos ||
            memcmp(pos, r->pos, (size_t)r->n_live * sizeof *pos) != 0)
            return fail(s->host, "layer-wise TOVA needs every head of the layer to hold the same tokens (another "
                                 "head's slots differ: per-head budgets?); set tova.per_head = true");
    }
    for (uint32_t j = 0; j < r->n_live; j++) {
        float sum = 0.0f;
        for (uint32_t h = 0; h < s->n_head; h++) sum += ((const float *)s->host->slot_meta(s->host->ctx, r->seq, h))[j];
        last[j] = sum / (float)s->n_head;
    }
    for (uint32_t h = 0; h + 1 < s->n_head; h++)
        memcpy(s->host->slot_meta(s->host->ctx, r->seq, h), last, (size_t)r->n_live * sizeof(float));
    return KVP_OK;
}

static int tova_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    tova_state *s = state;
    if (!req->slot_meta) return fail(s->host, "the host passed no slot metadata");
    kvp_select_smallest_f(req->slot_meta, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_SCORE_REPORT,
    .n_params = sizeof params / sizeof params[0],
    .name = "tova",
    .version = "1.0.0",
    .summary = "TOVA: drop the tokens the current query attends to least (layer-wise mean over heads, or per head)",
    .params = params,
    .create = tova_create,
    .destroy = tova_destroy,
    .evict = tova_evict,
    .score_report = tova_report,
};

KVP_PLUGIN(descriptor)
