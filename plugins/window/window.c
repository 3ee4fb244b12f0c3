/* window.c — FIFO sliding window: keep the `window` most recent tokens of every head.
 * Owns: its budget rule and victim choice. Needs no scores and keeps no state per sequence. */
#include <kvp/kvp.h>

typedef struct window_state {
    uint32_t budget;
} window_state;

static const kvp_param params[] = {
    {.name = "window", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "tokens kept per head (0 = use [cache] budget)"},
};

static int window_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    int64_t w = kvp_param_int(host, "window");
    if (w == 0) w = layer->cache_budget;
    if (w == 0) {
        host->set_error(host->ctx, "window is 0 and the run sets no [cache] budget: set window = N "
                                   "(--set window.window=N) or [cache] budget = N");
        return KVP_ERROR;
    }
    window_state *s = host->alloc(host->ctx, sizeof *s);
    if (!s) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    s->budget = (uint32_t)w;
    out->state = s;
    out->budget = s->budget;
    return KVP_OK;
}

/* Nothing to free: the host frees what host->alloc gave at the end of the run (it belongs to the section). */
static void window_destroy(void *state) { (void)state; }

/* Victims: the min_victims oldest positions. victims[] has room for n_live entries, so it doubles as
 * the selection scratch. */
static int window_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    (void)state;
    kvp_select_smallest_i(req->pos, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = "window",
    .version = "1.0.0",
    .summary = "FIFO sliding window: keep the most recent `window` tokens",
    .params = params,
    .create = window_create,
    .destroy = window_destroy,
    .evict = window_evict,
};

KVP_PLUGIN(descriptor)
