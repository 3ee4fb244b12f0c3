/* test_parse_memory.c — Criterion suite: parsing memory is bounded by the input's size (issue 14, defect 4).
 * Each case runs the parser in a forked child whose address space (RLIMIT_AS) is limited to what it had
 * plus a small multiple of the input; a parser that builds a tree of the whole input (the old cJSON path:
 * 4.2 GB for a 99.8 MB safetensors header, 5 GB for a 120 MB vocab.json) dies or reports garbage there.
 * Inputs: a safetensors header whose __metadata__ is a 50M-element array, one that is a valid but huge
 * string map, a header of a million tiny tensors; a vocab.json that is a 120 MB array, one with more
 * than 2^24 entries, one with millions of valid entries. And when memory really runs out, the message
 * says "out of memory", not "invalid JSON".
 * Skipped under AddressSanitizer, whose shadow memory does not work under RLIMIT_AS. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "util/sanitizer.h"
#include "util/util.h"

#ifdef KVH_ASAN
#define SKIP_UNDER_ASAN() cr_skip_test("RLIMIT_AS cannot be combined with AddressSanitizer's shadow memory")
#else
#define SKIP_UNDER_ASAN() (void)0
#endif

static size_t vm_size_bytes(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmSize:", 7) == 0) kb = strtoull(line + 7, NULL, 10);
    if (f) fclose(f);
    return kb * 1024;
}

typedef int (*parse_fn)(const char *buf, size_t len, kvh_err *err);

/* Runs fn(buf, len) in a child limited to its current address space + extra bytes. Returns the child's
 * status: 0 parsed, 1 refused (message in msg), 99 killed or crashed. */
static int run_limited(parse_fn fn, const char *buf, size_t len, size_t extra, char *msg, size_t cap) {
    int p[2];
    cr_assert_eq(pipe(p), 0);
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        close(p[0]);
        struct rlimit rl = {.rlim_cur = vm_size_bytes() + extra, .rlim_max = RLIM_INFINITY};
        setrlimit(RLIMIT_AS, &rl);
        kvh_err err = {{0}};
        int rc = fn(buf, len, &err);
        if (write(p[1], err.msg, strlen(err.msg)) < 0) _exit(98);
        _exit(rc == 0 ? 0 : 1);
    }
    close(p[1]);
    size_t got = 0;
    ssize_t r;
    while (got + 1 < cap && (r = read(p[0], msg + got, cap - 1 - got)) > 0) got += (size_t)r;
    msg[got] = '\0';
    close(p[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 99;
}

static int parse_st(const char *buf, size_t len, kvh_err *err) {
    kvh_safetensors st;
    int rc = kvh_st_parse(&st, buf, len, "crafted.safetensors", err);
    if (rc == 0) kvh_st_close(&st);
    return rc;
}

static int parse_vocab(const char *buf, size_t len, kvh_err *err) {
    kvh_tokenizer *tok = NULL;
    static const char merges[] = "#version: 0.2\n";
    int rc = kvh_tokenizer_load_mem(&tok, buf, len, merges, sizeof merges - 1, "crafted", err);
    kvh_tokenizer_free(tok);
    return rc;
}

/* A safetensors buffer: 8-byte length + header text (+ no data). */
static char *st_buf(const char *header, size_t hlen, size_t *len) {
    char *b = malloc(8 + hlen);
    cr_assert_not_null(b);
    for (int i = 0; i < 8; i++) b[i] = (char)((uint64_t)hlen >> (8 * i));
    memcpy(b + 8, header, hlen);
    *len = 8 + hlen;
    return b;
}

/* Appends s (n bytes) to a growing buffer. */
typedef struct sbuf {
    char *p;
    size_t n, cap;
} sbuf;
static void put(sbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        cr_assert_not_null(b->p);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}
#define PUTS(b, s) put(b, s, strlen(s))

static const size_t MB = 1u << 20;

Test(parse_memory, safetensors_metadata_array, .timeout = 120) {
    SKIP_UNDER_ASAN();
    /* 99.8 MB: {"__metadata__": [0,0,...(50M)], "w": {...}} */
    sbuf h = {0};
    PUTS(&h, "{\"__metadata__\": [0");
    size_t n = 49900000;
    char *zeros = malloc(2 * n);
    for (size_t i = 0; i < n; i++) zeros[2 * i] = ',', zeros[2 * i + 1] = '0';
    put(&h, zeros, 2 * n);
    free(zeros);
    PUTS(&h, "], \"w\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}}");
    size_t len;
    char *b = st_buf(h.p, h.n, &len);
    free(h.p);
    char msg[1024];
    int rc = run_limited(parse_st, b, len, 64 * MB, msg, sizeof msg);
    free(b);
    cr_assert_eq(rc, 1, "status %d (99 = died under the memory limit), message: %s", rc, msg);
    cr_assert(strstr(msg, "__metadata__") && strstr(msg, "strings to strings"), "message: %s", msg);
    cr_assert_null(strstr(msg, "not valid JSON"), "reported as invalid JSON: %s", msg);
}

Test(parse_memory, safetensors_huge_valid_metadata, .timeout = 120) {
    SKIP_UNDER_ASAN();
    /* 90 MB of string -> string metadata is valid: accepted without building a tree of it */
    sbuf h = {0};
    PUTS(&h, "{\"__metadata__\": {\"format\": \"pt\"");
    char item[64];
    for (int i = 0; h.n < 90 * MB; i++) {
        int k = snprintf(item, sizeof item, ", \"k%d\": \"v\"", i);
        put(&h, item, (size_t)k);
    }
    PUTS(&h, "}, \"w\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [0, 0]}}");
    size_t len;
    char *b = st_buf(h.p, h.n, &len);
    free(h.p);
    char msg[1024];
    int rc = run_limited(parse_st, b, len, 64 * MB, msg, sizeof msg);
    free(b);
    cr_assert_eq(rc, 0, "status %d, message: %s", rc, msg);
}

Test(parse_memory, safetensors_million_tensors, .timeout = 120) {
    SKIP_UNDER_ASAN();
    /* ~60 MB header of 1M empty tensors: the tensor table is the only thing that grows (~4x) */
    sbuf h = {0};
    PUTS(&h, "{");
    char item[128];
    for (int i = 0; i < 1000000; i++) {
        int k = snprintf(item, sizeof item, "%s\"t%d\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}",
                         i ? "," : "", i);
        put(&h, item, (size_t)k);
    }
    PUTS(&h, "}");
    size_t len;
    char *b = st_buf(h.p, h.n, &len);
    size_t hn = h.n;
    free(h.p);
    char msg[1024];
    int rc = run_limited(parse_st, b, len, 5 * hn + 64 * MB, msg, sizeof msg);
    cr_assert_eq(rc, 0, "status %d (99 = died under a limit of 5x the %zu-byte header), message: %s", rc, hn, msg);
    /* the same input with room for little more than itself: an allocation fails, and says so */
    rc = run_limited(parse_st, b, len, 4 * MB, msg, sizeof msg);
    free(b);
    cr_assert_eq(rc, 1, "status %d, message: %s", rc, msg);
    cr_assert(strstr(msg, "out of memory"), "allocation failure not reported as such: %s", msg);
}

Test(parse_memory, vocab_array_and_too_many_entries, .timeout = 120) {
    SKIP_UNDER_ASAN();
    /* 120 MB that is a JSON array */
    size_t n = 60 * MB;
    char *a = malloc(2 * n + 2);
    a[0] = '[';
    for (size_t i = 0; i < n; i++) a[1 + 2 * i] = '0', a[2 + 2 * i] = ',';
    a[2 * n] = ']';
    char msg[1024];
    int rc = run_limited(parse_vocab, a, 2 * n + 1, 64 * MB, msg, sizeof msg);
    free(a);
    cr_assert_eq(rc, 1, "status %d, message: %s", rc, msg);
    cr_assert(strstr(msg, "top level must be a JSON object") && strstr(msg, "array"), "message: %s", msg);
    /* more entries than the tokenizer supports: refused while counting, before any allocation */
    sbuf v = {0};
    PUTS(&v, "{");
    for (size_t i = 0; i < (1u << 24) + 10; i++) put(&v, i ? ",\"a\":0" : "\"a\":0", i ? 6 : 5);
    PUTS(&v, "}");
    rc = run_limited(parse_vocab, v.p, v.n, 64 * MB, msg, sizeof msg);
    free(v.p);
    cr_assert_eq(rc, 1, "status %d, message: %s", rc, msg);
    cr_assert(strstr(msg, "2^24"), "message: %s", msg);
}

/* A valid vocab.json: the 256 byte tokens (as the fixture tokenizer) then n distinct 6-letter words. */
static char *big_vocab(size_t n_words, size_t *len) {
    sbuf v = {0};
    PUTS(&v, "{");
    char item[64];
    int id = 0;
    /* bytes: use \u escapes of the GPT-2 byte alphabet (code points 0x21.. and 0x100..) */
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        unsigned cp = printable ? (unsigned)b : 256u + (unsigned)extra++;
        int k = snprintf(item, sizeof item, "%s\"\\u%04x\": %d", id ? ", " : "", cp, id);
        put(&v, item, (size_t)k);
        id++;
    }
    for (size_t w = 0; w < n_words; w++) {
        char word[8];
        size_t x = w;
        for (int c = 0; c < 6; c++) {
            word[c] = (char)('a' + x % 26);
            x /= 26;
        }
        word[6] = '\0';
        int k = snprintf(item, sizeof item, ", \"%s\": %d", word, id++);
        put(&v, item, (size_t)k);
    }
    PUTS(&v, "}");
    *len = v.n;
    return v.p;
}

Test(parse_memory, vocab_millions_of_entries, .timeout = 120) {
    SKIP_UNDER_ASAN();
    size_t len;
    char *v = big_vocab(4000000, &len); /* ~68 MB */
    char msg[1024];
    int rc = run_limited(parse_vocab, v, len, 5 * len + 64 * MB, msg, sizeof msg);
    cr_assert_eq(rc, 0, "status %d (99 = died under a limit of 5x the %zu-byte file), message: %s", rc, len, msg);
    rc = run_limited(parse_vocab, v, len, 8 * MB, msg, sizeof msg);
    free(v);
    cr_assert_eq(rc, 1, "status %d, message: %s", rc, msg);
    cr_assert(strstr(msg, "out of memory"), "allocation failure not reported as such: %s", msg);
    cr_assert_null(strstr(msg, "invalid JSON"), "%s", msg);
}
