/* tp_alloc.c — a FIFO policy (evict the oldest positions) whose memory is known exactly, for
 * tests/test_policy_bytes.c: create() takes `bytes + per_layer * layer` bytes from host->alloc (its state
 * lives at the start of that block), the section's host->shared block of `shared` bytes (when > 0), and a
 * scratch block of `scratch` bytes that it frees before returning. So after every layer is created a
 * run's policy memory is sum over layers of (bytes + per_layer * layer) + shared, and its peak that plus
 * `scratch` (reached in the last layer's create). */
#include <kvp/kvp.h>

typedef struct ta_state {
    uint32_t budget;
} ta_state;

static const kvp_param params[] = {
    {.name = "bytes", .type = KVP_PARAM_INT, .default_value = 1000, .min_value = 64, .max_value = 1 << 24,
     .help = "bytes each layer's instance holds (the state lives in them)"},
    {.name = "per_layer", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 20,
     .help = "extra bytes per layer index"},
    {.name = "shared", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 24,
     .help = "bytes of the section's shared block (0: none)"},
    {.name = "scratch", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 24,
     .help = "bytes allocated and freed again inside create (0: none)"},
};

static int ta_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    const size_t bytes = (size_t)kvp_param_int(host, "bytes") + (size_t)kvp_param_int(host, "per_layer") * layer->layer;
    ta_state *s = host->alloc(host->ctx, bytes);
    const size_t shared = (size_t)kvp_param_int(host, "shared"), scratch = (size_t)kvp_param_int(host, "scratch");
    if (!s || (shared && !host->shared(host->ctx, shared))) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    if (scratch) {
        void *tmp = host->alloc(host->ctx, scratch);
        if (!tmp) {
            host->set_error(host->ctx, "out of memory");
            return KVP_ERROR;
        }
        host->free(host->ctx, tmp);
    }
    s->budget = layer->cache_budget ? layer->cache_budget : layer->n_ctx;
    out->state = s;
    out->budget = s->budget;
    return KVP_OK;
}

static void ta_destroy(void *state) { (void)state; /* the host frees host->alloc memory */ }

static int ta_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    (void)state;
    kvp_select_smallest_i(req->pos, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .n_params = sizeof params / sizeof params[0],
    .name = "tp_alloc",
    .version = "1.0.0",
    .summary = "test policy: FIFO with a known amount of host->alloc / host->shared memory",
    .params = params,
    .create = ta_create,
    .destroy = ta_destroy,
    .evict = ta_evict,
};

KVP_PLUGIN(descriptor)
