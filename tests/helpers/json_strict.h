/* json_strict.h — a strict RFC 8259 JSON checker for tests and fuzz harnesses: exactly one value
 * (surrounding whitespace allowed), strings of well-formed UTF-8 without raw control characters,
 * escapes from the RFC's list only, \u surrogates in pairs, RFC number syntax, nesting <= 512.
 * Independent of cJSON (which is lenient), so it can judge what kvhost writes. */
#ifndef KVH_JSON_STRICT_H
#define KVH_JSON_STRICT_H

#include <stddef.h>

/* 0 when s[0..n) is one strict JSON value; else -1 with *bad_at (may be NULL) the offset where it
 * stopped being valid. */
int kvh_json_strict_check(const char *s, size_t n, size_t *bad_at);

#endif
