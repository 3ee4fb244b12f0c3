/* metrics.c — implementation of metrics.h. */
#define _GNU_SOURCE
#include "metrics.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

int kvh_jsonl_append(const char *path, const cJSON *obj, kvh_err *err) {
    char *text = cJSON_PrintUnformatted(obj);
    if (!text) return kvh_fail(err, "%s: out of memory formatting the record", path);
    size_t len = strlen(text);
    char *line = malloc(len + 2);
    if (!line) {
        free(text);
        return kvh_fail(err, "%s: out of memory formatting the record", path);
    }
    memcpy(line, text, len);
    line[len] = '\n';
    free(text);
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        free(line);
        return kvh_fail(err, "%s: cannot open for appending: %s", path, strerror(errno));
    }
    struct stat st;
    off_t before = fstat(fd, &st) == 0 ? st.st_size : -1;
    ssize_t w = write(fd, line, len + 1);
    int rc = 0;
    if (w != (ssize_t)(len + 1)) {
        int e = errno;
        /* Never leave half a record: cut the file back to where it was. */
        if (before >= 0 && ftruncate(fd, before) != 0) { /* best effort */
        }
        rc = kvh_fail(err, "%s: could not append the record (%s)", path, w < 0 ? strerror(e) : "short write");
    }
    if (close(fd) != 0 && rc == 0) rc = kvh_fail(err, "%s: close failed: %s", path, strerror(errno));
    free(line);
    return rc;
}
