/* fuzz_tokenizer.c — fuzz target for the GPT-2 byte-level BPE tokenizer (host/model/tokenizer.c).
 * Owns: encoding arbitrary bytes and checking that decoding gives back exactly the same bytes (with
 * and without the <|endoftext|> special), and that every id is in range. The embedded GPT-2 tokenizer
 * is loaded once (static) and kept for the process. Does not own the tokenizer. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "fuzz_tokenizer: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

static kvh_tokenizer *g_tok; /* loaded once, never freed (the fuzzer process owns it) */

static void roundtrip(const char *text, size_t size, int allow_special) {
    int32_t *ids = NULL;
    size_t n_ids = 0;
    kvh_err err;
    CHECK(kvh_tokenizer_encode(g_tok, text, size, allow_special, &ids, &n_ids, &err) == 0);
    CHECK(n_ids <= size); /* every token covers at least one byte */
    int V = kvh_tokenizer_vocab_size(g_tok);
    for (size_t i = 0; i < n_ids; i++) CHECK(ids[i] >= 0 && ids[i] < V);
    char *back = NULL;
    size_t back_len = 0;
    CHECK(kvh_tokenizer_decode(g_tok, ids, n_ids, &back, &back_len, &err) == 0);
    if (back_len != size || (size && memcmp(back, text, size) != 0)) {
        fprintf(stderr, "fuzz_tokenizer: round trip differs (allow_special %d): %zu bytes in, %zu out\n",
                allow_special, size, back_len);
        abort();
    }
    CHECK(back[back_len] == '\0');
    free(back);
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_tok) {
        kvh_err err;
        if (kvh_tokenizer_load_embedded(&g_tok, &err) != 0) {
            fprintf(stderr, "fuzz_tokenizer: cannot load the embedded tokenizer: %s\n", err.msg);
            abort();
        }
    }
    if (size > 64 * 1024) return 0; /* BPE cost grows with word length; bound each input */
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    if (size) memcpy(text, data, size);
    roundtrip(text, size, 0);
    roundtrip(text, size, 1);
    free(text);
    return 0;
}
