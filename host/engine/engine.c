/* engine.c — implementation of the continuous-batching engine declared in engine.h.
 *
 * A request's tokens are its prompt followed by what it generated; `computed` of them are in its
 * sequence's cache. Every step feeds each running request the next piece of its tokens: one token when
 * only the last sampled one is missing (decode), a chunk of the prompt otherwise (prefill), and samples
 * when the piece reaches the end of the known tokens. Preempted requests keep their tokens and sampler and
 * are recomputed from scratch when admitted again (recompute, not swap: see docs/engine.md). */
#include "engine/engine.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/weights.h"

typedef struct request {
    uint64_t id;
    kvh_request_state state;
    int32_t *tokens;   /* [n_prompt + max_tokens] prompt, then generated tokens */
    int n_prompt, n_tokens, max_tokens, n_gen;
    int computed;      /* tokens in the sequence's cache */
    int seq;           /* -1 unless running */
    uint64_t admit_no; /* admission order: preemption takes the newest */
    kvh_sampler sampler;
    bool ignore_eos;
    void *user;
    int32_t *chain;    /* [n_prompt / B + 1] prefix-cache entries this request uses */
    uint32_t n_chain;
    bool registered;   /* its prompt blocks went into the prefix cache */
    bool evicted;      /* an evicting policy removed tokens of its sequence (no more registration) */
} request;

struct kvh_engine {
    kvh_session *s;
    const kvh_model *model;
    kvh_engine_options o;
    kvh_engine_callbacks cb;
    request **waiting; /* FIFO; preempted requests go back to the front */
    int n_waiting, cap_waiting;
    request **running; /* in admission order */
    int n_running;
    bool *seq_busy;    /* [max_seqs] */
    uint64_t next_id, admit_counter;
    kvh_prefix_cache pc;
    bool sharing;
    bool policy_sharing; /* sharing under an evicting policy: blocks registered with policy-state snapshots */
    uint32_t share_cap;  /* policy sharing: the last block boundary at or before the smallest budget + slack,
                          * where a prompt's first eviction can come at the earliest */
    char sharing_reason[256];
    float *logits;     /* [max_seqs, V] */
    /* batch scratch, [max_seqs] each */
    int *b_seq, *b_n;
    const int32_t **b_tok;
    request **b_req;
    kvh_engine_stats st;
    uint32_t policy_cap; /* tokens a sequence can hold at most when every layer has a budget (0: unbounded) */
};

/* ---- small helpers ------------------------------------------------------------------------------ */

static void request_free(request *r) {
    if (!r) return;
    kvh_sampler_free(&r->sampler);
    free(r->tokens);
    free(r->chain);
    free(r);
}

/* Tokens a running sequence counts against max_tokens: its fullest head, less the shared blocks (counted
 * once, by the prefix cache). */
static size_t seq_tokens(const kvh_engine *e, const request *r) {
    const kvh_kvcache *c = &e->s->cache;
    uint32_t mx = 0;
    for (int l = 0; l < c->n_layer; l++)
        for (int h = 0; h < c->n_head; h++) {
            const uint32_t n = c->heads[kvh_kvcache_head_index(c, r->seq, l, h)].n;
            if (n > mx) mx = n;
        }
    const size_t shared = (size_t)r->n_chain * c->block_slots;
    return mx > shared ? mx - shared : 0;
}

static size_t tokens_held(const kvh_engine *e) {
    size_t t = 0;
    for (int i = 0; i < e->n_running; i++) t += seq_tokens(e, e->running[i]);
    if (e->sharing) t += (size_t)kvh_prefix_cache_entries_in_use(&e->pc) * e->s->cache.block_slots;
    return t;
}

/* Why sharing prompt blocks between sequences would not be exact for this stack, or NULL. */
static const char *sharing_blocker(const kvh_engine *e, char *buf, size_t cap) {
    const kvh_kvcache *c = &e->s->cache;
    if (!c->block_slots) return "the KV layout is contiguous ([cache] block_size = 0)";
    const kvh_packed_matrix *pm = kvh_weights_find(e->s->weights, KVP_CAP_ACT_QUANT);
    if (pm) {
        /* its decode-sized products quantize activations, prefill pieces do not: a prompt block computed in
         * another sequence's pieces would differ beyond rounding from the one this sequence computes */
        snprintf(buf, cap, "weight format '%s' (layer %u) quantizes activations in decode-sized products but not "
                 "in prefill pieces, so a shared prompt block would differ from a recomputed one", pm->desc->name,
                 (unsigned)pm->info.layer);
        return buf;
    }
    for (int l = 0; l < c->n_layer; l++) {
        const kvh_layer_policy_settings *ls = &c->layer[l];
        if (ls->policy && ls->policy->reset) {
            /* A policy without reset() keeps its per-sequence state in the host's slot arrays (scores,
             * metadata, budgets), which the prefix cache snapshots; one with reset() may keep more. */
            snprintf(buf, cap, "layer %d's policy '%s' has a reset hook: it may keep per-sequence state of its own, "
                     "which a shared prompt block could not bring along", l, ls->policy->name);
            return buf;
        }
        if (ls->store && (ls->store->append || ls->store->release) && !(ls->store_flags & KVP_STORE_SELF_CONTAINED)) {
            /* ABI 1.2 hooks may keep per-sequence state outside the slots (a slot is then a handle): such
             * slots cannot be handed to another sequence. Fixed-slot stores (encode only) share, and so do
             * stores that declare their slots self-contained (ABI 1.4, KVP_STORE_SELF_CONTAINED: int8/int4). */
            snprintf(buf, cap, "layer %d's store '%s' has append/release hooks and does not declare its slots "
                     "self-contained (they may be handles into per-sequence memory)", l, ls->store->name);
            return buf;
        }
    }
    return NULL;
}

static size_t prompt_reserve(const kvh_engine *e, int left);

/* Whether some layer has an eviction policy (per-token state, budgets). */
static bool has_policy(const kvh_kvcache *c) {
    for (int l = 0; l < c->n_layer; l++) {
        const kvh_layer_policy_settings *ls = &c->layer[l];
        if (ls->budget != KVH_BUDGET_UNLIMITED || ls->track_scores || ls->obs_scores || ls->slot_meta_bytes ||
            ls->report)
            return true;
    }
    return false;
}

/* Whether a head of r's sequence holds fewer tokens than it computed: its policy evicted. */
static bool seq_evicted(const kvh_engine *e, const request *r) {
    const kvh_kvcache *c = &e->s->cache;
    for (int l = 0; l < c->n_layer; l++)
        for (int h = 0; h < c->n_head; h++)
            if (c->heads[kvh_kvcache_head_index(c, r->seq, l, h)].n < (uint32_t)r->computed) return true;
    return false;
}

/* Bytes r's first eviction may copy under policy sharing: every head's shared blocks (copy-on-write before
 * compaction writes into them). */
static size_t cow_reserve(const kvh_engine *e, const request *r) {
    if (!e->policy_sharing || !r->n_chain || r->evicted) return 0;
    const kvh_kvcache *c = &e->s->cache;
    size_t per_block = 0;
    for (int l = 0; l < c->n_layer; l++) per_block += c->pool[l].block_bytes;
    return (size_t)r->n_chain * per_block * (size_t)c->n_head;
}

/* ---- lifecycle ------------------------------------------------------------------------------------ */

int kvh_engine_create(kvh_engine **out, const kvh_model *model, const kvh_run_config *cfg,
                      const kvh_session_options *opt, const kvh_engine_options *eo, kvh_err *err) {
    *out = NULL;
    if (eo->max_seqs < 1 || eo->step_tokens < 1)
        return kvh_fail(err, "engine: max_seqs and step_tokens must be >= 1");
    kvh_engine *e = calloc(1, sizeof *e);
    if (!e) return kvh_fail(err, "engine: out of memory");
    e->o = *eo;
    e->model = model;
    e->next_id = 1;
    kvh_session_options so = *opt;
    so.n_seq = (int)eo->max_seqs;
    so.no_cache = false;
    if (kvh_session_create(&e->s, model, cfg, &so, err) != 0) goto fail;
    if (e->s->prefill_chunk) {
        /* The engine chunks prompts itself (step_tokens); the session's own splitting would hide that. */
        e->s->prefill_chunk = 0;
    }
    const int V = model->cfg.n_vocab;
    e->logits = malloc((size_t)eo->max_seqs * (size_t)V * sizeof(float));
    e->seq_busy = calloc(eo->max_seqs, sizeof *e->seq_busy);
    e->running = calloc(eo->max_seqs, sizeof *e->running);
    e->b_seq = calloc(eo->max_seqs, sizeof *e->b_seq);
    e->b_n = calloc(eo->max_seqs, sizeof *e->b_n);
    e->b_tok = calloc(eo->max_seqs, sizeof *e->b_tok);
    e->b_req = calloc(eo->max_seqs, sizeof *e->b_req);
    if (!e->logits || !e->seq_busy || !e->running || !e->b_seq || !e->b_n || !e->b_tok || !e->b_req) {
        kvh_fail(err, "engine: out of memory for %u sequences", eo->max_seqs);
        goto fail;
    }
    /* With a budget on every layer a sequence never holds more than budget + slack + one step's chunk; the
     * smallest budget + slack is where its first eviction can come at the earliest (policy sharing). */
    const kvh_kvcache *c = &e->s->cache;
    uint32_t most = 0, least = UINT32_MAX;
    bool every_layer = true;
    for (int l = 0; l < c->n_layer; l++) {
        if (c->layer[l].budget == KVH_BUDGET_UNLIMITED) {
            every_layer = false;
            continue;
        }
        const uint32_t cap = c->layer[l].budget + c->layer[l].slack;
        if (cap > most) most = cap;
        if (cap < least) least = cap;
    }
    e->policy_cap = every_layer ? most : 0;
    char why[256];
    const char *blocker = eo->prefix_sharing ? sharing_blocker(e, why, sizeof why) : "[engine] prefix_sharing = off";
    if (blocker) {
        snprintf(e->sharing_reason, sizeof e->sharing_reason, "%s", blocker);
    } else {
        if (kvh_prefix_cache_init(&e->pc, &e->s->cache, err) != 0) goto fail;
        e->sharing = true;
        e->policy_sharing = has_policy(&e->s->cache);
        if (e->policy_sharing) {
            if (least == UINT32_MAX) least = (uint32_t)model->cfg.n_positions; /* scores only, no budget */
            e->share_cap = least - least % c->block_slots;
        }
    }
    *out = e;
    return 0;
fail:
    kvh_engine_free(e);
    return -1;
}

void kvh_engine_free(kvh_engine *e) {
    if (!e) return;
    for (int i = 0; i < e->n_waiting; i++) request_free(e->waiting[i]);
    for (int i = 0; i < e->n_running; i++) request_free(e->running[i]);
    free(e->waiting);
    free(e->running);
    if (e->sharing) kvh_prefix_cache_free(&e->pc);
    kvh_session_free(e->s);
    free(e->logits);
    free(e->seq_busy);
    free(e->b_seq);
    free(e->b_n);
    free(e->b_tok);
    free(e->b_req);
    free(e);
}

void kvh_engine_set_callbacks(kvh_engine *e, const kvh_engine_callbacks *cb) { e->cb = *cb; }
kvh_session *kvh_engine_session(kvh_engine *e) { return e->s; }
const char *kvh_engine_sharing_reason(const kvh_engine *e) { return e->sharing_reason; }
kvh_prefix_cache *kvh_engine_prefix_cache(kvh_engine *e) { return e->sharing ? &e->pc : NULL; }
bool kvh_engine_idle(const kvh_engine *e) { return e->n_waiting == 0 && e->n_running == 0; }

/* ---- queue ---------------------------------------------------------------------------------------- */

static int waiting_insert(kvh_engine *e, request *r, bool front) {
    if (e->n_waiting == e->cap_waiting) {
        int nc = e->cap_waiting ? e->cap_waiting * 2 : 64;
        request **w = realloc(e->waiting, (size_t)nc * sizeof *w);
        if (!w) return -1;
        e->waiting = w;
        e->cap_waiting = nc;
    }
    if (front) {
        memmove(e->waiting + 1, e->waiting, (size_t)e->n_waiting * sizeof *e->waiting);
        e->waiting[0] = r;
    } else {
        e->waiting[e->n_waiting] = r;
    }
    e->n_waiting++;
    return 0;
}

static void waiting_remove(kvh_engine *e, int i) {
    memmove(e->waiting + i, e->waiting + i + 1, (size_t)(e->n_waiting - i - 1) * sizeof *e->waiting);
    e->n_waiting--;
}

static void running_remove(kvh_engine *e, request *r) {
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i] == r) {
            memmove(e->running + i, e->running + i + 1, (size_t)(e->n_running - i - 1) * sizeof *e->running);
            e->n_running--;
            return;
        }
}

/* Gives a running request's sequence back: cache emptied, plugins reset, prefix entries released. */
static int release_seq(kvh_engine *e, request *r, kvh_err *err) {
    if (r->seq < 0) return 0;
    if (e->sharing && r->n_chain) kvh_prefix_cache_release(&e->pc, r->chain, r->n_chain);
    r->n_chain = 0;
    r->registered = false;
    r->evicted = false;
    int rc = kvh_session_reset_seq(e->s, r->seq, err);
    e->seq_busy[r->seq] = false;
    r->seq = -1;
    r->computed = 0;
    return rc;
}

int kvh_engine_submit(kvh_engine *e, const kvh_engine_request *q, uint64_t *id_out, kvh_err *err) {
    const kvh_model_config *mc = &e->model->cfg;
    if (q->n_prompt < 1) return kvh_fail(err, "request: the prompt is empty");
    if (q->max_tokens < 1) return kvh_fail(err, "request: max_tokens %d must be >= 1", q->max_tokens);
    if ((int64_t)q->n_prompt + q->max_tokens > mc->n_positions)
        return kvh_fail(err, "request: prompt (%d tokens) + max_tokens (%d) exceeds n_positions %d", q->n_prompt,
                        q->max_tokens, mc->n_positions);
    for (int i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= mc->n_vocab)
            return kvh_fail(err, "request: prompt token #%d is %d, outside the vocabulary [0, %d)", i, q->prompt[i],
                            mc->n_vocab);
    /* A request that could not run even alone would wait forever: refuse it now. A full cache needs its
     * whole length; a policy stack what admission reserves (its ceiling and a prompt piece). */
    if (e->o.max_tokens) {
        const size_t whole = (size_t)q->n_prompt + (size_t)q->max_tokens;
        const size_t least = e->policy_cap ? (prompt_reserve(e, q->n_prompt) < whole ? prompt_reserve(e, q->n_prompt) : whole)
                                           : whole;
        if (least > e->o.max_tokens)
            return kvh_fail(err, "request: needs %zu tokens of cache alone, more than [engine] max_tokens = %u", least,
                            e->o.max_tokens);
    }
    request *r = calloc(1, sizeof *r);
    if (!r) return kvh_fail(err, "engine: out of memory");
    r->tokens = malloc((size_t)(q->n_prompt + q->max_tokens) * sizeof *r->tokens);
    const uint32_t B = e->s->cache.block_slots ? e->s->cache.block_slots : 1;
    r->chain = malloc(((size_t)(q->n_prompt + q->max_tokens) / B + 1) * sizeof *r->chain);
    if (!r->tokens || !r->chain) {
        request_free(r);
        return kvh_fail(err, "engine: out of memory");
    }
    if (kvh_sampler_init(&r->sampler, &q->sampling, mc->n_vocab, 0, err) != 0) {
        request_free(r);
        return -1;
    }
    memcpy(r->tokens, q->prompt, (size_t)q->n_prompt * sizeof *r->tokens);
    r->n_prompt = r->n_tokens = q->n_prompt;
    r->max_tokens = q->max_tokens;
    r->ignore_eos = q->ignore_eos;
    r->user = q->user;
    r->seq = -1;
    r->id = e->next_id++;
    r->state = KVH_REQ_WAITING;
    if (waiting_insert(e, r, false) != 0) {
        request_free(r);
        return kvh_fail(err, "engine: out of memory");
    }
    if (id_out) *id_out = r->id;
    return 0;
}

static void finish(kvh_engine *e, request *r, kvh_finish_reason why, kvh_err *err) {
    kvh_err ignore = {{0}};
    release_seq(e, r, err ? err : &ignore);
    r->state = KVH_REQ_DONE;
    if (why == KVH_FINISH_CANCELLED) e->st.cancelled++;
    else e->st.finished++;
    if (e->cb.on_finish) e->cb.on_finish(e->cb.ctx, r->id, r->user, why, kvh_now_ns());
}

int kvh_engine_cancel(kvh_engine *e, uint64_t id) {
    for (int i = 0; i < e->n_waiting; i++)
        if (e->waiting[i]->id == id) {
            request *r = e->waiting[i];
            waiting_remove(e, i);
            finish(e, r, KVH_FINISH_CANCELLED, NULL);
            request_free(r);
            return 0;
        }
    for (int i = 0; i < e->n_running; i++)
        if (e->running[i]->id == id) {
            request *r = e->running[i];
            running_remove(e, r);
            finish(e, r, KVH_FINISH_CANCELLED, NULL);
            request_free(r);
            return 0;
        }
    return -1;
}

/* ---- planning --------------------------------------------------------------------------------------- */

/* What the step being planned adds on top of what the cache holds now. */
typedef struct plan {
    size_t tokens, bytes;
    size_t prefill_left; /* prompt tokens the step may still take */
    int n;               /* batch entries so far */
} plan;

/* Bytes a policy's score-report buffers may add per token (they grow with the live count): planned at
 * 1/16 of the slot bytes plus a little, on the safe side; zero for stacks without them. */
static size_t report_margin(const kvh_engine *e, size_t bytes) {
    const kvh_kvcache *c = &e->s->cache;
    for (int l = 0; l < c->n_layer; l++)
        if (c->layer[l].report) return bytes / 16 + 256;
    return 0;
}

/* Whether adding (tokens, bytes) keeps the step inside both budgets. Idle prefix-cache blocks are given
 * back first when only the bytes are short. */
static bool fits(kvh_engine *e, const plan *p, size_t add_tokens, size_t add_bytes) {
    if (e->o.max_tokens && tokens_held(e) + p->tokens + add_tokens > e->o.max_tokens) return false;
    const kvh_kvcache *c = &e->s->cache;
    if (!c->bytes_limit) return true;
    const size_t want = c->bytes_held + p->bytes + add_bytes;
    if (want <= c->bytes_limit) return true;
    if (e->sharing) kvh_prefix_cache_reclaim(&e->pc, want - c->bytes_limit);
    return c->bytes_held + p->bytes + add_bytes <= c->bytes_limit;
}

static void plan_add(kvh_engine *e, plan *p, request *r, int n_new, size_t bytes) {
    e->b_req[p->n] = r;
    e->b_seq[p->n] = r->seq;
    e->b_tok[p->n] = r->tokens + r->computed;
    e->b_n[p->n] = n_new;
    p->n++;
    p->tokens += (size_t)n_new;
    p->bytes += bytes;
}

/* Frees the newest running request's memory and puts it back at the front of the queue. */
static int preempt_newest(kvh_engine *e, kvh_err *err) {
    request *newest = NULL;
    for (int i = 0; i < e->n_running; i++)
        if (!newest || e->running[i]->admit_no > newest->admit_no) newest = e->running[i];
    running_remove(e, newest);
    if (release_seq(e, newest, err) != 0) return -1;
    newest->state = KVH_REQ_WAITING;
    if (waiting_insert(e, newest, true) != 0) return kvh_fail(err, "engine: out of memory");
    e->st.preemptions++;
    return 0;
}

/* Under policy sharing, while a request may still register blocks, a prompt piece ends on a block boundary
 * (or at the prompt's end), and the piece that would pass share_cap stops there: the state after it can
 * then be snapshot for the requests after it, before the first eviction changes it. */
static int align_piece(const kvh_engine *e, const request *r, int want) {
    if (!e->policy_sharing || r->evicted) return want;
    const int B = (int)e->s->cache.block_slots, cap = (int)e->share_cap;
    int end = r->computed + want;
    if (r->computed < cap && end > cap) end = cap;
    else if (end < r->n_prompt) end -= end % B;
    return end > r->computed ? end - r->computed : want;
}

/* The largest piece (<= want tokens) of a prompt that fits, or 0. */
static int fitting_chunk(kvh_engine *e, const plan *p, const request *r, int want, size_t *bytes) {
    want = align_piece(e, r, want);
    const size_t cow = cow_reserve(e, r);
    for (int n = want; n >= 1; n = n > 16 ? n / 2 : n - 1) {
        const size_t b = kvh_kvcache_bytes_to_append(&e->s->cache, r->seq, (uint32_t)n) + cow;
        if (fits(e, p, (size_t)n, b + report_margin(e, b))) {
            *bytes = b + report_margin(e, b);
            return n;
        }
    }
    return 0;
}

/* Running requests' pieces, oldest first: every decode token must fit (else the newest request is
 * preempted and planning restarts), prompt chunks take what is left. */
static int plan_running(kvh_engine *e, plan *p, kvh_err *err) {
restart:
    memset(p, 0, sizeof *p);
    p->prefill_left = e->o.step_tokens;
    for (int i = 0; i < e->n_running; i++) {
        request *r = e->running[i];
        const int left = r->n_tokens - r->computed;
        if (left != 1) continue;
        const size_t b = kvh_kvcache_bytes_to_append(&e->s->cache, r->seq, 1) + cow_reserve(e, r);
        if (!fits(e, p, 1, b + report_margin(e, b))) {
            if (e->n_running == 1)
                return kvh_fail(err, "engine: request %llu alone does not fit the budgets (max_tokens %u, %zu KV bytes "
                                "limit) at %d tokens", (unsigned long long)r->id, e->o.max_tokens,
                                e->s->cache.bytes_limit, r->computed);
            if (preempt_newest(e, err) != 0) return -1;
            goto restart;
        }
        plan_add(e, p, r, 1, b + report_margin(e, b));
    }
    for (int i = 0; i < e->n_running && p->prefill_left; i++) {
        request *r = e->running[i];
        const int left = r->n_tokens - r->computed;
        if (left <= 1) continue;
        size_t bytes = 0;
        const int want = left < (int)p->prefill_left ? left : (int)p->prefill_left;
        const int n = fitting_chunk(e, p, r, want, &bytes);
        if (!n) continue;
        plan_add(e, p, r, n, bytes);
        p->prefill_left -= (size_t)n;
    }
    return 0;
}

/* Attaches the cached blocks of r's prompt to its (empty) sequence; returns the tokens they cover (0 when
 * the metadata of the shared slots does not fit: the request then computes its prompt, if it fits). */
static int attach_shared(kvh_engine *e, const plan *p, request *r, kvh_err *err) {
    kvh_kvcache *c = &e->s->cache;
    const uint32_t B = c->block_slots;
    uint32_t hit = kvh_prefix_cache_match(&e->pc, r->tokens, (uint32_t)(r->n_tokens - 1) / B, r->chain);
    if (e->policy_sharing) { /* only up to an entry where a piece ended: its snapshot is the policy's state there */
        const uint32_t matched = hit;
        while (hit && !e->pc.e[r->chain[hit - 1]].snap) hit--;
        e->pc.blocks_hit -= matched - hit;
    }
    if (!hit) return 0;
    /* In use before anything may reclaim memory, so fits() cannot drop the very entries matched. */
    kvh_prefix_cache_use(&e->pc, r->chain, hit);
    if (!fits(e, p, 0, kvh_kvcache_meta_bytes(c, hit * B))) {
        kvh_prefix_cache_release(&e->pc, r->chain, hit);
        return 0;
    }
    uint32_t *ids = malloc(hit * sizeof *ids);
    int32_t *pos = malloc((size_t)hit * B * sizeof *pos);
    int rc = ids && pos ? 0 : kvh_fail(err, "engine: out of memory");
    for (uint32_t i = 0; rc == 0 && i < hit * B; i++) pos[i] = (int32_t)i;
    for (int l = 0; l < c->n_layer && rc == 0; l++)
        for (int h = 0; h < c->n_head && rc == 0; h++) {
            for (uint32_t j = 0; j < hit; j++) ids[j] = e->pc.e[r->chain[j]].blocks[(size_t)l * c->n_head + h];
            rc = kvh_kvcache_attach_blocks(c, r->seq, l, h, ids, hit, pos, err);
        }
    free(ids);
    free(pos);
    if (rc != 0) {
        kvh_prefix_cache_release(&e->pc, r->chain, hit);
        kvh_kvcache_reset_seq(c, r->seq);
        return -1;
    }
    if (e->policy_sharing) kvh_prefix_cache_load_snapshot(&e->pc, r->chain[hit - 1], r->seq);
    c->next_pos[r->seq] = (int32_t)(hit * B);
    r->n_chain = hit;
    return (int)(hit * B);
}

/* Tokens a sequence with `left` prompt tokens to go may still add before it decodes: all of them (and its
 * first decode token) for a stack that keeps every token, at most a policy's ceiling plus a step's
 * prompt piece otherwise. */
static size_t prompt_reserve(const kvh_engine *e, int left) {
    const size_t full = (size_t)left + 1;
    if (!e->policy_cap) return full;
    const size_t capped = (size_t)e->policy_cap + e->o.step_tokens;
    return full < capped ? full : capped;
}

/* What the running requests still in their prompt will add after this step's pieces (tokens, bytes), so
 * an admission does not take the memory they are about to need (which would preempt it at once). */
static void pending_prompts(const kvh_engine *e, const plan *p, size_t *tokens, size_t *bytes) {
    *tokens = *bytes = 0;
    for (int i = 0; i < e->n_running; i++) {
        const request *r = e->running[i];
        int left = r->n_tokens - r->computed;
        for (int k = 0; k < p->n; k++)
            if (e->b_req[k] == r) left -= e->b_n[k];
        if (left <= 0) continue;
        const size_t t = prompt_reserve(e, left);
        *tokens += t;
        *bytes += kvh_kvcache_bytes_to_append(&e->s->cache, r->seq, (uint32_t)t);
    }
}

/* Tries to start r in sequence seq, with its cached prefix (share) or without: its first piece must fit next
 * to what the running requests' prompts still need. Returns the piece's tokens (r is running, *bytes its
 * planned bytes, *shared the prefix tokens it took), 0 when it does not fit (r is back as it was), -1 on
 * error. */
static int try_start(kvh_engine *e, plan *p, request *r, int seq, bool share, size_t *bytes, int *shared,
                     kvh_err *err) {
    r->seq = seq;
    r->computed = 0;
    *shared = 0;
    if (share) {
        *shared = attach_shared(e, p, r, err);
        if (*shared < 0) {
            r->seq = -1;
            return -1;
        }
        r->computed = *shared;
    }
    size_t pend_t, pend_b;
    pending_prompts(e, p, &pend_t, &pend_b);
    e->seq_busy[seq] = true;
    e->running[e->n_running++] = r; /* counted by tokens_held from here on */
    const int left = r->n_tokens - r->computed;
    const int want = left < (int)p->prefill_left ? left : (int)p->prefill_left;
    const size_t reserve = prompt_reserve(e, left);
    const size_t reserve_b = kvh_kvcache_bytes_to_append(&e->s->cache, seq, (uint32_t)reserve);
    const int n = fits(e, p, pend_t + reserve, pend_b + reserve_b + report_margin(e, reserve_b))
                      ? fitting_chunk(e, p, r, want, bytes)
                      : 0;
    if (!n) {
        running_remove(e, r);
        if (release_seq(e, r, err) != 0) return -1;
    }
    return n;
}

/* Admits waiting requests in order (no overtaking) while a sequence is free and their prompt fits the
 * budgets next to what the running requests' prompts still need (a policy stack: its ceiling). */
static int admit(kvh_engine *e, plan *p, kvh_err *err) {
    while (e->n_waiting && e->n_running < (int)e->o.max_seqs && p->prefill_left) {
        request *r = e->waiting[0];
        int seq = -1;
        for (uint32_t i = 0; i < e->o.max_seqs && seq < 0; i++)
            if (!e->seq_busy[i]) seq = (int)i;
        size_t bytes = 0;
        int shared = 0;
        int n = try_start(e, p, r, seq, e->sharing, &bytes, &shared, err);
        /* Under eviction an attached prefix is copied at the first eviction after it, which the plan reserves:
         * where that does not fit, the request computes its prompt itself. */
        if (n == 0 && shared > 0 && e->policy_sharing) n = try_start(e, p, r, seq, false, &bytes, &shared, err);
        if (n < 0) return -1;
        if (!n) break; /* stays first in line */
        e->st.prompt_tokens_shared += (uint64_t)shared;
        waiting_remove(e, 0);
        r->state = KVH_REQ_RUNNING;
        r->admit_no = ++e->admit_counter;
        e->st.admitted++;
        plan_add(e, p, r, n, bytes);
        p->prefill_left -= (size_t)n;
    }
    return 0;
}

/* ---- the step ------------------------------------------------------------------------------------------ */

static bool is_eos(const kvh_engine *e, int32_t tok) { return tok == e->model->cfg.bos_id; }

/* Policy sharing, after a piece of r: until its sequence first evicts, the prompt blocks the pieces so far
 * completed go into the prefix cache, the last one with a snapshot of the policy state when the piece ended
 * on its boundary. At the first eviction its state starts to depend on more than the prefix: it stops
 * registering and leaves the chain (the blocks its heads still share stay referenced by them; its tokens
 * then count in full). */
static int share_policy_prefix(kvh_engine *e, request *r, kvh_err *err) {
    if (r->evicted) return 0;
    if (seq_evicted(e, r)) {
        r->evicted = true;
        if (r->n_chain) kvh_prefix_cache_release(&e->pc, r->chain, r->n_chain);
        r->n_chain = 0;
        return 0;
    }
    const uint32_t B = e->s->cache.block_slots;
    if (r->computed % (int)B || r->computed > r->n_prompt) return 0;
    const uint32_t d = (uint32_t)r->computed / B;
    if (d <= r->n_chain) return 0;
    const int n = kvh_prefix_cache_insert(&e->pc, r->seq, r->tokens, r->n_chain, d, r->chain, err);
    if (n < 0) return -1;
    r->n_chain = (uint32_t)n;
    /* n < d: a block was cached already (another sequence computed this prefix), the rest stays private */
    if ((uint32_t)n == d && !e->pc.e[r->chain[d - 1]].snap &&
        kvh_prefix_cache_snapshot(&e->pc, r->chain[d - 1], r->seq, err) < 0)
        return -1;
    return 0;
}

int kvh_engine_step(kvh_engine *e, kvh_err *err) {
    plan p;
    if (plan_running(e, &p, err) != 0) return -1;
    if (admit(e, &p, err) != 0) return -1;
    if (p.n == 0) {
        if (e->n_waiting && !e->n_running)
            return kvh_fail(err, "engine: request %llu does not fit the budgets even alone (max_tokens %u, KV limit %zu "
                            "bytes)", (unsigned long long)e->waiting[0]->id, e->o.max_tokens, e->s->cache.bytes_limit);
        return 0;
    }
    kvh_batch b = {.n = p.n, .seq = e->b_seq, .tokens = e->b_tok, .n_tokens = e->b_n, .all_logits = false};
    const uint64_t t0 = kvh_now_ns();
    if (kvh_session_forward(e->s, &b, e->logits, err) != 0) return -1;
    const uint64_t t1 = kvh_now_ns();
    e->st.steps++;
    e->st.forward_ns += t1 - t0;
    /* Peaks are taken after the forward (and its evictions), before finished requests give memory back. */
    if ((uint32_t)e->n_running > e->st.max_running) e->st.max_running = (uint32_t)e->n_running;
    const size_t held = tokens_held(e);
    if (held > e->st.tokens_peak) e->st.tokens_peak = held;
    /* active <= held: the scan of idle prefix-cache entries is needed only when held is above the peak */
    if (e->s->cache.bytes_held > e->st.kv_bytes_active_peak) {
        const size_t idle = e->sharing ? kvh_prefix_cache_idle_bytes(&e->pc) : 0;
        const size_t active = e->s->cache.bytes_held > idle ? e->s->cache.bytes_held - idle : 0;
        if (active > e->st.kv_bytes_active_peak) e->st.kv_bytes_active_peak = active;
    }
    const int V = e->model->cfg.n_vocab;
    for (int i = 0; i < p.n; i++) {
        request *r = e->b_req[i];
        const int n_new = e->b_n[i];
        if (r->n_tokens - r->computed > 1) e->st.prompt_tokens_computed += (uint64_t)n_new;
        r->computed += n_new;
        /* A finished prompt goes into the prefix cache (its full blocks), for the requests after it; under
         * an evicting policy each piece's blocks go in as it ends, until the first eviction. */
        if (e->policy_sharing) {
            if (share_policy_prefix(e, r, err) != 0) return -1;
        } else if (e->sharing && !r->registered && r->computed >= r->n_prompt) {
            const uint32_t B = e->s->cache.block_slots;
            const int n = kvh_prefix_cache_insert(&e->pc, r->seq, r->tokens, r->n_chain, (uint32_t)r->n_prompt / B,
                                                  r->chain, err);
            if (n < 0) return -1;
            r->n_chain = (uint32_t)n;
            r->registered = true;
        }
        if (r->computed < r->n_tokens) continue; /* more prompt to go */
        if (e->cb.on_logits) e->cb.on_logits(e->cb.ctx, r->id, r->user, r->n_gen, e->logits + (size_t)i * V, V);
        const int32_t tok = kvh_sampler_next(&r->sampler, e->logits + (size_t)i * V);
        r->tokens[r->n_tokens++] = tok;
        const int index = r->n_gen++;
        e->st.generated_tokens++;
        if (e->cb.on_token) e->cb.on_token(e->cb.ctx, r->id, r->user, index, tok, kvh_now_ns());
        const bool eos = !r->ignore_eos && is_eos(e, tok);
        if (r->n_gen >= r->max_tokens || eos) {
            running_remove(e, r);
            finish(e, r, eos ? KVH_FINISH_EOS : KVH_FINISH_LENGTH, err);
            request_free(r);
        }
    }
    if (e->o.check_invariants && kvh_engine_check_invariants(e, err) != 0) return -1;
    return 0;
}

int kvh_engine_check_invariants(const kvh_engine *e, kvh_err *err) {
    const size_t t = tokens_held(e);
    if (e->o.max_tokens && t > e->o.max_tokens)
        return kvh_fail(err, "engine invariant broken: %zu tokens held, max_tokens is %u", t, e->o.max_tokens);
    const kvh_kvcache *c = &e->s->cache;
    if (c->bytes_limit && c->bytes_held > c->bytes_limit)
        return kvh_fail(err, "engine invariant broken: %zu KV bytes held, the limit is %zu", c->bytes_held, c->bytes_limit);
    for (int i = 0; i < e->n_running; i++) {
        const request *r = e->running[i];
        if (c->next_pos[r->seq] != r->computed)
            return kvh_fail(err, "engine invariant broken: request %llu has %d tokens computed but its sequence is at "
                            "position %d", (unsigned long long)r->id, r->computed, (int)c->next_pos[r->seq]);
    }
    return 0;
}

void kvh_engine_get_stats(const kvh_engine *e, kvh_engine_stats *out) {
    *out = e->st;
    out->running = (uint32_t)e->n_running;
    out->waiting = (uint32_t)e->n_waiting;
    out->tokens_held = tokens_held(e);
    out->kv_bytes_held = e->s->cache.bytes_held;
    out->kv_bytes_peak = e->s->cache.bytes_peak;
    out->cow_copies = e->s->cache.cow_copies;
    if (e->sharing) {
        out->prefix_blocks_looked_up = e->pc.blocks_looked_up;
        out->prefix_blocks_hit = e->pc.blocks_hit;
        out->prefix_verify_rejects = e->pc.verify_rejects;
        out->prefix_entries_reclaimed = e->pc.entries_reclaimed;
    }
}
