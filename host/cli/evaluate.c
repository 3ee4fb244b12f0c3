/* evaluate.c — teacher-forced and streaming perplexity, KL and top-1 agreement (see evaluate.h).
 * Owns: the chunking, the scoring arithmetic (double), the timing of the sessions' forward calls.
 * Does not own: the sessions, tokenization, printing or records. */
#include "cli/evaluate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* log(sum(exp(x))) of V floats, in double. */
static double logsumexp(const float *x, int V) {
    double mx = x[0];
    for (int i = 1; i < V; i++)
        if (x[i] > mx) mx = x[i];
    double s = 0.0;
    for (int i = 0; i < V; i++) s += exp((double)x[i] - mx);
    return mx + log(s);
}

/* First index of the largest value (ties: lowest index), so both runs break ties the same way. */
static int argmax(const float *x, int V) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

double kvh_eval_token_nll(const float *logits, int V, int32_t target) {
    return logsumexp(logits, V) - (double)logits[target];
}

/* KL(softmax(p) || softmax(q)) given both log-normalizers. */
static double kl_lse(const float *p_logits, double lse_p, const float *q_logits, double lse_q, int V) {
    double kl = 0.0;
    for (int i = 0; i < V; i++) {
        double lp = (double)p_logits[i] - lse_p;
        double lq = (double)q_logits[i] - lse_q;
        /* identical logits give lp == lq exactly, so every term is exactly 0 */
        kl += exp(lp) * (lp - lq);
    }
    /* rounding can leave a tiny negative value for nearly equal distributions; KL is >= 0 */
    return kl > 0.0 ? kl : 0.0;
}

double kvh_eval_kl(const float *p_logits, const float *q_logits, int V) {
    return kl_lse(p_logits, logsumexp(p_logits, V), q_logits, logsumexp(q_logits, V), V);
}

/* The NLL of a chunk came out non-finite: name the first non-finite logit (row = position in the chunk).
 * Checking the sum instead of every logit keeps the normal path free of an extra pass. */
static int nonfinite_logits(const float *logits, int rows, int V, size_t first_token, const char *which,
                            kvh_err *err) {
    size_t n = (size_t)rows * (size_t)V;
    size_t at = kvh_first_nonfinite(logits, n);
    if (at == n)
        return kvh_fail(err, "eval: %s, token %zu: the log-likelihood is not finite although every logit is", which,
                        first_token);
    return kvh_fail(err, "eval: %s, token %zu: the logit of token id %zu is %s (non-finite). The weights were checked "
                    "finite at load, so an activation overflowed or a plugin's store returned non-finite values",
                    which, first_token + at / (size_t)V, at % (size_t)V, kvh_nonfinite_name(logits[at]));
}

static int check_inputs(const kvh_session *s, const int32_t *ids, size_t n, const kvh_eval_options *opt,
                        kvh_err *err) {
    const kvh_model_config *c = &s->model->cfg;
    if (!opt || opt->ctx < 2 || opt->ctx > c->n_positions)
        return kvh_fail(err, "eval: ctx %d must be in 2..%d (the model's n_positions)", opt ? opt->ctx : 0,
                        c->n_positions);
    if (n < 2) return kvh_fail(err, "eval: %zu tokens; at least 2 are needed to predict one", n);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->n_vocab)
            return kvh_fail(err, "eval: token %zu has id %d, outside the model's vocabulary 0..%d", i, (int)ids[i],
                            c->n_vocab - 1);
    return 0;
}

static void finish(kvh_eval_result *r, double t0) {
    r->nll_mean = r->n_predicted ? r->nll_sum / (double)r->n_predicted : 0.0;
    r->ppl = exp(r->nll_mean);
    r->ms = kvh_now_ms() - t0;
}

static uint32_t max_live_now(const kvh_kvcache *c) {
    uint32_t mx = 0;
    for (int l = 0; l < c->n_layer; l++) {
        uint32_t m = kvh_kvcache_max_live(c, l);
        if (m > mx) mx = m;
    }
    return mx;
}

int kvh_eval_teacher(kvh_session *s, const int32_t *ids, size_t n, const kvh_eval_options *opt,
                     kvh_eval_result *res, kvh_err *err) {
    memset(res, 0, sizeof *res);
    if (check_inputs(s, ids, n, opt, err) != 0) return -1;
    const int V = s->model->cfg.n_vocab;
    const int T = opt->ctx;
    size_t bytes;
    if (kvh_size_mul((size_t)T, (size_t)V * sizeof(float), &bytes) != 0)
        return kvh_fail(err, "eval: logits of %d x %d overflow", T, V);
    float *logits = malloc(bytes); /* [T, V] */
    if (!logits) return kvh_fail(err, "eval: out of memory for %d x %d logits", T, V);
    double t0 = kvh_now_ms();
    res->n_tokens = n;
    int rc = -1;
    for (size_t start = 0; start + 1 < n; start += (size_t)T) {
        int len = (int)(n - start < (size_t)T ? n - start : (size_t)T);
        if (kvh_session_reset_seq(s, 0, err) != 0) goto out;
        int seq = 0;
        const int32_t *tp = ids + start;
        kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &len, .all_logits = true};
        double tf = kvh_now_ms();
        if (kvh_session_forward(s, &b, logits, err) != 0) {
            kvh_fail_prefix(err, "eval: chunk at token %zu", start);
            goto out;
        }
        res->policy_forward_ms += kvh_now_ms() - tf;
        double chunk_sum = 0.0;
        int nt = s->backend->threads > 0 ? s->backend->threads : 1;
        /* row t predicts token t+1 (rows scored on the session's threads) */
#pragma omp parallel for num_threads(nt) reduction(+ : chunk_sum) schedule(static) if (len > 16)
        for (int t = 0; t < len - 1; t++)
            chunk_sum += kvh_eval_token_nll(logits + (size_t)t * V, V, tp[t + 1]);
        if (!isfinite(chunk_sum)) {
            nonfinite_logits(logits, len - 1, V, start, "chunk", err);
            goto out;
        }
        res->nll_sum += chunk_sum;
        res->n_predicted += (size_t)(len - 1);
        res->n_chunks++;
        uint32_t ml = max_live_now(&s->cache);
        if (ml > res->max_live_per_head) res->max_live_per_head = ml;
        if (opt->progress) opt->progress(opt->progress_user, start + (size_t)len, n);
    }
    finish(res, t0);
    rc = 0;
out:
    free(logits);
    return rc;
}

int kvh_eval_stream(kvh_session *policy, kvh_session *full, const int32_t *ids, size_t n,
                    const kvh_eval_options *opt, kvh_eval_result *res, kvh_err *err) {
    memset(res, 0, sizeof *res);
    if (!policy || !full) return kvh_fail(err, "eval: streaming needs a policy session and a full-cache session");
    if (check_inputs(policy, ids, n, opt, err) != 0) return -1;
    if (policy->model->cfg.n_vocab != full->model->cfg.n_vocab)
        return kvh_fail(err, "eval: the two sessions' models have different vocabularies (%d, %d)",
                        policy->model->cfg.n_vocab, full->model->cfg.n_vocab);
    if (opt->ctx > full->model->cfg.n_positions)
        return kvh_fail(err, "eval: ctx %d exceeds the reference model's n_positions %d", opt->ctx,
                        full->model->cfg.n_positions);
    const int V = policy->model->cfg.n_vocab;
    const int T = opt->ctx;
    float *lp = malloc((size_t)V * sizeof(float)); /* [V] policy logits */
    float *lf = malloc((size_t)V * sizeof(float)); /* [V] full-cache logits */
    int rc = -1;
    if (!lp || !lf) {
        kvh_fail(err, "eval: out of memory");
        goto out;
    }
    double t0 = kvh_now_ms();
    double full_nll_sum = 0.0;
    res->n_tokens = n;
    for (size_t start = 0; start + 1 < n; start += (size_t)T) {
        int len = (int)(n - start < (size_t)T ? n - start : (size_t)T);
        if (kvh_session_reset_seq(policy, 0, err) != 0 || kvh_session_reset_seq(full, 0, err) != 0) goto out;
        const int32_t *tp = ids + start;
        int seq = 0, one = 1;
        /* feed token t, score the prediction of token t+1 */
        for (int t = 0; t < len - 1; t++) {
            const int32_t *cur = tp + t;
            kvh_batch b = {.n = 1, .seq = &seq, .tokens = &cur, .n_tokens = &one, .all_logits = false};
            double ta = kvh_now_ms();
            if (kvh_session_forward(policy, &b, lp, err) != 0) {
                kvh_fail_prefix(err, "eval: policy session, token %zu", start + (size_t)t);
                goto out;
            }
            double tb = kvh_now_ms();
            if (kvh_session_forward(full, &b, lf, err) != 0) {
                kvh_fail_prefix(err, "eval: full-cache session, token %zu", start + (size_t)t);
                goto out;
            }
            double tc = kvh_now_ms();
            res->policy_forward_ms += tb - ta;
            res->full_forward_ms += tc - tb;
            int32_t target = tp[t + 1];
            double lse_p = logsumexp(lp, V), lse_f = logsumexp(lf, V);
            if (!isfinite(lse_p - (double)lp[target])) {
                nonfinite_logits(lp, 1, V, start + (size_t)t, "policy session", err);
                goto out;
            }
            if (!isfinite(lse_f - (double)lf[target])) {
                nonfinite_logits(lf, 1, V, start + (size_t)t, "full-cache session", err);
                goto out;
            }
            res->nll_sum += lse_p - (double)lp[target];
            full_nll_sum += lse_f - (double)lf[target];
            double kl = kl_lse(lf, lse_f, lp, lse_p, V);
            res->kl_sum += kl;
            if (kl > res->kl_max) res->kl_max = kl;
            if (argmax(lp, V) == argmax(lf, V)) res->top1_agree++;
            uint32_t ml = max_live_now(&policy->cache);
            if (ml > res->max_live_per_head) res->max_live_per_head = ml;
        }
        res->n_predicted += (size_t)(len - 1);
        res->n_chunks++;
        if (opt->progress) opt->progress(opt->progress_user, start + (size_t)len, n);
    }
    finish(res, t0);
    if (res->n_predicted) {
        res->full_nll_mean = full_nll_sum / (double)res->n_predicted;
        res->kl_mean = res->kl_sum / (double)res->n_predicted;
        res->top1_agreement = (double)res->top1_agree / (double)res->n_predicted;
    }
    res->full_ppl = exp(res->full_nll_mean);
    rc = 0;
out:
    free(lp);
    free(lf);
    return rc;
}
