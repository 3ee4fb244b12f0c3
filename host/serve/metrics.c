/* metrics.c — the Prometheus text of GET /metrics (metrics.h). */
#define _GNU_SOURCE /* open_memstream */
#include "serve/metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const int kvh_serve_codes[KVH_SERVE_N_CODES] = {200, 400, 401, 404, 405, 413, 429, 500, 503, 0};

int kvh_serve_code_index(int status) {
    for (int i = 0; i < KVH_SERVE_N_CODES - 1; i++)
        if (kvh_serve_codes[i] == status) return i;
    return KVH_SERVE_N_CODES - 1;
}

char *kvh_serve_label_escape(const char *v) {
    if (!v) v = "";
    char *o = malloc(strlen(v) * 2 + 1), *w = o;
    if (!o) return NULL;
    for (; *v; v++) {
        if (*v == '\\' || *v == '"') {
            *w++ = '\\';
            *w++ = *v;
        } else if (*v == '\n') {
            *w++ = '\\';
            *w++ = 'n';
        } else {
            *w++ = *v;
        }
    }
    *w = 0;
    return o;
}

static void head(FILE *f, const char *name, const char *type, const char *help) {
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void one(FILE *f, const char *name, const char *type, const char *help, double v) {
    head(f, name, type, help);
    fprintf(f, "%s %.17g\n", name, v);
}

static void histogram(FILE *f, const char *name, const char *help, const kvh_histogram *h, const double *bounds,
                      int n_bounds) {
    head(f, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < n_bounds; i++) {
        cum += h->count[i];
        fprintf(f, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    }
    cum += h->count[n_bounds];
    fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    fprintf(f, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->n);
}

char *kvh_serve_metrics_text(const kvh_bridge_snapshot *s, const kvh_serve_info *info,
                             const uint64_t http[KVH_SERVE_N_CODES]) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    char *model = kvh_serve_label_escape(info->model), *backend = kvh_serve_label_escape(info->backend),
         *plugins = kvh_serve_label_escape(info->plugins && info->plugins[0] ? info->plugins : "none"),
         *version = kvh_serve_label_escape(info->version);
    const kvh_engine_stats *e = &s->engine;

    head(f, "kvhost_info", "gauge", "The server: version, model, backend, threads and the plugin stack.");
    fprintf(f, "kvhost_info{version=\"%s\",model=\"%s\",backend=\"%s\",threads=\"%d\",plugins=\"%s\"} 1\n",
            version ? version : "", model ? model : "", backend ? backend : "", info->threads, plugins ? plugins : "");
    if (info->layer_lines && info->layer_lines[0]) {
        head(f, "kvhost_layer_plugin_info", "gauge", "The policy and store plugins serving each layer.");
        fputs(info->layer_lines, f);
    }
    one(f, "kvhost_requests_running", "gauge", "Requests the engine is running (prefill or decode).", e->running);
    one(f, "kvhost_requests_waiting", "gauge", "Requests accepted that have no token yet.", s->waiting);
    one(f, "kvhost_requests_in_flight", "gauge", "Requests accepted and not over.", s->in_flight);
    head(f, "kvhost_requests_total", "counter", "Requests by outcome.");
    fprintf(f, "kvhost_requests_total{outcome=\"completed\"} %llu\n", (unsigned long long)s->completed);
    fprintf(f, "kvhost_requests_total{outcome=\"cancelled\"} %llu\n", (unsigned long long)s->cancelled);
    fprintf(f, "kvhost_requests_total{outcome=\"failed\"} %llu\n", (unsigned long long)s->failed);
    fprintf(f, "kvhost_requests_total{outcome=\"rejected_full\"} %llu\n", (unsigned long long)s->rejected_full);
    head(f, "kvhost_http_responses_total", "counter", "HTTP responses by status code (0 = any other).");
    for (int i = 0; i < KVH_SERVE_N_CODES; i++)
        fprintf(f, "kvhost_http_responses_total{code=\"%d\"} %llu\n", kvh_serve_codes[i], (unsigned long long)http[i]);
    one(f, "kvhost_generated_tokens_total", "counter", "Tokens generated (tokens/s: rate() of this).",
        (double)e->generated_tokens);
    one(f, "kvhost_prompt_tokens_computed_total", "counter", "Prompt tokens run through the model (recomputation included).",
        (double)e->prompt_tokens_computed);
    one(f, "kvhost_prompt_tokens_shared_total", "counter", "Prompt tokens taken from the prefix cache.",
        (double)e->prompt_tokens_shared);
    histogram(f, "kvhost_time_to_first_token_seconds", "From acceptance to the first token.", &s->ttft,
              kvh_bridge_ttft_bounds, KVH_BRIDGE_TTFT_BUCKETS);
    histogram(f, "kvhost_time_per_output_token_seconds", "Mean time between tokens after the first, per request.",
              &s->tpot, kvh_bridge_tpot_bounds, KVH_BRIDGE_TPOT_BUCKETS);
    one(f, "kvhost_kv_bytes_held", "gauge", "KV cache bytes held by all sequences.", (double)e->kv_bytes_held);
    one(f, "kvhost_kv_bytes_peak", "gauge", "Most KV cache bytes held at once.", (double)e->kv_bytes_peak);
    one(f, "kvhost_kv_bytes_limit", "gauge", "KV cache byte limit (--mem-limit; 0 = none).", (double)info->kv_limit_bytes);
    one(f, "kvhost_kv_tokens_held", "gauge", "Tokens held against the global budget.", (double)e->tokens_held);
    one(f, "kvhost_kv_tokens_peak", "gauge", "Most tokens held at once.", (double)e->tokens_peak);
    one(f, "kvhost_kv_tokens_budget", "gauge", "Global token budget ([engine] max_tokens; 0 = none).",
        (double)info->token_budget);
    one(f, "kvhost_max_seqs", "gauge", "Sequences that may run at once.", info->max_seqs);
    one(f, "kvhost_evict_calls_total", "counter", "Calls of the policy plugins' evict hook.", (double)s->evict_calls);
    one(f, "kvhost_preemptions_total", "counter", "Requests preempted (memory given back, recomputed later).",
        (double)e->preemptions);
    one(f, "kvhost_prefix_cache_lookups_total", "counter", "Prompt blocks looked up in the prefix cache.",
        (double)e->prefix_blocks_looked_up);
    one(f, "kvhost_prefix_cache_hits_total", "counter", "Prompt blocks found in the prefix cache.",
        (double)e->prefix_blocks_hit);
    one(f, "kvhost_prefix_cache_hit_ratio", "gauge", "Hits / lookups since start (0 before any lookup).",
        e->prefix_blocks_looked_up ? (double)e->prefix_blocks_hit / (double)e->prefix_blocks_looked_up : 0);
    one(f, "kvhost_engine_steps_total", "counter", "Engine steps.", (double)e->steps);
    one(f, "kvhost_engine_forward_seconds_total", "counter", "Time in forward passes.", (double)e->forward_ns / 1e9);
    one(f, "kvhost_draining", "gauge", "1 after SIGINT/SIGTERM: no new requests are admitted.", s->draining ? 1 : 0);
    one(f, "kvhost_engine_failed", "gauge", "1 after an engine step failed: nothing more runs.", s->broken ? 1 : 0);
    free(model);
    free(backend);
    free(plugins);
    free(version);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}
