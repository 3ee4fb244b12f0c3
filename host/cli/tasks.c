/* tasks.c — passkey, copy and key-value lookup samples, and their scoring (see tasks.h).
 * Owns: the task texts, the per-sample generator (splitmix64 over (seed, cell, index)), the run of one
 * sample through a policy and a reference session, exact-match / top-1 / NLL / KL scoring.
 * Does not own: the sessions, files, records. */
#include "cli/tasks.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The texts tools/fidelity/train.py trains on (keep them equal). */
static const char PASSKEY_INTRO[] = "There is an important info hidden inside a lot of irrelevant text. Find it and "
                                    "memorize it. I will quiz you about the important information there.";
static const char PASSKEY_NEEDLE[] = " The pass key is %s. Remember it. %s is the pass key.";
static const char PASSKEY_QUESTION[] = " What is the pass key? The pass key is";
static const char KV_INTRO[] = "Here is a list of keys and their values. Remember them.";
static const char KV_LINE[] = " The value of key %s is %s.";
static const char KV_QUESTION[] = " The value of key %s is";

kvh_task_options kvh_task_default_options(int kind, int n_positions) {
    kvh_task_options o;
    memset(&o, 0, sizeof o);
    o.kind = kind;
    o.seed = 1;
    o.n_positions = n_positions;
    static const int depths[] = {0, 25, 50, 75, 100};
    o.n_depths = 5;
    memcpy(o.depths, depths, sizeof depths);
    if (kind == KVH_TASK_KVLOOKUP) {
        static const int pairs[] = {8, 16, 32, 64};
        o.n_lengths = 4;
        memcpy(o.lengths, pairs, sizeof pairs);
        o.samples = 4;
        o.queries = 4;
        o.n_depths = 0;
        return o;
    }
    static const int pk[] = {256, 512, 768, 1024}, cp[] = {256, 512, 1024};
    const int *L = kind == KVH_TASK_COPY ? cp : pk;
    int nl = kind == KVH_TASK_COPY ? 3 : 4;
    for (int i = 0; i < nl; i++)
        if (L[i] <= n_positions) o.lengths[o.n_lengths++] = L[i];
    o.samples = 2;
    o.span = 64;
    return o;
}

int kvh_task_kind_parse(const char *name) {
    if (strcmp(name, "passkey") == 0) return KVH_TASK_PASSKEY;
    if (strcmp(name, "copy") == 0) return KVH_TASK_COPY;
    if (strcmp(name, "kvlookup") == 0) return KVH_TASK_KVLOOKUP;
    return -1;
}

const char *kvh_task_kind_name(int kind) {
    return kind == KVH_TASK_PASSKEY ? "passkey" : kind == KVH_TASK_COPY ? "copy" : "kvlookup";
}

/* ---- generator ------------------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, n) (n >= 1); the modulo bias is below 2^-40 for the ranges used here */
static uint64_t below(uint64_t *x, uint64_t n) { return splitmix64(x) % n; }

/* A growable id list. */
typedef struct ids_buf {
    int32_t *v;
    int n, cap;
} ids_buf;

static int push(ids_buf *b, const int32_t *ids, size_t n, kvh_err *err) {
    if (n == 0) return 0; /* an empty piece (e.g. no filler) may come with ids == NULL: memcpy must not see it */
    if ((size_t)b->n + n > (size_t)b->cap) {
        size_t cap = (size_t)b->cap * 2 + n + 64;
        int32_t *v = realloc(b->v, cap * sizeof *v);
        if (!v) return kvh_fail(err, "eval --task: out of memory");
        b->v = v;
        b->cap = (int)cap;
    }
    memcpy(b->v + b->n, ids, n * sizeof *ids);
    b->n += (int)n;
    return 0;
}

static int push_text(ids_buf *b, const kvh_tokenizer *tok, const char *text, kvh_err *err) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (kvh_tokenizer_encode(tok, text, strlen(text), 0, &ids, &n, err) != 0) return -1;
    int rc = push(b, ids, n, err);
    free(ids);
    return rc;
}

static int count_text(const kvh_tokenizer *tok, const char *text, int *n_out, kvh_err *err) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (kvh_tokenizer_encode(tok, text, strlen(text), 0, &ids, &n, err) != 0) return -1;
    free(ids);
    *n_out = (int)n;
    return 0;
}

static void number(uint64_t *x, int digits, char *out, size_t cap) {
    uint64_t lo = 1;
    for (int i = 1; i < digits; i++) lo *= 10;
    snprintf(out, cap, "%llu", (unsigned long long)(lo + below(x, 9 * lo)));
}

/* Filler: n ids from a random offset of the filler text. */
static int push_filler(ids_buf *b, uint64_t *x, const int32_t *filler, size_t n_filler, int n, kvh_err *err) {
    if (n <= 0) return 0;
    if ((size_t)n > n_filler)
        return kvh_fail(err, "eval --task: the filler text has %zu tokens; a sample needs %d (give a longer "
                        "--filler-file)", n_filler, n);
    size_t off = (size_t)below(x, n_filler - (size_t)n + 1);
    return push(b, filler + off, (size_t)n, err);
}

static int gen_passkey(const kvh_tokenizer *tok, const int32_t *filler, size_t n_filler,
                       uint64_t *x, int length, int depth_pct, kvh_task_sample *s, kvh_err *err) {
    char key[16], text[256];
    number(x, 5, key, sizeof key);
    ids_buf b = {0}, needle = {0};
    snprintf(text, sizeof text, PASSKEY_NEEDLE, key, key);
    int n_intro, n_q, n_ans;
    char ans[24];
    snprintf(ans, sizeof ans, " %s", key);
    if (count_text(tok, PASSKEY_INTRO, &n_intro, err) || count_text(tok, PASSKEY_QUESTION, &n_q, err) ||
        count_text(tok, ans, &n_ans, err) || push_text(&needle, tok, text, err))
        goto fail;
    int n_fill = length - n_intro - needle.n - n_q - n_ans;
    if (n_fill < 0) {
        kvh_fail(err, "eval --task passkey: length %d is shorter than the prompt's fixed text (%d tokens)", length,
                 length - n_fill);
        goto fail;
    }
    int before = (int)(((long)n_fill * depth_pct + 50) / 100);
    ids_buf f = {0};
    if (push_filler(&f, x, filler, n_filler, n_fill, err)) {
        free(f.v);
        goto fail;
    }
    int rc = push_text(&b, tok, PASSKEY_INTRO, err) || push(&b, f.v, (size_t)before, err) ||
             push(&b, needle.v, (size_t)needle.n, err) || push(&b, f.v + before, (size_t)(n_fill - before), err) ||
             push_text(&b, tok, PASSKEY_QUESTION, err);
    free(f.v);
    if (rc) goto fail;
    int a0 = b.n;
    if (push_text(&b, tok, ans, err)) goto fail;
    s->ids = b.v;
    s->n = b.n;
    s->prompt_len = a0 - n_q; /* the question is decoded */
    s->n_spans = 1;
    s->spans[0] = (kvh_task_span){a0, b.n};
    s->exact_spans = 1;
    free(needle.v);
    return 0;
fail:
    free(b.v);
    free(needle.v);
    return -1;
}

static int gen_copy(const kvh_task_options *o, const int32_t *filler, size_t n_filler, uint64_t *x, int length,
                    int depth_pct, kvh_task_sample *s, kvh_err *err) {
    int L = o->span, F = length - 2 * o->span;
    if (L < 2 || F < 0)
        return kvh_fail(err, "eval --task copy: a span of %d tokens twice does not fit in %d tokens (span >= 2)", L,
                        length);
    ids_buf w = {0}, b = {0};
    /* one window of the filler: the passage, then the filler around the copies (disjoint text) */
    if (push_filler(&w, x, filler, n_filler, L + F, err)) goto fail;
    int before = (int)(((long)F * depth_pct + 50) / 100);
    if (push(&b, w.v + L, (size_t)before, err) || push(&b, w.v, (size_t)L, err) ||
        push(&b, w.v + L + before, (size_t)(F - before), err))
        goto fail;
    int s2 = b.n;
    if (push(&b, w.v, (size_t)L, err)) goto fail;
    free(w.v);
    s->ids = b.v;
    s->n = b.n;
    s->prompt_len = s2 + 1; /* the second copy's first token is in the prompt; its others are predicted */
    s->n_spans = 1;
    s->spans[0] = (kvh_task_span){s2 + 1, b.n};
    s->exact_spans = 0;
    return 0;
fail:
    free(w.v);
    free(b.v);
    return -1;
}

static int gen_kvlookup(const kvh_task_options *o, const kvh_tokenizer *tok, uint64_t *x, int pairs,
                        kvh_task_sample *s, kvh_err *err) {
    if (pairs < 1 || pairs > 9000) return kvh_fail(err, "eval --task kvlookup: %d pairs (1..9000)", pairs);
    if (o->queries < 1 || o->queries > KVH_TASK_MAX_SPANS)
        return kvh_fail(err, "eval --task kvlookup: %d queries (1..%d)", o->queries, KVH_TASK_MAX_SPANS);
    int *keys = malloc((size_t)pairs * sizeof *keys), *vals = malloc((size_t)pairs * sizeof *vals);
    ids_buf b = {0};
    char text[128], k[16], v[16];
    if (!keys || !vals) {
        kvh_fail(err, "eval --task: out of memory");
        goto fail;
    }
    for (int i = 0; i < pairs; i++) {
        int dup;
        do { /* distinct keys */
            keys[i] = 1000 + (int)below(x, 9000);
            dup = 0;
            for (int j = 0; j < i; j++) dup |= keys[j] == keys[i];
        } while (dup);
        vals[i] = 1000 + (int)below(x, 9000);
    }
    if (push_text(&b, tok, KV_INTRO, err)) goto fail;
    for (int i = 0; i < pairs; i++) {
        snprintf(k, sizeof k, "%d", keys[i]);
        snprintf(v, sizeof v, "%d", vals[i]);
        snprintf(text, sizeof text, KV_LINE, k, v);
        if (push_text(&b, tok, text, err)) goto fail;
    }
    s->prompt_len = b.n;
    s->n_spans = 0;
    /* queries: distinct keys when there are enough (a partial Fisher-Yates shuffle of the pairs, done
     * after the list is written), else drawn with replacement */
    for (int q = 0; q < o->queries; q++) {
        int i;
        if (o->queries <= pairs) {
            int j = q + (int)below(x, (uint64_t)(pairs - q));
            int tk = keys[q], tv = vals[q];
            keys[q] = keys[j], vals[q] = vals[j];
            keys[j] = tk, vals[j] = tv;
            i = q;
        } else {
            i = (int)below(x, (uint64_t)pairs);
        }
        snprintf(k, sizeof k, "%d", keys[i]);
        snprintf(text, sizeof text, KV_QUESTION, k);
        if (push_text(&b, tok, text, err)) goto fail;
        int a0 = b.n;
        snprintf(text, sizeof text, " %d", vals[i]);
        if (push_text(&b, tok, text, err)) goto fail;
        s->spans[s->n_spans++] = (kvh_task_span){a0, b.n};
        if (q + 1 < o->queries && push_text(&b, tok, ".", err)) goto fail;
    }
    free(keys);
    free(vals);
    s->ids = b.v;
    s->n = b.n;
    s->exact_spans = 1;
    return 0;
fail:
    free(keys);
    free(vals);
    free(b.v);
    return -1;
}

int kvh_task_generate(const kvh_task_options *o, const kvh_tokenizer *tok, const int32_t *filler, size_t n_filler,
                      kvh_task_set *out, kvh_err *err) {
    memset(out, 0, sizeof *out);
    if (o->kind < KVH_TASK_PASSKEY || o->kind > KVH_TASK_KVLOOKUP) return kvh_fail(err, "eval --task: unknown task");
    if (o->samples < 1) return kvh_fail(err, "eval --task: --samples %d (>= 1)", o->samples);
    if (o->n_lengths < 1 || o->n_lengths > KVH_TASK_MAX_CELLS)
        return kvh_fail(err, "eval --task: %d lengths (1..%d)", o->n_lengths, KVH_TASK_MAX_CELLS);
    int kv = o->kind == KVH_TASK_KVLOOKUP;
    int nd = kv ? 1 : o->n_depths;
    if (!kv && (nd < 1 || nd > KVH_TASK_MAX_CELLS))
        return kvh_fail(err, "eval --task: %d depths (1..%d)", nd, KVH_TASK_MAX_CELLS);
    for (int d = 0; !kv && d < nd; d++)
        if (o->depths[d] < 0 || o->depths[d] > 100)
            return kvh_fail(err, "eval --task: depth %d%% (0..100)", o->depths[d]);
    if (!kv && (!filler || n_filler == 0)) return kvh_fail(err, "eval --task %s needs filler text", kvh_task_kind_name(o->kind));
    size_t total = (size_t)o->n_lengths * (size_t)nd * (size_t)o->samples;
    out->s = calloc(total, sizeof *out->s);
    if (!out->s) return kvh_fail(err, "eval --task: out of memory for %zu samples", total);
    for (int li = 0; li < o->n_lengths; li++) {
        int length = o->lengths[li];
        if (!kv && (length < 2 || length > o->n_positions)) {
            kvh_task_set_free(out);
            return kvh_fail(err, "eval --task %s: length %d outside 2..%d (the model's n_positions)",
                            kvh_task_kind_name(o->kind), length, o->n_positions);
        }
        for (int di = 0; di < nd; di++)
            for (int k = 0; k < o->samples; k++) {
                kvh_task_sample *s = &out->s[out->n];
                /* the generator of this sample: (seed, kind, length, depth, index) */
                uint64_t x = o->seed * 0x100000001B3ull ^ ((uint64_t)o->kind << 56);
                splitmix64(&x);
                x ^= (uint64_t)length * 0x9E3779B1ull + ((uint64_t)(kv ? 0 : o->depths[di]) << 32) + (uint64_t)k;
                splitmix64(&x);
                int rc;
                if (o->kind == KVH_TASK_PASSKEY)
                    rc = gen_passkey(tok, filler, n_filler, &x, length, o->depths[di], s, err);
                else if (o->kind == KVH_TASK_COPY)
                    rc = gen_copy(o, filler, n_filler, &x, length, o->depths[di], s, err);
                else
                    rc = gen_kvlookup(o, tok, &x, length, s, err);
                if (rc != 0) {
                    kvh_task_set_free(out);
                    return -1;
                }
                out->n++;
                s->length = length;
                s->depth_pct = kv ? -1 : o->depths[di];
                if (s->n > o->n_positions) {
                    kvh_fail(err, "eval --task %s: a sample of %d pairs has %d tokens, more than the model's %d "
                             "positions (fewer pairs)", kvh_task_kind_name(o->kind), length, s->n, o->n_positions);
                    kvh_task_set_free(out);
                    return -1;
                }
            }
    }
    return 0;
}

void kvh_task_set_free(kvh_task_set *set) {
    if (!set) return;
    for (int i = 0; i < set->n; i++) free(set->s[i].ids);
    free(set->s);
    set->s = NULL;
    set->n = 0;
}

/* ---- scoring -------------------------------------------------------------------------------------- */

static int cell_of(kvh_task_score *sc, const kvh_task_sample *s) {
    for (int c = 0; c < sc->n_cells; c++)
        if (sc->cell_length[c] == s->length && sc->cell_depth[c] == s->depth_pct) return c;
    if (sc->n_cells >= KVH_TASK_MAX_CELLS * KVH_TASK_MAX_CELLS) return -1;
    int c = sc->n_cells++;
    sc->cell_length[c] = s->length;
    sc->cell_depth[c] = s->depth_pct;
    return c;
}

/* Counts answers and correct answers of one sample from its predictions. */
static void count(const kvh_task_sample *s, const int32_t *pred, size_t *answers, size_t *correct) {
    for (int k = 0; k < s->n_spans; k++) {
        const kvh_task_span *sp = &s->spans[k];
        if (s->exact_spans) {
            int ok = 1;
            for (int t = sp->begin; t < sp->end; t++) ok &= pred[t] == s->ids[t];
            (*answers)++;
            *correct += (size_t)ok;
        } else {
            for (int t = sp->begin; t < sp->end; t++) {
                (*answers)++;
                *correct += pred[t] == s->ids[t];
            }
        }
    }
}

void kvh_task_score_add(kvh_task_score *sc, const kvh_task_sample *s, const int32_t *pred, const double *nll) {
    size_t a = 0, c = 0;
    count(s, pred, &a, &c);
    sc->answers += a;
    sc->correct += c;
    for (int k = 0; k < s->n_spans; k++)
        for (int t = s->spans[k].begin; t < s->spans[k].end; t++) {
            sc->tokens++;
            sc->nll_sum += nll[t];
        }
    int cell = cell_of(sc, s);
    if (cell >= 0) {
        sc->cell_answers[cell] += a;
        sc->cell_correct[cell] += c;
    }
}

static double lse(const float *x, int V) {
    double mx = x[0];
    for (int i = 1; i < V; i++)
        if (x[i] > mx) mx = x[i];
    double s = 0.0;
    for (int i = 0; i < V; i++) s += exp((double)x[i] - mx);
    return mx + log(s);
}

static int32_t argmax(const float *x, int V) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static uint32_t max_live_now(const kvh_kvcache *c) {
    uint32_t mx = 0;
    for (int l = 0; l < c->n_layer; l++) {
        uint32_t m = kvh_kvcache_max_live(c, l);
        if (m > mx) mx = m;
    }
    return mx;
}

static int scored(const kvh_task_sample *s, int t) {
    for (int k = 0; k < s->n_spans; k++)
        if (t >= s->spans[k].begin && t < s->spans[k].end) return 1;
    return 0;
}

/* Feeds ids[from..to-1] to session x (one block), leaving the last position's logits in lg. */
static int feed(kvh_session *x, const int32_t *ids, int from, int to, float *lg, double *ms, kvh_err *err) {
    int seq = 0, n = to - from;
    const int32_t *p = ids + from;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &p, .n_tokens = &n, .all_logits = false};
    double t0 = kvh_now_ms();
    int rc = kvh_session_forward(x, &b, lg, err);
    *ms += kvh_now_ms() - t0;
    return rc;
}

int kvh_task_run_sample(kvh_session *policy, kvh_session *full, const kvh_task_sample *s, int stream,
                        kvh_task_score *sc, kvh_err *err) {
    const int V = policy->model->cfg.n_vocab;
    const int n = s->n;
    const int p = stream ? 1 : s->prompt_len;
    if (p < 1 || p > n) return kvh_fail(err, "eval --task: prompt of %d tokens in a sample of %d", p, n);
    for (int t = 0; t < n; t++)
        if (s->ids[t] < 0 || s->ids[t] >= V)
            return kvh_fail(err, "eval --task: token %d has id %d, outside the model's vocabulary 0..%d", t,
                            (int)s->ids[t], V - 1);
    float *lp = malloc((size_t)V * sizeof *lp), *lf = malloc((size_t)V * sizeof *lf);
    int32_t *pred = calloc((size_t)n, sizeof *pred), *fpred = calloc((size_t)n, sizeof *fpred);
    double *nll = calloc((size_t)n, sizeof *nll), *fnll = calloc((size_t)n, sizeof *fnll);
    int rc = -1;
    if (!lp || !lf || !pred || !fpred || !nll || !fnll) {
        kvh_fail(err, "eval --task: out of memory");
        goto out;
    }
    if (kvh_session_reset_seq(policy, 0, err) != 0 || (full && kvh_session_reset_seq(full, 0, err) != 0)) goto out;
    /* after feeding ids[0..t-1], the logits predict ids[t] (the last token is never fed: nothing follows) */
    for (int t = p; t < n; t++) {
        int from = t == p ? 0 : t - 1;
        if (feed(policy, s->ids, from, t, lp, &sc->policy_forward_ms, err) != 0) {
            kvh_fail_prefix(err, "eval --task: policy session, token %d", t - 1);
            goto out;
        }
        if (full && feed(full, s->ids, from, t, lf, &sc->full_forward_ms, err) != 0) {
            kvh_fail_prefix(err, "eval --task: full-cache session, token %d", t - 1);
            goto out;
        }
        uint32_t ml = max_live_now(&policy->cache);
        if (ml > sc->max_live_per_head) sc->max_live_per_head = ml;
        if (!scored(s, t)) continue;
        double lse_p = lse(lp, V);
        nll[t] = lse_p - (double)lp[s->ids[t]];
        pred[t] = argmax(lp, V);
        if (!isfinite(nll[t])) {
            kvh_fail(err, "eval --task: the policy session's log-likelihood of token %d is not finite", t);
            goto out;
        }
        if (full) {
            double lse_f = lse(lf, V);
            fnll[t] = lse_f - (double)lf[s->ids[t]];
            fpred[t] = argmax(lf, V);
            double kl = 0.0;
            for (int i = 0; i < V; i++) {
                double a = (double)lf[i] - lse_f, b = (double)lp[i] - lse_p;
                kl += exp(a) * (a - b);
            }
            if (kl < 0.0) kl = 0.0;
            sc->kl_sum += kl;
            if (kl > sc->kl_max) sc->kl_max = kl;
            sc->top1_agree += pred[t] == fpred[t];
            sc->full_nll_sum += fnll[t];
        }
    }
    kvh_task_score_add(sc, s, pred, nll);
    if (full) {
        size_t a = 0, c = 0;
        count(s, fpred, &a, &c);
        sc->full_correct += c;
        int cell = cell_of(sc, s);
        if (cell >= 0) sc->cell_full_correct[cell] += c;
    }
    rc = 0;
out:
    free(lp);
    free(lf);
    free(pred);
    free(fpred);
    free(nll);
    free(fnll);
    return rc;
}
