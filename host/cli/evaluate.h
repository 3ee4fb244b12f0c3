/* evaluate.h — language-model quality of a session on a token stream: perplexity, and fidelity to the
 * full cache.
 * Owns: teacher-forced NLL (non-overlapping chunks, one all-logits prefill each), streaming NLL (every
 * token decoded one by one through the cache, so eviction shows), KL(P_full || P_policy) and top-1
 * agreement of the next-token distributions against a second, plugin-free session on the same tokens.
 * All log-softmax / KL arithmetic is in double. Prints nothing.
 * Does not own: tokenization, argument parsing or records (cmd_eval.c), the sessions (session.h).
 *
 * Shapes: N tokens, T chunk length (<= ctx), V vocab. A chunk of T tokens predicts T-1 of them (its first
 * token has no context); a trailing chunk of one token predicts nothing and is skipped. */
#ifndef KVH_EVALUATE_H
#define KVH_EVALUATE_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/session.h"
#include "util/util.h"

/* Called after each chunk (may be NULL): tokens processed so far out of total. */
typedef void (*kvh_eval_progress_fn)(void *user, size_t done, size_t total);

typedef struct kvh_eval_options {
    int ctx;                        /* chunk length T, 2..n_positions */
    kvh_eval_progress_fn progress;  /* optional */
    void *progress_user;
} kvh_eval_options;

typedef struct kvh_eval_result {
    size_t n_tokens;        /* N tokens evaluated (input) */
    size_t n_predicted;     /* tokens whose NLL was counted: sum over chunks of T-1 */
    int n_chunks;
    double nll_sum;         /* nats, of the evaluated session (the policy session in streaming mode) */
    double nll_mean;
    double ppl;             /* exp(nll_mean) */
    /* streaming only (zero in teacher mode) */
    double full_nll_mean;   /* the plugin-free reference session on the same tokens */
    double full_ppl;
    double kl_sum, kl_mean; /* KL(P_full || P_policy), nats per predicted token */
    double kl_max;          /* largest single-token KL */
    size_t top1_agree;      /* predicted tokens where both argmaxes agree */
    double top1_agreement;  /* top1_agree / n_predicted, in [0, 1] */
    uint32_t max_live_per_head; /* largest live count of the policy session, any layer/head, after any step */
    double ms;              /* wall time of the whole evaluation */
    double policy_forward_ms; /* time inside the evaluated session's forward calls */
    double full_forward_ms;   /* time inside the reference session's forward calls (streaming) */
} kvh_eval_result;

/* -log softmax(logits)[target], in double. */
double kvh_eval_token_nll(const float *logits, int V, int32_t target);

/* KL(P || Q) in nats where P = softmax(p_logits), Q = softmax(q_logits), in double. */
double kvh_eval_kl(const float *p_logits, const float *q_logits, int V);

/* Teacher-forced: for each chunk of opt->ctx tokens, sequence 0 of s is reset and the chunk is run as one
 * prefill with all logits; every next token inside the chunk is scored. Attention is over the whole chunk
 * (plugins act only after the prefill, so they cannot change these logits), unless the session has a
 * [cache] prefill_chunk: then the prefill runs in pieces with evictions between them, and the scores show
 * them (prefill_chunk = 1 is the streaming evaluation's computation). Tokens must be < V. */
int kvh_eval_teacher(kvh_session *s, const int32_t *ids, size_t n, const kvh_eval_options *opt,
                     kvh_eval_result *res, kvh_err *err);

/* Streaming: for each chunk, sequence 0 of both sessions is reset; token 0 is fed as a one-token prefill,
 * then tokens 1..T-2 one decode step each, the policy session evicting as its plugins say. Every
 * next-token distribution of `policy` is scored (NLL) and compared with `full`'s (KL, top-1). `full`
 * should have no plugins; when policy has none either, KL is 0 and agreement 100% (the two runs are the
 * same computation). */
int kvh_eval_stream(kvh_session *policy, kvh_session *full, const int32_t *ids, size_t n,
                    const kvh_eval_options *opt, kvh_eval_result *res, kvh_err *err);

#endif
