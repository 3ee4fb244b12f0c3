/* utf8.c — implementation of utf8.h. */
#include "util/utf8.h"

#include <stdlib.h>
#include <string.h>

size_t kvh_utf8_scan(const char *s, size_t n, int *valid) {
    const unsigned char *u = (const unsigned char *)s;
    const unsigned c = u[0];
    *valid = 0;
    if (c < 0x80) {
        *valid = 1;
        return 1;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xBF; /* range of the second byte; later bytes are always 80..BF */
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;      /* no overlong forms */
        else if (c == 0xED) hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;      /* no overlong forms */
        else if (c == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        return 1; /* 80..C1, F5..FF never start a sequence */
    }
    for (size_t i = 1; i < len; i++) {
        if (i >= n) return i; /* truncated: the bytes so far are one ill-formed subpart */
        const unsigned b = u[i];
        if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) return i;
    }
    *valid = 1;
    return len;
}

int kvh_utf8_valid(const char *s, size_t n, size_t *bad_at) {
    size_t i = 0;
    while (i < n) {
        int ok;
        size_t k = kvh_utf8_scan(s + i, n - i, &ok);
        if (!ok) {
            if (bad_at) *bad_at = i;
            return 0;
        }
        i += k;
    }
    return 1;
}

char *kvh_utf8_repair(const char *s, size_t n, size_t *out_len) {
    /* each replaced subpart is >= 1 byte and becomes 3: the result is at most 3n bytes */
    if (n > ((size_t)-1 - 1) / 3) return NULL;
    char *out = malloc(3 * n + 1);
    if (!out) return NULL;
    size_t i = 0, o = 0;
    while (i < n) {
        int ok;
        size_t k = kvh_utf8_scan(s + i, n - i, &ok);
        if (ok) {
            memcpy(out + o, s + i, k);
            o += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
        }
        i += k;
    }
    out[o] = '\0';
    if (out_len) *out_len = o;
    return out;
}
