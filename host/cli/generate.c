/* generate.c — implementation of the decode loop declared in generate.h. */
#include "cli/generate.h"

#include <stdlib.h>
#include <string.h>

void kvh_generate_result_free(kvh_generate_result *res) {
    if (res->out)
        for (int i = 0; i < res->n_seq; i++) free(res->out[i]);
    free(res->out);
    free(res->n_out);
    free(res->step_ms);
    memset(res, 0, sizeof *res);
}

static uint32_t max_live_now(const kvh_kvcache *c) {
    uint32_t mx = 0;
    for (int l = 0; l < c->n_layer; l++) {
        uint32_t m = kvh_kvcache_max_live(c, l);
        if (m > mx) mx = m;
    }
    return mx;
}

/* Fails when a row of logits holds a NaN or infinity: sampling would silently pick token 0 (argmax over
 * NaN) and the run would exit 0 with garbage. Weights are checked at load (model.c), so what is left is an
 * activation that overflowed or a plugin's store that returned non-finite values. O(rows x V) per step,
 * against O(parameters) for the forward pass that made them: a few microseconds. */
static int check_logits(const float *logits, int rows, int V, const int *seq_of_row, const char *when, int step,
                        kvh_err *err) {
    size_t n = (size_t)rows * (size_t)V;
    size_t at = kvh_first_nonfinite(logits, n);
    if (at == n) return 0;
    char w[48];
    if (step >= 0) snprintf(w, sizeof w, "%s %d", when, step);
    else snprintf(w, sizeof w, "%s", when);
    return kvh_fail(err, "%s: sequence %d: the logit of token %zu is %s (non-finite). The weights were checked "
                    "finite at load, so an activation overflowed (weights of huge magnitude?) or a plugin's store "
                    "returned non-finite values; the run is stopped rather than sampling from it",
                    w, seq_of_row[at / (size_t)V], at % (size_t)V, kvh_nonfinite_name(logits[at]));
}

static void stream_token(const kvh_generate_request *req, int32_t id) {
    if (!req->stream || !req->tok) return;
    char buf[256];
    int n = kvh_tokenizer_token_bytes(req->tok, id, buf, sizeof buf);
    if (n > 0 && (size_t)n <= sizeof buf) fwrite(buf, 1, (size_t)n, req->stream);
    fflush(req->stream);
}

int kvh_generate(kvh_session *s, const kvh_generate_request *req, kvh_generate_result *res, kvh_err *err) {
    memset(res, 0, sizeof *res);
    const int B = req->n_prompts;
    const int V = s->model->cfg.n_vocab;
    if (B < 1 || B > s->opt.n_seq) return kvh_fail(err, "generate: %d prompts for a session of %d sequences", B, s->opt.n_seq);
    if (req->max_new < 0) return kvh_fail(err, "generate: --max-new must be >= 0");
    for (int b = 0; b < B; b++) {
        if (req->prompt_len[b] < 1) return kvh_fail(err, "generate: prompt %d is empty", b);
        if (req->prompt_len[b] + req->max_new > s->model->cfg.n_positions)
            return kvh_fail(err,
                            "prompt %d has %d tokens; with --max-new %d it would reach %d tokens, past the model's "
                            "n_positions %d. HINT: lower --max-new, shorten the prompt, or pass --truncate to keep the "
                            "most recent prompt tokens",
                            b, req->prompt_len[b], req->max_new, req->prompt_len[b] + req->max_new,
                            s->model->cfg.n_positions);
    }
    /* A padded vocabulary (vocab_size 50304 for a 50257-token tokenizer) has ids with no text: they are
     * masked by sampling only from the tokenizer's ids (rows keep stride V). */
    int V_sample = V;
    if (req->tok && kvh_tokenizer_vocab_size(req->tok) < V) V_sample = kvh_tokenizer_vocab_size(req->tok);
    res->n_seq = B;
    res->out = calloc((size_t)B, sizeof *res->out);
    res->n_out = calloc((size_t)B, sizeof *res->n_out);
    res->step_ms = calloc((size_t)(req->max_new > 0 ? req->max_new : 1), sizeof *res->step_ms);
    float *logits = malloc((size_t)B * (size_t)V * sizeof(float));
    kvh_sampler *samplers = calloc((size_t)B, sizeof *samplers);
    int *seqs = malloc((size_t)B * sizeof *seqs);
    int *ones = malloc((size_t)B * sizeof *ones);
    int32_t *next = malloc((size_t)B * sizeof *next);
    const int32_t **tok_ptrs = malloc((size_t)B * sizeof *tok_ptrs);
    bool *done = calloc((size_t)B, sizeof *done);
    int rc = -1;
    if (!res->out || !res->n_out || !res->step_ms || !logits || !samplers || !seqs || !ones || !next || !tok_ptrs ||
        !done) {
        kvh_fail(err, "generate: out of memory");
        goto out;
    }
    for (int b = 0; b < B; b++) {
        res->out[b] = malloc((size_t)(req->max_new > 0 ? req->max_new : 1) * sizeof(int32_t));
        if (!res->out[b] || kvh_sampler_init(&samplers[b], &req->sampling, V_sample, (uint64_t)b, err) != 0) {
            if (res->out[b] == NULL) kvh_fail(err, "generate: out of memory");
            goto out;
        }
        seqs[b] = b;
        ones[b] = 1;
    }
    kvh_phase_times times0 = s->backend->times;
    uint64_t hooks0 = s->hook_ns;
    double t_start = kvh_now_ms();

    /* Prefill: all prompts in one forward call (ragged, no padding). */
    {
        kvh_batch batch = {.n = B, .seq = seqs, .tokens = req->prompts, .n_tokens = req->prompt_len, .all_logits = false};
        double t0 = kvh_now_ms();
        if (kvh_session_forward(s, &batch, logits, err) != 0) {
            kvh_fail_prefix(err, "prefill");
            goto out;
        }
        res->prefill_ms = kvh_now_ms() - t0;
        res->max_live_per_head = max_live_now(&s->cache);
        if (check_logits(logits, B, V, seqs, "prefill", -1, err) != 0) goto out;
    }

    /* Decode: one token per live sequence per step. */
    int active = B;
    for (int step = 0; step < req->max_new && active > 0; step++) {
        int n = 0;
        for (int b = 0; b < B; b++) {
            if (done[b]) continue;
            /* logits rows are in the order of the previous call's live entries */
            next[b] = kvh_sampler_next(&samplers[b], logits + (size_t)n * V);
            n++;
        }
        n = 0;
        for (int b = 0; b < B; b++) {
            if (done[b]) continue;
            res->out[b][res->n_out[b]++] = next[b];
            if (b == 0) stream_token(req, next[b]);
            if (req->stop_at_eot && next[b] == req->eot_id) {
                done[b] = true;
                active--;
                continue;
            }
            seqs[n] = b;
            tok_ptrs[n] = &next[b];
            n++;
        }
        /* The last generated token needs no forward pass: nothing would read its logits. */
        if (step == req->max_new - 1 || n == 0) break;
        kvh_batch batch = {.n = n, .seq = seqs, .tokens = tok_ptrs, .n_tokens = ones, .all_logits = false};
        double t0 = kvh_now_ms();
        if (kvh_session_forward(s, &batch, logits, err) != 0) {
            kvh_fail_prefix(err, "decode step %d", step);
            goto out;
        }
        res->step_ms[res->n_steps++] = kvh_now_ms() - t0;
        if (check_logits(logits, n, V, seqs, "decode step", step, err) != 0) goto out;
        uint32_t ml = max_live_now(&s->cache);
        if (ml > res->max_live_per_head) res->max_live_per_head = ml;
    }
    res->total_ms = kvh_now_ms() - t_start;
    kvh_latency_stats_compute(res->step_ms, res->n_steps, &res->decode);
    double decode_ms = 0.0;
    size_t decoded = 0;
    for (int i = 0; i < res->n_steps; i++) decode_ms += res->step_ms[i];
    /* Each decode step produced one token per sequence that was live in it. */
    for (int b = 0; b < B; b++) decoded += res->n_out[b] > 0 ? (size_t)(res->n_out[b] - 1) : 0;
    res->decode_tokens_per_s = decode_ms > 0 ? (double)decoded / (decode_ms / 1e3) : 0.0;
    res->kv_bytes_held = s->cache.bytes_held;
    res->kv_bytes_peak = s->cache.bytes_peak;
    res->kv_live_bytes = kvh_kvcache_live_kv_bytes(&s->cache);
    res->live_tokens = kvh_kvcache_live_tokens(&s->cache);
    res->peak_rss = kvh_peak_rss_bytes();
    res->hooks_ms = (double)(s->hook_ns - hooks0) / 1e6;
    res->times.embed = s->backend->times.embed - times0.embed;
    res->times.attn_proj = s->backend->times.attn_proj - times0.attn_proj;
    res->times.attn_core = s->backend->times.attn_core - times0.attn_core;
    res->times.mlp = s->backend->times.mlp - times0.mlp;
    res->times.lm_head = s->backend->times.lm_head - times0.lm_head;
    rc = 0;
out:
    if (samplers)
        for (int b = 0; b < B; b++) kvh_sampler_free(&samplers[b]);
    free(samplers);
    free(logits);
    free(seqs);
    free(ones);
    free(next);
    free(tok_ptrs);
    free(done);
    if (rc != 0) kvh_generate_result_free(res);
    return rc;
}
