/* json_scan.c — implementation of json_scan.h. Iterative (an explicit stack of container kinds, at most
 * 64 deep), so hostile nesting cannot exhaust the C stack. */
#include "util/json_scan.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_DEPTH = 64 };

static int fail(kvh_json_scan *j, const char *what) {
    j->error = what;
    return -1;
}

void kvh_json_ws(kvh_json_scan *j) {
    while (j->at < j->len) {
        char c = j->s[j->at];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        j->at++;
    }
}

static int hex4(const char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* Writes code point cp as UTF-8 to out (if not NULL) at *n. */
static void put_utf8(char *out, size_t *n, unsigned cp) {
    unsigned char b[4];
    int k;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        k = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | (cp >> 6));
        b[1] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | (cp >> 12));
        b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | (cp >> 18));
        b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    if (out) memcpy(out + *n, b, (size_t)k);
    *n += (size_t)k;
}

int kvh_json_string(kvh_json_scan *j, char *out, size_t *out_len) {
    if (j->at >= j->len || j->s[j->at] != '"') return fail(j, "expected a string");
    size_t i = j->at + 1, n = 0;
    for (;;) {
        if (i >= j->len) {
            j->at = i;
            return fail(j, "unterminated string");
        }
        unsigned char c = (unsigned char)j->s[i];
        if (c == '"') break;
        if (c < 0x20) {
            j->at = i;
            return fail(j, "raw control character in a string (must be escaped)");
        }
        if (c != '\\') {
            if (out) out[n] = (char)c;
            n++;
            i++;
            continue;
        }
        if (i + 1 >= j->len) {
            j->at = i;
            return fail(j, "unterminated escape in a string");
        }
        char e = j->s[i + 1];
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e != '\0' && simple) {
            static const char decoded[] = "\"\\/\b\f\n\r\t";
            if (out) out[n] = decoded[simple - "\"\\/bfnrt"];
            n++;
            i += 2;
            continue;
        }
        if (e != 'u') {
            j->at = i;
            return fail(j, "invalid escape in a string");
        }
        unsigned cp;
        if (i + 6 > j->len || hex4(j->s + i + 2, &cp) != 0) {
            j->at = i;
            return fail(j, "invalid \\u escape in a string");
        }
        size_t used = 6;
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            j->at = i;
            return fail(j, "lone low surrogate in a \\u escape");
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            unsigned lo;
            if (i + 12 > j->len || j->s[i + 6] != '\\' || j->s[i + 7] != 'u' || hex4(j->s + i + 8, &lo) != 0 ||
                lo < 0xDC00 || lo > 0xDFFF) {
                j->at = i;
                return fail(j, "high surrogate without its low surrogate in a \\u escape");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            used = 12;
        }
        /* the UTF-8 form (<= 4 bytes) is never longer than its escape (6 or 12 bytes) */
        put_utf8(out, &n, cp);
        i += used;
    }
    j->at = i + 1;
    if (out_len) *out_len = n;
    return 0;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

int kvh_json_number(kvh_json_scan *j) {
    size_t i = j->at;
    const char *s = j->s;
    if (i < j->len && s[i] == '-') i++;
    if (i >= j->len || !is_digit(s[i])) return fail(j, "invalid number");
    if (s[i] == '0') {
        i++;
        if (i < j->len && is_digit(s[i])) {
            j->at = i;
            return fail(j, "number with a leading zero");
        }
    } else {
        while (i < j->len && is_digit(s[i])) i++;
    }
    if (i < j->len && s[i] == '.') {
        i++;
        if (i >= j->len || !is_digit(s[i])) {
            j->at = i;
            return fail(j, "invalid number: no digit after '.'");
        }
        while (i < j->len && is_digit(s[i])) i++;
    }
    if (i < j->len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < j->len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= j->len || !is_digit(s[i])) {
            j->at = i;
            return fail(j, "invalid number: no digit in the exponent");
        }
        while (i < j->len && is_digit(s[i])) i++;
    }
    j->at = i;
    return 0;
}

static int literal(kvh_json_scan *j, const char *word) {
    size_t n = strlen(word);
    if (j->len - j->at < n || memcmp(j->s + j->at, word, n) != 0) return fail(j, "invalid value");
    j->at += n;
    return 0;
}

/* One scalar at s[at]; '{' and '[' are the caller's. */
static int scalar(kvh_json_scan *j) {
    char c = j->s[j->at];
    if (c == '"') return kvh_json_string(j, NULL, NULL);
    if (c == 't') return literal(j, "true");
    if (c == 'f') return literal(j, "false");
    if (c == 'n') return literal(j, "null");
    return kvh_json_number(j);
}

int kvh_json_skip_value(kvh_json_scan *j, int max_depth, size_t *n_values) {
    char stack[MAX_DEPTH]; /* '{' or '[' per open container */
    int depth = 0;
    if (max_depth > MAX_DEPTH) max_depth = MAX_DEPTH;
    size_t count = 0;
    for (;;) {
        /* here a value is expected */
        kvh_json_ws(j);
        if (j->at >= j->len) return fail(j, "unexpected end of text (a value was expected)");
        char c = j->s[j->at];
        count++;
        if (c == '{' || c == '[') {
            if (depth >= max_depth) return fail(j, "nested too deeply");
            stack[depth++] = c;
            j->at++;
            kvh_json_ws(j);
            char close = c == '{' ? '}' : ']';
            if (j->at < j->len && j->s[j->at] == close) {
                j->at++;
                depth--;
            } else if (c == '{') {
                if (j->at >= j->len || j->s[j->at] != '"') return fail(j, "expected a key string or '}'");
                if (kvh_json_string(j, NULL, NULL) != 0) return -1;
                kvh_json_ws(j);
                if (j->at >= j->len || j->s[j->at] != ':') return fail(j, "expected ':' after a key");
                j->at++;
                continue; /* the member's value */
            } else {
                continue; /* the first element */
            }
        } else if (scalar(j) != 0) {
            return -1;
        }
        /* a value ended: close containers or move to the next member / element */
        for (;;) {
            if (depth == 0) {
                if (n_values) *n_values += count;
                return 0;
            }
            kvh_json_ws(j);
            if (j->at >= j->len) return fail(j, "unexpected end of text (',' or a closing bracket was expected)");
            char d = j->s[j->at];
            char open = stack[depth - 1];
            if (d == (open == '{' ? '}' : ']')) {
                j->at++;
                depth--;
                continue;
            }
            if (d != ',') return fail(j, open == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
            j->at++;
            if (open == '{') {
                kvh_json_ws(j);
                if (j->at >= j->len || j->s[j->at] != '"') return fail(j, "expected a key string after ','");
                if (kvh_json_string(j, NULL, NULL) != 0) return -1;
                kvh_json_ws(j);
                if (j->at >= j->len || j->s[j->at] != ':') return fail(j, "expected ':' after a key");
                j->at++;
            }
            break; /* the next value */
        }
    }
}

static int key_cmp(const void *a, const void *b) {
    const char *x = *(const char *const *)a, *y = *(const char *const *)b;
    return strcmp(x, y);
}

int kvh_json_duplicate_key(const cJSON *obj, const char **dup_out) {
    *dup_out = NULL;
    size_t n = 0;
    for (const cJSON *it = obj ? obj->child : NULL; it; it = it->next) n++;
    if (n < 2) return 0;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys) return -1;
    size_t k = 0;
    for (const cJSON *it = obj->child; it; it = it->next) keys[k++] = it->string ? it->string : "";
    qsort(keys, n, sizeof *keys, key_cmp);
    const char *dup = NULL;
    for (size_t i = 1; i < n && !dup; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0) dup = keys[i];
    free(keys);
    *dup_out = dup;
    return 0;
}
