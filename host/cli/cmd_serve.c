/* cmd_serve.c — `kvhost serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.
 * Owns: the command's options, loading the model and creating the engine, starting the engine thread
 * (host/serve/bridge.c) and the HTTP server (host/serve/server.c), and the shutdown on SIGINT / SIGTERM:
 * stop admitting (503), let in-flight requests finish within --grace-s, cancel the rest, exit 0.
 * Signals are blocked in every thread and taken by this (main) thread with sigtimedwait. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/engine_args.h"
#include "engine/engine.h"
#include "runtime/router.h"
#include "serve/bridge.h"
#include "serve/metrics.h"
#include "serve/server.h"

static const char *const serve_usage =
    "usage: kvhost serve [--model SPEC] [--config run.ini] [--plugins A.so,B.so] [options]\n"
    "\n"
    "An OpenAI-compatible HTTP server (docs/serve.md): POST /v1/completions (streaming as server-sent events),\n"
    "GET /v1/models, GET /health, GET /metrics (Prometheus). Requests run on the continuous-batching engine\n"
    "(docs/engine.md) on a thread of its own. SIGINT/SIGTERM: no new requests (503), in-flight ones finish\n"
    "within --grace-s, the rest are cancelled, exit 0 (a second signal cancels at once).\n"
    "\n"
    "  --host ADDR         address to bind (default 127.0.0.1: this machine only)\n"
    "  --port N            TCP port (default 8080; 0 = any free port, printed at start)\n"
    "  --api-key KEY       require \"Authorization: Bearer KEY\" on /v1/ and /metrics (also env KVHOST_API_KEY)\n"
    "  --model-name NAME   the model id answers and /v1/models carry (default: from --model)\n"
    "  --max-waiting N     accepted requests without a token yet beyond which new ones get 429 (default 64)\n"
    "  --max-body BYTES    request body cap, K/M suffixes (default 1M; 413 beyond)\n"
    "  --max-connections N open connections at once (default 256)\n"
    "  --grace-s S         seconds in-flight requests get to finish at shutdown (default 10)\n"
    "  --max-seqs N        requests running at once (default [engine] max_seqs, 64)\n"
    "  --max-tokens N      global budget: KV tokens held by all requests together (default none)\n"
    "  --step-tokens N     prompt tokens prefilled per step, all requests together (default 256)\n"
    "  --block-size N      KV block size in slots (default [cache] block_size, else 16)\n"
    "  --no-prefix-sharing compute every prompt in full\n"
    "  --log               one line on stderr per failed or interrupted request\n"
    "  --mem-limit BYTES   (common option) the KV memory the engine may use, K/M/G suffixes\n";

typedef struct serve_args {
    kvh_cli_common common;
    const char *host, *api_key, *model_name;
    kvh_cli_engine_args engine;
    long port, max_waiting, max_connections, grace_s;
    size_t max_body;
    bool log;
} serve_args;

static int parse_args(int argc, char **argv, serve_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->host = "127.0.0.1";
    a->port = 8080;
    a->max_waiting = 64;
    a->max_connections = 256;
    a->max_body = 1u << 20;
    a->grace_s = 10;
    kvh_cli_engine_args_init(&a->engine);
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        if ((r = kvh_cli_engine_args_parse(&a->engine, argc, argv, &i, err)) < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (strcmp(o, "--log") == 0) { a->log = true; i++; continue; }
        if (!v) return kvh_fail(err, "%s: missing value (see kvhost serve --help)", o);
        if (strcmp(o, "--host") == 0) {
            a->host = v;
        } else if (strcmp(o, "--port") == 0) {
            if (kvh_cli_parse_int(v, 0, 65535, &a->port)) return kvh_fail(err, "--port '%s': expected 0..65535", v);
        } else if (strcmp(o, "--api-key") == 0) {
            if (!v[0]) return kvh_fail(err, "--api-key: empty key");
            a->api_key = v;
        } else if (strcmp(o, "--model-name") == 0) {
            if (!v[0]) return kvh_fail(err, "--model-name: empty name");
            a->model_name = v;
        } else if (strcmp(o, "--max-waiting") == 0) {
            if (kvh_cli_parse_int(v, 1, 1 << 20, &a->max_waiting))
                return kvh_fail(err, "--max-waiting '%s': expected 1..1048576", v);
        } else if (strcmp(o, "--max-connections") == 0) {
            if (kvh_cli_parse_int(v, 1, 65536, &a->max_connections))
                return kvh_fail(err, "--max-connections '%s': expected 1..65536", v);
        } else if (strcmp(o, "--max-body") == 0) {
            if (kvh_cli_parse_bytes(v, &a->max_body) || a->max_body < 64 || a->max_body > (256u << 20))
                return kvh_fail(err, "--max-body '%s': expected 64 bytes .. 256M", v);
        } else if (strcmp(o, "--grace-s") == 0) {
            if (kvh_cli_parse_int(v, 0, 3600, &a->grace_s)) return kvh_fail(err, "--grace-s '%s': expected 0..3600", v);
        } else {
            return kvh_fail(err, "serve: unknown option '%s' (see kvhost serve --help)", o);
        }
        i += 2;
    }
    if (a->common.no_cache) return kvh_fail(err, "--no-cache: the engine always keeps a cache");
    if (a->common.json_path) return kvh_fail(err, "--json: serve writes no record (GET /metrics has the figures)");
    if (!a->api_key) {
        const char *env = getenv("KVHOST_API_KEY");
        if (env && env[0]) a->api_key = env;
    }
    return 0;
}

/* "window.so,int8.so"-like list of the distinct plugins of the stack, and one kvhost_layer_plugin_info
 * line per layer. */
static void describe_stack(const kvh_router *r, int n_layer, char *plugins, size_t cap, char **layer_lines) {
    plugins[0] = 0;
    *layer_lines = NULL;
    if (!r) return;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    for (int l = 0; l < n_layer; l++) {
        const char *names[2] = {kvh_router_layer_policy_name(r, l), kvh_router_layer_store_name(r, l)};
        for (int k = 0; k < 2; k++) {
            if (!names[k]) continue;
            char item[96];
            snprintf(item, sizeof item, "%s.so", names[k]);
            bool seen = false;
            for (const char *p = strstr(plugins, item); p; p = strstr(p + 1, item))
                if ((p == plugins || p[-1] == ',') && (p[strlen(item)] == ',' || !p[strlen(item)])) seen = true;
            if (!seen && strlen(plugins) + strlen(item) + 2 < cap) {
                if (plugins[0]) strcat(plugins, ",");
                strcat(plugins, item);
            }
        }
        if (f) {
            char *pol = kvh_serve_label_escape(names[0] ? names[0] : "none");
            char *sto = kvh_serve_label_escape(names[1] ? names[1] : "dense");
            fprintf(f, "kvhost_layer_plugin_info{layer=\"%d\",policy=\"%s\",store=\"%s\"} 1\n", l, pol ? pol : "",
                    sto ? sto : "");
            free(pol);
            free(sto);
        }
    }
    if (f && fclose(f) == 0) *layer_lines = buf;
    else free(buf);
}

int kvh_cmd_serve(int argc, char **argv) {
    kvh_err err = {{0}};
    serve_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "serve", serve_usage, &err);
    if (outcome >= 0) return outcome;

    /* every thread made from here on (OpenMP, the engine, libmicrohttpd) inherits the blocked signals:
     * only this thread takes SIGINT / SIGTERM */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_engine *eng = NULL;
    kvh_bridge *br = NULL;
    kvh_server *srv = NULL;
    char *layer_lines = NULL;
    if (kvh_cli_build_config(&a.common, &cfg, &err) != 0) {
        fprintf(stderr, "kvhost serve: %s\n", err.msg);
        kvh_config_free(&cfg);
        return 2;
    }
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    const int threads = kvh_cli_threads(&a.common, &cfg);
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    kvh_engine_options eo;
    if (kvh_cli_engine_create(&eng, &model, &a.common, &cfg, &a.engine, &eo, &err) != 0) goto fail;
    kvh_session *sess = kvh_engine_session(eng);
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: timings and memory are real, the text is not.\n",
                model.name);

    char plugins[512];
    describe_stack(sess->router, model.cfg.n_layer, plugins, sizeof plugins, &layer_lines);
    const char *name = a.model_name;
    char name_buf[256];
    if (!name) { /* the directory's last component, or the spec itself */
        snprintf(name_buf, sizeof name_buf, "%s", spec);
        size_t n = strlen(name_buf);
        while (n > 1 && name_buf[n - 1] == '/') name_buf[--n] = 0;
        const char *slash = strrchr(name_buf, '/');
        name = slash ? slash + 1 : name_buf;
    }
    kvh_serve_info info = {.version = KVH_VERSION,
                           .model = name,
                           .backend = backend,
                           .plugins = plugins,
                           .layer_lines = layer_lines,
                           .threads = threads,
                           .max_seqs = eo.max_seqs,
                           .token_budget = eo.max_tokens,
                           .kv_limit_bytes = a.common.mem_limit,
                           .n_positions = model.cfg.n_positions};
    kvh_bridge_options bo = {.max_waiting = (int)a.max_waiting};
    if (kvh_bridge_create(&br, eng, &bo, &err) != 0) goto fail;
    kvh_server_options sopt = {.host = a.host,
                               .port = (int)a.port,
                               .max_body = a.max_body,
                               .api_key = a.api_key,
                               .model_name = name,
                               .tok = tok,
                               .n_vocab = model.cfg.n_vocab,
                               .n_positions = model.cfg.n_positions,
                               .eot = kvh_tokenizer_eot(tok),
                               .info = &info,
                               .max_connections = (unsigned)a.max_connections,
                               .log_requests = a.log};
    if (kvh_server_start(&srv, br, &sopt, &err) != 0) goto fail;
    const bool v6 = strchr(a.host, ':') != NULL;
    fprintf(stderr, "kvhost serve: listening on http://%s%s%s:%d (model %s, %s, plugins %s%s)\n", v6 ? "[" : "", a.host,
            v6 ? "]" : "", kvh_server_port(srv), name, backend, plugins[0] ? plugins : "none",
            a.api_key ? ", API key required" : "");
    fflush(stderr);

    int sig;
    do {
        sig = sigwaitinfo(&sigs, NULL);
    } while (sig < 0 && errno == EINTR);
    fprintf(stderr, "kvhost serve: %s: no new requests; in-flight ones get %ld s to finish\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM", a.grace_s);
    kvh_bridge_drain(br);
    const uint64_t deadline = kvh_now_ns() + (uint64_t)a.grace_s * 1000000000ull;
    bool idle = false;
    while (!(idle = kvh_bridge_wait_idle(br, 100)) && kvh_now_ns() < deadline) {
        struct timespec zero = {0, 0};
        if (sigtimedwait(&sigs, NULL, &zero) > 0) {
            fprintf(stderr, "kvhost serve: second signal: cancelling now\n");
            break;
        }
    }
    if (!idle) {
        kvh_bridge_snapshot sn;
        kvh_bridge_snapshot_get(br, &sn);
        fprintf(stderr, "kvhost serve: cancelling %u request(s) still in flight\n", sn.in_flight);
        kvh_bridge_cancel_all(br);
        kvh_bridge_wait_idle(br, 2000);
    }
    kvh_server_wait_quiet(srv, 1000); /* the last chunks and [DONE] of cancelled streams */
    kvh_server_stop(srv); /* handlers notice the cancellations and end; libmicrohttpd's threads are joined */
    srv = NULL;
    kvh_bridge_snapshot sn;
    kvh_bridge_snapshot_get(br, &sn);
    fprintf(stderr, "kvhost serve: stopped: %llu completed, %llu cancelled, %llu failed, %llu tokens generated\n",
            (unsigned long long)sn.completed, (unsigned long long)sn.cancelled, (unsigned long long)sn.failed,
            (unsigned long long)sn.engine.generated_tokens);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost serve: %s\n", err.msg);
done:
    kvh_server_stop(srv);
    kvh_bridge_free(br);
    kvh_engine_free(eng);
    free(layer_lines);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
}
