/* random.c — seeded random eviction: a control for the policy studies. Keeps the newest token of every
 * head and evicts victims drawn uniformly from the others. A policy that cannot beat it has learned nothing
 * about which tokens matter.
 * Owns: its budget rule, its generator (xorshift64*, one per layer instance, seeded by `seed` and the layer
 * index; the draws follow the order of the host's evict calls, so a run is reproducible). */
#include <kvp/kvp.h>

typedef struct random_state {
    uint64_t x;
} random_state;

static const kvp_param params[] = {
    {.name = "budget", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "tokens kept per head (0 = use [cache] budget)"},
    {.name = "seed", .type = KVP_PARAM_INT, .default_value = 1, .min_value = 0, .max_value = 1 << 30,
     .help = "generator seed (with the layer index)"},
};

static int random_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    int64_t b = kvp_param_int(host, "budget");
    if (b == 0) b = layer->cache_budget;
    if (b == 0) {
        host->set_error(host->ctx, "budget is 0 and the run sets no [cache] budget: set budget = N "
                                   "(--set random.budget=N) or [cache] budget = N");
        return KVP_ERROR;
    }
    random_state *s = host->alloc(host->ctx, sizeof *s);
    if (!s) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    s->x = 0x9E3779B97F4A7C15ull * ((uint64_t)kvp_param_int(host, "seed") + 1) ^ ((uint64_t)layer->layer << 32 | 1u);
    out->state = s;
    out->budget = (uint32_t)b;
    return KVP_OK;
}

static void random_destroy(void *state) { (void)state; }

static uint32_t below(random_state *s, uint32_t n) {
    s->x ^= s->x >> 12;
    s->x ^= s->x << 25;
    s->x ^= s->x >> 27;
    return (uint32_t)(((s->x * 0x2545F4914F6CDD1Dull) >> 32) % n);
}

/* Victims: a partial Fisher-Yates shuffle of the slots other than the newest position's; victims[] (room
 * for n_live) holds the candidates. */
static int random_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    random_state *s = state;
    uint32_t m = 0;
    for (uint32_t i = 0; i < req->n_live; i++)
        if (req->pos[i] != req->newest_pos) victims[m++] = i;
    uint32_t k = req->min_victims < m ? req->min_victims : m;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t j = i + below(s, m - i);
        uint32_t t = victims[i];
        victims[i] = victims[j];
        victims[j] = t;
    }
    *n_victims = k;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = "random",
    .version = "1.0.0",
    .summary = "seeded uniformly random eviction (keeps the newest token): a control",
    .params = params,
    .create = random_create,
    .destroy = random_destroy,
    .evict = random_evict,
};

KVP_PLUGIN(descriptor)
