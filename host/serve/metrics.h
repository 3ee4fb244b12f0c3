/* metrics.h — GET /metrics of `kvhost serve`: the Prometheus text exposition format (version 0.0.4).
 * Owns: metric names, types, help lines, label escaping. Does not own: where the figures come from (a
 * bridge snapshot, the server's response counters). Names are listed in docs/serve.md; tests check them. */
#ifndef KVH_SERVE_METRICS_H
#define KVH_SERVE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "serve/bridge.h"

/* HTTP status codes the server counts (kvhost_http_responses_total{code}). */
#define KVH_SERVE_N_CODES 10
extern const int kvh_serve_codes[KVH_SERVE_N_CODES];
/* Index of a status code in kvh_serve_codes (the last entry, 0, stands for any other). */
int kvh_serve_code_index(int status);

/* What does not change while the server runs. */
typedef struct kvh_serve_info {
    const char *version, *model, *backend;
    const char *plugins;     /* the plugin stack, e.g. "h2o.so,int8.so" ("" = none) */
    const char *layer_lines; /* preformatted kvhost_layer_plugin_info lines (may be NULL) */
    int threads;
    uint32_t max_seqs, token_budget; /* token_budget 0 = none */
    size_t kv_limit_bytes;           /* 0 = none */
    int n_positions;
} kvh_serve_info;

/* The whole exposition text (malloc'd, NUL-terminated; NULL when out of memory). http: counts per
 * kvh_serve_codes entry. */
char *kvh_serve_metrics_text(const kvh_bridge_snapshot *s, const kvh_serve_info *info,
                             const uint64_t http[KVH_SERVE_N_CODES]);

/* A Prometheus label value: backslash, double quote and newline escaped (malloc'd). */
char *kvh_serve_label_escape(const char *v);

#endif
