/* test_util.h — helpers shared by the Criterion suites: numeric comparison with a readable report,
 * locating ../shared, and a scratch directory per test process. */
#ifndef KVH_TEST_UTIL_H
#define KVH_TEST_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/session.h"

/* Compares a and b element-wise. Returns the max |a-b|; when it exceeds tol, prints the first few
 * mismatches (index, a, b, diff) with `what` to stderr so a failing assertion explains itself. */
double kvh_test_compare(const char *what, const float *a, const float *b, size_t n, double tol);

/* The same short script on two sessions of one model shape (vocabulary V): a prefill of two fixed prompts
 * (13 and 10 tokens, sequences 0 and 1, one batch), then `steps` decode steps, batch 2 for the first three
 * and batch 1 after. Asserts each step's logits agree within tol_prefill / tol_decode (a tolerance of 0
 * means bit for bit) and returns the largest difference seen. */
double kvh_test_compare_sessions(kvh_session *a, kvh_session *b, int V, double tol_prefill, double tol_decode, int steps,
                                 const char *what);

/* One xorshift64 step (shifts 13, 7, 17) of *state, returning the new state: the suites' deterministic
 * random numbers (each suite keeps its own state and seed, so its sequence is fixed). */
static inline uint64_t kvh_test_xorshift(uint64_t *state) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* Creates a session whose run configuration is `plugins` (a --plugins list, or NULL for none) plus the
 * --set strings sets[0..n_sets-1], with options o. A configuration error fails the calling test (it is
 * the test's own mistake); the session's status is returned (0, or -1 with *err filled), so tests of
 * refused sessions can check the message. */
int kvh_test_session(kvh_session **out, const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                     const kvh_session_options *o, kvh_err *err);

/* The same with the run configuration read from an INI text (named "test.ini" in its errors). */
int kvh_test_session_ini(kvh_session **out, const kvh_model *m, const char *ini, const kvh_session_options *o,
                         kvh_err *err);

/* A session that must open (any error fails the calling test): run configuration from the INI text `ini`
 * when given, else the --plugins list `plugins` (NULL: none); n_seq sequences on `threads` threads. */
kvh_session *kvh_test_open_session(const kvh_model *m, const char *plugins, const char *ini, int n_seq, int threads);

/* Path of the tiny model directory, or NULL (with the reason printed) when ../shared is absent. */
const char *kvh_test_tiny_model_dir(void);
/* Path of a file under ../shared (static buffer), or NULL when it does not exist. */
const char *kvh_test_shared_path(const char *rel);

/* Reads `path` (at most 64 MiB) and parses its first n JSON values into recs[0..n-1] (the caller
 * cJSON_Delete's them): JSON Lines records, or one document over several lines. Fails the calling test
 * if the file cannot be read or holds fewer than n values. */
void kvh_test_read_json(const char *path, struct cJSON **recs, int n);

/* Runs `kvhost generate` in-process with argv (NULL-terminated, argv[0] = "generate", and it must write
 * --json json_path), its stdout silenced; fails the calling test unless it exits 0 and json_path holds
 * one JSON record, which is returned (the caller cJSON_Delete's it). json_path is removed first. */
struct cJSON *kvh_test_generate_record(const char *const *argv, const char *json_path);

/* A fresh scratch directory for this process (created on first use, under /tmp). */
const char *kvh_test_tmpdir(void);
/* Writes len bytes to tmpdir/name and returns the full path (static buffer per call site: copy it). */
const char *kvh_test_write_file(const char *name, const void *data, size_t len);

#endif
