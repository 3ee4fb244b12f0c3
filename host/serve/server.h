/* server.h — the HTTP side of `kvhost serve`, on libmicrohttpd (a thread per connection).
 * Owns: routes (POST /v1/completions, GET /v1/models, /health, /metrics), the body cap, the API key
 * check, HTTP statuses and headers, streaming as server-sent events, noticing a client that went away
 * (its request is cancelled in the engine at once). Does not own: the engine thread (bridge.h), request
 * validation and answer shapes (api.h), metric names (metrics.h), signals (cmd_serve.c). */
#ifndef KVH_SERVE_SERVER_H
#define KVH_SERVE_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "model/tokenizer.h"
#include "serve/bridge.h"
#include "serve/metrics.h"
#include "util/util.h"

typedef struct kvh_server_options {
    const char *host;       /* IPv4 or IPv6 literal, or "localhost"; default 127.0.0.1 */
    int port;               /* 0 = any free port (kvh_server_port says which) */
    size_t max_body;        /* request body cap in bytes (413 beyond) */
    const char *api_key;    /* NULL or "" = no key; else "Authorization: Bearer KEY" on /v1/ and /metrics */
    const char *model_name; /* what /v1/models lists and answers carry */
    const kvh_tokenizer *tok;
    int n_vocab, n_positions, eot;
    const kvh_serve_info *info; /* for /metrics */
    unsigned max_connections;
    bool log_requests;      /* one line per request on stderr */
} kvh_server_options;

typedef struct kvh_server kvh_server;

/* Binds and starts serving (threads of libmicrohttpd). The bridge and options' pointers must outlive the
 * server. */
int kvh_server_start(kvh_server **out, kvh_bridge *b, const kvh_server_options *o, kvh_err *err);
int kvh_server_port(const kvh_server *s);
/* Waits up to timeout_ms until every accepted completion has been answered to the end (a cancelled
 * stream still sends its last chunk and [DONE]); true when all have. */
bool kvh_server_wait_quiet(kvh_server *s, int timeout_ms);
/* Handlers blocked waiting for tokens give up (their requests are cancelled) from now on. */
void kvh_server_close_waits(kvh_server *s);
/* Stops accepting, closes every connection, joins libmicrohttpd's threads, frees. */
void kvh_server_stop(kvh_server *s);

#endif
