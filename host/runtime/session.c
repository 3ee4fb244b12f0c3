/* session.c — implementation of session.h. */
#include "runtime/session.h"

#include "runtime/calibration.h"
#include "runtime/weights.h"

#include <stdlib.h>
#include <string.h>

kvh_session_options kvh_session_default_options(void) {
    kvh_session_options o = {.backend = "cpu", .threads = 1, .n_seq = 1, .no_cache = false, .kv_mem_limit = 0};
    return o;
}

void kvh_session_free(kvh_session *s) {
    if (!s) return;
    if (s->backend) s->backend->weights = NULL;
    kvh_weights_free(s->weights);
    if (s->calibration) kvh_calibration_free(s->calibration);
    free(s->calibration);
    if (s->router) kvh_router_free(s->router);
    kvh_kvcache_free(&s->cache);
    kvh_backend_destroy(s->backend);
    if (s->history) {
        for (int i = 0; i < s->opt.n_seq; i++) free(s->history[i]);
    }
    free(s->history);
    free(s->history_len);
    free(s);
}

int kvh_session_create(kvh_session **out, const kvh_model *model, const kvh_run_config *cfg,
                       const kvh_session_options *opt, kvh_err *err) {
    *out = NULL;
    const kvh_model_config *mc = &model->cfg;
    if (opt->n_seq < 1) return kvh_fail(err, "session: batch must be >= 1 (got %d)", opt->n_seq);
    kvh_session *s = calloc(1, sizeof *s);
    if (!s) return kvh_fail(err, "session: out of memory");
    s->model = model;
    s->opt = *opt;
    s->prefill_chunk = cfg ? cfg->prefill_chunk : 0;
    const int L = mc->n_layer, NH = mc->n_head, HS = mc->n_embd / mc->n_head;

    kvh_layer_policy_settings *settings = NULL;
    if (cfg) {
        if (kvh_router_create_model(&s->router, cfg, opt->plugin_path, model, opt->n_seq, err) != 0) goto fail;
        bool any_policy = false;
        for (int l = 0; l < L; l++)
            any_policy |= kvh_router_layer_policy_name(s->router, l) != NULL || kvh_router_layer_store_name(s->router, l) != NULL;
        if (opt->no_cache && any_policy) {
            kvh_fail(err, "--no-cache recomputes the whole prefix each step and keeps no cache, so it cannot be "
                          "combined with cache plugins. HINT: drop --no-cache, or drop the plugins for the baseline");
            goto fail;
        }
        settings = calloc((size_t)L, sizeof *settings);
        if (!settings) {
            kvh_fail(err, "session: out of memory");
            goto fail;
        }
        kvh_router_layer_settings(s->router, settings);
    }
    /* Weight formats pack first (a deferred F16/BF16 matrix goes from the file's bytes into its format
     * without an fp32 copy, model.h), then every deferred matrix no format holds is converted to fp32, all
     * before the backend exists: the CUDA backend uploads the weights when it is created and the CPU one
     * reads them in forward, so neither may see a NULL matrix. A backend other than cpu runs no weight
     * format (refused below), so it gets every matrix in fp32. */
    if (s->router) {
        if (opt->calibration) {
            s->calibration = calloc(1, sizeof *s->calibration);
            if (!s->calibration || kvh_calibration_load(s->calibration, opt->calibration, &model->cfg, err) != 0) {
                if (!s->calibration) kvh_fail(err, "session: out of memory");
                free(settings);
                goto fail;
            }
        }
        if (kvh_weights_pack(&s->weights, model, s->router, s->calibration, err) != 0) {
            free(settings);
            goto fail;
        }
    }
    if (model->n_deferred) {
        /* Materializing writes the model (its deferred matrices' fp32 pointers): sessions on one model are
         * created from one thread, and not while another session of it runs a forward pass; a matrix a
         * running session reads is never NULL, so it is never written here. */
        kvh_model *mm = (kvh_model *)model;
        const bool cpu = !opt->backend || strcmp(opt->backend, "cpu") == 0;
        for (int l = 0; l < L; l++)
            for (int w = KVH_MAT_ATTN_QKV; w <= KVH_MAT_MLP_PROJ; w++)
                if (kvh_model_needs_materialize(model, l, w) && (!cpu || !kvh_weights_matrix(s->weights, l, (uint32_t)w)) &&
                    kvh_model_materialize(mm, l, w, err) != 0) {
                    free(settings);
                    goto fail;
                }
    }
    /* The backend decides where the K/V slot data lives. */
    if (kvh_backend_create(&s->backend, opt->backend, model, opt->threads, err) != 0) {
        free(settings);
        goto fail;
    }
    if (s->router) {
        const kvh_packed_matrix *first = kvh_weights_first(s->weights);
        if (first && strcmp(s->backend->ops->name, "cpu") != 0) {
            kvh_fail(err, "the %s backend does not run weight-format plugins yet ([%s] holds %s of layer %u). "
                     "HINT: use --backend cpu, or drop the weight format", s->backend->ops->name, first->section,
                     kvp_matrix_name(first->info.which), (unsigned)first->info.layer);
            free(settings);
            goto fail;
        }
        s->backend->weights = s->weights;
    }
    if (!settings) {
        settings = calloc((size_t)L, sizeof *settings);
        if (!settings) {
            kvh_fail(err, "session: out of memory");
            goto fail;
        }
        for (int l = 0; l < L; l++) settings[l].budget = KVH_BUDGET_UNLIMITED;
    }
    /* Layers without a store hold K/V densely in the backend's element type. */
    uint32_t elem = s->backend->kv_dense_elem_bytes ? s->backend->kv_dense_elem_bytes : (uint32_t)sizeof(float);
    for (int l = 0; l < L; l++)
        if (!settings[l].store) settings[l].k_slot_bytes = settings[l].v_slot_bytes = (uint32_t)HS * elem;
    kvh_kv_memory mem = kvh_kv_memory_host();
    if (s->backend->ops->kv_memory) mem = *s->backend->ops->kv_memory(s->backend);
    int rc = kvh_kvcache_init_mem(&s->cache, opt->n_seq, L, NH, HS, mc->n_positions, settings, opt->kv_mem_limit,
                                  &mem, err);
    free(settings);
    if (rc != 0) goto fail;
    const uint32_t block_slots = cfg && kvh_origin_given(&cfg->block_size_origin) ? cfg->block_size : opt->block_slots;
    if (block_slots && s->backend->ops->kv_memory) {
        kvh_fail(err, "[cache] block_size = %u: the %s backend keeps each head's slots contiguous (paged KV memory is "
                 "CPU-only for now); set block_size = 0", (unsigned)block_slots, s->backend->ops->name);
        goto fail;
    }
    if (kvh_kvcache_set_paging(&s->cache, block_slots, err) != 0) goto fail;
    if (s->router && kvh_router_bind_cache(s->router, &s->cache, err) != 0) goto fail;
    if (opt->no_cache) {
        s->history = calloc((size_t)opt->n_seq, sizeof *s->history);
        s->history_len = calloc((size_t)opt->n_seq, sizeof *s->history_len);
        if (!s->history || !s->history_len) {
            kvh_fail(err, "session: out of memory");
            goto fail;
        }
        for (int i = 0; i < opt->n_seq; i++) {
            s->history[i] = malloc((size_t)mc->n_positions * sizeof(int32_t));
            if (!s->history[i]) {
                kvh_fail(err, "session: out of memory");
                goto fail;
            }
        }
    }
    *out = s;
    return 0;
fail:
    kvh_session_free(s);
    return -1;
}

int kvh_session_next_pos(const kvh_session *s, int seq) {
    if (s->opt.no_cache) return s->history_len[seq];
    return s->cache.next_pos[seq];
}

int kvh_session_reset_seq(kvh_session *s, int seq, kvh_err *err) {
    if (seq < 0 || seq >= s->opt.n_seq) return kvh_fail(err, "session: sequence %d out of range", seq);
    kvh_kvcache_reset_seq(&s->cache, seq);
    if (s->history_len) s->history_len[seq] = 0;
    if (s->router && kvh_router_reset_seq(s->router, seq, err) != 0) return -1;
    return 0;
}

/* --no-cache: every entry is run as a fresh prefill of its whole history plus its new tokens. */
static int forward_no_cache(kvh_session *s, const kvh_batch *batch, float *logits, kvh_err *err) {
    const int P = s->model->cfg.n_positions;
    const int V = s->model->cfg.n_vocab;
    for (int b = 0; b < batch->n; b++) {
        int seq = batch->seq[b];
        if (s->history_len[seq] + batch->n_tokens[b] > P)
            return kvh_fail(err, "sequence %d would reach position %d, past n_positions %d", seq,
                            s->history_len[seq] + batch->n_tokens[b], P);
    }
    /* One sequence at a time keeps the recompute honest (no batching gain the baseline would not have). */
    size_t out_row = 0;
    for (int b = 0; b < batch->n; b++) {
        int seq = batch->seq[b];
        int old = s->history_len[seq];
        memcpy(s->history[seq] + old, batch->tokens[b], (size_t)batch->n_tokens[b] * sizeof(int32_t));
        int total = old + batch->n_tokens[b];
        kvh_kvcache_reset_seq(&s->cache, seq);
        const int32_t *toks = s->history[seq];
        kvh_batch one = {.n = 1, .seq = &seq, .tokens = &toks, .n_tokens = &total, .all_logits = batch->all_logits};
        float *dst = logits + out_row * (size_t)V;
        if (batch->all_logits) {
            /* Only the new tokens' rows are wanted: run all rows, keep the tail. */
            float *tmp = malloc((size_t)total * (size_t)V * sizeof(float));
            if (!tmp) return kvh_fail(err, "--no-cache: out of memory for %d x %d logits", total, V);
            int rc = s->backend->ops->forward(s->backend, &s->cache, &one, tmp, err);
            if (rc == 0)
                memcpy(dst, tmp + (size_t)old * V, (size_t)batch->n_tokens[b] * (size_t)V * sizeof(float));
            free(tmp);
            if (rc != 0) return -1;
            out_row += (size_t)batch->n_tokens[b];
        } else {
            if (s->backend->ops->forward(s->backend, &s->cache, &one, dst, err) != 0) return -1;
            out_row += 1;
        }
        s->history_len[seq] = total;
        /* The recomputed cache is thrown away: the baseline holds none between steps. */
        kvh_kvcache_reset_seq(&s->cache, seq);
    }
    return 0;
}

/* Lets the router evict where a layer is over budget + slack, with the backend's metadata hooks around
 * each eviction (a device backend keeps scores on the device and syncs them only then). */
static int enforce_budgets(kvh_session *s, int seq, bool in_prefill, kvh_err *err) {
    const kvh_backend_ops *ops = s->backend->ops;
    if (in_prefill && !ops->before_evict) return kvh_router_after_prefill(s->router, &s->cache, seq, err);
    if (in_prefill) {
        /* per-head budgets are decided on the scores of the whole prompt: sync every layer first */
        for (int l = 0; l < s->cache.n_layer; l++)
            if (ops->before_evict(s->backend, &s->cache, seq, l, err) != 0) return -1;
        if (kvh_router_after_prefill(s->router, &s->cache, seq, err) != 0) return -1;
        for (int l = 0; l < s->cache.n_layer; l++)
            if (ops->after_evict && ops->after_evict(s->backend, &s->cache, seq, l, err) != 0) return -1;
        return 0;
    }
    for (int l = 0; l < s->cache.n_layer; l++) {
        if (!kvh_kvcache_over_budget(&s->cache, seq, l)) continue;
        if (ops->before_evict && ops->before_evict(s->backend, &s->cache, seq, l, err) != 0) return -1;
        if (kvh_router_enforce(s->router, &s->cache, seq, l, 0, err) != 0) return -1;
        if (ops->after_evict && ops->after_evict(s->backend, &s->cache, seq, l, err) != 0) return -1;
    }
    return 0;
}

static int forward_once(kvh_session *s, const kvh_batch *batch, float *logits, kvh_err *err) {
    int prefill_flags[64];
    int *in_prefill = batch->n <= 64 ? prefill_flags : malloc((size_t)batch->n * sizeof(int));
    if (!in_prefill) return kvh_fail(err, "session: out of memory");
    for (int b = 0; b < batch->n; b++)
        in_prefill[b] = batch->n_tokens[b] > 1 || s->cache.next_pos[batch->seq[b]] == 0;
    int rc = s->backend->ops->forward(s->backend, &s->cache, batch, logits, err);
    if (rc == 0 && s->router) {
        uint64_t t0 = kvh_now_ns();
        for (int b = 0; b < batch->n && rc == 0; b++) {
            int seq = batch->seq[b];
            rc = enforce_budgets(s, seq, in_prefill[b], err);
        }
        s->hook_ns += kvh_now_ns() - t0;
    }
    if (in_prefill != prefill_flags) free(in_prefill);
    return rc;
}

/* A batch with an entry longer than prefill_chunk, fed as rounds of pieces: round r gives every entry
 * with tokens left its next min(chunk, left) tokens, so entries stay in step and each round is one
 * forward call. Logit rows are copied to where the unsplit call would have written them. */
static int forward_chunked(kvh_session *s, const kvh_batch *batch, float *logits, kvh_err *err) {
    const int B = batch->n, V = s->model->cfg.n_vocab;
    const int chunk = (int)s->prefill_chunk;
    int max_T = 0;
    for (int b = 0; b < B; b++)
        if (batch->n_tokens[b] > max_T) max_T = batch->n_tokens[b];
    const size_t sub_rows = batch->all_logits ? (size_t)B * (size_t)chunk : (size_t)B;
    int *seq = malloc((size_t)B * sizeof *seq), *n_tok = malloc((size_t)B * sizeof *n_tok);
    int *entry = malloc((size_t)B * sizeof *entry);
    size_t *row0 = malloc((size_t)B * sizeof *row0); /* first logits row of entry b (all_logits) */
    const int32_t **tok = malloc((size_t)B * sizeof *tok);
    float *sub = malloc(sub_rows * (size_t)V * sizeof(float));
    int rc = -1;
    if (!seq || !n_tok || !entry || !row0 || !tok || !sub) {
        kvh_fail(err, "session: out of memory for a chunked prefill of %d entries", B);
        goto out;
    }
    for (int b = 0, r = 0; b < B; r += batch->n_tokens[b], b++) row0[b] = (size_t)r;
    for (int off = 0; off < max_T; off += chunk) {
        int n = 0;
        for (int b = 0; b < B; b++) {
            int left = batch->n_tokens[b] - off;
            if (left <= 0) continue;
            entry[n] = b;
            seq[n] = batch->seq[b];
            tok[n] = batch->tokens[b] + off;
            n_tok[n] = left < chunk ? left : chunk;
            n++;
        }
        kvh_batch piece = {.n = n, .seq = seq, .tokens = tok, .n_tokens = n_tok, .all_logits = batch->all_logits};
        if (forward_once(s, &piece, sub, err) != 0) {
            kvh_fail_prefix(err, "prefill tokens %d..%d", off, off + chunk - 1);
            goto out;
        }
        size_t r = 0;
        for (int i = 0; i < n; i++) {
            const int b = entry[i];
            if (batch->all_logits) {
                memcpy(logits + (row0[b] + (size_t)off) * V, sub + r * V, (size_t)n_tok[i] * V * sizeof(float));
                r += (size_t)n_tok[i];
            } else {
                if (off + n_tok[i] == batch->n_tokens[b]) /* this piece ends the entry: its logits are final */
                    memcpy(logits + (size_t)b * V, sub + (size_t)i * V, (size_t)V * sizeof(float));
            }
        }
    }
    rc = 0;
out:
    free(seq);
    free(n_tok);
    free(entry);
    free(row0);
    free(tok);
    free(sub);
    return rc;
}

int kvh_session_forward(kvh_session *s, const kvh_batch *batch, float *logits, kvh_err *err) {
    if (s->opt.no_cache) return forward_no_cache(s, batch, logits, err);
    if (s->prefill_chunk)
        for (int b = 0; b < batch->n; b++)
            if (batch->n_tokens[b] > (int)s->prefill_chunk) return forward_chunked(s, batch, logits, err);
    return forward_once(s, batch, logits, err);
}
