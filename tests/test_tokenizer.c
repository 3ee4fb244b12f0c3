/* test_tokenizer.c — Criterion suite for host/model/tokenizer.c (GPT-2 byte-level BPE).
 * Owns: checks of encode/decode against fixtures from two independent references (HF transformers and a
 * port of OpenAI encoder.py, tests/tools/gen_tokenizer_fixtures.py), whole-file checks on ../shared
 * data, golden prompts, byte round trips, and load-error messages. Does not own: the fixtures' content. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/tokenizer.h"

#define FIXTURES KVH_TEST_DATA_DIR "/tokenizer/fixtures.json"
#define ASSET_VOCAB KVH_SOURCE_DIR "/host/model/assets/vocab.json"
#define ASSET_MERGES KVH_SOURCE_DIR "/host/model/assets/merges.txt"

static kvh_tokenizer *load_embedded(void) {
    kvh_err err = {{0}};
    kvh_tokenizer *tok = NULL;
    cr_assert_eq(kvh_tokenizer_load_embedded(&tok, &err), 0, "load_embedded: %s", err.msg);
    return tok;
}

static cJSON *read_json(const char *path) {
    kvh_err err = {{0}};
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(kvh_read_file(path, (size_t)64 << 20, &text, &len, &err), 0, "%s", err.msg);
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    cr_assert_not_null(root, "%s: invalid JSON", path);
    return root;
}

static int shared_present(const char *rel) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", KVH_SHARED_DIR, rel);
    struct stat st;
    return stat(path, &st) == 0;
}

static size_t hex_decode(const char *hex, char *out) {
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned v = 0;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (char)v;
    }
    return n;
}

/* Asserts ids == want, printing the first mismatch. */
static void assert_ids(const char *what, const int32_t *ids, size_t n, const int32_t *want, size_t n_want) {
    size_t i = 0;
    while (i < n && i < n_want && ids[i] == want[i]) i++;
    if (i == n && i == n_want) return;
    cr_assert_fail("%s: ids differ at index %zu (got %zu ids, want %zu): got %ld, want %ld", what, i, n, n_want,
                   i < n ? (long)ids[i] : -1L, i < n_want ? (long)want[i] : -1L);
}

static void assert_encodes(const kvh_tokenizer *tok, const char *what, const char *text, size_t len,
                           int allow_special, const int32_t *want, size_t n_want) {
    kvh_err err = {{0}};
    int32_t *ids = NULL;
    size_t n = 0;
    cr_assert_eq(kvh_tokenizer_encode(tok, text, len, allow_special, &ids, &n, &err), 0, "%s: %s", what, err.msg);
    assert_ids(what, ids, n, want, n_want);
    free(ids);
}

static int32_t *json_ids(const cJSON *arr, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    size_t i = 0;
    for (const cJSON *it = arr->child; it; it = it->next) ids[i++] = (int32_t)it->valuedouble;
    return ids;
}

/* FNV-1a 64 over ids as int32 little-endian, as in gen_tokenizer_fixtures.py. */
static uint64_t fnv1a_ids(const int32_t *ids, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (int b = 0; b < 4; b++) h = (h ^ ((v >> (8 * b)) & 0xFF)) * 0x100000001b3ull;
    }
    return h;
}

Test(tokenizer, embedded_vocab_shape) {
    kvh_tokenizer *tok = load_embedded();
    cJSON *fx = read_json(FIXTURES);
    cr_assert_eq(kvh_tokenizer_vocab_size(tok), cJSON_GetObjectItem(fx, "vocab_size")->valueint);
    cr_assert_eq(kvh_tokenizer_eot(tok), cJSON_GetObjectItem(fx, "eot")->valueint);
    cr_assert_eq(kvh_tokenizer_vocab_size(tok), 50257);
    cr_assert_eq(kvh_tokenizer_eot(tok), 50256);
    cJSON_Delete(fx);
    kvh_tokenizer_free(tok);
}

Test(tokenizer, fixtures_match_references) {
    kvh_tokenizer *tok = load_embedded();
    cJSON *fx = read_json(FIXTURES);
    const cJSON *cases = cJSON_GetObjectItem(fx, "cases");
    cr_assert(cJSON_GetArraySize(cases) > 300, "fixture has too few cases");
    for (const cJSON *c = cases->child; c; c = c->next) {
        const char *name = cJSON_GetObjectItem(c, "name")->valuestring;
        int allow = cJSON_GetObjectItem(c, "allow_special")->valueint;
        const char *hex = cJSON_GetObjectItem(c, "hex")->valuestring;
        char *text = malloc(strlen(hex) / 2 + 1);
        size_t len = hex_decode(hex, text);
        size_t n_want = 0;
        int32_t *want = json_ids(cJSON_GetObjectItem(c, "ids"), &n_want);
        char what[256];
        snprintf(what, sizeof what, "case %s (allow_special=%d)", name, allow);
        assert_encodes(tok, what, text, len, allow, want, n_want);

        kvh_err err = {{0}};
        char *back = NULL;
        size_t blen = 0;
        cr_assert_eq(kvh_tokenizer_decode(tok, want, n_want, &back, &blen, &err), 0, "%s: %s", what, err.msg);
        cr_assert(blen == len && memcmp(back, text, len) == 0, "%s: decode does not give the text back", what);
        cr_assert_eq(back[blen], '\0');
        free(back);
        free(want);
        free(text);
    }
    cJSON_Delete(fx);
    kvh_tokenizer_free(tok);
}

Test(tokenizer, file_load_matches_embedded) {
    kvh_err err = {{0}};
    kvh_tokenizer *a = load_embedded(), *b = NULL;
    cr_assert_eq(kvh_tokenizer_load(&b, ASSET_VOCAB, ASSET_MERGES, &err), 0, "%s", err.msg);
    const char *text = "Files and the embedded copy agree: naïve café, 12345, 😀 <|endoftext|> end";
    int32_t *ia = NULL, *ib = NULL;
    size_t na = 0, nb = 0;
    cr_assert_eq(kvh_tokenizer_encode(a, text, strlen(text), 1, &ia, &na, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_tokenizer_encode(b, text, strlen(text), 1, &ib, &nb, &err), 0, "%s", err.msg);
    assert_ids("file vs embedded", ib, nb, ia, na);
    free(ia);
    free(ib);
    kvh_tokenizer_free(a);
    kvh_tokenizer_free(b);
}

Test(tokenizer, whole_shared_files) {
    if (!shared_present("data/wikitext-2-raw/wiki.test.raw")) {
        cr_skip_test("shared data absent at %s: whole-file checks skipped", KVH_SHARED_DIR);
    }
    kvh_tokenizer *tok = load_embedded();
    cJSON *fx = read_json(FIXTURES);
    const cJSON *files = cJSON_GetObjectItem(fx, "whole_files");
    for (const cJSON *f = files->child; f; f = f->next) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", KVH_SHARED_DIR, cJSON_GetObjectItem(f, "shared_path")->valuestring);
        kvh_err err = {{0}};
        char *text = NULL;
        size_t len = 0;
        cr_assert_eq(kvh_read_file(path, (size_t)64 << 20, &text, &len, &err), 0, "%s", err.msg);
        cr_assert_eq((double)len, cJSON_GetObjectItem(f, "bytes")->valuedouble, "%s: size changed", path);
        int32_t *ids = NULL;
        size_t n = 0;
        double t0 = kvh_now_ms();
        cr_assert_eq(kvh_tokenizer_encode(tok, text, len, 0, &ids, &n, &err), 0, "%s", err.msg);
        double ms = kvh_now_ms() - t0;
        printf("tokenizer: encoded %s (%zu bytes) -> %zu ids in %.1f ms\n", path, len, n, ms);
        size_t n_first = 0;
        int32_t *first = json_ids(cJSON_GetObjectItem(f, "first_ids"), &n_first);
        cr_assert_geq(n, n_first);
        assert_ids(path, ids, n_first, first, n_first);
        cr_assert_eq((double)n, cJSON_GetObjectItem(f, "n_ids")->valuedouble, "%s: %zu ids", path, n);
        char hash[32];
        snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a_ids(ids, n));
        cr_assert_str_eq(hash, cJSON_GetObjectItem(f, "ids_fnv1a64")->valuestring, "%s: id hash", path);
        char *back = NULL;
        size_t blen = 0;
        cr_assert_eq(kvh_tokenizer_decode(tok, ids, n, &back, &blen, &err), 0, "%s", err.msg);
        cr_assert(blen == len && memcmp(back, text, len) == 0, "%s: round trip", path);
        free(back);
        free(first);
        free(ids);
        free(text);
    }
    cJSON_Delete(fx);
    kvh_tokenizer_free(tok);
}

Test(tokenizer, golden_prompts) {
    if (!shared_present("models/gpt2-tiny-wt/golden.json")) {
        cr_skip_test("%s/models/gpt2-tiny-wt/golden.json absent: golden prompt check skipped", KVH_SHARED_DIR);
    }
    kvh_tokenizer *tok = load_embedded();
    cJSON *g = read_json(KVH_SHARED_DIR "/models/gpt2-tiny-wt/golden.json");
    const cJSON *prompts = cJSON_GetObjectItem(g, "prompts");
    cr_assert(cJSON_GetArraySize(prompts) > 0);
    for (const cJSON *p = prompts->child; p; p = p->next) {
        const char *text = cJSON_GetObjectItem(p, "text")->valuestring;
        size_t n_want = 0;
        int32_t *want = json_ids(cJSON_GetObjectItem(p, "ids"), &n_want);
        char what[128];
        snprintf(what, sizeof what, "golden prompt %s", cJSON_GetObjectItem(p, "name")->valuestring);
        assert_encodes(tok, what, text, strlen(text), 0, want, n_want);
        free(want);
    }
    cJSON_Delete(g);
    kvh_tokenizer_free(tok);
}

/* xorshift64*: deterministic bytes for the round-trip test. */
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

Test(tokenizer, random_bytes_round_trip) {
    kvh_tokenizer *tok = load_embedded();
    static const char *pieces[] = {"\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\xe2\x80", "\xf0\x9f",
                                   "\xed\xa0\x80", "\xc0\xaf", "'s", "'ll", " ", "  ", "\n", "\t", "<|endoftext|>",
                                   "<|", "a", "Z", "7", "\xc2\x85", "\xe3\x80\x80", "\xff", "\x80"};
    const size_t n_pieces = sizeof pieces / sizeof pieces[0];
    uint64_t s = 0x9E3779B97F4A7C15ull;
    char buf[600];
    for (int iter = 0; iter < 3000; iter++) {
        size_t len = 0, target = rng_next(&s) % 300;
        int mode = iter % 3;
        while (len < target) {
            uint64_t r = rng_next(&s);
            if (mode == 0 || (mode == 2 && r % 4 == 0)) {
                buf[len++] = (char)(r >> 8);
            } else {
                const char *p = pieces[(r >> 8) % n_pieces];
                size_t pl = strlen(p);
                memcpy(buf + len, p, pl);
                len += pl;
            }
        }
        for (int allow = 0; allow <= 1; allow++) {
            kvh_err err = {{0}};
            int32_t *ids = NULL;
            size_t n = 0;
            cr_assert_eq(kvh_tokenizer_encode(tok, buf, len, allow, &ids, &n, &err), 0, "iter %d: %s", iter,
                         err.msg);
            cr_assert_leq(n, len, "iter %d: more ids than bytes", iter);
            char *back = NULL;
            size_t blen = 0;
            cr_assert_eq(kvh_tokenizer_decode(tok, ids, n, &back, &blen, &err), 0, "%s", err.msg);
            cr_assert(blen == len && memcmp(back, buf, len) == 0, "iter %d allow %d: round trip differs", iter,
                      allow);
            free(back);
            free(ids);
        }
    }
    kvh_tokenizer_free(tok);
}

/* Invalid UTF-8 runs are pre-tokens of their own: valid neighbours encode as they would alone. */
Test(tokenizer, invalid_utf8_is_isolated) {
    kvh_tokenizer *tok = load_embedded();
    kvh_err err = {{0}};
    int32_t *a = NULL, *b = NULL, *c = NULL, *all = NULL;
    size_t na, nb, nc, nall;
    cr_assert_eq(kvh_tokenizer_encode(tok, "hello", 5, 0, &a, &na, &err), 0);
    cr_assert_eq(kvh_tokenizer_encode(tok, "\xff\xfe", 2, 0, &b, &nb, &err), 0);
    cr_assert_eq(kvh_tokenizer_encode(tok, " world", 6, 0, &c, &nc, &err), 0);
    cr_assert_eq(kvh_tokenizer_encode(tok, "hello\xff\xfe world", 13, 0, &all, &nall, &err), 0);
    int32_t want[64];
    size_t nw = 0;
    memcpy(want, a, na * sizeof *a), nw += na;
    memcpy(want + nw, b, nb * sizeof *b), nw += nb;
    memcpy(want + nw, c, nc * sizeof *c), nw += nc;
    assert_ids("hello\\xff\\xfe world", all, nall, want, nw);
    /* A lone byte is its own single-byte token. */
    char out[8];
    cr_assert_eq(nb, 2);
    cr_assert_eq(kvh_tokenizer_token_bytes(tok, b[0], out, sizeof out), 1);
    cr_assert_eq((unsigned char)out[0], 0xFF);
    free(a), free(b), free(c), free(all);
    kvh_tokenizer_free(tok);
}

Test(tokenizer, token_bytes_and_decode_errors) {
    kvh_tokenizer *tok = load_embedded();
    char out[64];
    int n = kvh_tokenizer_token_bytes(tok, 50256, out, sizeof out);
    cr_assert_eq(n, 13);
    cr_assert(memcmp(out, "<|endoftext|>", 13) == 0);
    memset(out, 'Q', sizeof out);
    cr_assert_eq(kvh_tokenizer_token_bytes(tok, 50256, out, 4), 13, "too-small cap still reports the size");
    cr_assert_eq(out[0], 'Q', "nothing written when cap is too small");
    cr_assert_eq(kvh_tokenizer_token_bytes(tok, -1, out, sizeof out), -1);
    cr_assert_eq(kvh_tokenizer_token_bytes(tok, 50257, out, sizeof out), -1);

    kvh_err err = {{0}};
    int32_t bad[] = {15496, 995, 50257};
    char *text = (char *)1;
    cr_assert_eq(kvh_tokenizer_decode(tok, bad, 3, &text, NULL, &err), -1);
    cr_assert_null(text);
    cr_assert(strstr(err.msg, "50257") && strstr(err.msg, "position 2"), "message: %s", err.msg);

    int32_t *ids = NULL;
    size_t n_ids = 99;
    cr_assert_eq(kvh_tokenizer_encode(tok, "", 0, 1, &ids, &n_ids, &err), 0, "%s", err.msg);
    cr_assert_eq(n_ids, 0);
    free(ids);
    char *empty = NULL;
    size_t elen = 7;
    cr_assert_eq(kvh_tokenizer_decode(tok, NULL, 0, &empty, &elen, &err), 0, "%s", err.msg);
    cr_assert_eq(elen, 0);
    cr_assert_str_eq(empty, "");
    free(empty);
    kvh_tokenizer_free(tok);
}

/* ---- load errors ----------------------------------------------------------------------------- */

static char *embedded_merges(size_t *len) {
    kvh_err err = {{0}};
    char *m = NULL;
    cr_assert_eq(kvh_read_file(ASSET_MERGES, (size_t)64 << 20, &m, len, &err), 0, "%s", err.msg);
    return m;
}

static char *embedded_vocab(size_t *len) {
    kvh_err err = {{0}};
    char *v = NULL;
    cr_assert_eq(kvh_read_file(ASSET_VOCAB, (size_t)64 << 20, &v, len, &err), 0, "%s", err.msg);
    return v;
}

static void expect_load_error(const char *vocab, size_t vlen, const char *merges, size_t mlen,
                              const char *must1, const char *must2) {
    kvh_err err = {{0}};
    kvh_tokenizer *tok = (kvh_tokenizer *)1;
    cr_assert_eq(kvh_tokenizer_load_mem(&tok, vocab, vlen, merges, mlen, "fixture", &err), -1,
                 "expected failure containing \"%s\"", must1);
    cr_assert_null(tok);
    cr_assert(strstr(err.msg, must1), "message \"%s\" lacks \"%s\"", err.msg, must1);
    if (must2) cr_assert(strstr(err.msg, must2), "message \"%s\" lacks \"%s\"", err.msg, must2);
}

Test(tokenizer, corrupt_vocab_errors) {
    size_t mlen = 0, vlen = 0;
    char *m = embedded_merges(&mlen);
    char *v = embedded_vocab(&vlen);
    /* Truncated JSON: names the file and the line:column where parsing stopped. */
    expect_load_error(v, vlen / 2, m, mlen, "fixture (vocab.json):1:", "invalid JSON");
    const char *multi = "{\n\"a\": 0,\n\"b\": ,\n}";
    expect_load_error(multi, strlen(multi), m, mlen, "vocab.json):3:", "invalid JSON");
    static const struct {
        const char *json, *must1, *must2;
    } bad[] = {
        {"{\"a\": 0}\n x", "vocab.json):2:2:", "after the JSON object"},
        {"[1, 2]", "vocab.json", "JSON object"},
        {"{}", "vocab.json", "empty"},
        {"{\"a\": 0, \"b\": 0.5}", "key \"b\"", "integer"},
        {"{\"a\": 0, \"b\": \"1\"}", "key \"b\"", "integer"},
        {"{\"a\": 0, \"b\": 7}", "key \"b\"", "[0, 2)"},
        {"{\"a\": 0, \"b\": 0}", "key \"b\"", "id 0"},
        {"{\"a\": 0, \"a\": 1}", "key \"a\"", "twice"},
        {"{\"a\": 0, \"\\u4e2d\": 1}", "U+4E2D", "byte alphabet"},
        {"{\"a\": 0, \"b\": 1}", "vocab.json", "single byte 0x00"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_load_error(bad[i].json, strlen(bad[i].json), m, mlen, bad[i].must1, bad[i].must2);

    /* The real vocab with one id broken. */
    char *v2 = malloc(vlen + 1);
    memcpy(v2, v, vlen + 1);
    char *p = strstr(v2, "\"hello\": ");
    cr_assert_not_null(p);
    p[9] = 'x';
    expect_load_error(v2, vlen, m, mlen, "vocab.json", NULL);
    free(v2);

    /* A corrupt file on disk: the message names the path and line. */
    kvh_err err = {{0}};
    kvh_tokenizer *tok = NULL;
    char path[] = "/tmp/kvh_tok_vocab_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, multi, strlen(multi)), (ssize_t)strlen(multi));
    close(fd);
    int rc = kvh_tokenizer_load(&tok, path, ASSET_MERGES, &err);
    unlink(path);
    cr_assert_eq(rc, -1);
    char want[64];
    snprintf(want, sizeof want, "%s:3:", path);
    cr_assert(strstr(err.msg, want), "message \"%s\" lacks \"%s\"", err.msg, want);

    /* Missing files name the path. */
    cr_assert_eq(kvh_tokenizer_load(&tok, "/nonexistent/vocab.json", ASSET_MERGES, &err), -1);
    cr_assert(strstr(err.msg, "/nonexistent/vocab.json"), "%s", err.msg);
    cr_assert_eq(kvh_tokenizer_load(&tok, ASSET_VOCAB, "/nonexistent/merges.txt", &err), -1);
    cr_assert(strstr(err.msg, "/nonexistent/merges.txt"), "%s", err.msg);
    free(m);
    free(v);
}

/* Replaces line `line` (1-based) of text with repl; returns a malloc'd copy. */
static char *replace_line(const char *text, size_t len, int line, const char *repl, size_t *out_len) {
    const char *s = text;
    for (int l = 1; l < line; l++) s = strchr(s, '\n') + 1;
    const char *e = strchr(s, '\n');
    size_t pre = (size_t)(s - text), post = len - (size_t)(e - text), rl = strlen(repl);
    char *out = malloc(pre + rl + post + 1);
    memcpy(out, text, pre);
    memcpy(out + pre, repl, rl);
    memcpy(out + pre + rl, e, post);
    out[pre + rl + post] = '\0';
    *out_len = pre + rl + post;
    return out;
}

Test(tokenizer, corrupt_merges_errors) {
    size_t mlen = 0, vlen = 0;
    char *m = embedded_merges(&mlen);
    char *v = embedded_vocab(&vlen);
    static const struct {
        int line;
        const char *repl, *must1, *must2;
    } cases[] = {
        {3, "\xc4\xa0\xc4\xa0t", "fixture (merges.txt):3:", "two tokens"},
        {5, "a  b", "merges.txt):5:", "two tokens"},
        {7, "a b c", "merges.txt):7:", "two tokens"},
        {9, "zzqqzzqq t", "merges.txt):9:", "\"zzqqzzqq\" is not in the vocabulary"},
        {11, "t zzqqzzqq", "merges.txt):11:", "\"zzqqzzqq\""},
        {13, "zz qq", "merges.txt):13:", "merged token \"zzqq\""},
        {40000, "\xc4\xa0 t", "merges.txt):40000:", "repeats the merge of rank 0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len = 0;
        char *bad = replace_line(m, mlen, cases[i].line, cases[i].repl, &len);
        expect_load_error(v, vlen, bad, len, cases[i].must1, cases[i].must2);
        free(bad);
    }
    free(m);
    free(v);
}
