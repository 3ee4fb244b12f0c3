/* fuzz_jsonl.c — fuzz target for the JSON Lines record writer's text (kvh_jsonl_format, host/util/metrics.c).
 * Owns: building a record from arbitrary bytes — keys and string values of any bytes but NUL, nested
 * objects and arrays, numbers from raw 8-byte patterns (NaN, infinities, subnormals) — and checking
 * the line: exactly one '\n', at the end; strict RFC 8259 JSON (tests/helpers/json_strict.c, not
 * cJSON's lenient parser); well-formed UTF-8; every key and string reads back as its input with
 * ill-formed bytes replaced by U+FFFD (and unchanged when the input was well-formed); non-finite
 * numbers as null. Does not own the writer or the file side of appending (tests/test_metrics.c).
 *
 * Input: pieces separated by NUL bytes. Each piece's first byte picks an action (mod 8), the rest is
 * its text: 0-2 a string member (the next piece is its key), 3 a number member from up to 8 bytes,
 * 4 open an object member, 5 open an array member, 6 close the innermost container, 7 a bool. */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "helpers/json_strict.h"
#include "util/metrics.h"
#include "util/utf8.h"

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz_jsonl: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

#define MAX_DEPTH 32

/* What was put in, in document order, to compare with what comes back. */
typedef struct expect {
    char **texts; /* keys and string values, as given */
    int n, cap;
} expect;

static void remember(expect *e, const char *s) {
    if (e->n == e->cap) {
        e->cap = e->cap ? e->cap * 2 : 16;
        e->texts = realloc(e->texts, (size_t)e->cap * sizeof *e->texts);
        CHECK(e->texts);
    }
    e->texts[e->n] = strdup(s);
    CHECK(e->texts[e->n]);
    e->n++;
}

/* Adds item under key (objects) or at the end (arrays). */
static void put(cJSON *parent, const char *key, cJSON *item, expect *e) {
    CHECK(item);
    if (cJSON_IsArray(parent)) {
        cJSON_AddItemToArray(parent, item);
    } else {
        remember(e, key);
        cJSON_AddItemToObject(parent, key, item);
    }
}

/* Walks the parsed line in document order: every key and string, against the inputs. */
static void compare(const cJSON *node, const expect *e, int *at, int in_object) {
    for (const cJSON *c = node->child; c; c = c->next) {
        if (in_object) {
            CHECK(*at < e->n);
            const char *in = e->texts[(*at)++];
            size_t n;
            char *want = kvh_utf8_repair(in, strlen(in), &n);
            CHECK(want);
            CHECK(strcmp(c->string, want) == 0);
            if (kvh_utf8_valid(in, strlen(in), NULL)) CHECK(strcmp(c->string, in) == 0);
            free(want);
        }
        if (cJSON_IsString(c)) {
            CHECK(*at < e->n);
            const char *in = e->texts[(*at)++];
            size_t n;
            char *want = kvh_utf8_repair(in, strlen(in), &n);
            CHECK(want);
            CHECK(strcmp(c->valuestring, want) == 0);
            free(want);
        } else if (cJSON_IsNumber(c)) {
            CHECK(isfinite(c->valuedouble));
        } else if (cJSON_IsObject(c) || cJSON_IsArray(c)) {
            compare(c, e, at, cJSON_IsObject(c));
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cJSON *root = cJSON_CreateObject();
    CHECK(root);
    cJSON *stack[MAX_DEPTH] = {root};
    int depth = 0;
    expect e = {0};
    /* pieces: NUL-separated, copied so each is a C string */
    char *buf = malloc(size + 1);
    CHECK(buf);
    memcpy(buf, data, size);
    buf[size] = '\0';
    size_t i = 0;
    while (i <= size) {
        char *piece = buf + i;
        size_t len = strlen(piece);
        i += len + 1;
        if (len == 0) continue;
        unsigned op = (unsigned char)piece[0] % 8u;
        char *text = piece + 1;
        cJSON *top = stack[depth];
        const char *key = text; /* objects: the text keys the member; arrays ignore it */
        switch (op) {
        case 0:
        case 1:
        case 2: {
            /* a string member: this piece is the value, the next piece its key */
            const char *k = "";
            if (i <= size) {
                k = buf + i;
                i += strlen(k) + 1;
            }
            if (!cJSON_IsArray(top)) remember(&e, k);
            remember(&e, text);
            cJSON *s = cJSON_CreateString(text);
            CHECK(s);
            if (cJSON_IsArray(top)) cJSON_AddItemToArray(top, s);
            else cJSON_AddItemToObject(top, k, s);
            break;
        }
        case 3: {
            double v = 0;
            size_t k = len - 1 < sizeof v ? len - 1 : sizeof v;
            memcpy(&v, text, k);
            put(top, "", cJSON_CreateNumber(v), &e);
            break;
        }
        case 4:
        case 5:
            if (depth + 1 < MAX_DEPTH) {
                cJSON *c = op == 4 ? cJSON_CreateObject() : cJSON_CreateArray();
                put(top, key, c, &e);
                stack[++depth] = c;
            }
            break;
        case 6:
            if (depth > 0) depth--;
            break;
        default:
            put(top, key, cJSON_CreateBool(len % 2), &e);
            break;
        }
    }
    free(buf);

    size_t n = 0;
    char *line = kvh_jsonl_format(root, &n);
    CHECK(line);
    CHECK(n >= 3 && line[n - 1] == '\n');
    CHECK(memchr(line, '\n', n) == line + n - 1); /* one line */
    size_t bad = 0;
    if (kvh_json_strict_check(line, n - 1, &bad) != 0) {
        fprintf(stderr, "fuzz_jsonl: not strict JSON at byte %zu of %zu\n", bad, n - 1);
        abort();
    }
    CHECK(kvh_utf8_valid(line, n - 1, NULL));
    cJSON *back = cJSON_ParseWithLength(line, n - 1);
    CHECK(back && cJSON_IsObject(back));
    int at = 0;
    compare(back, &e, &at, 1);
    CHECK(at == e.n);
    cJSON_Delete(back);
    free(line);
    cJSON_Delete(root);
    for (int k = 0; k < e.n; k++) free(e.texts[k]);
    free(e.texts);
    return 0;
}
