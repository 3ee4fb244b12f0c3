/* my_policy.c — a complete third-party kvhost policy, built outside the kvhost tree.
 *
 * Random eviction: when a head is over budget, drop uniformly random tokens, never the newest one.
 * It is the classic control baseline of KV-cache papers (a policy that cannot beat random is not
 * choosing anything). One parameter, `seed`; the state is one random generator per (sequence, head),
 * so runs are reproducible and sequences do not disturb each other.
 *
 * Everything it needs comes from <kvp/kvp.h>: it links no kvhost symbol and exports only
 * kvp_plugin_entry (hidden visibility + KVP_PLUGIN). */
#include <kvp/kvp.h>

typedef struct my_state {
    uint32_t n_head;
    uint64_t *rng; /* [n_seq * n_head] xorshift64 states */
    uint64_t seed;
} my_state;

static const kvp_param params[] = {
    {.name = "seed", .type = KVP_PARAM_INT, .default_value = 1, .min_value = 0, .max_value = 2147483647,
     .help = "random seed (same seed, same victims)"},
};

static uint64_t next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t start_state(uint64_t seed, uint32_t stream) {
    uint64_t s = (seed + 1) * 0x9E3779B97F4A7C15ull ^ ((uint64_t)stream + 1) * 0xD1B54A32D192ED03ull;
    return s ? s : 1; /* xorshift must not start at 0 */
}

/* REQUIRED: one call per layer this plugin serves. Allocate everything here, through the host. */
static int my_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    if (layer->cache_budget == 0) {
        host->set_error(host->ctx, "my_policy needs a budget: set [cache] budget = N");
        return KVP_ERROR;
    }
    my_state *s = host->alloc(host->ctx, sizeof *s);
    uint64_t *rng = s ? host->alloc(host->ctx, (size_t)layer->n_seq * layer->n_kv_head * sizeof *rng) : NULL;
    if (!rng) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR; /* the host frees what host->alloc gave */
    }
    s->n_head = layer->n_kv_head;
    s->rng = rng;
    s->seed = (uint64_t)kvp_param_int(host, "seed") + 7919u * layer->layer;
    for (uint32_t i = 0; i < layer->n_seq * layer->n_kv_head; i++) s->rng[i] = start_state(s->seed, i);
    out->state = s;
    out->budget = layer->cache_budget; /* tokens per head after each eviction */
    return KVP_OK;
}

/* REQUIRED. host->alloc memory is released by the host; nothing else to free. */
static void my_destroy(void *state) { (void)state; }

/* Optional: a sequence slot starts over, so its generators restart too. */
static int my_reset(void *state, uint32_t seq) {
    my_state *s = state;
    for (uint32_t h = 0; h < s->n_head; h++) s->rng[seq * s->n_head + h] = start_state(s->seed, seq * s->n_head + h);
    return KVP_OK;
}

/* REQUIRED: choose at least min_victims distinct slots < n_live. victims[] has room for n_live
 * entries; a partial Fisher-Yates shuffle over it picks the victims without allocating. */
static int my_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    my_state *s = state;
    uint64_t *rng = &s->rng[req->seq * s->n_head + req->head];
    uint32_t n = req->n_live, k = req->min_victims;
    for (uint32_t i = 0; i < n; i++) victims[i] = i;
    /* park the newest token at the end so it is never drawn */
    for (uint32_t i = 0; i < n; i++)
        if (req->pos[i] == req->newest_pos) {
            victims[i] = n - 1;
            victims[n - 1] = i;
            break;
        }
    uint32_t pool = n - 1; /* draw from victims[0..pool-1]; k <= n - budget <= n - 1 */
    for (uint32_t i = 0; i < k; i++) {
        uint32_t j = i + (uint32_t)(next(rng) % (pool - i));
        uint32_t t = victims[i];
        victims[i] = victims[j];
        victims[j] = t;
    }
    *n_victims = k;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER, /* ABI version and struct size: lets the host refuse a mismatch clearly */
    .role = KVP_ROLE_POLICY,
    .caps = 0, /* needs no attention scores */
    .n_params = sizeof params / sizeof params[0],
    .name = "my_policy",
    .version = "0.1.0",
    .summary = "random eviction (never the newest token): the control baseline",
    .params = params,
    .create = my_create,
    .destroy = my_destroy,
    .reset = my_reset,
    .evict = my_evict,
};

KVP_PLUGIN(descriptor)
