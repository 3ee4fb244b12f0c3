/* sink.c — StreamingLLM attention sinks: keep the first `sinks` tokens (positions 0..sinks-1) and the
 * `window` most recent ones; budget = sinks + window. Owns its budget rule and victim choice.
 * Needs no scores. Scratch for the selection key is allocated once in create (n_ctx + slack + 1). */
#include <stdio.h>

#include <kvp/kvp.h>

typedef struct sink_state {
    const kvp_host *host;
    uint32_t sinks;
    uint32_t cap;   /* entries in key[] */
    int32_t *key;   /* [cap] selection key: position, or INT32_MAX for a sink */
} sink_state;

static const kvp_param params[] = {
    {.name = "sinks", .type = KVP_PARAM_INT, .default_value = 4, .min_value = 0, .max_value = 1 << 20,
     .help = "first tokens always kept (positions 0..sinks-1)"},
    {.name = "window", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "most recent tokens kept (0 = [cache] budget - sinks)"},
};

static int sink_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    char msg[200];
    int64_t sinks = kvp_param_int(host, "sinks");
    int64_t window = kvp_param_int(host, "window");
    if (window == 0) {
        if (layer->cache_budget == 0) {
            host->set_error(host->ctx, "window is 0 and the run sets no [cache] budget: set window = N or [cache] budget");
            return KVP_ERROR;
        }
        if ((int64_t)layer->cache_budget <= sinks) {
            snprintf(msg, sizeof msg, "[cache] budget %u leaves no room for a window after %lld sinks: raise the "
                     "budget or set window = N", (unsigned)layer->cache_budget, (long long)sinks);
            host->set_error(host->ctx, msg);
            return KVP_ERROR;
        }
        window = (int64_t)layer->cache_budget - sinks;
    }
    sink_state *s = host->alloc(host->ctx, sizeof *s);
    uint32_t cap = layer->n_ctx + layer->slack + 1;
    int32_t *key = s ? host->alloc(host->ctx, (size_t)cap * sizeof *key) : NULL;
    if (!key) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR; /* the host frees what was allocated */
    }
    s->host = host;
    s->sinks = (uint32_t)sinks;
    s->cap = cap;
    s->key = key;
    out->state = s;
    out->budget = (uint32_t)(sinks + window);
    return KVP_OK;
}

static void sink_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

/* Sinks get the largest key so they are never among the min_victims smallest: at most `sinks` slots
 * are sinks and budget = sinks + window, so the victims are all recent-window tokens. */
static int sink_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    sink_state *s = state;
    if (req->n_live > s->cap) { /* cannot happen: n_live <= n_ctx + slack */
        s->host->set_error(s->host->ctx, "more live slots than the scratch allocated in create");
        return KVP_ERROR;
    }
    for (uint32_t i = 0; i < req->n_live; i++)
        s->key[i] = req->pos[i] < (int32_t)s->sinks ? INT32_MAX : req->pos[i];
    kvp_select_smallest_i(s->key, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = "sink",
    .version = "1.0.0",
    .summary = "StreamingLLM: keep the first `sinks` tokens and the most recent `window`",
    .params = params,
    .create = sink_create,
    .destroy = sink_destroy,
    .evict = sink_evict,
};

KVP_PLUGIN(descriptor)
