/* utf8.h — UTF-8 validity, and repair of text bound for JSON records.
 * Owns: the well-formedness rule (Unicode table 3-7: no overlong forms, no surrogates, nothing above
 * U+10FFFF) and the repair rule: each maximal ill-formed subsequence becomes one U+FFFD, exactly as
 * Python's bytes.decode("utf-8", "replace") does, so a repaired record reads back the same in Python.
 * Does not own: JSON escaping (cJSON) or where text comes from. */
#ifndef KVH_UTF8_H
#define KVH_UTF8_H

#include <stddef.h>

/* Bytes of the sequence starting at s[0] (n > 0 bytes available): its length when *valid is set to 1,
 * else the length of the maximal ill-formed subpart to replace (>= 1). */
size_t kvh_utf8_scan(const char *s, size_t n, int *valid);

/* 1 when s[0..n) is well-formed UTF-8; else 0 with *bad_at (may be NULL) the offset of the first
 * ill-formed byte. */
int kvh_utf8_valid(const char *s, size_t n, size_t *bad_at);

/* s[0..n) with each maximal ill-formed subsequence replaced by U+FFFD (EF BF BD): a malloc'd,
 * NUL-terminated copy (free it), its length in *out_len. NULL when out of memory. */
char *kvh_utf8_repair(const char *s, size_t n, size_t *out_len);

#endif
