/* json_strict.c — implementation of json_strict.h: a recursive-descent checker (no tree is built). */
#include "json_strict.h"

#include <string.h>

typedef struct cur {
    const unsigned char *s;
    size_t n, i;
    int depth;
} cur;

static void ws(cur *c) {
    while (c->i < c->n && (c->s[c->i] == ' ' || c->s[c->i] == '\t' || c->s[c->i] == '\n' || c->s[c->i] == '\r'))
        c->i++;
}

static int lit(cur *c, const char *word) {
    size_t k = strlen(word);
    if (c->n - c->i < k || memcmp(c->s + c->i, word, k) != 0) return -1;
    c->i += k;
    return 0;
}

static int digits(cur *c) {
    size_t start = c->i;
    while (c->i < c->n && c->s[c->i] >= '0' && c->s[c->i] <= '9') c->i++;
    return c->i > start ? 0 : -1;
}

static int number(cur *c) {
    if (c->i < c->n && c->s[c->i] == '-') c->i++;
    if (c->i < c->n && c->s[c->i] == '0') c->i++;
    else if (c->i < c->n && c->s[c->i] >= '1' && c->s[c->i] <= '9') digits(c);
    else return -1;
    if (c->i < c->n && c->s[c->i] == '.') {
        c->i++;
        if (digits(c)) return -1;
    }
    if (c->i < c->n && (c->s[c->i] == 'e' || c->s[c->i] == 'E')) {
        c->i++;
        if (c->i < c->n && (c->s[c->i] == '+' || c->s[c->i] == '-')) c->i++;
        if (digits(c)) return -1;
    }
    return 0;
}

static int hex4(cur *c, unsigned *v) {
    if (c->n - c->i < 4) return -1;
    *v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned char h = c->s[c->i++];
        unsigned d = h >= '0' && h <= '9'   ? (unsigned)(h - '0')
                     : h >= 'a' && h <= 'f' ? (unsigned)(h - 'a') + 10u
                     : h >= 'A' && h <= 'F' ? (unsigned)(h - 'A') + 10u
                                            : 99u;
        if (d > 15) return -1;
        *v = *v * 16 + d;
    }
    return 0;
}

/* One UTF-8 sequence (Unicode table 3-7), written out independently of host/util/utf8.c. */
static int utf8_seq(cur *c) {
    const unsigned char *u = c->s + c->i;
    size_t left = c->n - c->i;
    unsigned b0 = u[0], len, lo = 0x80, hi = 0xBF;
    if (b0 < 0x80) len = 1;
    else if (b0 >= 0xC2 && b0 <= 0xDF) len = 2;
    else if (b0 == 0xE0) len = 3, lo = 0xA0;
    else if (b0 == 0xED) len = 3, hi = 0x9F;
    else if (b0 >= 0xE1 && b0 <= 0xEF) len = 3;
    else if (b0 == 0xF0) len = 4, lo = 0x90;
    else if (b0 == 0xF4) len = 4, hi = 0x8F;
    else if (b0 >= 0xF1 && b0 <= 0xF3) len = 4;
    else return -1;
    if (left < len) return -1;
    for (unsigned k = 1; k < len; k++) {
        unsigned lo_k = k == 1 ? lo : 0x80, hi_k = k == 1 ? hi : 0xBF;
        if (u[k] < lo_k || u[k] > hi_k) return -1;
    }
    c->i += len;
    return 0;
}

static int string(cur *c) {
    if (c->i >= c->n || c->s[c->i] != '"') return -1;
    c->i++;
    for (;;) {
        if (c->i >= c->n) return -1;
        unsigned char ch = c->s[c->i];
        if (ch == '"') {
            c->i++;
            return 0;
        }
        if (ch < 0x20) return -1;
        if (ch != '\\') {
            if (utf8_seq(c)) return -1;
            continue;
        }
        c->i++;
        if (c->i >= c->n) return -1;
        ch = c->s[c->i++];
        if (strchr("\"\\/bfnrt", ch) && ch) continue;
        if (ch != 'u') return -1;
        unsigned v;
        if (hex4(c, &v)) return -1;
        if (v >= 0xDC00 && v <= 0xDFFF) return -1; /* a low surrogate alone */
        if (v >= 0xD800 && v <= 0xDBFF) {          /* a high surrogate needs its low one */
            if (c->n - c->i < 2 || c->s[c->i] != '\\' || c->s[c->i + 1] != 'u') return -1;
            c->i += 2;
            if (hex4(c, &v) || v < 0xDC00 || v > 0xDFFF) return -1;
        }
    }
}

static int value(cur *c);

static int members(cur *c, int object) {
    c->i++; /* [ or { */
    if (++c->depth > 512) return -1;
    ws(c);
    if (c->i < c->n && c->s[c->i] == (object ? '}' : ']')) {
        c->i++;
        c->depth--;
        return 0;
    }
    for (;;) {
        if (object) {
            if (string(c)) return -1;
            ws(c);
            if (c->i >= c->n || c->s[c->i] != ':') return -1;
            c->i++;
        }
        if (value(c)) return -1;
        ws(c);
        if (c->i >= c->n) return -1;
        if (c->s[c->i] == ',') {
            c->i++;
            ws(c);
            continue;
        }
        if (c->s[c->i] != (object ? '}' : ']')) return -1;
        c->i++;
        c->depth--;
        return 0;
    }
}

static int value(cur *c) {
    ws(c);
    if (c->i >= c->n) return -1;
    switch (c->s[c->i]) {
    case '{': return members(c, 1);
    case '[': return members(c, 0);
    case '"': return string(c);
    case 't': return lit(c, "true");
    case 'f': return lit(c, "false");
    case 'n': return lit(c, "null");
    default: return number(c);
    }
}

int kvh_json_strict_check(const char *s, size_t n, size_t *bad_at) {
    cur c = {(const unsigned char *)s, n, 0, 0};
    int rc = value(&c);
    if (rc == 0) {
        ws(&c);
        if (c.i != n) rc = -1;
    }
    if (rc != 0 && bad_at) *bad_at = c.i;
    return rc;
}
