/* trace.h — request trace files for `kvhost replay` (JSON Lines, one request a line) and the synthetic
 * trace generator behind `kvhost trace`.
 * Owns: the trace format (docs/trace.md), its strict line-by-line parser (every error names the file, the
 * line and the key), the deterministic synthetic-token rule (prompt_tokens, shared prefixes), the
 * generator's arrival and length distributions, and a trace's summary.
 * Does not own: running requests (engine.c), tokenization (model/tokenizer.c), printing (cli/cmd_trace.c).
 * Why not cJSON: a line may hold a thousand prompt ids and a trace a million lines; the parser walks each
 * line with util/json_scan.h (RFC 8259 strictness, no tree), so memory stays proportional to the ids kept
 * and a seed keeps all 64 bits (a JSON number read as a double would not). */
#ifndef KVH_TRACE_H
#define KVH_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "util/util.h"

struct kvh_tokenizer;

#define KVH_TRACE_MAX_LINE_BYTES (16u << 20) /* one line, newline excluded */
#define KVH_TRACE_MAX_REQUESTS 1000000
#define KVH_TRACE_MAX_LABEL 64 /* bytes of an id or a prefix label */

typedef struct kvh_trace_request {
    char id[KVH_TRACE_MAX_LABEL + 1];     /* "r7", or "line N" when the line gives none; unique in a trace */
    double arrival_s;                     /* seconds since replay start, finite, >= 0 */
    int32_t *prompt;                      /* [n_prompt] token ids, each in 0 .. vocab-1 (owned) */
    int n_prompt;                         /* >= 1; n_prompt + max_tokens <= n_positions */
    int max_tokens;                       /* >= 1 */
    char prefix[KVH_TRACE_MAX_LABEL + 1]; /* shared-prefix label, "" when none */
    int prefix_tokens;                    /* leading tokens that are the prefix's (prompt_tokens form), else 0 */
    float temperature;                    /* >= 0; 0 = greedy (default) */
    int top_k;                            /* >= 0; 0 = off (default) */
    float top_p;                          /* (0, 1]; 1 = off (default) */
    uint64_t seed;                        /* sampling seed (default 1234, as kvhost generate) */
    bool ignore_eos;                      /* default true: the request generates exactly max_tokens tokens */
    int line;                             /* 1-based line of the request in its file */
} kvh_trace_request;

/* A loaded trace: requests sorted by arrival (stable: equal arrivals keep file order). */
typedef struct kvh_trace {
    kvh_trace_request *req;
    int n;
} kvh_trace;

/* Parses the trace file at path (a regular file, or a pipe / FIFO / /dev/stdin read to EOF) into *out.
 * tok tokenizes "prompt" texts (<|endoftext|> in a text is the token 50256, as in generate); when tok is
 * NULL a text prompt is an error naming the line. vocab (>= 2) bounds prompt_ids and the synthetic
 * tokens; n_positions (>= 2) bounds prompt + max_tokens. On failure *out is empty ({NULL, 0}), nothing is
 * leaked, and err reads "PATH:LINE: key 'K': what was wrong (got V)" or "PATH:LINE: ..." for the line as
 * a whole. A trace without any request is an error. */
int kvh_trace_load(kvh_trace *out, const char *path, const struct kvh_tokenizer *tok, int vocab,
                   int n_positions, kvh_err *err);

/* The same over text[0..len) (not NUL-terminated; NUL bytes are refused), messages naming
 * name_for_errors in place of a path. */
int kvh_trace_parse(kvh_trace *out, const char *text, size_t len, const char *name_for_errors,
                    const struct kvh_tokenizer *tok, int vocab, int n_positions, kvh_err *err);

/* Frees the requests and their prompts; leaves *t empty. t may be NULL. */
void kvh_trace_free(kvh_trace *t);

/* The synthetic-token rule (docs/trace.md, "Synthetic prompts"), exposed so tests and tools reproduce it:
 * the first prefix_tokens ids come from the stream of the key "prefix:" + prefix, the rest from the
 * stream of "request:" + id, continuing at index prefix_tokens. A stream is splitmix64 seeded with the
 * FNV-1a 64-bit hash of the key's bytes; draw k gives the id (z_k mod (vocab - 1)), so the last id
 * (GPT-2's <|endoftext|>, 50256) never appears. */
void kvh_trace_synthetic_ids(int32_t *ids, int n, const char *id, const char *prefix, int prefix_tokens,
                             int vocab);

/* What `kvhost trace --check` prints. */
typedef struct kvh_trace_summary {
    int n_requests;
    int64_t prompt_tokens, output_tokens; /* sums over the requests (output: max_tokens) */
    int prompt_min, prompt_max, output_min, output_max;
    double first_arrival_s, last_arrival_s;
    int n_prefix_groups;     /* distinct non-empty prefix labels */
    int n_prefixed;          /* requests that carry a prefix label */
    int n_sampled;           /* requests with temperature > 0 */
} kvh_trace_summary;

/* Returns 0, or -1 when out of memory. */
int kvh_trace_summarize(const kvh_trace *t, kvh_trace_summary *s, kvh_err *err);

/* ---- the generator ---------------------------------------------------------------------------------- */

typedef enum kvh_trace_dist {
    KVH_TRACE_DIST_UNIFORM = 0,   /* integers uniform in [min, max] */
    KVH_TRACE_DIST_LOGNORMAL = 1, /* log-normal with median sqrt(min*max) and sigma = ln(max/min)/4, redrawn
                                   * until it rounds into [min, max] */
} kvh_trace_dist;

typedef struct kvh_trace_gen_options {
    int n_requests;       /* 1 .. KVH_TRACE_MAX_REQUESTS */
    double rate_per_s;    /* Poisson arrivals: exponential gaps with mean 1/rate; 0 = all arrive at 0 */
    int prompt_min, prompt_max; /* prompt length, shared prefix included; 1 <= min <= max */
    int output_min, output_max; /* max_tokens; 1 <= min <= max */
    kvh_trace_dist dist;  /* of both lengths */
    double shared_share;  /* each request independently starts with the common prefix with this probability */
    int shared_tokens;    /* length of the common prefix (label "sys"); needs prompt_min >= shared_tokens */
    uint64_t seed;        /* arrivals, lengths and which requests share; token content follows the ids */
    int n_positions;      /* > 0: refuse prompt_max + output_max > n_positions; 0: no check */
} kvh_trace_gen_options;

/* 100 requests, 1 request/s, prompts 64..512, outputs 16..128, uniform, no sharing, seed 1, 1024 positions. */
kvh_trace_gen_options kvh_trace_gen_default_options(void);

/* Checks the options (err names the option: "prompt_min ..."); writes nothing on failure. */
int kvh_trace_gen_check(const kvh_trace_gen_options *o, int vocab, kvh_err *err);

/* Writes o->n_requests lines to out: {"id": "rI", "arrival": T, "prompt_ids": [...], "max_tokens": N}
 * plus "prefix": "sys" on the requests that share. The same options give the same bytes. The prompt ids
 * equal kvh_trace_synthetic_ids("rI", shared ? "sys" : "", shared ? shared_tokens : 0), so a trace
 * written with prompt_tokens / prefix / prefix_tokens describes the same tokens. Returns -1 on bad options
 * (nothing written) or a write error. */
int kvh_trace_generate(const kvh_trace_gen_options *o, FILE *out, int vocab, kvh_err *err);

#endif
