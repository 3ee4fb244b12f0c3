/* metrics.h — measurements and their JSON Lines records.
 * Owns: latency statistics (median, p10, p90), the common fields every record carries (tool version,
 * commit, machine, time), and appending one record as one whole line (a single O_APPEND write, rolled
 * back on a short write) so an interrupted run never leaves half a record.
 * Does not own: what a command measures (the commands fill their own fields). */
#ifndef KVH_METRICS_H
#define KVH_METRICS_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "backend.h"
#include "util.h"

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

/* Appends obj as one line to path. Creates the file if needed. */
int kvh_jsonl_append(const char *path, const cJSON *obj, kvh_err *err);

#endif
