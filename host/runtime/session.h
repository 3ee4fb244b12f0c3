/* session.h — one inference session: model + backend + per-layer KV cache + plugin router.
 * Owns: running forward calls for a batch of sequences and, after each, asking the router to enforce
 * the layers' budgets (prefill: after_prefill; decode: enforce per layer); the --no-cache baseline that
 * recomputes each sequence's whole prefix every step; hook timing.
 * Does not own: tokenization, sampling, or how results are reported (commands do that).
 * The session never knows which plugin is loaded; the backend never sees the router. */
#ifndef KVH_SESSION_H
#define KVH_SESSION_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "model/model.h"
#include "runtime/router.h"
#include "util/util.h"

typedef struct kvh_session_options {
    const char *backend;  /* "cpu" (default), "cuda", "auto" */
    int threads;          /* >= 1 */
    int n_seq;            /* sequences the cache holds */
    bool no_cache;        /* recompute the whole prefix each step (baseline) */
    size_t kv_mem_limit;  /* 0 = none: KV growth beyond it fails (emulates a smaller memory) */
    const char *plugin_path; /* extra plugin directories (':'-separated), may be NULL */
    const char *calibration; /* .kvcal statistics for weight formats that need them ([model] calibration), or NULL */
    uint32_t block_slots; /* KV block size when the run file does not set [cache] block_size (0: contiguous) */
} kvh_session_options;

typedef struct kvh_session {
    const kvh_model *model; /* borrowed */
    kvh_backend *backend;
    kvh_kvcache cache;
    kvh_router *router;     /* NULL when no plugin is configured */
    struct kvh_weight_set *weights; /* linear weights held by weight-format plugins; NULL: all fp32 */
    struct kvh_calibration *calibration; /* statistics of opt.calibration, handed to the formats at packing */
    kvh_session_options opt;
    uint64_t hook_ns;       /* time spent in router (plugin hooks + compaction) */
    uint32_t prefill_chunk; /* [cache] prefill_chunk: longer entries run in pieces of this many tokens; 0 = off */
    /* --no-cache: each sequence's token history */
    int32_t **history;      /* [n_seq][n_positions] */
    int *history_len;       /* [n_seq] */
} kvh_session;

kvh_session_options kvh_session_default_options(void);

/* cfg may be NULL (no plugins). Plugins with no_cache is an error. */
int kvh_session_create(kvh_session **out, const kvh_model *model, const kvh_run_config *cfg,
                       const kvh_session_options *opt, kvh_err *err);
void kvh_session_free(kvh_session *s);

/* Runs one batch (see kvh_batch) and then enforces budgets. An entry with more than one token, or the
 * first tokens of a sequence, counts as prefill. With a prefill_chunk, an entry longer than it is fed in
 * pieces of at most prefill_chunk tokens, budgets enforced after each piece, so a layer never holds more
 * than budget + slack + prefill_chunk tokens per head; logits are those of the unsplit call (the last
 * token of each entry, or every token with all_logits). */
int kvh_session_forward(kvh_session *s, const kvh_batch *batch, float *logits, kvh_err *err);

/* Starts sequence seq afresh (cache emptied, plugins reset). */
int kvh_session_reset_seq(kvh_session *s, int seq, kvh_err *err);

/* Position of the next token of sequence seq. */
int kvh_session_next_pos(const kvh_session *s, int seq);

#endif
