/* tp_report.c — a FIFO policy (evict the oldest positions) that checks everything the ABI 1.3 host
 * hands it, for tests/test_score_report.c. Every check that fails returns KVP_ERROR with a message, so
 * a run through it passes only when the host kept its contract:
 *   insert: new slots' metadata arrives zeroed; it stores {position, reports seen = 0} there;
 *   score_report: n_rows = min(n_queries, report_rows); rows are probability rows (sum 1, 0 where the
 *     slot's position is after the query's); q_pos increasing; col_sum = the row in decode, = the sum of
 *     the rows when every query of the block has its row; every slot's metadata still names its own
 *     position (so metadata moved with the slot through compaction); counts one report per slot;
 *   evict: every live slot has been reported at least once since its insert (the report runs after
 *     attention and before eviction), and the metadata in the request is the same as host->slot_meta.
 * Parameter fail_at = N > 0: the N-th score_report call fails (the error-message test); bad_tensor =
 * true: create asks host->tensor() for a misspelt tensor name and fails (the weight-service test);
 * overrun = true: a decode step's insert writes one metadata entry past the last live slot (plugin_crash.sh: under
 * AddressSanitizer the host poisons those bytes while a hook runs, and the write is reported). */
#include <math.h>
#include <stdio.h>

#include <kvp/kvp.h>

typedef struct meta {
    int32_t pos;
    uint32_t reports;
} meta;

typedef struct tp_state {
    const kvp_host *host;
    uint32_t rows_wanted;
    int64_t fail_at, calls;
    int overrun;
} tp_state;

static const kvp_param params[] = {
    {.name = "fail_at", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = 1 << 30,
     .help = "the N-th score_report call fails (0: never)"},
    {.name = "bad_tensor", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "create asks for a tensor that does not exist"},
    {.name = "rows", .type = KVP_PARAM_INT, .default_value = 4, .min_value = 0, .max_value = 64,
     .help = "report_rows asked for"},
    {.name = "overrun", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "insert writes the metadata of the slot after the last live one (a deliberate bug)"},
};

static int fail(const tp_state *s, const char *msg) {
    s->host->set_error(s->host->ctx, msg);
    return KVP_ERROR;
}

static int tp_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    if (host->param(host->ctx, "bad_tensor") != 0) {
        kvp_tensor t = {.struct_size = sizeof t};
        return host->tensor(host->ctx, layer->layer, "attn.c_attn.wieght", &t); /* KVP_ERROR, message set */
    }
    tp_state *s = host->alloc(host->ctx, sizeof *s);
    if (!s) return KVP_ERROR;
    s->host = host;
    s->rows_wanted = (uint32_t)kvp_param_int(host, "rows");
    s->fail_at = kvp_param_int(host, "fail_at");
    s->overrun = host->param(host->ctx, "overrun") != 0;
    out->state = s;
    out->budget = layer->cache_budget ? layer->cache_budget : layer->n_ctx;
    out->slot_meta_bytes = sizeof(meta);
    out->report_rows = s->rows_wanted;
    return KVP_OK;
}

static void tp_destroy(void *state) { (void)state; }

static int tp_insert(void *state, const kvp_insert_args *a) {
    tp_state *s = state;
    meta *m = a->slot_meta;
    if (!m || a->slot_meta_bytes != sizeof(meta)) return fail(s, "insert: no metadata or wrong size");
    if (a->first_slot + a->n_new != a->n_live) return fail(s, "insert: new slots are not the last ones");
    for (uint32_t i = a->first_slot; i < a->n_live; i++) {
        if (m[i].pos != 0 || m[i].reports != 0) return fail(s, "insert: metadata of a new slot is not zeroed");
        m[i].pos = a->pos[i];
    }
    /* one past the last live slot, outside what the host handed us; on decode steps, where the cache usually
     * has spare capacity there, so only the host's poisoning (not the allocation's end) can catch it */
    if (s->overrun && a->n_new == 1) m[a->n_live].reports = 1;
    return KVP_OK;
}

static int tp_report(void *state, const kvp_score_report *r) {
    tp_state *s = state;
    char msg[200];
    if (s->fail_at && ++s->calls == s->fail_at) return fail(s, "asked to fail here");
    const uint32_t want = s->rows_wanted ? s->rows_wanted : 1;
    const uint32_t n = r->n_live;
    meta *m = r->slot_meta;
    if (!m || r->n_queries < 1) return fail(s, "report: no metadata or no queries");
    if (r->n_rows != (r->n_queries < want ? r->n_queries : want)) return fail(s, "report: wrong n_rows");
    if (r->in_prefill != (r->n_queries > 1)) return fail(s, "report: in_prefill disagrees with n_queries");
    if (n != s->host->live_count(s->host->ctx, r->seq, r->head) || m != s->host->slot_meta(s->host->ctx, r->seq, r->head))
        return fail(s, "report: live count or metadata differ from the host services");
    for (uint32_t j = 0; j < n; j++) {
        if (m[j].pos != r->pos[j]) {
            snprintf(msg, sizeof msg, "report: slot %u holds position %d but its metadata says %d", j, r->pos[j], m[j].pos);
            return fail(s, msg);
        }
        m[j].reports++;
    }
    for (uint32_t q = 0; q < r->n_rows; q++) {
        const float *row = r->rows + (size_t)q * n;
        if (q > 0 && r->q_pos[q] <= r->q_pos[q - 1]) return fail(s, "report: q_pos not increasing");
        double sum = 0;
        for (uint32_t j = 0; j < n; j++) {
            if (r->pos[j] > r->q_pos[q] && row[j] != 0.0f) return fail(s, "report: a masked slot has probability");
            if (!(row[j] >= 0.0f)) return fail(s, "report: negative or NaN probability");
            sum += row[j];
        }
        if (fabs(sum - 1.0) > 1e-4) {
            snprintf(msg, sizeof msg, "report: row %u sums to %.7f", q, sum);
            return fail(s, msg);
        }
    }
    double total = 0;
    for (uint32_t j = 0; j < n; j++) {
        total += r->col_sum[j];
        if (r->n_rows == r->n_queries) {
            double c = 0;
            for (uint32_t q = 0; q < r->n_rows; q++) c += r->rows[(size_t)q * n + j];
            if (fabs(c - r->col_sum[j]) > 1e-5) return fail(s, "report: col_sum is not the sum of the rows");
        }
    }
    if (fabs(total - (double)r->n_queries) > 1e-3 * r->n_queries) return fail(s, "report: col_sum does not total n_queries");
    return KVP_OK;
}

static int tp_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    tp_state *s = state;
    const meta *m = req->slot_meta;
    if (!m || req->slot_meta_bytes != sizeof(meta) || m != s->host->slot_meta(s->host->ctx, req->seq, req->head))
        return fail(s, "evict: metadata missing or not the host's");
    for (uint32_t j = 0; j < req->n_live; j++)
        if (m[j].reports == 0 || m[j].pos != req->pos[j]) return fail(s, "evict: a live slot was never reported");
    kvp_select_smallest_i(req->pos, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
    return KVP_OK;
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_POLICY,
    .caps = KVP_CAP_SCORE_REPORT,
    .n_params = sizeof params / sizeof params[0],
    .name = "tp_report",
    .version = "1.0.0",
    .summary = "FIFO policy that checks every score report, insert and metadata move",
    .params = params,
    .create = tp_create,
    .destroy = tp_destroy,
    .evict = tp_evict,
    .insert = tp_insert,
    .score_report = tp_report,
};

KVP_PLUGIN(descriptor)
