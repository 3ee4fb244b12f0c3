/* generate.h — the decode loop: prefill a batch of prompts, then decode new tokens step by step.
 * Owns: running a generation on a session, per-step timing, collecting output ids, streaming the text
 * of sequence 0 as it is produced. Does not own: argument parsing or record writing (cmd_generate.c),
 * the model, the cache or the plugins (session.h). */
#ifndef KVH_GENERATE_H
#define KVH_GENERATE_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "backend/backend.h"
#include "util/metrics.h"
#include "model/sampler.h"
#include "runtime/session.h"
#include "model/tokenizer.h"

typedef struct kvh_generate_request {
    int n_prompts;                   /* B: one cache sequence per prompt */
    const int32_t *const *prompts;   /* [B] token ids */
    const int *prompt_len;           /* [B] >= 1 */
    int max_new;                     /* tokens to generate per sequence (>= 0) */
    kvh_sampler_params sampling;
    bool stop_at_eot;                /* stop a sequence at <|endoftext|> */
    int eot_id;
    FILE *stream;                    /* print sequence 0's text as it is produced, or NULL */
    const kvh_tokenizer *tok;        /* needed for streaming; when it has fewer ids than the model's V
                                        (a padded vocabulary), ids >= its size are never sampled */
} kvh_generate_request;

typedef struct kvh_generate_result {
    int n_seq;
    int32_t **out;         /* [B][max_new] generated ids */
    int *n_out;            /* [B] */
    double prefill_ms;
    double *step_ms;       /* [n_steps] wall time of each decode step (all sequences) */
    int n_steps;
    kvh_latency_stats decode;
    double decode_tokens_per_s; /* generated tokens (all sequences) / decode time */
    size_t kv_bytes_held;  /* at the end */
    size_t kv_bytes_peak;
    size_t kv_live_bytes;  /* K/V data in live slots at the end */
    size_t live_tokens;    /* live slots at the end, all sequences, layers, heads */
    uint32_t max_live_per_head; /* largest live count seen after any step, any layer/head/sequence */
    uint64_t peak_rss;
    double hooks_ms;
    double total_ms;
    kvh_phase_times times;
} kvh_generate_result;

/* Runs the request on the session (which must have at least B sequences, all empty). */
int kvh_generate(kvh_session *s, const kvh_generate_request *req, kvh_generate_result *res, kvh_err *err);
void kvh_generate_result_free(kvh_generate_result *res);

#endif
