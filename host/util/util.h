/* util.h — small shared helpers for the host: error reporting, timing, file reading, memory figures.
 * Owns: kvh_err (the caller-owned error message every library function fills), monotonic clock,
 * whole-file reading with a size limit, peak-RSS reading. Owns nothing model- or plugin-specific. */
#ifndef KVH_UTIL_H
#define KVH_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Every fallible host function takes a kvh_err* and returns 0 on success, -1 on failure with
 * err->msg filled ("what was wrong and where"). err may be NULL when the caller does not care. */
typedef struct kvh_err {
    char msg[1024];
} kvh_err;

#if defined(__GNUC__)
#define KVH_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define KVH_PRINTF(a, b)
#endif

/* Fills err->msg (printf-style) and returns -1, so callers can write `return kvh_fail(err, ...)`. */
int kvh_fail(kvh_err *err, const char *fmt, ...) KVH_PRINTF(2, 3);
/* Prefixes an existing message: "context: <old message>". Returns -1. */
int kvh_fail_prefix(kvh_err *err, const char *fmt, ...) KVH_PRINTF(2, 3);

/* Monotonic time in nanoseconds / milliseconds. */
uint64_t kvh_now_ns(void);
double kvh_now_ms(void);

/* Reads a whole regular file into a NUL-terminated malloc'd buffer: for structured inputs (config.json,
 * vocab.json, merges.txt, INI run files). Fails (naming the path) when the file is missing, unreadable,
 * not a regular file (a FIFO, device or directory: opened non-blocking, so a FIFO without a writer does
 * not hang the open) or larger than max_bytes. */
int kvh_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err);

/* Reads a text input (prompt or evaluation text) into a NUL-terminated malloc'd buffer. A regular file
 * is size-checked before reading; a pipe, FIFO, terminal or character device (/dev/stdin, <(...)) is read
 * to EOF, failing as soon as more than max_bytes arrive (so /dev/zero is refused, not read forever). A
 * directory or socket is refused. */
int kvh_read_text(const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err);

/* Opens path read-only for a structured input that must be a regular file: non-blocking open (a FIFO
 * never blocks), fstat, S_ISREG, then back to blocking reads. Returns the fd, or -1 with err naming the
 * path and what it is ("is a FIFO", "is a directory", ...). */
int kvh_open_regular(const char *path, kvh_err *err);

/* Peak resident set size of this process in bytes (VmHWM), 0 if unknown. */
uint64_t kvh_peak_rss_bytes(void);
/* Current resident set size in bytes (VmRSS), 0 if unknown. */
uint64_t kvh_rss_bytes(void);

/* Index of the first NaN or infinity in x[0..n), or n when every value is finite. A bit test on the
 * exponent (so it holds under -ffast-math too), checked in blocks that vectorize. */
size_t kvh_first_nonfinite(const float *x, size_t n);
/* "nan", "inf" or "-inf" for a non-finite value (for messages). */
const char *kvh_nonfinite_name(float v);

/* Overflow-checked size arithmetic: return 0 and set *out, or -1 on overflow. */
int kvh_size_mul(size_t a, size_t b, size_t *out);
int kvh_size_add(size_t a, size_t b, size_t *out);

#endif
