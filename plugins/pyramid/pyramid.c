/* pyramid.c — PyramidKV (Cai et al. 2024): per-layer budgets that shrink with depth along an
 * arithmetic sequence (the reference code's schedule, made to preserve the total exactly), and,
 * inside a layer, SnapKV-style selection: the last `window` prompt queries' attention column sums
 * (obs_score[], from the host), pooled along token positions with a `kernel_size` kernel, choose the
 * prompt tokens kept; the observation window itself (the `window` newest positions) always stays.
 * During decode the layer is held at its budget: the `window` newest tokens stay and, among the others,
 * the lowest (obs_score + accumulated decode attention) are evicted (the reference compresses only at
 * prefill and then lets the cache grow; kvhost must bound memory). See docs/policies.md.
 * Owns: the schedule, the selection. Does not own: the scores (host/backend).
 * evict() allocates nothing (scratch from create); O(n * kernel_size) at prefill when positions are
 * dense enough for a bucket sort (the usual case; otherwise an in-place heapsort, O(n log n)), O(n)
 * expected during decode. */
#include <math.h>
#include <stdio.h>

#include <kvp/kvp.h>

typedef struct pyramid_state {
    const kvp_host *host;
    uint32_t window;    /* observation window = recent tokens always kept */
    uint32_t kernel;    /* pooling kernel (odd) */
    int pool_max;       /* 1: max pooling, 0: average pooling (zero padding, divide by kernel) */
    uint32_t cap;       /* entries of each scratch array */
    uint32_t *order;    /* [cap] candidate slots (outside the window), sorted by position at prefill */
    uint32_t *bucket;   /* [cap] bucket sort: slot at position - min position, UINT32_MAX if none */
    float *raw;         /* [cap] candidates' obs scores in position order; decode: their keys in slot order */
    float *pooled;      /* [cap] pooled scores in position order */
} pyramid_state;

static const kvp_param params[] = {
    {.name = "avg_budget", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "average per-head budget over layers, window included (0 = [cache] budget)"},
    {.name = "window", .type = KVP_PARAM_INT, .default_value = 8, .min_value = 1, .max_value = 1 << 20,
     .help = "observation window: last prompt queries scored, newest tokens always kept"},
    {.name = "kernel_size", .type = KVP_PARAM_INT, .default_value = 7, .min_value = 1, .max_value = 101,
     .help = "pooling kernel along positions (odd; 1 = no pooling)"},
    {.name = "beta", .type = KVP_PARAM_INT, .default_value = 20, .min_value = 1, .max_value = 1 << 20,
     .help = "top layer keeps (avg_budget - window) / beta tokens besides the window (1 = uniform budgets)"},
    {.name = "pool_max", .type = KVP_PARAM_BOOL, .default_value = 1, .min_value = 0, .max_value = 1,
     .help = "max pooling (1) or average pooling (0)"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

/* Tokens layer `l` of `L` keeps besides the window, for an average of A per layer:
 *   min = A / beta, max = 2A - min, s_l = floor(max - l (max - min) / (L - 1)),
 * then the remainder L*A - sum(s_l) (< L) goes one token each to the lowest layers, so the total is
 * exactly L*A and the sequence stays non-increasing. */
static int64_t pyramid_selected(int64_t A, int64_t beta, int64_t L, int64_t l) {
    if (L <= 1) return A;
    int64_t mn = A / beta, mx = 2 * A - mn, sum = 0;
    for (int64_t i = 0; i < L; i++) sum += (mx * (L - 1) - i * (mx - mn)) / (L - 1);
    int64_t rem = L * A - sum;
    return (mx * (L - 1) - l * (mx - mn)) / (L - 1) + (l < rem ? 1 : 0);
}

static int pyramid_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    char msg[256];
    int64_t avg = kvp_param_int(host, "avg_budget");
    int64_t window = kvp_param_int(host, "window");
    int64_t kernel = kvp_param_int(host, "kernel_size");
    int64_t beta = kvp_param_int(host, "beta");
    if (avg == 0) avg = layer->cache_budget;
    if (avg == 0)
        return fail(host, "avg_budget is 0 and the run sets no [cache] budget: set [cache] budget = N or "
                          "avg_budget = N");
    if (avg <= window) {
        snprintf(msg, sizeof msg, "average budget %lld must be larger than window %lld (room for selected tokens): "
                 "raise the budget or lower window", (long long)avg, (long long)window);
        return fail(host, msg);
    }
    if (kernel % 2 == 0) {
        snprintf(msg, sizeof msg, "kernel_size %lld must be odd (the pooling is centred on each token)", (long long)kernel);
        return fail(host, msg);
    }
    int64_t sel = pyramid_selected(avg - window, beta, layer->n_layer, layer->layer);
    if (window + sel > (int64_t)UINT32_MAX - 1) return fail(host, "layer budget does not fit 32 bits");
    pyramid_state *s = host->alloc(host->ctx, sizeof *s);
    uint32_t cap = layer->n_ctx + layer->slack + 1;
    uint32_t *order = s ? host->alloc(host->ctx, (size_t)cap * sizeof *order) : NULL;
    uint32_t *bucket = order ? host->alloc(host->ctx, (size_t)cap * sizeof *bucket) : NULL;
    float *raw = bucket ? host->alloc(host->ctx, (size_t)cap * sizeof *raw) : NULL;
    float *pooled = raw ? host->alloc(host->ctx, (size_t)cap * sizeof *pooled) : NULL;
    if (!pooled) return fail(host, "out of memory"); /* the host frees what was allocated */
    s->host = host;
    s->window = (uint32_t)window;
    s->kernel = (uint32_t)kernel;
    s->pool_max = host->param(host->ctx, "pool_max") != 0;
    s->cap = cap;
    s->order = order;
    s->bucket = bucket;
    s->raw = raw;
    s->pooled = pooled;
    out->state = s;
    out->budget = (uint32_t)(window + sel);
    out->obs_window = (uint32_t)window;
    return KVP_OK;
}

static void pyramid_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

/* order[0..m-1] sorted by pos[], in place (the fallback when positions are too sparse to bucket). */
static void sift_down(uint32_t *a, const int32_t *pos, uint32_t root, uint32_t end) {
    for (;;) {
        uint32_t child = 2 * root + 1;
        if (child >= end) return;
        if (child + 1 < end && pos[a[child + 1]] > pos[a[child]]) child++;
        if (pos[a[child]] <= pos[a[root]]) return;
        uint32_t t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}
static void heapsort_by_pos(uint32_t *a, uint32_t m, const int32_t *pos) {
    for (uint32_t i = m / 2; i-- > 0;) sift_down(a, pos, i, m);
    for (uint32_t end = m; end-- > 1;) {
        uint32_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, pos, 0, end);
    }
}

/* Sorts order[0..m-1] by position: a bucket pass when the positions span at most cap values. */
static void sort_by_pos(pyramid_state *s, uint32_t m, const int32_t *pos) {
    if (m < 2) return;
    int32_t lo = pos[s->order[0]], hi = lo;
    for (uint32_t i = 1; i < m; i++) {
        int32_t p = pos[s->order[i]];
        if (p < lo) lo = p;
        if (p > hi) hi = p;
    }
    uint64_t range = (uint64_t)((int64_t)hi - lo) + 1;
    if (range > s->cap) {
        heapsort_by_pos(s->order, m, pos);
        return;
    }
    for (uint64_t i = 0; i < range; i++) s->bucket[i] = UINT32_MAX;
    for (uint32_t i = 0; i < m; i++) s->bucket[pos[s->order[i]] - lo] = s->order[i];
    uint32_t j = 0;
    for (uint64_t i = 0; i < range; i++)
        if (s->bucket[i] != UINT32_MAX) s->order[j++] = s->bucket[i];
}

/* pooled[r] = max or mean of raw[r-h .. r+h] (h = kernel / 2); outside 0..m-1 counts as absent for max,
 * as zero for the mean (divided by the full kernel, as torch's avg_pool1d with padding). */
static void pool(const pyramid_state *s, uint32_t m) {
    const int64_t h = s->kernel / 2;
    for (int64_t r = 0; r < (int64_t)m; r++) {
        int64_t a = r - h < 0 ? 0 : r - h, b = r + h >= (int64_t)m ? (int64_t)m - 1 : r + h;
        float acc = s->pool_max ? -INFINITY : 0.0f;
        for (int64_t j = a; j <= b; j++) {
            if (s->pool_max) acc = s->raw[j] > acc ? s->raw[j] : acc;
            else acc += s->raw[j];
        }
        s->pooled[r] = s->pool_max ? acc : acc / (float)s->kernel;
    }
}

static int pyramid_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    pyramid_state *s = state;
    const uint32_t n = req->n_live, k = req->min_victims;
    if (n > s->cap) return fail(s->host, "more live slots than the scratch allocated in create");
    if (!req->obs_score || !req->score) return fail(s->host, "the host passed no attention scores (caps ignored)");
    /* The observation window: the `window` newest positions (window <= budget < n). */
    int32_t start = INT32_MAX;
    kvp_select_largest_i(req->pos, n, s->window, victims);
    for (uint32_t i = 0; i < s->window; i++)
        if (req->pos[victims[i]] < start) start = req->pos[victims[i]];
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++)
        if (req->pos[i] < start) s->order[m++] = i;
    if (m < k) return fail(s->host, "fewer candidates than victims needed");
    if (req->in_prefill) {
        /* SnapKV selection: pooled observation scores, in position order. */
        sort_by_pos(s, m, req->pos);
        for (uint32_t r = 0; r < m; r++) s->raw[r] = req->obs_score[s->order[r]];
        pool(s, m);
        kvp_select_smallest_f(s->pooled, m, k, victims);
    } else {
        /* Decode: observation score + decode attention accumulated since, no pooling. */
        for (uint32_t r = 0; r < m; r++) s->raw[r] = req->obs_score[s->order[r]] + req->score[s->order[r]];
        kvp_select_smallest_f(s->raw, m, k, victims);
    }
    for (uint32_t j = 0; j < k; j++) victims[j] = s->order[victims[j]];
    *n_victims = k;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_OBS_SCORES | KVP_CAP_DECODE_SCORES,
    .n_params = sizeof params / sizeof params[0],
    .name = "pyramid",
    .version = "1.0.0",
    .summary = "PyramidKV: per-layer budgets shrinking with depth, observation-window (SnapKV) selection",
    .params = params,
    .create = pyramid_create,
    .destroy = pyramid_destroy,
    .evict = pyramid_evict,
};

KVP_PLUGIN(descriptor)
