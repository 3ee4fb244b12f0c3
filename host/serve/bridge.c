/* bridge.c — the engine thread and the queues between it and the HTTP handlers (bridge.h).
 * One mutex guards everything shared: the inbox, the cancel list, each request's outbox and the figures.
 * The engine is only ever called by the engine thread, and never with the mutex held (its callbacks,
 * which run inside kvh_engine_step and kvh_engine_cancel, take the mutex themselves). */
#define _GNU_SOURCE
#include "serve/bridge.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/router.h"
#ifdef _OPENMP
#include <omp.h>
#endif

const double kvh_bridge_ttft_bounds[KVH_BRIDGE_TTFT_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                                0.5,   1,    2.5,   5,    10,  30};
const double kvh_bridge_tpot_bounds[KVH_BRIDGE_TPOT_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                                0.1,   0.25,   0.5,   1,    2.5,   5};

struct kvh_bridge_req {
    kvh_engine_request er; /* er.prompt points to the copy below */
    int32_t *prompt;
    uint64_t id;           /* the engine's id; 0 until submitted */
    int refs;              /* handler + bridge (+ one per pending cancel) */
    bool done, failed, cancel_wanted;
    kvh_finish_reason why;
    char error[512];
    int32_t *tokens;       /* [er.max_tokens] */
    int n_tokens;
    uint64_t t_submit, t_first, t_last;
    pthread_cond_t cv;
    kvh_bridge_req *next_in;       /* inbox */
    kvh_bridge_req *prev_a, *next_a; /* requests not over */
};

typedef struct cancel_item {
    kvh_bridge_req *q;
    struct cancel_item *next;
} cancel_item;

struct kvh_bridge {
    kvh_engine *e;
    kvh_bridge_options o;
    pthread_mutex_t mu;
    pthread_cond_t wake;    /* the engine thread sleeps on it */
    pthread_cond_t idle_cv; /* kvh_bridge_wait_idle */
    pthread_t th;
    bool started, stop;
    kvh_bridge_req *in_head, *in_tail;
    cancel_item *cancels;
    kvh_bridge_req *active;
    kvh_bridge_snapshot st; /* counters live here directly */
};

static void cond_init_mono(pthread_cond_t *c) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

static void deadline_after(struct timespec *ts, int ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static void req_unref_locked(kvh_bridge_req *q) {
    if (--q->refs > 0) return;
    pthread_cond_destroy(&q->cv);
    free(q->prompt);
    free(q->tokens);
    free(q);
}

static void hist_add(kvh_histogram *h, const double *bounds, double v) {
    int i = 0;
    while (i < KVH_BRIDGE_TTFT_BUCKETS && v > bounds[i]) i++;
    h->count[i]++;
    h->n++;
    h->sum += v;
}

/* The request is over: outbox closed, figures counted, the bridge's reference dropped. */
static void finish_locked(kvh_bridge *b, kvh_bridge_req *q, kvh_finish_reason why, const char *failure) {
    if (q->done) return;
    q->done = true;
    q->why = why;
    if (failure) {
        q->failed = true;
        snprintf(q->error, sizeof q->error, "%s", failure);
        b->st.failed++;
    } else if (why == KVH_FINISH_CANCELLED) {
        b->st.cancelled++;
    } else {
        b->st.completed++;
    }
    if (q->n_tokens == 0) b->st.waiting--;
    else hist_add(&b->st.ttft, kvh_bridge_ttft_bounds, (double)(q->t_first - q->t_submit) / 1e9);
    if (q->n_tokens >= 2)
        hist_add(&b->st.tpot, kvh_bridge_tpot_bounds, (double)(q->t_last - q->t_first) / 1e9 / (q->n_tokens - 1));
    b->st.in_flight--;
    if (q->prev_a) q->prev_a->next_a = q->next_a;
    else b->active = q->next_a;
    if (q->next_a) q->next_a->prev_a = q->prev_a;
    q->prev_a = q->next_a = NULL;
    pthread_cond_broadcast(&q->cv);
    if (b->st.in_flight == 0) pthread_cond_broadcast(&b->idle_cv);
    req_unref_locked(q);
}

static void on_token(void *ctx, uint64_t id, void *user, int index, int32_t token, uint64_t t_ns) {
    (void)id;
    kvh_bridge *b = ctx;
    kvh_bridge_req *q = user;
    pthread_mutex_lock(&b->mu);
    if (!q->done && index == q->n_tokens && q->n_tokens < q->er.max_tokens) {
        if (q->n_tokens == 0) {
            q->t_first = t_ns;
            b->st.waiting--;
        }
        q->tokens[q->n_tokens++] = token;
        q->t_last = t_ns;
        pthread_cond_broadcast(&q->cv);
    }
    pthread_mutex_unlock(&b->mu);
}

static void on_finish(void *ctx, uint64_t id, void *user, kvh_finish_reason why, uint64_t t_ns) {
    (void)id;
    (void)t_ns;
    kvh_bridge *b = ctx;
    pthread_mutex_lock(&b->mu);
    finish_locked(b, user, why, NULL);
    pthread_mutex_unlock(&b->mu);
}

static void refresh_stats(kvh_bridge *b) {
    kvh_engine_stats es;
    kvh_engine_get_stats(b->e, &es);
    kvh_session *s = kvh_engine_session(b->e);
    const uint64_t ev = s && s->router ? kvh_router_evict_calls(s->router) : 0;
    pthread_mutex_lock(&b->mu);
    b->st.engine = es;
    b->st.evict_calls = ev;
    pthread_mutex_unlock(&b->mu);
}

/* Fails every request not over (the engine cannot step any more). */
static void fail_all_locked(kvh_bridge *b, const char *msg) {
    while (b->active) finish_locked(b, b->active, KVH_FINISH_CANCELLED, msg);
}

static void *engine_thread(void *arg) {
    kvh_bridge *b = arg;
    kvh_err err = {{0}};
#ifdef _OPENMP
    /* The CPU backend sets its thread count with omp_set_num_threads on the thread that created it, and
     * sizes its per-thread scratch for that many: OpenMP's setting is per thread, so this thread, which
     * runs every forward pass, must ask for the same (else parallel regions get one thread per core). */
    const kvh_session *s = kvh_engine_session(b->e);
    if (s && s->opt.threads >= 1) omp_set_num_threads(s->opt.threads);
#endif
    pthread_mutex_lock(&b->mu);
    for (;;) {
        while (!b->stop && !b->in_head && !b->cancels && (b->st.broken || kvh_engine_idle(b->e)))
            pthread_cond_wait(&b->wake, &b->mu);
        if (b->stop) break;
        kvh_bridge_req *subs = b->in_head;
        cancel_item *cancels = b->cancels;
        b->in_head = b->in_tail = NULL;
        b->cancels = NULL;
        b->st.inbox = 0;
        pthread_mutex_unlock(&b->mu);

        for (kvh_bridge_req *q = subs; q;) {
            kvh_bridge_req *next = q->next_in; /* q may be freed below */
            pthread_mutex_lock(&b->mu);
            const bool skip = q->cancel_wanted || b->st.broken;
            if (skip) finish_locked(b, q, KVH_FINISH_CANCELLED, b->st.broken ? "the engine failed earlier" : NULL);
            pthread_mutex_unlock(&b->mu);
            if (!skip) {
                uint64_t id = 0;
                const int rc = kvh_engine_submit(b->e, &q->er, &id, &err);
                pthread_mutex_lock(&b->mu);
                if (rc != 0) finish_locked(b, q, KVH_FINISH_CANCELLED, err.msg);
                else q->id = id;
                pthread_mutex_unlock(&b->mu);
            }
            q = next;
        }
        for (cancel_item *c = cancels; c;) {
            cancel_item *next = c->next;
            pthread_mutex_lock(&b->mu);
            const uint64_t id = c->q->done ? 0 : c->q->id;
            pthread_mutex_unlock(&b->mu);
            if (id) kvh_engine_cancel(b->e, id); /* calls on_finish */
            pthread_mutex_lock(&b->mu);
            req_unref_locked(c->q);
            pthread_mutex_unlock(&b->mu);
            free(c);
            c = next;
        }
        if (!b->st.broken && !kvh_engine_idle(b->e)) { /* st.broken is only written by this thread */
            if (kvh_engine_step(b->e, &err) != 0) {
                fprintf(stderr, "kvhost serve: engine step failed: %s (no more requests run)\n", err.msg);
                pthread_mutex_lock(&b->mu);
                b->st.broken = true;
                char msg[sizeof err.msg + 32]; /* room for the whole message: no truncation */
                snprintf(msg, sizeof msg, "engine step failed: %s", err.msg);
                fail_all_locked(b, msg);
                pthread_mutex_unlock(&b->mu);
            }
        }
        refresh_stats(b);
        pthread_mutex_lock(&b->mu);
    }
    /* stopping: end what is left (the inbox's requests are on the active list too) */
    b->in_head = b->in_tail = NULL;
    b->st.inbox = 0;
    while (b->active) {
        kvh_bridge_req *q = b->active;
        const uint64_t id = q->id;
        pthread_mutex_unlock(&b->mu);
        if (!id || b->st.broken || kvh_engine_cancel(b->e, id) != 0) {
            pthread_mutex_lock(&b->mu);
            if (b->active == q) finish_locked(b, q, KVH_FINISH_CANCELLED, NULL);
            pthread_mutex_unlock(&b->mu);
        }
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

int kvh_bridge_create(kvh_bridge **out, kvh_engine *e, const kvh_bridge_options *o, kvh_err *err) {
    *out = NULL;
    kvh_bridge *b = calloc(1, sizeof *b);
    if (!b) return kvh_fail(err, "out of memory");
    b->e = e;
    if (o) b->o = *o;
    pthread_mutex_init(&b->mu, NULL);
    cond_init_mono(&b->wake);
    cond_init_mono(&b->idle_cv);
    kvh_engine_callbacks cb = {.on_token = on_token, .on_finish = on_finish, .ctx = b};
    kvh_engine_set_callbacks(e, &cb);
    refresh_stats(b);
    const int rc = pthread_create(&b->th, NULL, engine_thread, b);
    if (rc != 0) {
        kvh_bridge_free(b);
        return kvh_fail(err, "cannot start the engine thread: %s", strerror(rc));
    }
    b->started = true;
    *out = b;
    return 0;
}

void kvh_bridge_free(kvh_bridge *b) {
    if (!b) return;
    if (b->started) {
        pthread_mutex_lock(&b->mu);
        b->stop = true;
        pthread_cond_signal(&b->wake);
        pthread_mutex_unlock(&b->mu);
        pthread_join(b->th, NULL);
    }
    /* what the thread did not end (the inbox's requests are on the active list too) */
    b->in_head = b->in_tail = NULL;
    while (b->active) finish_locked(b, b->active, KVH_FINISH_CANCELLED, NULL);
    for (cancel_item *c = b->cancels; c;) {
        cancel_item *next = c->next;
        req_unref_locked(c->q);
        free(c);
        c = next;
    }
    kvh_engine_callbacks none = {0};
    kvh_engine_set_callbacks(b->e, &none);
    pthread_cond_destroy(&b->wake);
    pthread_cond_destroy(&b->idle_cv);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

kvh_bridge_status kvh_bridge_submit(kvh_bridge *b, const kvh_engine_request *r, kvh_bridge_req **out) {
    *out = NULL;
    pthread_mutex_lock(&b->mu);
    kvh_bridge_status st = b->st.broken ? KVH_BRIDGE_BROKEN
                           : b->st.draining ? KVH_BRIDGE_DRAINING
                           : (b->o.max_waiting > 0 && b->st.waiting >= (uint32_t)b->o.max_waiting) ? KVH_BRIDGE_FULL
                                                                                                  : KVH_BRIDGE_OK;
    if (st == KVH_BRIDGE_FULL) b->st.rejected_full++;
    pthread_mutex_unlock(&b->mu);
    if (st != KVH_BRIDGE_OK) return st;

    kvh_bridge_req *q = calloc(1, sizeof *q);
    if (!q) return KVH_BRIDGE_NOMEM;
    q->prompt = malloc((size_t)(r->n_prompt > 0 ? r->n_prompt : 1) * sizeof *q->prompt);
    q->tokens = malloc((size_t)(r->max_tokens > 0 ? r->max_tokens : 1) * sizeof *q->tokens);
    if (!q->prompt || !q->tokens) {
        free(q->prompt);
        free(q->tokens);
        free(q);
        return KVH_BRIDGE_NOMEM;
    }
    if (r->n_prompt > 0) memcpy(q->prompt, r->prompt, (size_t)r->n_prompt * sizeof *q->prompt);
    q->er = *r;
    q->er.prompt = q->prompt;
    q->er.user = q;
    q->refs = 2;
    q->t_submit = kvh_now_ns();
    cond_init_mono(&q->cv);

    pthread_mutex_lock(&b->mu);
    if (b->in_tail) b->in_tail->next_in = q;
    else b->in_head = q;
    b->in_tail = q;
    q->next_a = b->active;
    if (b->active) b->active->prev_a = q;
    b->active = q;
    b->st.inbox++;
    b->st.waiting++;
    b->st.in_flight++;
    b->st.submitted++;
    pthread_cond_signal(&b->wake);
    pthread_mutex_unlock(&b->mu);
    *out = q;
    return KVH_BRIDGE_OK;
}

static void cancel_locked(kvh_bridge *b, kvh_bridge_req *q) {
    if (q->done || q->cancel_wanted) return;
    q->cancel_wanted = true;
    cancel_item *c = malloc(sizeof *c);
    if (!c) return; /* the flag still stops it before submission; a running one then ends on its own */
    q->refs++;
    c->q = q;
    c->next = b->cancels;
    b->cancels = c;
    pthread_cond_signal(&b->wake);
}

void kvh_bridge_cancel(kvh_bridge *b, kvh_bridge_req *q) {
    pthread_mutex_lock(&b->mu);
    cancel_locked(b, q);
    pthread_mutex_unlock(&b->mu);
}

int kvh_bridge_wait(kvh_bridge *b, kvh_bridge_req *q, int have, int32_t *out, int cap, int timeout_ms,
                    kvh_bridge_poll *p) {
    memset(p, 0, sizeof *p);
    struct timespec dl;
    if (timeout_ms >= 0) deadline_after(&dl, timeout_ms);
    pthread_mutex_lock(&b->mu);
    while (q->n_tokens <= have && !q->done) {
        if (timeout_ms < 0) pthread_cond_wait(&q->cv, &b->mu);
        else if (pthread_cond_timedwait(&q->cv, &b->mu, &dl) == ETIMEDOUT) break;
    }
    int n = q->n_tokens - have;
    if (n < 0) n = 0;
    if (n > cap) n = cap;
    if (n > 0) memcpy(out, q->tokens + have, (size_t)n * sizeof *out);
    p->n_new = n;
    p->done = q->done && have + n >= q->n_tokens;
    p->why = q->why;
    p->failed = q->failed;
    if (q->failed) snprintf(p->error, sizeof p->error, "%s", q->error);
    pthread_mutex_unlock(&b->mu);
    return 0;
}

void kvh_bridge_req_times(kvh_bridge *b, kvh_bridge_req *q, uint64_t *submitted, uint64_t *first, uint64_t *last) {
    pthread_mutex_lock(&b->mu);
    if (submitted) *submitted = q->t_submit;
    if (first) *first = q->t_first;
    if (last) *last = q->t_last;
    pthread_mutex_unlock(&b->mu);
}

void kvh_bridge_release(kvh_bridge *b, kvh_bridge_req *q) {
    if (!q) return;
    pthread_mutex_lock(&b->mu);
    cancel_locked(b, q);
    req_unref_locked(q);
    pthread_mutex_unlock(&b->mu);
}

void kvh_bridge_drain(kvh_bridge *b) {
    pthread_mutex_lock(&b->mu);
    b->st.draining = true;
    pthread_mutex_unlock(&b->mu);
}

void kvh_bridge_cancel_all(kvh_bridge *b) {
    pthread_mutex_lock(&b->mu);
    for (kvh_bridge_req *q = b->active; q; q = q->next_a) cancel_locked(b, q);
    pthread_mutex_unlock(&b->mu);
}

bool kvh_bridge_wait_idle(kvh_bridge *b, int timeout_ms) {
    struct timespec dl;
    deadline_after(&dl, timeout_ms);
    pthread_mutex_lock(&b->mu);
    while (b->st.in_flight > 0)
        if (pthread_cond_timedwait(&b->idle_cv, &b->mu, &dl) == ETIMEDOUT) break;
    const bool idle = b->st.in_flight == 0;
    pthread_mutex_unlock(&b->mu);
    return idle;
}

void kvh_bridge_snapshot_get(kvh_bridge *b, kvh_bridge_snapshot *s) {
    pthread_mutex_lock(&b->mu);
    *s = b->st;
    pthread_mutex_unlock(&b->mu);
}
