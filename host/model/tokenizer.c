/* tokenizer.c — GPT-2 byte-level BPE (encode / decode), exact to OpenAI's encoder.py.
 * Owns: parsing vocab.json (json_scan, no tree) and merges.txt with errors naming file + key/line, the GPT-2
 * pre-tokenizer regex (PCRE2, UTF + UCP, invalid UTF-8 tolerated), the byte<->unicode alphabet, the
 * rank-ordered BPE merge loop, <|endoftext|> handling, and the embedded copy of the GPT-2 files
 * (symbols from embedded_assets.S).
 * Does not own: model weights, sampling, chat templates, or any other special token.
 *
 * Encoding of bytes that are not valid UTF-8 (GPT-2 itself only ever sees Python str): PCRE2 with
 * PCRE2_MATCH_INVALID_UTF never matches an invalid sequence, so each run of bytes the pattern skips
 * becomes one pre-token of its own and goes through the same byte-level BPE. Every byte has a token,
 * so decode(encode(x)) == x for any bytes x. Valid UTF-8 is always fully covered by the pattern.
 *
 * Unicode tables: \p{L} / \p{N} come from the system PCRE2 (Debian 12: 10.42, Unicode 14). Checked on
 * every code point against HF `tokenizers` (identical) and the newest Python `regex` module (differs
 * only on code points first assigned in Unicode 15+, which a newer PCRE2 would pick up). */
#include "model/tokenizer.h"

#include "util/json_scan.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The OpenAI pattern
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * with \s spelled out as the set Python's `regex` module matches (Unicode White_Space), since PCRE2's
 * UCP \s leaves out U+0085. \p{L} and \p{N} come from PCRE2's Unicode tables. */
#define WS "\\t\\n\\x0B\\f\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}" \
           "\\x{205F}\\x{3000}"
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS "]+(?![^" WS "])|[" WS
    "]+";

static const char EOT_TEXT[] = "<|endoftext|>";
#define EOT_LEN (sizeof EOT_TEXT - 1)

/* Largest vocab.json / merges.txt accepted from disk. */
#define MAX_FILE_BYTES ((size_t)256 << 20)

/* Symbols from embedded_assets.S. */
extern const char kvh_asset_vocab_json[];
extern const char kvh_asset_vocab_json_end[];
extern const char kvh_asset_merges_txt[];
extern const char kvh_asset_merges_txt_end[];

/* One merge: (left id, right id) -> (rank, merged id). Open-addressed table, key 0 = empty slot
 * (keys are stored +1 so that pair (0,0) is not confused with empty). */
typedef struct merge_slot {
    uint64_t key;
    int32_t rank;
    int32_t id;
} merge_slot;

struct kvh_tokenizer {
    int n_vocab;          /* V */
    int eot;              /* id of <|endoftext|> or -1 */
    int32_t byte_id[256]; /* id of the single-byte token for each byte */
    char *tok_bytes;      /* raw bytes of all tokens, concatenated */
    uint32_t *tok_off;    /* (V+1,) offsets into tok_bytes */
    merge_slot *merges;   /* (merge_cap,) */
    size_t merge_cap;     /* power of two */
    int n_merges;
    pcre2_code *re;
};

/* ---- byte <-> unicode alphabet (bytes_to_unicode in encoder.py) -------------------------------- */

/* cp_to_byte[cp] for cp < 0x144: the byte that code point stands for, or -1. */
static void byte_alphabet(int16_t cp_to_byte[0x144]) {
    for (int i = 0; i < 0x144; i++) cp_to_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        int cp = printable ? b : 256 + n++;
        cp_to_byte[cp] = (int16_t)b;
    }
}

/* Decodes one UTF-8 code point from s[0..len); returns bytes used or 0 if invalid. */
static int utf8_next(const unsigned char *s, size_t len, uint32_t *cp) {
    if (len == 0) return 0;
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
    if (n == 0 || (size_t)n > len) return 0;
    uint32_t v = c & (0x3Fu >> (n - 1));
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3Fu);
    }
    *cp = v;
    return n;
}

/* ---- small hashes ---------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static const merge_slot *merge_find(const kvh_tokenizer *tok, int32_t a, int32_t b) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = tok->merge_cap - 1;
    for (size_t i = hash_u64(key) & mask;; i = (i + 1) & mask) {
        const merge_slot *s = &tok->merges[i];
        if (s->key == key) return s;
        if (s->key == 0) return NULL;
    }
}

/* Vocabulary lookup used only while loading: token text (as in vocab.json) -> id. */
typedef struct vocab_map {
    const char **key; /* (cap,) NULL = empty; points into the decoded key buffer */
    size_t *klen;
    int32_t *id;
    size_t cap;
} vocab_map;

static int vocab_map_find(const vocab_map *m, const char *s, size_t n) {
    size_t mask = m->cap - 1;
    for (size_t i = hash_bytes(s, n) & mask;; i = (i + 1) & mask) {
        if (!m->key[i]) return -1;
        if (m->klen[i] == n && memcmp(m->key[i], s, n) == 0) return m->id[i];
    }
}

/* Returns the previous id when the key already exists, else inserts and returns -1. */
static int vocab_map_insert(vocab_map *m, const char *s, size_t n, int32_t id) {
    size_t mask = m->cap - 1;
    for (size_t i = hash_bytes(s, n) & mask;; i = (i + 1) & mask) {
        if (!m->key[i]) {
            m->key[i] = s;
            m->klen[i] = n;
            m->id[i] = id;
            return -1;
        }
        if (m->klen[i] == n && memcmp(m->key[i], s, n) == 0) return m->id[i];
    }
}

/* Line (1-based) and column of byte offset off in text. */
static void line_col(const char *text, size_t off, size_t *line, size_t *col) {
    size_t l = 1, c = 1;
    for (size_t i = 0; i < off; i++) {
        if (text[i] == '\n') {
            l++;
            c = 1;
        } else {
            c++;
        }
    }
    *line = l;
    *col = c;
}

/* Copies s[0..n) into buf for an error message, truncating long text. */
static const char *excerpt(char *buf, size_t cap, const char *s, size_t n) {
    size_t k = n < cap - 4 ? n : cap - 4;
    memcpy(buf, s, k);
    if (k < n) memcpy(buf + k, "...", 3), k += 3;
    buf[k] = '\0';
    return buf;
}

/* ---- loading --------------------------------------------------------------------------------- */

void kvh_tokenizer_free(kvh_tokenizer *tok) {
    if (!tok) return;
    free(tok->tok_bytes);
    free(tok->tok_off);
    free(tok->merges);
    if (tok->re) pcre2_code_free(tok->re);
    free(tok);
}

/* ---- vocab.json ------------------------------------------------------------------------------
 * Read straight into the tokenizer's tables with json_scan (no cJSON tree: a 120 MB file of small values
 * would become gigabytes of nodes). Pass 1 checks the shape — one top-level object whose values are
 * integers — and counts the entries before anything is allocated; pass 2 decodes the keys into one
 * buffer no larger than the file. Memory: the file's size + ~48 bytes per entry. */

/* "file:line:col: invalid JSON at byte N of LEN (what), near "..."" */
static int vocab_syntax_error(const char *name, const char *text, size_t len, size_t off, const char *what,
                              kvh_err *err) {
    if (off > len) off = len;
    size_t line, col;
    line_col(text, off, &line, &col);
    char near[40];
    return kvh_fail(err, "%s:%zu:%zu: invalid JSON at byte %zu of %zu (%s), near \"%s\"", name, line, col, off, len,
                    what ? what : "syntax error",
                    excerpt(near, sizeof near, text + off, len - off < 24 ? len - off : 24));
}

/* Decodes the (validated) key string at text[ks] into a short, printable excerpt for messages. */
static const char *key_excerpt(const char *text, size_t len, size_t ks, char *buf, size_t cap) {
    kvh_json_scan k = {.s = text, .len = len, .at = ks};
    if (kvh_json_string(&k, NULL, NULL) != 0) return "?";
    size_t raw = k.at - ks;
    char small[256];
    if (raw > sizeof small) raw = sizeof small; /* decode a prefix only: the excerpt is short anyway */
    k.at = ks;
    k.len = ks + raw < len ? ks + raw : len;
    size_t n = 0;
    if (kvh_json_string(&k, small, &n) != 0) { /* the prefix cut the string: show its raw start */
        return excerpt(buf, cap, text + ks + 1, raw > 1 ? raw - 1 : 0);
    }
    return excerpt(buf, cap, small, n);
}

/* Pass 1: the members of the top-level object at text[*at] == '{'. Counts entries into *n_out. */
static int vocab_scan(const char *text, size_t len, size_t body, const char *name, int *n_out, kvh_err *err) {
    kvh_json_scan j = {.s = text, .len = len, .at = body};
    char buf[96];
    long n = 0;
    kvh_json_ws(&j);
    if (j.at < len && text[j.at] == '}') {
        *n_out = 0;
        return 0;
    }
    for (;;) {
        kvh_json_ws(&j);
        size_t ks = j.at;
        if (j.at >= len || text[j.at] != '"')
            return vocab_syntax_error(name, text, len, j.at, "expected a token string", err);
        if (kvh_json_string(&j, NULL, NULL) != 0) return vocab_syntax_error(name, text, len, j.at, j.error, err);
        kvh_json_ws(&j);
        if (j.at >= len || text[j.at] != ':')
            return vocab_syntax_error(name, text, len, j.at, "expected ':' after a token", err);
        j.at++;
        kvh_json_ws(&j);
        char c = j.at < len ? text[j.at] : '\0';
        if (c == '-' || (c >= '0' && c <= '9')) {
            if (kvh_json_number(&j) != 0) return vocab_syntax_error(name, text, len, j.at, j.error, err);
        } else {
            /* not a number: a syntax error, or valid JSON of the wrong kind (said so, naming the key) */
            if (kvh_json_skip_value(&j, 64, NULL) != 0) return vocab_syntax_error(name, text, len, j.at, j.error, err);
            return kvh_fail(err, "%s: key \"%s\": id must be an integer, not %s", name,
                            key_excerpt(text, len, ks, buf, sizeof buf),
                            c == '"' ? "a string" : c == '{' ? "an object" : c == '[' ? "an array" : "true/false/null");
        }
        if (++n > (1 << 24))
            return kvh_fail(err, "%s: more than the supported 2^24 entries (stopped counting at byte %zu)", name,
                            j.at);
        kvh_json_ws(&j);
        if (j.at >= len) return vocab_syntax_error(name, text, len, j.at, "unexpected end: ',' or '}' expected", err);
        if (text[j.at] == '}') break;
        if (text[j.at] != ',') return vocab_syntax_error(name, text, len, j.at, "expected ',' or '}'", err);
        j.at++;
    }
    j.at++;
    /* anything but whitespace after the object is an error too */
    kvh_json_ws(&j);
    if (j.at < len) {
        size_t line, col;
        line_col(text, j.at, &line, &col);
        return kvh_fail(err, "%s:%zu:%zu: unexpected content after the JSON object (byte %zu of %zu)", name, line, col,
                        j.at, len);
    }
    *n_out = (int)n;
    return 0;
}

/* Parses vocab.json text into tok (ids, token bytes) and fills the text->id map; the map's keys point
 * into *keybuf_out, which the caller frees after the merges are read. */
static int load_vocab(kvh_tokenizer *tok, const char *text, size_t len, vocab_map *map, char **keybuf_out,
                      const char *name, kvh_err *err) {
    *keybuf_out = NULL;
    kvh_json_scan j = {.s = text, .len = len};
    kvh_json_ws(&j);
    if (j.at >= len || text[j.at] != '{') {
        kvh_json_scan v = j;
        if (j.at < len && kvh_json_skip_value(&v, 64, NULL) == 0)
            return kvh_fail(err, "%s: top level must be a JSON object {token: id}, not %s", name,
                            text[j.at] == '[' ? "an array" : "a single value");
        return vocab_syntax_error(name, text, len, v.at, v.error ? v.error : "expected '{'", err);
    }
    size_t body = j.at + 1;
    int n = 0;
    if (vocab_scan(text, len, body, name, &n, err) != 0) return -1;
    if (n <= 0) return kvh_fail(err, "%s: vocabulary is empty", name);
    int16_t cp_to_byte[0x144];
    byte_alphabet(cp_to_byte);

    map->cap = pow2_at_least((size_t)n * 2);
    map->key = calloc(map->cap, sizeof *map->key);
    map->klen = calloc(map->cap, sizeof *map->klen);
    map->id = calloc(map->cap, sizeof *map->id);
    char *keys = malloc(len + 1);                   /* decoded keys: never longer than their JSON text */
    size_t *kpos = malloc((size_t)n * sizeof *kpos); /* by id: offset of the key in keys */
    uint32_t *klens = malloc((size_t)n * sizeof *klens);
    int32_t *seen = malloc((size_t)n * sizeof *seen); /* by id: entry index that took it, or -1 */
    size_t *kstart = malloc((size_t)n * sizeof *kstart); /* by entry: key position in the text (messages) */
    char buf[96], buf2[96];
    int rc = -1;
    if (!map->key || !map->klen || !map->id || !keys || !kpos || !klens || !seen || !kstart) {
        kvh_fail(err, "%s: out of memory for %d entries", name, n);
        goto done;
    }
    for (int i = 0; i < n; i++) seen[i] = -1;
    size_t used = 0, total = 0;
    j.at = body;
    for (int e = 0; e < n; e++) {
        kvh_json_ws(&j);
        size_t ks = j.at, klen = 0;
        kstart[e] = ks;
        (void)kvh_json_string(&j, keys + used, &klen); /* validated in pass 1 */
        const char *key = keys + used;
        kvh_json_ws(&j);
        j.at++; /* ':' */
        kvh_json_ws(&j);
        size_t ns = j.at;
        (void)kvh_json_number(&j);
        char num[40];
        size_t nl = j.at - ns;
        double v = -1.0;
        if (nl < sizeof num) {
            memcpy(num, text + ns, nl);
            num[nl] = '\0';
            v = strtod(num, NULL);
        }
        if (!(v >= 0) || v >= n || v != (double)(int)v) {
            kvh_fail(err, "%s: key \"%s\": id must be an integer in [0, %d) (the number of entries)", name,
                     excerpt(buf, sizeof buf, key, klen), n);
            goto done;
        }
        int id = (int)v;
        if (seen[id] >= 0) {
            kvh_fail(err, "%s: key \"%s\": id %d is also used by key \"%s\"", name, excerpt(buf, sizeof buf, key, klen),
                     id, key_excerpt(text, len, kstart[seen[id]], buf2, sizeof buf2));
            goto done;
        }
        seen[id] = e;
        if (vocab_map_insert(map, key, klen, id) >= 0) {
            kvh_fail(err, "%s: key \"%s\" appears twice", name, excerpt(buf, sizeof buf, key, klen));
            goto done;
        }
        kpos[id] = used;
        klens[id] = (uint32_t)klen;
        used += klen;
        total += klen; /* raw bytes never exceed the UTF-8 length */
        kvh_json_ws(&j);
        j.at++; /* ',' or '}' */
    }
    /* n unique ids in [0, n): ids are dense. */
    tok->n_vocab = n;
    tok->tok_off = malloc(((size_t)n + 1) * sizeof *tok->tok_off);
    tok->tok_bytes = malloc(total + 1);
    if (!tok->tok_off || !tok->tok_bytes || total > UINT32_MAX) {
        kvh_fail(err, "%s: out of memory", name);
        goto done;
    }
    for (int b = 0; b < 256; b++) tok->byte_id[b] = -1;
    tok->eot = -1;
    uint32_t off = 0;
    for (int id = 0; id < n; id++) {
        const char *key = keys + kpos[id];
        size_t klen = klens[id];
        tok->tok_off[id] = off;
        if (klen == EOT_LEN && memcmp(key, EOT_TEXT, EOT_LEN) == 0) tok->eot = id;
        for (size_t i = 0; i < klen;) {
            uint32_t cp = 0;
            int u = utf8_next((const unsigned char *)key + i, klen - i, &cp);
            if (u == 0 || cp >= 0x144 || cp_to_byte[cp] < 0) {
                kvh_fail(err,
                         "%s: key \"%s\": character %s%04X at byte %zu is not in the GPT-2 byte alphabet",
                         name, excerpt(buf, sizeof buf, key, klen), u ? "U+" : "invalid UTF-8 0x",
                         u ? (unsigned)cp : (unsigned char)key[i], i);
                goto done;
            }
            tok->tok_bytes[off++] = (char)cp_to_byte[cp];
            i += (size_t)u;
        }
        if (off - tok->tok_off[id] == 1 && tok->byte_id[(unsigned char)tok->tok_bytes[off - 1]] < 0)
            tok->byte_id[(unsigned char)tok->tok_bytes[off - 1]] = id;
    }
    tok->tok_off[n] = off;
    for (int b = 0; b < 256; b++) {
        if (tok->byte_id[b] < 0) {
            kvh_fail(err, "%s: no token for the single byte 0x%02X (every byte needs one)", name, b);
            goto done;
        }
    }
    rc = 0;
done:
    free(kpos);
    free(klens);
    free(seen);
    free(kstart);
    if (rc != 0) free(keys);
    else *keybuf_out = keys;
    return rc;
}

static int load_merges(kvh_tokenizer *tok, const char *text, size_t len, const vocab_map *map,
                       const char *name, kvh_err *err) {
    size_t n_lines = 1;
    for (size_t i = 0; i < len; i++) n_lines += text[i] == '\n';
    tok->merge_cap = pow2_at_least(n_lines * 2);
    tok->merges = calloc(tok->merge_cap, sizeof *tok->merges);
    if (!tok->merges) return kvh_fail(err, "%s: out of memory", name);
    char *cat = NULL;
    size_t cat_cap = 0;
    char buf[96], buf2[96];
    int rank = 0;
    size_t line = 0;
    for (size_t pos = 0; pos < len;) {
        const char *s = text + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - s) : len - pos;
        pos += n + (nl != NULL);
        line++;
        if (n > 0 && s[n - 1] == '\r') n--;
        if (line == 1 && n >= 8 && memcmp(s, "#version", 8) == 0) continue;
        if (n == 0) continue;
        const char *sp = memchr(s, ' ', n);
        if (!sp || sp == s || sp == s + n - 1 || memchr(sp + 1, ' ', (size_t)(s + n - sp - 1))) {
            free(cat);
            return kvh_fail(err, "%s:%zu: expected two tokens separated by one space, got \"%s\"", name,
                            line, excerpt(buf, sizeof buf, s, n));
        }
        size_t la = (size_t)(sp - s), lb = n - la - 1;
        int a = vocab_map_find(map, s, la);
        int b = vocab_map_find(map, sp + 1, lb);
        if (a < 0 || b < 0) {
            free(cat);
            return kvh_fail(err, "%s:%zu: token \"%s\" is not in the vocabulary", name, line,
                            a < 0 ? excerpt(buf, sizeof buf, s, la) : excerpt(buf, sizeof buf, sp + 1, lb));
        }
        if (la + lb > cat_cap) {
            free(cat);
            cat_cap = (la + lb) * 2;
            cat = malloc(cat_cap);
            if (!cat) return kvh_fail(err, "%s: out of memory", name);
        }
        memcpy(cat, s, la);
        memcpy(cat + la, sp + 1, lb);
        int ab = vocab_map_find(map, cat, la + lb);
        if (ab < 0) {
            kvh_fail(err, "%s:%zu: merged token \"%s\" is not in the vocabulary", name, line,
                     excerpt(buf, sizeof buf, cat, la + lb));
            free(cat);
            return -1;
        }
        uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
        size_t mask = tok->merge_cap - 1;
        size_t i = hash_u64(key) & mask;
        while (tok->merges[i].key != 0 && tok->merges[i].key != key) i = (i + 1) & mask;
        if (tok->merges[i].key == key) {
            free(cat);
            return kvh_fail(err, "%s:%zu: merge \"%s %s\" repeats the merge of rank %d", name, line,
                            excerpt(buf, sizeof buf, s, la), excerpt(buf2, sizeof buf2, sp + 1, lb),
                            tok->merges[i].rank);
        }
        tok->merges[i].key = key;
        tok->merges[i].rank = rank++;
        tok->merges[i].id = ab;
    }
    free(cat);
    tok->n_merges = rank;
    return 0;
}

static int compile_pattern(kvh_tokenizer *tok, kvh_err *err) {
    int ec = 0;
    PCRE2_SIZE eo = 0;
    tok->re = pcre2_compile((PCRE2_SPTR)GPT2_PATTERN, PCRE2_ZERO_TERMINATED,
                            PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo, NULL);
    if (!tok->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return kvh_fail(err, "tokenizer: PCRE2 cannot compile the GPT-2 pattern at offset %zu: %s",
                        (size_t)eo, (const char *)msg);
    }
    /* JIT is an optimisation only; the interpreter gives the same matches if JIT is unavailable. */
    (void)pcre2_jit_compile(tok->re, PCRE2_JIT_COMPLETE);
    return 0;
}

static int load_named(kvh_tokenizer **out, const char *vocab_json, size_t vocab_len, const char *vocab_name,
                      const char *merges, size_t merges_len, const char *merges_name, kvh_err *err) {
    *out = NULL;
    kvh_tokenizer *tok = calloc(1, sizeof *tok);
    if (!tok) return kvh_fail(err, "tokenizer: out of memory");
    vocab_map map = {0};
    char *keys = NULL; /* the map's keys point here */
    int rc = -1;
    if (load_vocab(tok, vocab_json, vocab_len, &map, &keys, vocab_name, err) != 0) goto done;
    if (load_merges(tok, merges, merges_len, &map, merges_name, err) != 0) goto done;
    if (compile_pattern(tok, err) != 0) goto done;
    rc = 0;
done:
    free(map.key);
    free(map.klen);
    free(map.id);
    free(keys);
    if (rc != 0) {
        kvh_tokenizer_free(tok);
        return -1;
    }
    *out = tok;
    return 0;
}

int kvh_tokenizer_load_mem(kvh_tokenizer **out, const char *vocab_json, size_t vocab_len, const char *merges,
                           size_t merges_len, const char *path_hint, kvh_err *err) {
    char vname[512], mname[512];
    const char *hint = path_hint ? path_hint : "memory";
    snprintf(vname, sizeof vname, "%s (vocab.json)", hint);
    snprintf(mname, sizeof mname, "%s (merges.txt)", hint);
    return load_named(out, vocab_json, vocab_len, vname, merges, merges_len, mname, err);
}

int kvh_tokenizer_load(kvh_tokenizer **out, const char *vocab_json_path, const char *merges_path,
                       kvh_err *err) {
    *out = NULL;
    char *v = NULL, *m = NULL;
    size_t vlen = 0, mlen = 0;
    if (kvh_read_file(vocab_json_path, MAX_FILE_BYTES, &v, &vlen, err) != 0) return -1;
    if (kvh_read_file(merges_path, MAX_FILE_BYTES, &m, &mlen, err) != 0) {
        free(v);
        return -1;
    }
    int rc = load_named(out, v, vlen, vocab_json_path, m, mlen, merges_path, err);
    free(v);
    free(m);
    return rc;
}

int kvh_tokenizer_load_embedded(kvh_tokenizer **out, kvh_err *err) {
    return load_named(out, kvh_asset_vocab_json, (size_t)(kvh_asset_vocab_json_end - kvh_asset_vocab_json),
                      "embedded vocab.json", kvh_asset_merges_txt,
                      (size_t)(kvh_asset_merges_txt_end - kvh_asset_merges_txt), "embedded merges.txt", err);
}

int kvh_tokenizer_vocab_size(const kvh_tokenizer *tok) { return tok->n_vocab; }
int kvh_tokenizer_eot(const kvh_tokenizer *tok) { return tok->eot; }

/* ---- encoding -------------------------------------------------------------------------------- */

/* Growable buffers one encode call reuses for every pre-token. */
typedef struct heap_item {
    int32_t rank;
    int32_t left;  /* node index of the left symbol */
    int32_t right; /* node index of the right symbol */
    int32_t lid, rid;
} heap_item;

typedef struct enc_state {
    int32_t *ids; /* output (n_out,) of cap_out */
    size_t n_out, cap_out;
    int32_t *sym, *next, *prev; /* per-node symbol id and links (W,) */
    heap_item *heap;            /* candidate merges (<= 2W) */
    size_t cap_w, cap_heap, n_heap;
} enc_state;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) {
        if (c > SIZE_MAX / 2 / elem) return -1;
        c *= 2;
    }
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

static int emit(enc_state *st, int32_t id) {
    if (st->n_out == st->cap_out && grow((void **)&st->ids, &st->cap_out, st->n_out + 1, sizeof *st->ids))
        return -1;
    st->ids[st->n_out++] = id;
    return 0;
}

static int heap_less(const heap_item *a, const heap_item *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->left < b->left;
}

static void heap_push(enc_state *st, heap_item it) {
    size_t i = st->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&it, &st->heap[p])) break;
        st->heap[i] = st->heap[p];
        i = p;
    }
    st->heap[i] = it;
}

static heap_item heap_pop(enc_state *st) {
    heap_item top = st->heap[0];
    heap_item last = st->heap[--st->n_heap];
    size_t n = st->n_heap, i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_less(&st->heap[c + 1], &st->heap[c])) c++;
        if (!heap_less(&st->heap[c], &last)) break;
        st->heap[i] = st->heap[c];
        i = c;
    }
    if (n > 0) st->heap[i] = last;
    return top;
}

static void push_pair(enc_state *st, const kvh_tokenizer *tok, int32_t left, int32_t right) {
    const merge_slot *m = merge_find(tok, st->sym[left], st->sym[right]);
    if (m) heap_push(st, (heap_item){m->rank, left, right, st->sym[left], st->sym[right]});
}

/* BPE of one pre-token: starts from single bytes and repeatedly applies the lowest-rank merge
 * present, leftmost first — the same result as encoder.py's "merge every occurrence of the best
 * bigram" loop, because a merge's result only takes part in merges of higher rank (true of every one
 * of GPT-2's 50000 merges; a merges file breaking that rule could tokenize differently). */
static int bpe_word(const kvh_tokenizer *tok, enc_state *st, const unsigned char *w, size_t n) {
    if (n == 1) return emit(st, tok->byte_id[w[0]]);
    if (n > INT32_MAX / 2) return -1;
    if (n > st->cap_w) {
        size_t c = st->cap_w ? st->cap_w : 64;
        while (c < n) c *= 2;
        int32_t *a = realloc(st->sym, c * sizeof *a);
        if (a) st->sym = a;
        int32_t *b = realloc(st->next, c * sizeof *b);
        if (b) st->next = b;
        int32_t *d = realloc(st->prev, c * sizeof *d);
        if (d) st->prev = d;
        if (!a || !b || !d) return -1;
        st->cap_w = c;
    }
    if (grow((void **)&st->heap, &st->cap_heap, 2 * n, sizeof *st->heap)) return -1;
    int32_t nn = (int32_t)n;
    for (int32_t i = 0; i < nn; i++) {
        st->sym[i] = tok->byte_id[w[i]];
        st->next[i] = i + 1 < nn ? i + 1 : -1;
        st->prev[i] = i - 1;
    }
    st->n_heap = 0;
    for (int32_t i = 0; i + 1 < nn; i++) push_pair(st, tok, i, i + 1);
    while (st->n_heap > 0) {
        heap_item it = heap_pop(st);
        /* Stale candidates: a side was merged away or changed since the pair was pushed. */
        if (st->sym[it.left] != it.lid || st->next[it.left] != it.right || st->sym[it.right] != it.rid)
            continue;
        const merge_slot *m = merge_find(tok, it.lid, it.rid);
        st->sym[it.left] = m->id;
        st->sym[it.right] = -1;
        int32_t nx = st->next[it.right];
        st->next[it.left] = nx;
        st->next[it.right] = -2;
        if (nx >= 0) st->prev[nx] = it.left;
        if (st->prev[it.left] >= 0) push_pair(st, tok, st->prev[it.left], it.left);
        if (nx >= 0) push_pair(st, tok, it.left, nx);
    }
    for (int32_t i = 0; i >= 0; i = st->next[i])
        if (emit(st, st->sym[i])) return -1;
    return 0;
}

static int encode_ordinary(const kvh_tokenizer *tok, enc_state *st, pcre2_match_data *md, const char *text,
                           size_t len, kvh_err *err) {
    const unsigned char *s = (const unsigned char *)text;
    size_t off = 0;
    while (off < len) {
        int rc = pcre2_match(tok->re, s, len, off, 0, md, NULL);
        size_t ms, me;
        if (rc == PCRE2_ERROR_NOMATCH) {
            ms = me = len;
        } else if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return kvh_fail(err, "tokenizer: regex match failed at byte %zu: %s", off, (const char *)msg);
        } else {
            PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
            ms = ov[0];
            me = ov[1];
            if (me <= ms || ms < off) return kvh_fail(err, "tokenizer: empty regex match at byte %zu", off);
        }
        if (ms > off && bpe_word(tok, st, s + off, ms - off)) goto oom;
        if (me > ms && bpe_word(tok, st, s + ms, me - ms)) goto oom;
        off = me;
    }
    return 0;
oom:
    return kvh_fail(err, "tokenizer: out of memory encoding %zu bytes", len);
}

static const char *find_eot(const char *s, size_t n) {
    for (const char *p = s; (size_t)(s + n - p) >= EOT_LEN;) {
        p = memchr(p, '<', (size_t)(s + n - p) - EOT_LEN + 1);
        if (!p) return NULL;
        if (memcmp(p, EOT_TEXT, EOT_LEN) == 0) return p;
        p++;
    }
    return NULL;
}

int kvh_tokenizer_encode(const kvh_tokenizer *tok, const char *text, size_t len, int allow_special,
                         int32_t **ids, size_t *n_ids, kvh_err *err) {
    *ids = NULL;
    *n_ids = 0;
    if (len > 0 && !text) return kvh_fail(err, "tokenizer: encode given NULL text of length %zu", len);
    enc_state st = {0};
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(tok->re, NULL);
    int rc = -1;
    if (!md) {
        kvh_fail(err, "tokenizer: out of memory");
        goto done;
    }
    size_t off = 0;
    while (off < len) {
        const char *hit = allow_special && tok->eot >= 0 ? find_eot(text + off, len - off) : NULL;
        size_t seg_end = hit ? (size_t)(hit - text) : len;
        if (encode_ordinary(tok, &st, md, text + off, seg_end - off, err)) goto done;
        if (!hit) break;
        if (emit(&st, tok->eot)) {
            kvh_fail(err, "tokenizer: out of memory encoding %zu bytes", len);
            goto done;
        }
        off = seg_end + EOT_LEN;
    }
    rc = 0;
done:
    pcre2_match_data_free(md);
    free(st.sym);
    free(st.next);
    free(st.prev);
    free(st.heap);
    if (rc != 0) {
        free(st.ids);
        return -1;
    }
    if (!st.ids) st.ids = malloc(sizeof *st.ids); /* non-NULL even for no tokens */
    if (!st.ids) return kvh_fail(err, "tokenizer: out of memory");
    *ids = st.ids;
    *n_ids = st.n_out;
    return 0;
}

/* ---- decoding -------------------------------------------------------------------------------- */

int kvh_tokenizer_token_bytes(const kvh_tokenizer *tok, int32_t id, char *out, size_t cap) {
    if (id < 0 || id >= tok->n_vocab) return -1;
    size_t n = tok->tok_off[id + 1] - tok->tok_off[id];
    if (n <= cap && n > 0) memcpy(out, tok->tok_bytes + tok->tok_off[id], n);
    return (int)n;
}

int kvh_tokenizer_decode(const kvh_tokenizer *tok, const int32_t *ids, size_t n_ids, char **text,
                         size_t *text_len, kvh_err *err) {
    *text = NULL;
    if (text_len) *text_len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= tok->n_vocab)
            return kvh_fail(err, "tokenizer: decode: id %ld at position %zu is out of range [0, %d)",
                            (long)ids[i], i, tok->n_vocab);
        if (kvh_size_add(total, tok->tok_off[ids[i] + 1] - tok->tok_off[ids[i]], &total) != 0)
            return kvh_fail(err, "tokenizer: decode: output size overflows");
    }
    char *buf = malloc(total + 1);
    if (!buf) return kvh_fail(err, "tokenizer: decode: out of memory for %zu bytes", total);
    size_t at = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t n = tok->tok_off[ids[i] + 1] - tok->tok_off[ids[i]];
        memcpy(buf + at, tok->tok_bytes + tok->tok_off[ids[i]], n);
        at += n;
    }
    buf[at] = '\0';
    *text = buf;
    if (text_len) *text_len = at;
    return 0;
}
