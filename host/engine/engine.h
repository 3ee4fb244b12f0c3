/* engine.h — many requests on one session: continuous batching under a global token budget.
 * Owns: the request queue (waiting in arrival order, running in sequences of the session's cache),
 * admission at every step while the budgets allow, chunked prefill inside a step, sampling each
 * request with its own settings, retiring finished requests at once, preemption when a step would break
 * the budget (the newest running request gives its memory back and is recomputed later), prefix sharing
 * through the prefix cache, and the statistics replay and serve report.
 * Does not own: the forward pass, eviction or plugins (the session), timing of arrivals (the caller
 * submits when a request arrives), or output (callbacks).
 *
 * Invariants, checked after every step when `check_invariants` is set (tests) and cheap enough to keep on:
 *   tokens_held <= max_tokens (when set) and kv bytes held <= the session's byte limit (when set), where a
 *   sequence's tokens are the most any of its heads holds, minus the blocks it shares, and each shared
 *   block's tokens count once. See docs/engine.md. */
#ifndef KVH_ENGINE_H
#define KVH_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/prefix_cache.h"
#include "model/sampler.h"
#include "runtime/session.h"
#include "util/util.h"

typedef struct kvh_engine_options {
    uint32_t max_tokens;   /* global token budget over all sequences; 0 = none */
    uint32_t max_seqs;     /* sequences running at once (the session's n_seq) */
    uint32_t step_tokens;  /* prompt tokens prefilled per step, all requests together (>= 1) */
    bool prefix_sharing;   /* reuse cached prompt blocks where exact (see kvh_engine_sharing_reason) */
    bool check_invariants; /* verify the budget invariants after every step (fails the step if broken) */
} kvh_engine_options;

typedef enum { KVH_REQ_WAITING, KVH_REQ_RUNNING, KVH_REQ_DONE } kvh_request_state;
typedef enum { KVH_FINISH_LENGTH, KVH_FINISH_EOS, KVH_FINISH_CANCELLED } kvh_finish_reason;

typedef struct kvh_engine_request {
    const int32_t *prompt; /* copied at submit */
    int n_prompt;          /* >= 1 */
    int max_tokens;        /* >= 1; prompt + max_tokens <= n_positions */
    kvh_sampler_params sampling;
    bool ignore_eos;       /* false: stop at the end-of-text token */
    void *user;            /* handed back in callbacks */
} kvh_engine_request;

/* Called from kvh_engine_step: a new token of request `id` (index in its output, 0-based), and the end
 * of a request. t_ns: kvh_now_ns() when the token was sampled. */
typedef struct kvh_engine_callbacks {
    void (*on_token)(void *ctx, uint64_t id, void *user, int index, int32_t token, uint64_t t_ns);
    void (*on_finish)(void *ctx, uint64_t id, void *user, kvh_finish_reason why, uint64_t t_ns);
    /* Optional: the logits [V] a token is about to be sampled from (tests compare runs with them). */
    void (*on_logits)(void *ctx, uint64_t id, void *user, int index, const float *logits, int V);
    void *ctx;
} kvh_engine_callbacks;

typedef struct kvh_engine_stats {
    uint64_t steps, forward_ns;
    uint64_t admitted, finished, cancelled, preemptions;
    uint64_t prompt_tokens_computed; /* prefill tokens run through the model (recomputation included) */
    uint64_t prompt_tokens_shared;   /* prompt tokens taken from the prefix cache instead */
    uint64_t generated_tokens;
    uint32_t running, waiting, max_running;
    size_t tokens_held, tokens_peak;  /* global-budget tokens (see above) */
    size_t kv_bytes_held, kv_bytes_peak;
    size_t kv_bytes_active_peak;      /* most KV bytes held after a step less the prefix cache's idle entries
                                       * (what the running requests hold; idle entries are reclaimed on demand) */
    uint64_t prefix_blocks_looked_up, prefix_blocks_hit, prefix_verify_rejects, prefix_entries_reclaimed;
    uint64_t cow_copies;
} kvh_engine_stats;

typedef struct kvh_engine kvh_engine;

/* Creates the engine and its session (n_seq = max_seqs). opt: the session options (backend, threads,
 * kv_mem_limit, plugin path, block_slots default); cfg: the run configuration (plugins, [cache]); may be
 * NULL. */
int kvh_engine_create(kvh_engine **out, const kvh_model *model, const kvh_run_config *cfg,
                      const kvh_session_options *opt, const kvh_engine_options *eo, kvh_err *err);
void kvh_engine_free(kvh_engine *e);
void kvh_engine_set_callbacks(kvh_engine *e, const kvh_engine_callbacks *cb);

/* Queues a request; *id_out is its id (1, 2, ...). Fails (nothing queued) on bad sizes or when the request
 * could never fit the budgets on its own. */
int kvh_engine_submit(kvh_engine *e, const kvh_engine_request *r, uint64_t *id_out, kvh_err *err);
/* Ends a waiting or running request now (its memory is freed at once); 0, or -1 if unknown / done. */
int kvh_engine_cancel(kvh_engine *e, uint64_t id);

/* One step: admit, run one forward over every running request (a decode token each, prompt chunks up to
 * step_tokens), sample, retire. Returns 0 (also when there was nothing to do), -1 on error. */
int kvh_engine_step(kvh_engine *e, kvh_err *err);
bool kvh_engine_idle(const kvh_engine *e); /* nothing waiting or running */

void kvh_engine_get_stats(const kvh_engine *e, kvh_engine_stats *out);
kvh_session *kvh_engine_session(kvh_engine *e);
/* Why prefix sharing is off for this run ("" when on). */
const char *kvh_engine_sharing_reason(const kvh_engine *e);
/* The prefix cache (NULL when sharing is off); tests use it to force hash collisions. */
kvh_prefix_cache *kvh_engine_prefix_cache(kvh_engine *e);

/* Checks the invariants now: 0, or -1 with err saying which one is broken and by how much. */
int kvh_engine_check_invariants(const kvh_engine *e, kvh_err *err);

#endif
