/* server.c — routes, limits and streaming of `kvhost serve` on libmicrohttpd (server.h).
 * libmicrohttpd runs one thread per connection (MHD_USE_THREAD_PER_CONNECTION): a handler may block
 * while its request waits for tokens. It waits in slices of WAIT_MS and between slices looks at its
 * socket (a peek): a client that closed the connection is noticed within a slice, its request is
 * cancelled and the connection dropped. The request-completed callback releases every request at the
 * end of its HTTP exchange, cancelling it in the engine when it is not over (a stream whose client went
 * away while a chunk was being written ends there). */
#define _GNU_SOURCE
#include "serve/server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "serve/api.h"

#define WAIT_MS 100

struct kvh_server {
    struct MHD_Daemon *d;
    kvh_bridge *b;
    kvh_server_options o;
    int port;
    volatile int closing; /* read by handler threads; __atomic */
    uint64_t http[KVH_SERVE_N_CODES];
    uint64_t next_id;
    int open_completions; /* accepted completion requests whose HTTP exchange is not over; __atomic */
};

/* One completion request from acceptance to the end of its HTTP exchange. */
typedef struct completion {
    kvh_server *srv;
    kvh_bridge_req *q;
    kvh_serve_params p;
    kvh_serve_text text;
    int fd;
    int have;             /* tokens taken from the outbox */
    int n_counted;        /* completion tokens (up to a stop string) */
    bool finished;        /* no more text will come */
    const char *finish;   /* "length" | "stop" */
    char id[48];
    long long created;
    size_t sent;          /* text[0..sent) is in chunks already (streaming) */
    char *o;              /* bytes of the current chunk being written */
    size_t o_n, o_off;
    bool done_sent;
} completion;

typedef struct conn_ctx {
    char *body;
    size_t n, cap;
    bool too_big;
    completion *c; /* set for an accepted completion request */
} conn_ctx;

static bool is_closing(kvh_server *s) { return __atomic_load_n(&s->closing, __ATOMIC_ACQUIRE) != 0; }

static bool client_gone(int fd) {
    if (fd < 0) return false;
    char ch;
    const ssize_t r = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0) return true;
    return r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

static enum MHD_Result send_body(kvh_server *s, struct MHD_Connection *conn, int status, const char *type, char *body,
                                 const char *h1, const char *v1) {
    if (!body) {
        status = 500;
        type = "application/json";
        body = strdup("{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}");
        if (!body) return MHD_NO;
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    if (h1) MHD_add_response_header(r, h1, v1);
    __atomic_fetch_add(&s->http[kvh_serve_code_index(status)], 1, __ATOMIC_RELAXED);
    const enum MHD_Result ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(kvh_server *s, struct MHD_Connection *conn, int status, char *body) {
    return send_body(s, conn, status, "application/json", body, NULL, NULL);
}

static enum MHD_Result send_error(kvh_server *s, struct MHD_Connection *conn, const kvh_serve_error *e) {
    const char *h = NULL, *v = NULL;
    if (e->status == 429 || e->status == 503) h = MHD_HTTP_HEADER_RETRY_AFTER, v = "1";
    if (e->status == 401) h = MHD_HTTP_HEADER_WWW_AUTHENTICATE, v = "Bearer";
    if (e->status == 405) h = MHD_HTTP_HEADER_ALLOW, v = strcmp(e->param, "POST") == 0 ? "POST" : "GET, HEAD";
    if (s->o.log_requests) fprintf(stderr, "kvhost serve: %d %s\n", e->status, e->message);
    return send_body(s, conn, e->status, "application/json", kvh_serve_error_json(e), h, v);
}

/* ---- completions ---------------------------------------------------------------------------------------- */

static void completion_free(completion *c) {
    if (!c) return;
    kvh_bridge_release(c->srv->b, c->q); /* cancels it in the engine when it is not over */
    kvh_serve_text_free(&c->text);
    kvh_serve_params_free(&c->p);
    free(c->o);
    free(c);
}

/* Takes the tokens the outbox has (waiting up to timeout_ms for some) into the text. 0, or -1 when out
 * of memory; *got: whether anything changed. */
static int advance(completion *c, int timeout_ms, bool *got) {
    int32_t toks[64];
    kvh_bridge_poll p;
    *got = false;
    kvh_bridge_wait(c->srv->b, c->q, c->have, toks, 64, timeout_ms, &p);
    c->have += p.n_new;
    if (p.n_new > 0) *got = true;
    for (int i = 0; i < p.n_new && !c->finished; i++) {
        c->n_counted++;
        if (toks[i] == c->srv->o.eot) continue; /* the end of the text: not part of it */
        char small[256], *bytes = small;
        int n = kvh_tokenizer_token_bytes(c->srv->o.tok, toks[i], small, sizeof small);
        if (n > (int)sizeof small) {
            bytes = malloc((size_t)n);
            if (!bytes) return -1;
            n = kvh_tokenizer_token_bytes(c->srv->o.tok, toks[i], bytes, (size_t)n);
        }
        size_t from;
        const int rc = n > 0 ? kvh_serve_text_push(&c->text, bytes, (size_t)n, &from) : 0;
        if (bytes != small) free(bytes);
        if (rc < 0) return -1;
        if (rc == 1) { /* a stop string: the request is over here */
            c->finished = true;
            c->finish = "stop";
            kvh_bridge_cancel(c->srv->b, c->q);
        }
    }
    if (p.done && !c->finished) {
        size_t from;
        if (kvh_serve_text_flush(&c->text, &from) < 0) return -1;
        c->finished = true;
        c->finish = p.why == KVH_FINISH_EOS ? "stop" : "length"; /* cancelled at shutdown: cut short */
        *got = true;
    }
    return 0;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    completion *c = cls;
    for (;;) {
        if (c->o_off < c->o_n) {
            const size_t n = c->o_n - c->o_off < max ? c->o_n - c->o_off : max;
            memcpy(buf, c->o + c->o_off, n);
            c->o_off += n;
            return (ssize_t)n;
        }
        free(c->o);
        c->o = NULL;
        c->o_n = c->o_off = 0;
        if (c->done_sent) return MHD_CONTENT_READER_END_OF_STREAM;
        if (c->text.n_out > c->sent) {
            c->o = kvh_serve_sse_chunk(c->id, c->created, c->srv->o.model_name, c->text.out + c->sent,
                                       c->text.n_out - c->sent, NULL, -1, 0);
            if (!c->o) return MHD_CONTENT_READER_END_WITH_ERROR;
            c->o_n = strlen(c->o);
            c->sent = c->text.n_out;
            continue;
        }
        if (c->finished) {
            char *last = kvh_serve_sse_chunk(c->id, c->created, c->srv->o.model_name, "", 0, c->finish, c->p.n_prompt,
                                             c->n_counted);
            if (!last) return MHD_CONTENT_READER_END_WITH_ERROR;
            const size_t n = strlen(last), nd = strlen(KVH_SERVE_SSE_DONE);
            c->o = realloc(last, n + nd + 1);
            if (!c->o) {
                free(last);
                return MHD_CONTENT_READER_END_WITH_ERROR;
            }
            memcpy(c->o + n, KVH_SERVE_SSE_DONE, nd + 1);
            c->o_n = n + nd;
            c->done_sent = true;
            continue;
        }
        bool got;
        if (advance(c, WAIT_MS, &got) != 0) return MHD_CONTENT_READER_END_WITH_ERROR;
        if (client_gone(c->fd) || (!got && is_closing(c->srv))) {
            kvh_bridge_cancel(c->srv->b, c->q);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static enum MHD_Result handle_completion(kvh_server *s, struct MHD_Connection *conn, conn_ctx *cx) {
    kvh_serve_error e = {0};
    if (cx->too_big) {
        kvh_serve_fail(&e, 413, NULL, "body_too_large", "the request body is larger than %zu bytes", s->o.max_body);
        return send_error(s, conn, &e);
    }
    completion *c = calloc(1, sizeof *c);
    if (!c) return send_json(s, conn, 500, NULL);
    c->srv = s;
    const uint64_t n = __atomic_add_fetch(&s->next_id, 1, __ATOMIC_RELAXED);
    snprintf(c->id, sizeof c->id, "cmpl-kvh-%llx-%llu", (unsigned long long)(kvh_now_ns() & 0xffffffffffull),
             (unsigned long long)n);
    c->created = (long long)time(NULL);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    c->fd = ci ? ci->connect_fd : -1;
    kvh_serve_limits lim = {.tok = s->o.tok,
                            .n_vocab = s->o.n_vocab,
                            .n_positions = s->o.n_positions,
                            .eot = s->o.eot,
                            .default_seed = kvh_now_ns() ^ (n * 0x9E3779B97F4A7C15ull)};
    if (kvh_serve_parse_completion(cx->body ? cx->body : "", cx->n, &lim, &c->p, &e) != 0) {
        free(c);
        return send_error(s, conn, &e);
    }
    kvh_serve_text_init(&c->text, c->p.stop, c->p.n_stop);
    kvh_engine_request er = {.prompt = c->p.prompt,
                             .n_prompt = c->p.n_prompt,
                             .max_tokens = c->p.max_tokens,
                             .sampling = c->p.sampling,
                             .ignore_eos = false};
    switch (kvh_bridge_submit(s->b, &er, &c->q)) {
    case KVH_BRIDGE_OK: break;
    case KVH_BRIDGE_FULL:
        kvh_serve_fail(&e, 429, NULL, "too_many_waiting", "too many requests are waiting; retry later");
        break;
    case KVH_BRIDGE_DRAINING:
        kvh_serve_fail(&e, 503, NULL, "shutting_down", "the server is shutting down");
        break;
    case KVH_BRIDGE_BROKEN:
        kvh_serve_fail(&e, 500, NULL, "engine_failed", "the engine failed earlier; restart the server");
        break;
    default: kvh_serve_fail(&e, 500, NULL, NULL, "out of memory"); break;
    }
    if (!c->q) {
        completion_free(c);
        return send_error(s, conn, &e);
    }
    cx->c = c; /* from here the request-completed callback releases it */
    __atomic_fetch_add(&s->open_completions, 1, __ATOMIC_RELAXED);

    /* the first token (or the end): the answer's status depends on it */
    while (c->have == 0 && !c->finished) {
        bool got;
        if (advance(c, WAIT_MS, &got) != 0) return send_json(s, conn, 500, NULL);
        if (client_gone(c->fd) || (!got && is_closing(s))) {
            kvh_bridge_cancel(s->b, c->q);
            return MHD_NO; /* drops the connection */
        }
    }
    if (c->have == 0) { /* over without a token: refused by the engine, or cancelled */
        kvh_bridge_poll p;
        int32_t none[1];
        kvh_bridge_wait(s->b, c->q, 0, none, 0, 0, &p);
        if (p.failed) {
            const bool engine = strncmp(p.error, "engine step failed", 18) == 0;
            kvh_serve_fail(&e, engine ? 500 : 400, engine ? NULL : "prompt", engine ? "engine_failed" : "request_rejected",
                           "%s", p.error);
        } else {
            kvh_serve_fail(&e, 503, NULL, "shutting_down", "the server is shutting down: the request was cancelled");
        }
        return send_error(s, conn, &e);
    }
    if (c->p.stream) {
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_reader, c, NULL);
        if (!r) return MHD_NO;
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        __atomic_fetch_add(&s->http[kvh_serve_code_index(200)], 1, __ATOMIC_RELAXED);
        const enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ret;
    }
    while (!c->finished) {
        bool got;
        if (advance(c, WAIT_MS, &got) != 0) return send_json(s, conn, 500, NULL);
        if (client_gone(c->fd) || (!got && is_closing(s))) {
            kvh_bridge_cancel(s->b, c->q);
            return MHD_NO;
        }
    }
    return send_json(s, conn, 200,
                     kvh_serve_completion_json(c->id, c->created, s->o.model_name, c->text.out ? c->text.out : "",
                                               c->text.n_out, c->finish, c->p.n_prompt, c->n_counted));
}

/* ---- routing ------------------------------------------------------------------------------------------- */

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                               const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    (void)version;
    kvh_server *s = cls;
    conn_ctx *cx = *con_cls;
    if (!cx) { /* headers only */
        cx = calloc(1, sizeof *cx);
        if (!cx) return MHD_NO;
        *con_cls = cx;
        const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->o.max_body) cx->too_big = true;
        return MHD_YES;
    }
    if (*upload_size) { /* a piece of the body */
        if (!cx->too_big) {
            if (cx->n + *upload_size > s->o.max_body) {
                cx->too_big = true;
                free(cx->body);
                cx->body = NULL;
                cx->n = cx->cap = 0;
            } else {
                if (cx->n + *upload_size > cx->cap) {
                    size_t cap = cx->cap ? cx->cap : 4096;
                    while (cap < cx->n + *upload_size) cap *= 2;
                    char *nb = realloc(cx->body, cap);
                    if (!nb) return MHD_NO;
                    cx->body = nb;
                    cx->cap = cap;
                }
                memcpy(cx->body + cx->n, upload_data, *upload_size);
                cx->n += *upload_size;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }

    kvh_serve_error e = {0};
    const bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0, post = strcmp(method, "POST") == 0;
    if (strcmp(url, "/health") == 0) {
        if (!get) return send_error(s, conn, (kvh_serve_fail(&e, 405, "GET", "method_not_allowed", "use GET /health"), &e));
        kvh_bridge_snapshot sn;
        kvh_bridge_snapshot_get(s->b, &sn);
        if (sn.draining || sn.broken)
            return send_json(s, conn, 503, strdup(sn.broken ? "{\"status\":\"engine failed\"}" : "{\"status\":\"draining\"}"));
        return send_json(s, conn, 200, strdup("{\"status\":\"ok\"}"));
    }
    const bool known = strcmp(url, "/v1/completions") == 0 || strcmp(url, "/v1/models") == 0 ||
                       strcmp(url, "/metrics") == 0;
    if (!known) {
        kvh_serve_fail(&e, 404, NULL, "not_found",
                       "no route %s %s (kvhost serve has POST /v1/completions, GET /v1/models, /health, /metrics)",
                       method, url);
        return send_error(s, conn, &e);
    }
    if (s->o.api_key && s->o.api_key[0] &&
        !kvh_serve_auth_ok(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
                           s->o.api_key)) {
        kvh_serve_fail(&e, 401, NULL, "invalid_api_key", "missing or wrong API key (Authorization: Bearer KEY)");
        return send_error(s, conn, &e);
    }
    if (strcmp(url, "/v1/completions") == 0) {
        if (!post) return send_error(s, conn, (kvh_serve_fail(&e, 405, "POST", "method_not_allowed", "use POST /v1/completions"), &e));
        return handle_completion(s, conn, cx);
    }
    if (!get) return send_error(s, conn, (kvh_serve_fail(&e, 405, "GET", "method_not_allowed", "use GET %s", url), &e));
    if (strcmp(url, "/v1/models") == 0) return send_json(s, conn, 200, kvh_serve_models_json(s->o.model_name, 0));
    kvh_bridge_snapshot sn;
    kvh_bridge_snapshot_get(s->b, &sn);
    uint64_t http[KVH_SERVE_N_CODES];
    for (int i = 0; i < KVH_SERVE_N_CODES; i++) http[i] = __atomic_load_n(&s->http[i], __ATOMIC_RELAXED);
    http[0]++; /* this answer */
    return send_body(s, conn, 200, "text/plain; version=0.0.4; charset=utf-8", kvh_serve_metrics_text(&sn, s->o.info, http),
                     NULL, NULL);
}

/* libmicrohttpd's own messages, prefixed so a log reader knows where they come from. One is dropped:
 * "application error generating response" is logged whenever the stream reader ends a response early,
 * which kvhost does on purpose when the client has gone or the server is closing (the request is
 * cancelled and counted in /metrics), so it would be a line per disconnected client. */
static void http_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (strstr(msg, "application error generating response")) return;
    const size_t n = strlen(msg);
    fprintf(stderr, "kvhost serve: http: %s%s", msg, n && msg[n - 1] == '\n' ? "" : "\n");
}

static void completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)conn;
    kvh_server *s = cls;
    conn_ctx *cx = *con_cls;
    if (!cx) return;
    if (cx->c && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && s->o.log_requests)
        fprintf(stderr, "kvhost serve: %s ended early (client gone or shutdown): cancelled\n", cx->c->id);
    if (cx->c) {
        completion_free(cx->c); /* releases the request: cancelled in the engine if not over */
        __atomic_fetch_sub(&s->open_completions, 1, __ATOMIC_RELAXED);
    }
    free(cx->body);
    free(cx);
    *con_cls = NULL;
}

int kvh_server_start(kvh_server **out, kvh_bridge *b, const kvh_server_options *o, kvh_err *err) {
    *out = NULL;
    kvh_server *s = calloc(1, sizeof *s);
    if (!s) return kvh_fail(err, "out of memory");
    s->b = b;
    s->o = *o;
    const char *host = o->host && o->host[0] ? o->host : "127.0.0.1";
    if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    const struct sockaddr *sa;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD | MHD_USE_ERROR_LOG;
    if (inet_pton(AF_INET, host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)o->port);
        sa = (const struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)o->port);
        sa = (const struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        free(s);
        return kvh_fail(err, "--host '%s': expected an IPv4 or IPv6 address (or localhost)", host);
    }
    s->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, handler, s, MHD_OPTION_EXTERNAL_LOGGER, http_log, NULL,
                            MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
                            MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned)(o->max_connections ? o->max_connections : 256), MHD_OPTION_CONNECTION_TIMEOUT,
                            (unsigned)300, MHD_OPTION_END);
    if (!s->d) {
        free(s);
        return kvh_fail(err, "cannot listen on %s port %d (in use, or not an address of this machine?)", host, o->port);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : o->port;
    *out = s;
    return 0;
}

int kvh_server_port(const kvh_server *s) { return s->port; }

bool kvh_server_wait_quiet(kvh_server *s, int timeout_ms) {
    const uint64_t end = kvh_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (__atomic_load_n(&s->open_completions, __ATOMIC_RELAXED) > 0) {
        if (kvh_now_ns() >= end) return false;
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    return true;
}

void kvh_server_close_waits(kvh_server *s) { __atomic_store_n(&s->closing, 1, __ATOMIC_RELEASE); }

void kvh_server_stop(kvh_server *s) {
    if (!s) return;
    kvh_server_close_waits(s);
    MHD_stop_daemon(s->d);
    free(s);
}
