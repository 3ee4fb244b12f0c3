/* tp_fifo_1_2.c — a FIFO policy (evict the oldest positions, budget = the run's [cache] budget) built
 * against the FROZEN ABI 1.2 header (kvp_1_2.h), as a plugin author did before ABI 1.3: the current host
 * must load it and give exactly the results window.so gives (tests/test_score_report.c). */
#include "kvp_1_2.h"

static int fifo_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    if (layer->cache_budget == 0) {
        host->set_error(host->ctx, "needs [cache] budget");
        return KVP_ERROR;
    }
    out->state = (void *)host;
    out->budget = layer->cache_budget;
    return KVP_OK;
}

static void fifo_destroy(void *state) { (void)state; }

static int fifo_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    (void)state;
    kvp_select_smallest_i(req->pos, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .name = "tp_fifo_1_2",
    .version = "1.2.0",
    .summary = "FIFO policy built against the frozen ABI 1.2 header",
    .create = fifo_create,
    .destroy = fifo_destroy,
    .evict = fifo_evict,
};

KVP_PLUGIN(descriptor)
