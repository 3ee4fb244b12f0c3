/* metrics.h — measurements and their JSON Lines records.
 * Owns: latency statistics (median, p10, p90), the common fields every record carries (tool version,
 * commit, machine, time), the text of a record line (compact JSON in well-formed UTF-8: ill-formed
 * bytes from tags, paths or names become U+FFFD, host/util/utf8.h) and appending it as one whole line, safe
 * with any number of concurrent writers (see kvh_jsonl_append).
 * Does not own: what a command measures (the commands fill their own fields). */
#ifndef KVH_METRICS_H
#define KVH_METRICS_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "backend/backend.h"
#include "util/util.h"

typedef struct kvh_latency_stats {
    int n;
    double mean, median, p10, p90, min, max; /* milliseconds */
} kvh_latency_stats;

/* Percentiles by linear interpolation between order statistics (numpy's default). ms is not modified. */
void kvh_latency_stats_compute(const double *ms, int n, kvh_latency_stats *out);
double kvh_percentile(const double *sorted, int n, double q);

/* A new record object with: record (kind), kvhost_version, commit, time_utc, machine (host name,
 * CPU model, cores), and is filled further by the caller. */
cJSON *kvh_record_new(const char *kind);
void kvh_record_add_latency(cJSON *obj, const char *name, const kvh_latency_stats *st);
void kvh_record_add_phases(cJSON *obj, const kvh_phase_times *t, double hooks_ms, double total_ms);

/* The line kvh_jsonl_append writes for obj: compact JSON (one line: cJSON escapes control characters),
 * ill-formed UTF-8 replaced by U+FFFD, then '\n'. malloc'd (free it), length in *len; NULL when out of
 * memory. */
char *kvh_jsonl_format(const cJSON *obj, size_t *len);

/* Appends obj as one line to path (created 0644 if needed) and never removes bytes it did not write.
 * Regular files: under an exclusive flock(2) on the file (every kvhost writer takes it; waits at most
 * 60 s), one write(2) on an O_APPEND descriptor. A short write (disk full, file-size limit) is undone
 * with ftruncate only when the file's size is exactly its size before plus the bytes written, i.e. the
 * tail is this writer's own partial line (no other kvhost writer can append while the lock is held);
 * otherwise (a program appending without the lock) the partial line stays and the error gives its
 * offset. Other files (a pipe, /dev/stdout): written to the end without a lock. On failure err names
 * the file, the reason, and what the file holds now. */
int kvh_jsonl_append(const char *path, const cJSON *obj, kvh_err *err);

#endif
