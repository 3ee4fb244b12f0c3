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

/* Reads a whole file into a NUL-terminated malloc'd buffer. Fails (naming the path) when the file is
 * missing, unreadable or larger than max_bytes. */
int kvh_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err);

/* Peak resident set size of this process in bytes (VmHWM), 0 if unknown. */
uint64_t kvh_peak_rss_bytes(void);
/* Current resident set size in bytes (VmRSS), 0 if unknown. */
uint64_t kvh_rss_bytes(void);

/* Overflow-checked size arithmetic: return 0 and set *out, or -1 on overflow. */
int kvh_size_mul(size_t a, size_t b, size_t *out);
int kvh_size_add(size_t a, size_t b, size_t *out);

#endif
