/* fuzz_trace.c — fuzz target for the request trace parser (host/engine/trace.c, kvh_trace_parse).
 * Owns: feeding arbitrary bytes (not NUL-terminated) to the parser with the embedded GPT-2 tokenizer, the
 * full vocabulary and a small context (64 positions), and checking what an accepted trace promises:
 * at least one request, sorted by arrival, every prompt 1..64 ids in range with prompt + max_tokens <= 64,
 * sampling fields in range, unique ids; a refused one leaves the trace empty with a message. The
 * summary is computed on every accepted trace. The tokenizer is loaded once (static) and kept for the
 * process. Does not own the parser. Built with libFuzzer or with replay_main.c (tests/fuzz/CMakeLists.txt). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/trace.h"
#include "model/tokenizer.h"

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz_trace: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

#define N_POS 64

static kvh_tokenizer *g_tok; /* loaded once, never freed (the fuzzer process owns it) */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_tok) {
        kvh_err err;
        if (kvh_tokenizer_load_embedded(&g_tok, &err) != 0) {
            fprintf(stderr, "fuzz_trace: cannot load the embedded tokenizer: %s\n", err.msg);
            abort();
        }
    }
    int vocab = kvh_tokenizer_vocab_size(g_tok);
    /* Not NUL-terminated on purpose: the parser gets (text, len) and must not read past len. */
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    if (size) memcpy(text, data, size);
    kvh_trace t = {NULL, 0};
    kvh_err err;
    err.msg[0] = '\0';
    if (kvh_trace_parse(&t, text, size, "fuzz.jsonl", g_tok, vocab, N_POS, &err) != 0) {
        CHECK(err.msg[0] != '\0');
        CHECK(t.req == NULL && t.n == 0);
    } else {
        CHECK(t.n >= 1 && t.n <= KVH_TRACE_MAX_REQUESTS && t.req != NULL);
        for (int i = 0; i < t.n; i++) {
            const kvh_trace_request *r = &t.req[i];
            CHECK(r->line >= 1);
            CHECK(isfinite(r->arrival_s) && r->arrival_s >= 0);
            if (i > 0) CHECK(t.req[i - 1].arrival_s <= r->arrival_s);
            if (i > 0 && t.req[i - 1].arrival_s == r->arrival_s) CHECK(t.req[i - 1].line < r->line);
            CHECK(r->n_prompt >= 1 && r->max_tokens >= 1 && r->n_prompt + r->max_tokens <= N_POS);
            for (int k = 0; k < r->n_prompt; k++) CHECK(r->prompt[k] >= 0 && r->prompt[k] < vocab);
            CHECK(r->temperature >= 0 && r->top_k >= 0 && r->top_p > 0 && r->top_p <= 1);
            size_t il = strlen(r->id), pl = strlen(r->prefix);
            CHECK(il >= 1 && il <= KVH_TRACE_MAX_LABEL && pl <= KVH_TRACE_MAX_LABEL);
            CHECK(r->prefix_tokens >= 0 && r->prefix_tokens <= r->n_prompt);
            if (r->prefix_tokens > 0) CHECK(pl > 0);
            for (int q = 0; q < i && t.n <= 64; q++) CHECK(strcmp(t.req[q].id, r->id) != 0);
        }
        kvh_trace_summary s;
        CHECK(kvh_trace_summarize(&t, &s, &err) == 0);
        CHECK(s.n_requests == t.n && s.prompt_min >= 1 && s.prompt_max <= N_POS);
        CHECK(s.n_prefix_groups <= s.n_prefixed && s.n_prefixed <= t.n);
        kvh_trace_free(&t);
    }
    free(text);
    return 0;
}
