/* metrics.c — implementation of metrics.h. The append protocol (lock, one write, undo only our own
 * tail) is described at kvh_jsonl_append in metrics.h. */
#define _GNU_SOURCE
#include "util/metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "util/utf8.h"

#ifndef KVH_VERSION
#define KVH_VERSION "dev"
#endif
#include "kvh_commit.h" /* generated at build time: KVH_GIT_COMMIT */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double kvh_percentile(const double *sorted, int n, double q) {
    if (n <= 0) return 0.0;
    double rank = q * (double)(n - 1);
    int lo = (int)rank;
    if (lo >= n - 1) return sorted[n - 1];
    double frac = rank - (double)lo;
    return sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac;
}

void kvh_latency_stats_compute(const double *ms, int n, kvh_latency_stats *out) {
    memset(out, 0, sizeof *out);
    out->n = n;
    if (n <= 0) return;
    double *s = malloc((size_t)n * sizeof *s);
    if (!s) return;
    memcpy(s, ms, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += s[i];
    out->mean = sum / n;
    out->median = kvh_percentile(s, n, 0.5);
    out->p10 = kvh_percentile(s, n, 0.1);
    out->p90 = kvh_percentile(s, n, 0.9);
    out->min = s[0];
    out->max = s[n - 1];
    free(s);
}

static void cpu_model(char *buf, size_t cap) {
    snprintf(buf, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *colon = strchr(line, ':');
            if (colon) {
                colon++;
                while (*colon == ' ') colon++;
                colon[strcspn(colon, "\n")] = '\0';
                snprintf(buf, cap, "%s", colon);
            }
            break;
        }
    }
    fclose(f);
}

cJSON *kvh_record_new(const char *kind) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    cJSON_AddStringToObject(o, "record", kind);
    cJSON_AddStringToObject(o, "kvhost_version", KVH_VERSION);
    cJSON_AddStringToObject(o, "commit", KVH_GIT_COMMIT);
    char ts[64];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
    cJSON_AddStringToObject(o, "time_utc", ts);
    cJSON *mach = cJSON_AddObjectToObject(o, "machine");
    char host[256] = "unknown";
    gethostname(host, sizeof host - 1);
    cJSON_AddStringToObject(mach, "host", host);
    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    cJSON_AddStringToObject(mach, "cpu", cpu);
    cJSON_AddNumberToObject(mach, "cores", (double)sysconf(_SC_NPROCESSORS_ONLN));
    return o;
}

void kvh_record_add_latency(cJSON *obj, const char *name, const kvh_latency_stats *st) {
    cJSON *l = cJSON_AddObjectToObject(obj, name);
    cJSON_AddNumberToObject(l, "n", st->n);
    cJSON_AddNumberToObject(l, "median_ms", st->median);
    cJSON_AddNumberToObject(l, "p10_ms", st->p10);
    cJSON_AddNumberToObject(l, "p90_ms", st->p90);
    cJSON_AddNumberToObject(l, "mean_ms", st->mean);
    cJSON_AddNumberToObject(l, "min_ms", st->min);
    cJSON_AddNumberToObject(l, "max_ms", st->max);
}

void kvh_record_add_phases(cJSON *obj, const kvh_phase_times *t, double hooks_ms, double total_ms) {
    cJSON *p = cJSON_AddObjectToObject(obj, "phase_ms");
    double embed = (double)t->embed / 1e6, proj = (double)t->attn_proj / 1e6, core = (double)t->attn_core / 1e6;
    double mlp = (double)t->mlp / 1e6, head = (double)t->lm_head / 1e6;
    cJSON_AddNumberToObject(p, "embed", embed);
    cJSON_AddNumberToObject(p, "attn_proj", proj);
    cJSON_AddNumberToObject(p, "attn_core", core);
    cJSON_AddNumberToObject(p, "mlp", mlp);
    cJSON_AddNumberToObject(p, "lm_head", head);
    cJSON_AddNumberToObject(p, "plugin_hooks", hooks_ms);
    double other = total_ms - (embed + proj + core + mlp + head + hooks_ms);
    cJSON_AddNumberToObject(p, "other", other > 0 ? other : 0.0);
}

/* cJSON prints a number with 15 significant digits whenever those read back within a relative
 * DBL_EPSILON of it; next to DBL_MAX they read back as infinity (found by tests/fuzz/fuzz_jsonl.c).
 * Only |v| >= 1e308 can be hit, so such numbers are written with 17 digits, on a copy of the record. */
static int has_huge_number(const cJSON *o) {
    for (const cJSON *c = o; c; c = c->next) {
        if (cJSON_IsNumber(c) && isfinite(c->valuedouble) && fabs(c->valuedouble) >= 1e308) return 1;
        if (c->child && has_huge_number(c->child)) return 1;
    }
    return 0;
}

static int fix_huge_numbers(cJSON *parent) {
    for (cJSON *c = parent->child, *next; c; c = next) {
        next = c->next;
        if (cJSON_IsNumber(c) && isfinite(c->valuedouble) && fabs(c->valuedouble) >= 1e308) {
            char num[40];
            snprintf(num, sizeof num, "%.17g", c->valuedouble);
            cJSON *raw = cJSON_CreateRaw(num);
            if (!raw || !cJSON_ReplaceItemViaPointer(parent, c, raw)) {
                cJSON_Delete(raw);
                return -1;
            }
        } else if (c->child && fix_huge_numbers(c) != 0) {
            return -1;
        }
    }
    return 0;
}

char *kvh_jsonl_format(const cJSON *obj, size_t *len) {
    char *text;
    if (has_huge_number(obj)) {
        cJSON *copy = cJSON_Duplicate(obj, 1);
        text = copy && fix_huge_numbers(copy) == 0 ? cJSON_PrintUnformatted(copy) : NULL;
        cJSON_Delete(copy);
    } else {
        text = cJSON_PrintUnformatted(obj);
    }
    if (!text) return NULL;
    size_t n;
    char *line = kvh_utf8_repair(text, strlen(text), &n); /* room for the '\n': the NUL's byte */
    cJSON_free(text);
    if (!line) return NULL;
    line[n] = '\n';
    *len = n + 1;
    return line;
}

#define LOCK_WAIT_MS 60000

/* Exclusive flock, waiting at most LOCK_WAIT_MS. 1 = locked, 0 = the file system has no locks, -1 =
 * timed out or failed (errno set). */
static int lock_file(int fd) {
    for (int waited = 0;; waited += 10) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return 1;
        if (errno == ENOLCK || errno == EINVAL || errno == EOPNOTSUPP) return 0;
        if (errno != EWOULDBLOCK && errno != EINTR) return -1;
        if (waited >= LOCK_WAIT_MS) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Why a write stopped short without an errno: the file-size limit, or (most likely) a full device. */
static const char *short_reason(off_t before, size_t len) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (unsigned long long)before + len > (unsigned long long)rl.rlim_cur)
        return "the file-size limit (ulimit -f) stopped it";
    return "the device is probably full";
}

static int append_regular(int fd, const char *path, const char *line, size_t len, kvh_err *err) {
    int locked = lock_file(fd);
    if (locked < 0)
        return kvh_fail(err, "%s: cannot lock the file for appending (%s); nothing was written", path,
                        errno == ETIMEDOUT ? "another process has held its lock for 60 s" : strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) return kvh_fail(err, "%s: cannot stat: %s; nothing was written", path, strerror(errno));
    const off_t before = st.st_size;
    errno = 0;
    ssize_t w = write(fd, line, len); /* one write: O_APPEND puts it at the end, whole */
    if (w == (ssize_t)len) return 0;
    if (w < 0)
        return kvh_fail(err, "%s: could not append the record (%s); nothing was written", path, strerror(errno));
    const char *why = errno ? strerror(errno) : short_reason(before, len);
    /* Our bytes are the tail exactly when the size is before + w: then (and only then) cut them off.
     * Without the lock another writer may have appended after us, so the tail is left alone. */
    if (locked && fstat(fd, &st) == 0 && st.st_size == before + (off_t)w && ftruncate(fd, before) == 0)
        return kvh_fail(err, "%s: could not append the record: wrote %zd of %zu bytes (%s); the partial line was "
                        "removed, the file is as it was", path, w, len, why);
    return kvh_fail(err, "%s: could not append the record: wrote %zd of %zu bytes (%s); a partial line of %zd bytes "
                    "may remain at byte offset %lld (the file changed meanwhile, so it was left alone)", path, w, len,
                    why, w, (long long)before);
}

/* Pipes and devices: no size, no lock, no rollback; the rest of a short write is written after it. */
static int append_stream(int fd, const char *path, const char *line, size_t len, kvh_err *err) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    size_t done = 0;
    while (done < len) {
        ssize_t w = write(fd, line + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return kvh_fail(err, "%s: could not write the record (%s) after %zu of %zu bytes", path,
                            w < 0 ? strerror(errno) : "no progress", done, len);
        done += (size_t)w;
    }
    return 0;
}

int kvh_jsonl_append(const char *path, const cJSON *obj, kvh_err *err) {
    size_t len;
    char *line = kvh_jsonl_format(obj, &len);
    if (!line) return kvh_fail(err, "%s: out of memory formatting the record; nothing was written", path);
    /* O_NONBLOCK: a FIFO without a reader fails at once (ENXIO) instead of blocking the end of a run */
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0644);
    if (fd < 0) {
        int e = errno;
        free(line);
        return kvh_fail(err, "%s: cannot open for appending: %s%s", path, strerror(e),
                        e == ENXIO ? " (a FIFO with no reader)" : "");
    }
    struct stat st;
    int rc = fstat(fd, &st) != 0 ? kvh_fail(err, "%s: cannot stat: %s", path, strerror(errno))
             : S_ISREG(st.st_mode) ? append_regular(fd, path, line, len, err)
                                   : append_stream(fd, path, line, len, err);
    if (close(fd) != 0 && rc == 0) rc = kvh_fail(err, "%s: close failed after appending: %s", path, strerror(errno));
    free(line);
    return rc;
}
