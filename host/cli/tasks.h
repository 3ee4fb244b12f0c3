/* tasks.h — retrieval tasks for `kvhost eval --task`: passkey, repeated-span copy, key-value lookup.
 * Owns: generating the samples deterministically from a seed (token ids, the prompt a prefill-mode run
 * feeds at once, the scored answer spans), running one sample through a policy session and a plugin-free
 * reference session, and scoring (exact match per answer, top-1 per token, NLL of the scored tokens,
 * KL and top-1 agreement against the full cache).
 * Does not own: reading files, argument parsing, records (cmd_eval.c), the sessions (session.h).
 *
 * The task texts (docs/fidelity.md) are the ones tools/fidelity/train.py trains gpt2-tiny-copy on:
 *   passkey   "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
 *             I will quiz you about the important information there." + filler with the needle
 *             " The pass key is K. Remember it. K is the pass key." at depth d + " What is the pass key?
 *             The pass key is" -> " K" (K: 5 digits). Exact match of the answer's tokens.
 *   copy      filler, a passage P of `span` tokens taken from the filler text, filler, P again (the first
 *             copy at depth d of the filler); scored: the second copy's tokens after its first (top-1
 *             accuracy per token, and their NLL: the perplexity slice that needs distant context).
 *   kvlookup  "Here is a list of keys and their values. Remember them." + N lines " The value of key K is
 *             V." (distinct 4-digit keys, 4-digit values) + Q queries " The value of key K is" -> " V."
 *             answered in turn (earlier queries, with their answers, are the shots of later ones).
 *             Exact match of each " V".
 *
 * Token positions: target t is ids[t], predicted from ids[0..t-1]. A span [begin, end) lists targets. */
#ifndef KVH_TASKS_H
#define KVH_TASKS_H

#include <stddef.h>
#include <stdint.h>

#include "model/tokenizer.h"
#include "runtime/session.h"
#include "util/util.h"

enum { KVH_TASK_PASSKEY = 0, KVH_TASK_COPY = 1, KVH_TASK_KVLOOKUP = 2 };
#define KVH_TASK_MAX_SPANS 64
#define KVH_TASK_MAX_CELLS 16

typedef struct kvh_task_span {
    int begin, end; /* targets ids[begin..end-1] */
} kvh_task_span;

typedef struct kvh_task_sample {
    int32_t *ids;    /* [n] */
    int n;
    int prompt_len;  /* prefill mode: ids[0..prompt_len-1] are one prefill; every target is >= prompt_len */
    int n_spans;
    kvh_task_span spans[KVH_TASK_MAX_SPANS];
    int exact_spans; /* 1: each span is one answer scored by exact match; 0: tokens scored one by one */
    int length;      /* the cell: context length (passkey, copy) or number of pairs (kvlookup) */
    int depth_pct;   /* the cell: depth in percent (passkey, copy), -1 for kvlookup */
} kvh_task_sample;

typedef struct kvh_task_options {
    int kind;             /* KVH_TASK_* */
    uint64_t seed;
    int samples;          /* per cell */
    int lengths[KVH_TASK_MAX_CELLS]; /* passkey/copy: total tokens; kvlookup: number of pairs */
    int n_lengths;
    int depths[KVH_TASK_MAX_CELLS];  /* percent of the filler before the needle / first copy */
    int n_depths;
    int span;             /* copy: passage length */
    int queries;          /* kvlookup: queries per sample */
    int n_positions;      /* the model's limit: every sample must fit */
} kvh_task_options;

typedef struct kvh_task_set {
    kvh_task_sample *s;
    int n;
} kvh_task_set;

/* Defaults per kind: passkey lengths 256/512/768/1024, depths 0/25/50/75/100, 2 samples per cell;
 * copy lengths 256/512/1024, span 64, the same depths, 2 samples; kvlookup 8/16/32/64 pairs, 4 queries,
 * 4 samples. Lengths above n_positions are dropped. */
kvh_task_options kvh_task_default_options(int kind, int n_positions);
/* "passkey" / "copy" / "kvlookup" -> KVH_TASK_*, or -1. */
int kvh_task_kind_parse(const char *name);
const char *kvh_task_kind_name(int kind);

/* Generates every sample: for each cell (length x depth, or pairs), `samples` samples, each from its own
 * generator state derived from (seed, cell, index), so a sample does not depend on the others. Filler
 * passages are drawn from filler[0..n_filler-1] (ids, e.g. a tokenized book) at offsets of the
 * generator; the filler must hold at least the longest sample. Deterministic: the same options,
 * tokenizer and filler give the same ids. */
int kvh_task_generate(const kvh_task_options *o, const kvh_tokenizer *tok, const int32_t *filler, size_t n_filler,
                      kvh_task_set *out, kvh_err *err);
void kvh_task_set_free(kvh_task_set *set);

/* Per-run totals. "answers" are exact-match units: spans when exact_spans, else single tokens. */
typedef struct kvh_task_score {
    size_t answers, correct;           /* policy session */
    size_t full_correct;               /* reference (full cache) session */
    size_t tokens;                     /* scored target tokens */
    size_t top1_agree;                 /* scored tokens where both sessions' argmaxes agree */
    double nll_sum, full_nll_sum;      /* over scored tokens, nats */
    double kl_sum, kl_max;             /* KL(P_full || P_policy) over scored tokens */
    /* per cell (index into the options' cells, in generation order) */
    int n_cells;
    int cell_length[KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS];
    int cell_depth[KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS];
    size_t cell_answers[KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS];
    size_t cell_correct[KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS];
    size_t cell_full_correct[KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS];
    uint32_t max_live_per_head;
    double policy_forward_ms, full_forward_ms;
} kvh_task_score;

/* Scores one sample from the argmax and NLL of every target position (pred[t], nll[t] for t >= 1 are
 * the prediction of ids[t]; entries outside the spans are ignored), adding to *sc (the policy side only:
 * answers, correct, tokens, nll_sum, and the cell's counts). Exposed for the tests' hand-computed cases. */
void kvh_task_score_add(kvh_task_score *sc, const kvh_task_sample *s, const int32_t *pred, const double *nll);

/* Runs one sample: sequence 0 of both sessions is reset; prefill mode (stream == 0) feeds
 * ids[0..prompt_len-1] as one prefill and the rest one decode step each; stream mode feeds every token
 * as one step (token 0 a one-token prefill). The scored targets' distributions of `policy` and `full`
 * are scored into *sc (full may be NULL: no reference numbers). */
int kvh_task_run_sample(kvh_session *policy, kvh_session *full, const kvh_task_sample *s, int stream,
                        kvh_task_score *sc, kvh_err *err);

#endif
