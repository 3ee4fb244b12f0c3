/* tokenizer.h — GPT-2 byte-level BPE, exact to OpenAI's encoder.py.
 * Owns: loading vocab.json + merges.txt (from files or the copy embedded in the binary), the GPT-2
 * pre-tokenizer split, byte<->unicode mapping, BPE merges, encode and decode, <|endoftext|>.
 * Does not own: model weights or sampling. */
#ifndef KVH_TOKENIZER_H
#define KVH_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util/util.h"

typedef struct kvh_tokenizer kvh_tokenizer;

/* Loads from a vocab.json and merges.txt on disk. */
int kvh_tokenizer_load(kvh_tokenizer **out, const char *vocab_json_path, const char *merges_path,
                       kvh_err *err);
/* Loads the GPT-2 tokenizer files embedded in the binary (so random: models need no download). */
int kvh_tokenizer_load_embedded(kvh_tokenizer **out, kvh_err *err);
/* Loads from in-memory texts (path_hint used in messages). */
int kvh_tokenizer_load_mem(kvh_tokenizer **out, const char *vocab_json, size_t vocab_len,
                           const char *merges, size_t merges_len, const char *path_hint, kvh_err *err);
void kvh_tokenizer_free(kvh_tokenizer *tok);

int kvh_tokenizer_vocab_size(const kvh_tokenizer *tok);
/* Id of <|endoftext|> (50256 for GPT-2), -1 if the vocabulary has none. */
int kvh_tokenizer_eot(const kvh_tokenizer *tok);

/* Encodes len bytes of text (any bytes; invalid UTF-8 is encoded byte-wise as GPT-2 does) into a
 * malloc'd id array. The literal text "<|endoftext|>" becomes the single special id when
 * allow_special is non-zero, else it is encoded as ordinary text. */
int kvh_tokenizer_encode(const kvh_tokenizer *tok, const char *text, size_t len, int allow_special,
                         int32_t **ids, size_t *n_ids, kvh_err *err);

/* Appends the bytes of one token to out (cap bytes). Returns the number of bytes the token has (may be
 * more than cap: then nothing is written), or -1 for an id out of range. */
int kvh_tokenizer_token_bytes(const kvh_tokenizer *tok, int32_t id, char *out, size_t cap);
/* Decodes ids into a malloc'd NUL-terminated byte string. Fails naming the first id out of range. */
int kvh_tokenizer_decode(const kvh_tokenizer *tok, const int32_t *ids, size_t n_ids, char **text,
                         size_t *text_len, kvh_err *err);

#endif
