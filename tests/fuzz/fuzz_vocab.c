/* fuzz_vocab.c — fuzz target for the tokenizer files' loaders (vocab.json and merges.txt, host/model/tokenizer.c
 * with host/util/json_scan.c). The input is split at its first NUL byte: vocab.json before, merges.txt after.
 * Invariants when the pair loads: every byte has a token, so encode then decode gives back a fixed text
 * byte for byte (with and without <|endoftext|> as a special), and every id is below the vocabulary size.
 * When it does not load, the message is non-empty. Does not own the tokenizer. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/tokenizer.h"

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "fuzz_vocab: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

static const char SAMPLE[] = "Hello, world! <|endoftext|> 'll \xff\xfe caf\xc3\xa9 \xe4\xb8\xad  \t\n12345";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    const char *nul = memchr(text, '\0', size);
    size_t vlen = nul ? (size_t)(nul - text) : size;
    const char *merges = nul ? nul + 1 : "";
    size_t mlen = nul ? size - vlen - 1 : 0;
    kvh_tokenizer *tok = NULL;
    kvh_err err = {{0}};
    if (kvh_tokenizer_load_mem(&tok, text, vlen, merges, mlen, "fuzz", &err) != 0) {
        CHECK(tok == NULL);
        CHECK(err.msg[0] != '\0');
        return 0;
    }
    int V = kvh_tokenizer_vocab_size(tok);
    CHECK(V >= 256);
    for (int special = 0; special < 2; special++) {
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK(kvh_tokenizer_encode(tok, SAMPLE, sizeof SAMPLE - 1, special, &ids, &n, &err) == 0);
        for (size_t i = 0; i < n; i++) CHECK(ids[i] >= 0 && ids[i] < V);
        char *back = NULL;
        size_t blen = 0;
        CHECK(kvh_tokenizer_decode(tok, ids, n, &back, &blen, &err) == 0);
        CHECK(blen == sizeof SAMPLE - 1 && memcmp(back, SAMPLE, blen) == 0);
        free(back);
        free(ids);
    }
    kvh_tokenizer_free(tok);
    return 0;
}
