/* util.c — implementation of the shared helpers declared in util.h. File reading: structured inputs must
 * be regular files (kvh_read_file); text inputs may be streams read to EOF within a cap (kvh_read_text). */
#define _POSIX_C_SOURCE 200809L
#include "util/util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int kvh_fail(kvh_err *err, const char *fmt, ...) {
    if (!err) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int kvh_fail_prefix(kvh_err *err, const char *fmt, ...) {
    if (!err) return -1;
    char prefix[512];
    char old[sizeof err->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    size_t plen = strlen(prefix);
    if (plen > sizeof err->msg - 3) plen = sizeof err->msg - 3;
    memcpy(err->msg, prefix, plen);
    memcpy(err->msg + plen, ": ", 2);
    size_t room = sizeof err->msg - plen - 3;
    size_t olen = strnlen(old, room);
    memcpy(err->msg + plen + 2, old, olen);
    err->msg[plen + 2 + olen] = '\0';
    return -1;
}

uint64_t kvh_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double kvh_now_ms(void) { return (double)kvh_now_ns() / 1e6; }

static const char *file_kind(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISFIFO(m)) return "a FIFO (named pipe)";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    if (S_ISSOCK(m)) return "a socket";
    return "a special file";
}

int kvh_open_regular(const char *path, kvh_err *err) {
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0) {
        int e = errno;
        /* a socket cannot be opened at all (ENXIO): say what it is rather than the errno text */
        if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
            return kvh_fail(err, "%s: not a regular file (it is %s)", path, file_kind(st.st_mode));
        return kvh_fail(err, "%s: cannot open: %s", path, strerror(e));
    }
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kvh_fail(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kvh_fail(err, "%s: not a regular file (it is %s)", path, file_kind(st.st_mode));
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

/* Reads up to `want` bytes (fewer at EOF), retrying on EINTR. Returns bytes read or -1. */
static ssize_t read_full(int fd, char *buf, size_t want) {
    size_t got = 0;
    while (got < want) {
        ssize_t r = read(fd, buf + got, want - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* Reads a stream to EOF into a growing buffer; more than max_bytes is an error. */
static int read_stream(int fd, const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err) {
    size_t cap = 64 * 1024, len = 0;
    char *buf = malloc(cap + 1);
    if (!buf) return kvh_fail(err, "%s: out of memory", path);
    for (;;) {
        if (len == cap) {
            if (cap > max_bytes) break; /* already more than the limit */
            size_t nc = cap * 2;
            if (nc > max_bytes + 1) nc = max_bytes + 1; /* one byte past the limit tells "too long" */
            if (nc <= cap) nc = cap + 1;
            char *nb = realloc(buf, nc + 1);
            if (!nb) {
                free(buf);
                return kvh_fail(err, "%s: out of memory reading %zu bytes", path, nc);
            }
            buf = nb;
            cap = nc;
        }
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            free(buf);
            return kvh_fail(err, "%s: read error after %zu bytes: %s", path, len, strerror(e));
        }
        if (r == 0) break;
        len += (size_t)r;
        if (len > max_bytes) break;
    }
    if (len > max_bytes) {
        free(buf);
        return kvh_fail(err, "%s: more than the limit of %zu bytes (read as a stream, stopped at the limit)", path,
                        max_bytes);
    }
    buf[len] = '\0';
    *out = buf;
    if (out_len) *out_len = len;
    return 0;
}

/* Reads exactly st_size bytes of a regular file (size already checked against the limit). */
static int read_regular(int fd, const char *path, size_t size, char **out, size_t *out_len, kvh_err *err) {
    char *buf = malloc(size + 1);
    if (!buf) return kvh_fail(err, "%s: out of memory reading %zu bytes", path, size);
    ssize_t got = read_full(fd, buf, size);
    if (got < 0) {
        int e = errno;
        free(buf);
        return kvh_fail(err, "%s: read error: %s", path, strerror(e));
    }
    if ((size_t)got != size) {
        free(buf);
        return kvh_fail(err, "%s: short read (%zu of %zu bytes; the file changed while being read)", path,
                        (size_t)got, size);
    }
    buf[size] = '\0';
    *out = buf;
    if (out_len) *out_len = size;
    return 0;
}

static int check_size(const char *path, const struct stat *st, size_t max_bytes, kvh_err *err) {
    if ((uint64_t)st->st_size > (uint64_t)max_bytes)
        return kvh_fail(err, "%s: file is %lld bytes, more than the limit of %zu bytes", path,
                        (long long)st->st_size, max_bytes);
    return 0;
}

int kvh_read_file(const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err) {
    *out = NULL;
    if (out_len) *out_len = 0;
    int fd = kvh_open_regular(path, err);
    if (fd < 0) return -1;
    struct stat st;
    int rc = fstat(fd, &st) != 0 ? kvh_fail(err, "%s: cannot stat: %s", path, strerror(errno))
                                 : check_size(path, &st, max_bytes, err);
    if (rc == 0) rc = read_regular(fd, path, (size_t)st.st_size, out, out_len, err);
    close(fd);
    return rc;
}

int kvh_read_text(const char *path, size_t max_bytes, char **out, size_t *out_len, kvh_err *err) {
    *out = NULL;
    if (out_len) *out_len = 0;
    /* Blocking open: a FIFO prompt waits for its writer, as `cat FIFO` does (the user asked for it). */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
        int e = errno;
        if (stat(path, &st) == 0 && S_ISSOCK(st.st_mode))
            return kvh_fail(err, "%s: not a file or a stream (it is a socket)", path);
        return kvh_fail(err, "%s: cannot open: %s", path, strerror(e));
    }
    int rc = 0;
    if (fstat(fd, &st) != 0) {
        rc = kvh_fail(err, "%s: cannot stat: %s", path, strerror(errno));
    } else if (S_ISDIR(st.st_mode) || S_ISSOCK(st.st_mode) || S_ISBLK(st.st_mode)) {
        rc = kvh_fail(err, "%s: not a file or a stream (it is %s)", path, file_kind(st.st_mode));
    } else if (S_ISREG(st.st_mode)) {
        /* st_size tells a regular file's length before reading, so a huge file is refused at once */
        rc = check_size(path, &st, max_bytes, err);
        if (rc == 0) rc = read_stream(fd, path, max_bytes, out, out_len, err);
    } else {
        /* pipes, FIFOs, terminals, /dev/stdin: st_size means nothing, read to EOF within the cap */
        rc = read_stream(fd, path, max_bytes, out, out_len, err);
    }
    close(fd);
    return rc;
}

static uint64_t read_status_kb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    size_t klen = strlen(key);
    uint64_t kb = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            kb = strtoull(line + klen + 1, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb;
}

uint64_t kvh_peak_rss_bytes(void) { return read_status_kb("VmHWM") * 1024ull; }
uint64_t kvh_rss_bytes(void) { return read_status_kb("VmRSS") * 1024ull; }

int kvh_size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}

int kvh_size_add(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

size_t kvh_first_nonfinite(const float *x, size_t n) {
    const uint32_t EXP = 0x7f800000u;
    for (size_t b = 0; b < n; b += 1024) {
        size_t e = n - b < 1024 ? n - b : 1024;
        uint32_t any = 0;
        for (size_t i = 0; i < e; i++) { /* no early exit: the block vectorizes */
            uint32_t u;
            memcpy(&u, &x[b + i], sizeof u);
            any |= (uint32_t)((u & EXP) == EXP);
        }
        if (!any) continue;
        for (size_t i = 0; i < e; i++) {
            uint32_t u;
            memcpy(&u, &x[b + i], sizeof u);
            if ((u & EXP) == EXP) return b + i;
        }
    }
    return n;
}

const char *kvh_nonfinite_name(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffu) != 0) return "nan";
    return (u >> 31) ? "-inf" : "inf";
}
