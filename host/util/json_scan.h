/* json_scan.h — validating JSON lexing without building a tree, for inputs whose size is hostile.
 * Owns: skipping whitespace, validating and decoding strings (all escapes, surrogate pairs), validating
 * numbers, skipping a whole value with a nesting limit, and finding a duplicate key in a cJSON object.
 * Does not own: what any document means (safetensors.c walks a header entry by entry, tokenizer.c reads
 * vocab.json straight into its tables). Why: cJSON spends ~80 bytes per value, so a 100 MB text of small
 * values (a 50M-element array) becomes gigabytes of tree; these helpers let a loader refuse a wrong shape
 * before anything is allocated and keep memory proportional to the input.
 * Strictness is RFC 8259's (what Python's json and Rust's serde_json accept): no raw control characters
 * in strings, no lone surrogates, no leading zeros, no trailing commas. */
#ifndef KVH_JSON_SCAN_H
#define KVH_JSON_SCAN_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* A scan position in s[0..len) and, after a failure, what was wrong at `at`. */
typedef struct kvh_json_scan {
    const char *s;
    size_t len;
    size_t at;
    const char *error; /* static text, NULL while no error */
} kvh_json_scan;

/* Advances past JSON whitespace (space, tab, CR, LF). */
void kvh_json_ws(kvh_json_scan *j);

/* s[at] must be '"'. Validates the string and advances past its closing quote. When out is not NULL the
 * decoded UTF-8 bytes are written there (at most the raw length in bytes, never more) and their count to
 * *out_len. Returns 0, or -1 with j->error set and j->at at the offending byte. */
int kvh_json_string(kvh_json_scan *j, char *out, size_t *out_len);

/* Validates a number at s[at] and advances past it. Returns 0 or -1. */
int kvh_json_number(kvh_json_scan *j);

/* Validates one value of any kind at s[at] (whitespace before it skipped) and advances past it; objects
 * and arrays may nest at most max_depth (<= 64) levels (a scalar is depth 0). *n_values (if not NULL) is
 * increased by the number of values seen, containers included. Returns 0 or -1. */
int kvh_json_skip_value(kvh_json_scan *j, int max_depth, size_t *n_values);

/* Sets *dup to the first key (in sorted order) of `obj` that appears more than once among its direct
 * members, or NULL. cJSON keeps every member of a repeated key and its lookups return the first one.
 * Returns 0, or -1 when out of memory. */
int kvh_json_duplicate_key(const cJSON *obj, const char **dup);

#endif
