/* api.h — the OpenAI completions API of `kvhost serve`, without sockets: request JSON parsing and
 * validation, error objects, the completion object, server-sent-event framing, and the text of a
 * request's tokens (whole UTF-8 characters only, stop strings cut out).
 * Owns: what a request may say and what each answer looks like. Does not own: HTTP (server.c), the engine
 * thread and queues (bridge.c), metrics (metrics.c). Everything here is pure and thread-safe: handler
 * threads call it concurrently (the tokenizer is read-only after loading). */
#ifndef KVH_SERVE_API_H
#define KVH_SERVE_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/sampler.h"
#include "model/tokenizer.h"
#include "util/util.h"

#define KVH_SERVE_MAX_STOP 4        /* OpenAI's limit on stop strings */
#define KVH_SERVE_MAX_STOP_BYTES 256 /* per stop string */
#define KVH_SERVE_DEFAULT_MAX_TOKENS 16 /* OpenAI's default */

/* An error answer: HTTP status and the fields of {"error":{"message","type","param","code"}}. */
typedef struct kvh_serve_error {
    int status;       /* 400, 401, 404, 405, 413, 429, 500, 503 */
    const char *type; /* "invalid_request_error", "authentication_error", "rate_limit_error", "server_error" */
    char param[64];   /* the offending field, "" for none (null in JSON) */
    char code[48];    /* a short machine-readable code, "" for none */
    char message[512];
} kvh_serve_error;

/* Fills e and returns -1 (so parsers can `return kvh_serve_fail(...)`). param/code may be NULL. */
int kvh_serve_fail(kvh_serve_error *e, int status, const char *param, const char *code, const char *fmt, ...)
    KVH_PRINTF(5, 6);
/* The error as a malloc'd JSON text (NULL when out of memory). */
char *kvh_serve_error_json(const kvh_serve_error *e);

/* What the server knows when it parses a request. */
typedef struct kvh_serve_limits {
    const kvh_tokenizer *tok;
    int n_vocab, n_positions;
    int eot;               /* <|endoftext|> id: the prompt of an empty text (OpenAI's default prompt) */
    uint64_t default_seed; /* used when the request gives no seed (the server varies it per request) */
} kvh_serve_limits;

/* A validated POST /v1/completions request. */
typedef struct kvh_serve_params {
    int32_t *prompt; /* malloc'd token ids, 1 <= n_prompt, n_prompt + max_tokens <= n_positions */
    int n_prompt;
    int n_truncated; /* prompt tokens dropped from the front ("truncate": true) */
    int max_tokens;
    kvh_sampler_params sampling;
    bool stream, truncate;
    char *stop[KVH_SERVE_MAX_STOP]; /* malloc'd, non-empty */
    int n_stop;
} kvh_serve_params;

/* Parses and validates a request body (len bytes, not necessarily NUL-terminated). 0, or -1 with e filled
 * (status 400 for every problem of the body: malformed JSON, unknown or duplicate field, wrong type or
 * range, unsupported OpenAI option, prompt too long without "truncate"). out is zeroed first and owns its
 * memory only on success. */
int kvh_serve_parse_completion(const char *body, size_t len, const kvh_serve_limits *lim, kvh_serve_params *out,
                               kvh_serve_error *e);
void kvh_serve_params_free(kvh_serve_params *p);

/* ---- text of the generated tokens -------------------------------------------------------------------- */

/* Turns token bytes into text that can be sent: only whole UTF-8 characters (a GPT-2 token may end in the
 * middle of one: its bytes wait for the next token; ill-formed bytes become U+FFFD), and nothing that may
 * be the start of a stop string until the next bytes rule it out. When a stop string appears, the text
 * ends just before it. */
typedef struct kvh_serve_text {
    char *const *stop; /* borrowed */
    int n_stop;
    char *pend;        /* bytes received, not yet sent */
    size_t n_pend, cap_pend;
    char *out;         /* all the text sent so far (NUL-terminated), for the non-streaming answer */
    size_t n_out, cap_out;
    bool stopped;      /* a stop string was found: nothing more is added */
} kvh_serve_text;

void kvh_serve_text_init(kvh_serve_text *t, char *const *stop, int n_stop);
void kvh_serve_text_free(kvh_serve_text *t);
/* Adds n bytes (a token's). *emit_from is set to where the new sendable text starts in t->out (it ends at
 * t->n_out). Returns 1 when a stop string was found (the request is over), 0 otherwise, -1 when out of
 * memory. */
int kvh_serve_text_push(kvh_serve_text *t, const char *bytes, size_t n, size_t *emit_from);
/* The request ended: sends what is left (an unfinished character becomes U+FFFD). Same return. */
int kvh_serve_text_flush(kvh_serve_text *t, size_t *emit_from);

/* ---- answers ----------------------------------------------------------------------------------------- */

/* The non-streaming completion object (malloc'd JSON text, NULL when out of memory). finish_reason is
 * "length" or "stop". */
char *kvh_serve_completion_json(const char *id, long long created, const char *model, const char *text, size_t len,
                                const char *finish_reason, int prompt_tokens, int completion_tokens);
/* One server-sent event with a completion chunk: "data: {json}\n\n" (malloc'd, NUL-terminated; NULL when
 * out of memory). finish_reason NULL while the stream goes on. With usage (prompt_tokens >= 0) the chunk
 * carries a usage object too. */
char *kvh_serve_sse_chunk(const char *id, long long created, const char *model, const char *text, size_t len,
                          const char *finish_reason, int prompt_tokens, int completion_tokens);
/* The last event of a stream. */
#define KVH_SERVE_SSE_DONE "data: [DONE]\n\n"

/* GET /v1/models (malloc'd JSON). */
char *kvh_serve_models_json(const char *model, long long created);

/* Constant-time check of an "Authorization" header against "Bearer KEY": time depends on the header's
 * length only, not on where it differs from the key. */
bool kvh_serve_auth_ok(const char *header, const char *key);

#endif
