/* bridge.h — the engine on a thread of its own, and the queues HTTP handler threads talk to it through.
 * Owns: the engine thread (it alone calls the engine: submit, cancel, step), the inbox (submissions and
 * cancellations, under one mutex, drained before every step), each request's outbox (its tokens and its
 * end, read by the handler with a condition variable), admission limits (waiting requests, draining),
 * and the figures /metrics shows (engine statistics after each step, TTFT / TPOT histograms).
 * Does not own: the engine's scheduling (engine.c), HTTP or text (server.c, api.c).
 *
 * Threads: kvh_bridge_create starts the engine thread; every other function may be called from any
 * thread. When nothing is queued or running the engine thread sleeps on a condition variable.
 * Lifetime of a request: kvh_bridge_submit gives the handler a reference; the bridge holds its own until
 * the engine is done with it; kvh_bridge_release drops the handler's (cancelling the request first when
 * it is still going, e.g. the client went away). */
#ifndef KVH_SERVE_BRIDGE_H
#define KVH_SERVE_BRIDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

typedef struct kvh_bridge kvh_bridge;
typedef struct kvh_bridge_req kvh_bridge_req;

typedef struct kvh_bridge_options {
    int max_waiting; /* requests queued and not yet started beyond which submit answers FULL; 0 = no limit */
} kvh_bridge_options;

typedef enum {
    KVH_BRIDGE_OK,       /* queued; *out is the handler's reference */
    KVH_BRIDGE_FULL,     /* max_waiting requests are already waiting (HTTP 429) */
    KVH_BRIDGE_DRAINING, /* shutting down: no new requests (HTTP 503) */
    KVH_BRIDGE_BROKEN,   /* the engine failed a step; nothing more runs (HTTP 500) */
    KVH_BRIDGE_NOMEM
} kvh_bridge_status;

/* What a handler reads from its request's outbox. */
typedef struct kvh_bridge_poll {
    int n_new;               /* tokens copied into the caller's array */
    bool done;               /* the request is over (no more tokens) */
    kvh_finish_reason why;   /* when done */
    bool failed;             /* when done: the engine refused or failed it; error says why */
    char error[512];
} kvh_bridge_poll;

/* Histogram bucket bounds (seconds, ascending; +Inf implied). */
#define KVH_BRIDGE_TTFT_BUCKETS 12
#define KVH_BRIDGE_TPOT_BUCKETS 12
extern const double kvh_bridge_ttft_bounds[KVH_BRIDGE_TTFT_BUCKETS];
extern const double kvh_bridge_tpot_bounds[KVH_BRIDGE_TPOT_BUCKETS];

typedef struct kvh_histogram {
    uint64_t count[KVH_BRIDGE_TTFT_BUCKETS + 1]; /* per bucket (not cumulative), the last is +Inf */
    uint64_t n;
    double sum;
} kvh_histogram;

/* A consistent copy of the figures, taken under the lock. */
typedef struct kvh_bridge_snapshot {
    kvh_engine_stats engine; /* as of the last step */
    uint64_t evict_calls;    /* the router's evict hook calls (0 without plugins) */
    uint32_t inbox;          /* submitted, not yet handed to the engine */
    uint32_t waiting;        /* submitted, no token yet (inbox included) */
    uint32_t in_flight;      /* submitted, not over */
    uint64_t submitted, rejected_full, completed, cancelled, failed;
    kvh_histogram ttft, tpot;
    bool draining, broken;
} kvh_bridge_snapshot;

/* Starts the engine thread. The engine's callbacks are the bridge's from now on; the engine must outlive
 * the bridge. */
int kvh_bridge_create(kvh_bridge **out, kvh_engine *e, const kvh_bridge_options *o, kvh_err *err);
/* Cancels what is left, stops and joins the engine thread, frees the bridge. Handlers must have released
 * their requests (the server is stopped first). */
void kvh_bridge_free(kvh_bridge *b);

/* Queues a request (its prompt is copied). */
kvh_bridge_status kvh_bridge_submit(kvh_bridge *b, const kvh_engine_request *r, kvh_bridge_req **out);
/* Asks the engine thread to end the request now (no-op when it is over). */
void kvh_bridge_cancel(kvh_bridge *b, kvh_bridge_req *q);
/* Waits up to timeout_ms (< 0: no limit) for tokens after the first `have` or for the end; copies at most
 * cap new tokens into out. Returns 0 with *p filled (n_new may be 0 on timeout). */
int kvh_bridge_wait(kvh_bridge *b, kvh_bridge_req *q, int have, int32_t *out, int cap, int timeout_ms,
                    kvh_bridge_poll *p);
/* The time the request was submitted and the times of its first and latest tokens (kvh_now_ns; 0 = none). */
void kvh_bridge_req_times(kvh_bridge *b, kvh_bridge_req *q, uint64_t *submitted, uint64_t *first, uint64_t *last);
/* Drops the handler's reference; cancels the request first if it is not over. */
void kvh_bridge_release(kvh_bridge *b, kvh_bridge_req *q);

/* Stop admitting (submit answers DRAINING from now on). */
void kvh_bridge_drain(kvh_bridge *b);
/* Cancels every request not over. */
void kvh_bridge_cancel_all(kvh_bridge *b);
/* Waits up to timeout_ms until no request is in flight; true when none is. */
bool kvh_bridge_wait_idle(kvh_bridge *b, int timeout_ms);

void kvh_bridge_snapshot_get(kvh_bridge *b, kvh_bridge_snapshot *s);

#endif
