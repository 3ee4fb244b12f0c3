/* plugin_check.c — implementation of plugin_check.h: `kvhost plugins check`. Every run has a small seeded
 * random model at the run's shape (so stores and policies may read weights with host->tensor).
 * A run: random small shape (layers, heads, sequences, n_ctx), random budget and slack, one INI section
 * holding the plugin on every layer. Each step gives every sequence a prefill block (its first step)
 * or one decode token; per layer the driver appends the tokens, calls the policy's insert hook, makes up
 * causal attention (random logits, softmax over the slots each query sees) and feeds it exactly as the
 * CPU backend does (score[] / obs_score[] accumulators, score-report rows), calls score_report, then
 * lets the router enforce the budget (it validates every victim list and names plugin, layer, seq, head
 * and hook on any failure). Sequences restart at random and when n_ctx is near (reset hooks). After
 * every step: live <= budget + slack on every head. Warns once when a policy drops the newest token or
 * empties a head (legal, rarely meant).
 * A store: the same shapes and steps, K/V/Q rows made from the model's own c_attn (x W + b for random x),
 * written through append() or encode() into copies of the head's slots followed by guard bytes, then
 * every live slot decoded (decode() into a guarded row) and compared with the fp32 row it came from
 * (relative RMS error <= tol), and attend() (guarded out / probs) compared with fp32 attention over the
 * decoded rows; random victims removed through the cache (release hook), random resets. A guard byte
 * changed names the hook that wrote past its slots or rows. */
#include "runtime/plugin_check.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <kvp/kvp.h>

#include "model/model.h"
#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "runtime/router.h"

kvh_plugin_check_options kvh_plugin_check_default_options(void) {
    kvh_plugin_check_options o = {.seed = 1, .runs = 20, .steps = 200, .budget = 0, .sets = NULL, .n_sets = 0,
                                  .tol = 0.25};
    return o;
}

static uint64_t rnd(uint64_t *s) { /* xorshift64* */
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 2685821657736338717ull;
}
static uint32_t below(uint64_t *s, uint32_t n) { return n ? (uint32_t)(rnd(s) % n) : 0; }

/* What the CPU backend's accumulate_scores does with one query's probabilities (backend_cpu.c). */
static void feed(kvh_head_cache *hc, const kvh_layer_policy_settings *ls, int t, int T, const float *probs) {
    const uint32_t n = hc->n;
    const int pre = T > 1;
    if (hc->score && ((pre && ls->prefill_scores) || (!pre && ls->decode_scores)))
        for (uint32_t j = 0; j < n; j++) hc->score[j] += probs[j];
    if (hc->obs_score && pre && T - t <= (int)ls->obs_window)
        for (uint32_t j = 0; j < n; j++) hc->obs_score[j] += probs[j];
    if (hc->report) {
        const int R = T < (int)ls->report_rows ? T : (int)ls->report_rows;
        float *col = kvh_report_col(hc);
        if (T > 1) {
            if (t == 0) memcpy(col, probs, (size_t)n * sizeof(float));
            else
                for (uint32_t j = 0; j < n; j++) col[j] += probs[j];
        }
        if (t >= T - R) memcpy(kvh_report_row(hc, T, (uint32_t)(t - (T - R))), probs, (size_t)n * sizeof(float));
    }
}

/* Random causal attention of T queries at positions qpos over every head of (s, l). probs: scratch of
 * n_ctx floats. Some steps give ties (equal logits) or a near one-hot row, the cases policies get wrong. */
static void attend(kvh_kvcache *c, int s, int l, int T, const int32_t *qpos, float *probs, uint64_t *rng) {
    const kvh_layer_policy_settings *ls = &c->layer[l];
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, s, l, h);
        const uint32_t kind = below(rng, 8);
        for (int t = 0; t < T; t++) {
            float mx = -INFINITY, sum = 0.0f;
            for (uint32_t j = 0; j < hc->n; j++) {
                float x = kind == 0 ? 0.0f : kind == 1 ? (below(rng, 16) == 0 ? 30.0f : 0.0f)
                                                       : (float)below(rng, 1000) / 100.0f - 5.0f;
                probs[j] = hc->pos[j] > qpos[t] ? -INFINITY : x;
                if (probs[j] > mx) mx = probs[j];
            }
            for (uint32_t j = 0; j < hc->n; j++) {
                probs[j] = probs[j] == -INFINITY ? 0.0f : expf(probs[j] - mx);
                sum += probs[j];
            }
            for (uint32_t j = 0; j < hc->n; j++) probs[j] /= sum;
            feed(hc, ls, t, T, probs);
        }
    }
}

typedef struct check_run {
    int n_layer, n_head, n_ctx, n_seq;
    uint32_t budget, slack;
} check_run;

/* ---- stores ------------------------------------------------------------------------------------- */

enum { GUARD = 64 };               /* bytes of 0xA5 after every buffer a store hook writes */
static const unsigned char GUARD_BYTE = 0xA5;

static void guard_set(unsigned char *p) { memset(p, GUARD_BYTE, GUARD); }
static int guard_ok(const unsigned char *p) {
    for (int i = 0; i < GUARD; i++)
        if (p[i] != GUARD_BYTE) return 0;
    return 1;
}

/* Uniform in [-sqrt(3), sqrt(3)): unit variance. */
static float unit(uint64_t *s) { return ((float)(rnd(s) >> 40) / (float)(1ull << 24) * 2.0f - 1.0f) * 1.7320508f; }

/* Row of the fp32 projection x W[:, col0 .. col0 + n) + b (W: [C, ld], input-major). */
static void project(const float *x, const float *W, const float *b, int C, int ld, int col0, int n, float *y) {
    for (int j = 0; j < n; j++) y[j] = b[col0 + j];
    for (int i = 0; i < C; i++)
        for (int j = 0; j < n; j++) y[j] += x[i] * W[(size_t)i * ld + col0 + j];
}

typedef struct store_rig {
    kvh_kvcache *c;
    const kvh_layer_policy_settings *ls;
    const kvp_descriptor *st;
    int l, HS;
    size_t kb, vb;
    unsigned char *kbuf, *vbuf; /* a head's slots as one run each + GUARD (room for n_ctx slots) */
    float *row;                 /* HS floats + GUARD bytes */
    float *probs;               /* n_ctx floats + GUARD bytes */
    float *dk, *dv;             /* [n_ctx][HS] decoded rows */
    double max_err, max_attn_err;
} store_rig;

/* Copies the head's slots into the guarded runs (guards re-armed), or back. */
static void runs_in(store_rig *x, const kvh_head_cache *hc) {
    for (uint32_t i = 0; i < hc->n; i++) {
        memcpy(x->kbuf + i * x->kb, kvh_slot_k(x->c, x->l, hc, i), x->kb);
        memcpy(x->vbuf + i * x->vb, kvh_slot_v(x->c, x->l, hc, i), x->vb);
    }
    guard_set(x->kbuf + hc->n * x->kb);
    guard_set(x->vbuf + hc->n * x->vb);
}
static void runs_out(store_rig *x, const kvh_head_cache *hc) {
    for (uint32_t i = 0; i < hc->n; i++) {
        memcpy(kvh_slot_k(x->c, x->l, hc, i), x->kbuf + i * x->kb, x->kb);
        memcpy(kvh_slot_v(x->c, x->l, hc, i), x->vbuf + i * x->vb, x->vb);
    }
}
static int runs_guarded(const store_rig *x, const kvh_head_cache *hc, int s, int h, const char *hook, kvh_err *err) {
    if (!guard_ok(x->kbuf + hc->n * x->kb) || !guard_ok(x->vbuf + hc->n * x->vb))
        return kvh_fail(err, "store '%s' layer %d seq %d head %d: %s wrote past the head's %u slots (k_slot_bytes "
                        "%zu, v_slot_bytes %zu)", x->st->name, x->l, s, h, hook, hc->n, x->kb, x->vb);
    return 0;
}

/* Writes T new tokens (rows k/v: [T][NH*HS]) of every head of (s, l) as the CPU backend does (append()
 * over the head's slots, or encode() per row), through guarded copies. */
static int store_write(store_rig *x, int s, int T, const float *k, const float *v, kvh_err *err) {
    const int NH = x->c->n_head, HS = x->HS;
    for (int h = 0; h < NH; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(x->c, s, x->l, h);
        const uint32_t first = hc->n - (uint32_t)T;
        runs_in(x, hc);
        if (x->st->append) {
            kvp_append_args a = {.struct_size = sizeof a, .seq = (uint32_t)s, .head = (uint32_t)h,
                                 .head_dim = (uint32_t)HS, .n_new = (uint32_t)T, .first_slot = first,
                                 .pos = hc->pos, .k_rows = k + (size_t)h * HS, .v_rows = v + (size_t)h * HS,
                                 .row_stride = (size_t)NH * HS, .k_slots = x->kbuf, .v_slots = x->vbuf};
            if (x->st->append(x->ls->store_state, &a) != KVP_OK)
                return x->ls->store_fail(x->ls->store_fail_ctx, s, h, "append", err);
            if (runs_guarded(x, hc, s, h, "append", err) != 0) return -1;
        } else {
            for (int t = 0; t < T; t++) {
                x->st->encode(x->ls->store_state, KVP_WHICH_K, k + (size_t)t * NH * HS + (size_t)h * HS,
                              x->kbuf + (first + (uint32_t)t) * x->kb);
                x->st->encode(x->ls->store_state, KVP_WHICH_V, v + (size_t)t * NH * HS + (size_t)h * HS,
                              x->vbuf + (first + (uint32_t)t) * x->vb);
                if (runs_guarded(x, hc, s, h, "encode", err) != 0) return -1;
            }
        }
        runs_out(x, hc);
    }
    return 0;
}

/* Decodes every live slot of head (s, l, h) into dk/dv and compares each with the fp32 row its position
 * was written from (orig: [n_ctx][2][HS] of this head). */
static int store_read(store_rig *x, int s, int h, const float *orig, double tol, kvh_err *err) {
    const int HS = x->HS;
    kvh_head_cache *hc = kvh_kvcache_head(x->c, s, x->l, h);
    runs_in(x, hc);
    for (uint32_t j = 0; j < hc->n; j++)
        for (int w = 0; w < 2; w++) {
            guard_set((unsigned char *)(x->row + HS));
            x->st->decode(x->ls->store_state, w ? KVP_WHICH_V : KVP_WHICH_K, (w ? x->vbuf + j * x->vb : x->kbuf + j * x->kb),
                          x->row);
            if (!guard_ok((const unsigned char *)(x->row + HS)))
                return kvh_fail(err, "store '%s' layer %d seq %d head %d: decode wrote past the %d floats of its row",
                                x->st->name, x->l, s, h, HS);
            const float *ref = orig + ((size_t)hc->pos[j] * 2 + (size_t)w) * HS;
            double e2 = 0, r2 = 0;
            for (int d = 0; d < HS; d++) {
                double dd = (double)x->row[d] - ref[d];
                e2 += dd * dd;
                r2 += (double)ref[d] * ref[d];
                if (!isfinite(x->row[d])) e2 = INFINITY;
            }
            const double rel = sqrt(e2 / (r2 > 1e-30 ? r2 : 1e-30));
            if (rel > x->max_err) x->max_err = rel;
            if (!(rel <= tol))
                return kvh_fail(err, "store '%s' layer %d seq %d head %d: slot %u (position %d) decodes %s with a "
                                "relative error of %.4g against the fp32 row, more than --tol %g", x->st->name, x->l, s,
                                h, j, hc->pos[j], w ? "V" : "K", rel, tol);
            memcpy((w ? x->dv : x->dk) + (size_t)j * HS, x->row, (size_t)HS * sizeof(float));
        }
    return runs_guarded(x, hc, s, h, "decode", err);
}

/* attend() of T queries (q: [T][NH*HS], positions qpos) over head (s, l, h), after store_read filled
 * dk/dv: probabilities and output equal fp32 attention over the decoded rows. */
static int store_attend(store_rig *x, int s, int h, int T, const float *q, const int32_t *qpos, kvh_err *err) {
    const int HS = x->HS, NH = x->c->n_head;
    kvh_head_cache *hc = kvh_kvcache_head(x->c, s, x->l, h);
    const uint32_t n = hc->n;
    const float scale = 1.0f / sqrtf((float)HS);
    float *out = x->row;
    for (int t = 0; t < T; t++) {
        const float *qt = q + (size_t)t * NH * HS + (size_t)h * HS;
        guard_set((unsigned char *)(out + HS));
        guard_set((unsigned char *)(x->probs + n));
        kvp_attend_args a = {.struct_size = sizeof a, .head_dim = (uint32_t)HS, .n = n, .q_pos = qpos[t],
                             .scale = scale, .q = qt, .pos = hc->pos, .k_slots = x->kbuf, .v_slots = x->vbuf,
                             .out = out, .probs = x->probs};
        x->st->attend(x->ls->store_state, &a);
        if (!guard_ok((const unsigned char *)(out + HS)) || !guard_ok((const unsigned char *)(x->probs + n)))
            return kvh_fail(err, "store '%s' layer %d seq %d head %d: attend wrote past out[%d] or probs[%u]",
                            x->st->name, x->l, s, h, HS, n);
        if (runs_guarded(x, hc, s, h, "attend", err) != 0) return -1;
        /* the reference, in double over the decoded rows */
        double mx = -INFINITY, sum = 0, vmax = 0;
        double p[1024];
        for (uint32_t j = 0; j < n; j++) {
            double d = 0;
            for (int i = 0; i < HS; i++) d += (double)qt[i] * x->dk[(size_t)j * HS + i];
            p[j] = hc->pos[j] > qpos[t] ? -INFINITY : d * scale;
            if (p[j] > mx) mx = p[j];
        }
        for (uint32_t j = 0; j < n; j++) {
            p[j] = p[j] == -INFINITY ? 0 : exp(p[j] - mx);
            sum += p[j];
        }
        double perr = 0, oerr = 0;
        for (uint32_t j = 0; j < n; j++) {
            p[j] /= sum;
            double e = fabs(p[j] - x->probs[j]);
            if (!(e <= perr)) perr = e;
            for (int i = 0; i < HS; i++) vmax = fmax(vmax, fabs(x->dv[(size_t)j * HS + i]));
        }
        for (int i = 0; i < HS; i++) {
            double o = 0;
            for (uint32_t j = 0; j < n; j++) o += p[j] * x->dv[(size_t)j * HS + i];
            double e = fabs(o - out[i]) / (vmax > 1e-30 ? vmax : 1e-30);
            if (!(e <= oerr)) oerr = e;
        }
        if (oerr > x->max_attn_err) x->max_attn_err = oerr;
        if (!(perr <= 1e-4) || !(oerr <= 1e-3))
            return kvh_fail(err, "store '%s' layer %d seq %d head %d: attend of the query at position %d differs from "
                            "fp32 attention over its decoded slots (largest probability error %.3g, output error %.3g "
                            "of max |V|; allowed 1e-4 and 1e-3)", x->st->name, x->l, s, h, qpos[t], perr, oerr);
    }
    return 0;
}

static int store_run(const char *ref, const kvh_plugin_check_options *o, uint64_t seed, const check_run *g,
                     const kvh_model *m, kvh_router *r, FILE *out, int *warned_leak, kvh_err *err) {
    uint64_t rng = seed * 0xD1B54A32D192ED03ull + 7;
    const int L = g->n_layer, NH = g->n_head, HS = m->cfg.n_embd / NH, C = m->cfg.n_embd, N = g->n_ctx;
    int rc = 0, step = 0, s = 0, resets = 0;
    uint64_t removed = 0;
    kvh_kvcache c;
    memset(&c, 0, sizeof c);
    store_rig x = {.c = &c, .HS = HS};
    kvh_layer_policy_settings *st = calloc((size_t)L, sizeof *st);
    /* fp32 rows each (seq, layer, head, position) was written from: [S][L][NH][N][2][HS] */
    float *orig = calloc((size_t)g->n_seq * L * NH * N * 2 * HS, sizeof *orig);
    float *xin = malloc((size_t)C * sizeof *xin);
    float *qr = malloc((size_t)N * NH * HS * sizeof *qr), *kr = malloc((size_t)N * NH * HS * sizeof *kr);
    float *vr = malloc((size_t)N * NH * HS * sizeof *vr);
    int32_t *qpos = malloc((size_t)N * sizeof *qpos);
    uint32_t *victims = malloc((size_t)N * sizeof *victims);
    x.row = malloc((size_t)HS * sizeof(float) + GUARD);
    x.probs = malloc((size_t)N * sizeof(float) + GUARD);
    x.dk = malloc((size_t)N * HS * sizeof(float));
    x.dv = malloc((size_t)N * HS * sizeof(float));
    if (!st || !orig || !xin || !qr || !kr || !vr || !qpos || !victims || !x.row || !x.probs || !x.dk || !x.dv) {
        rc = kvh_fail(err, "plugins check: out of memory");
        goto done;
    }
    kvh_router_layer_settings(r, st);
    if ((rc = kvh_kvcache_init(&c, g->n_seq, L, NH, HS, N, st, 0, err)) != 0) goto done;
    if ((rc = kvh_router_bind_cache(r, &c, err)) != 0) goto done;
    size_t kbmax = 0, vbmax = 0;
    for (int l = 0; l < L; l++) {
        if (kvh_kvcache_k_slot_bytes(&c, l) > kbmax) kbmax = kvh_kvcache_k_slot_bytes(&c, l);
        if (kvh_kvcache_v_slot_bytes(&c, l) > vbmax) vbmax = kvh_kvcache_v_slot_bytes(&c, l);
    }
    x.kbuf = malloc((size_t)N * kbmax + GUARD);
    x.vbuf = malloc((size_t)N * vbmax + GUARD);
    if (!x.kbuf || !x.vbuf) {
        rc = kvh_fail(err, "plugins check: out of memory");
        goto done;
    }
    const size_t fixed_bytes = c.store_bytes; /* what the instances hold before any token */
    for (step = 0; step < o->steps && rc == 0; step++) {
        for (s = 0; s < g->n_seq && rc == 0; s++) {
            const int32_t p0 = c.next_pos[s];
            const int first = p0 == 0;
            const int T = first ? 1 + (int)below(&rng, (uint32_t)(N / 2)) : 1;
            if (p0 + T > N || (!first && below(&rng, 64) == 0)) { /* the sequence slot starts over */
                if ((rc = kvh_router_reset_seq(r, s, err)) != 0) break;
                kvh_kvcache_reset_seq(&c, s);
                resets++;
                continue;
            }
            for (int t = 0; t < T; t++) qpos[t] = p0 + t;
            for (int l = 0; l < L && rc == 0; l++) {
                const kvh_layer_weights *w = &m->layers[l];
                x.l = l;
                x.ls = &c.layer[l];
                x.st = x.ls->store;
                x.kb = kvh_kvcache_k_slot_bytes(&c, l);
                x.vb = kvh_kvcache_v_slot_bytes(&c, l);
                if (!x.st) {
                    rc = kvh_fail(err, "layer %d has no store (the section claims every layer)", l);
                    break;
                }
                for (int t = 0; t < T; t++) {
                    for (int i = 0; i < C; i++) xin[i] = unit(&rng);
                    project(xin, w->attn_w, w->attn_b, C, 3 * C, 0, C, qr + (size_t)t * C);
                    project(xin, w->attn_w, w->attn_b, C, 3 * C, C, C, kr + (size_t)t * C);
                    project(xin, w->attn_w, w->attn_b, C, 3 * C, 2 * C, C, vr + (size_t)t * C);
                    for (int h = 0; h < NH; h++) {
                        float *dst = orig + ((((size_t)s * L + l) * NH + h) * N + (size_t)qpos[t]) * 2 * HS;
                        memcpy(dst, kr + (size_t)t * C + (size_t)h * HS, (size_t)HS * sizeof(float));
                        memcpy(dst + HS, vr + (size_t)t * C + (size_t)h * HS, (size_t)HS * sizeof(float));
                    }
                }
                if ((rc = kvh_kvcache_reserve(&c, s, l, (uint32_t)T, err)) != 0) break;
                kvh_kvcache_append_meta(&c, s, l, T, qpos);
                if ((rc = store_write(&x, s, T, kr, vr, err)) != 0) break;
                for (int h = 0; h < NH && rc == 0; h++) {
                    const float *oh = orig + (((size_t)s * L + l) * NH + h) * N * 2 * HS;
                    if ((rc = store_read(&x, s, h, oh, o->tol, err)) != 0) break;
                    rc = store_attend(&x, s, h, T, qr, qpos, err);
                }
                /* over budget + slack: random victims (at least down to budget), released by the cache */
                for (int h = 0; h < NH && rc == 0; h++) {
                    kvh_head_cache *hc = kvh_kvcache_head(&c, s, l, h);
                    if (hc->n <= g->budget + g->slack) continue;
                    const uint32_t k = hc->n - g->budget + below(&rng, g->budget / 2 + 1);
                    for (uint32_t j = 0; j < hc->n; j++) victims[j] = j;
                    for (uint32_t j = 0; j < k; j++) { /* partial Fisher-Yates */
                        uint32_t pick = j + below(&rng, hc->n - j), t2 = victims[j];
                        victims[j] = victims[pick];
                        victims[pick] = t2;
                    }
                    if ((rc = kvh_kvcache_remove(&c, s, l, h, victims, k, err)) != 0) break;
                    removed += k;
                    const float *oh = orig + (((size_t)s * L + l) * NH + h) * N * 2 * HS;
                    rc = store_read(&x, s, h, oh, o->tol, err); /* the survivors still read back right */
                    if (rc != 0) kvh_fail_prefix(err, "after %u slots were released", k);
                }
            }
            if (rc != 0) break; /* step and s name the failure */
            c.next_pos[s] = p0 + T;
        }
        if (rc != 0) break;
    }
    if (rc == 0) { /* every sequence starts over: the store's memory should be what it was before any token */
        for (s = 0; s < g->n_seq && rc == 0; s++) {
            if ((rc = kvh_router_reset_seq(r, s, err)) != 0) break;
            kvh_kvcache_reset_seq(&c, s);
        }
        if (rc == 0 && c.store_bytes > fixed_bytes && !(*warned_leak)++)
            fprintf(out, "warning: %s holds %zu bytes of its own memory once every sequence is reset, %zu more than "
                    "before the first token (kept for reuse, or not freed in release/reset?)\n", ref, c.store_bytes,
                    c.store_bytes - fixed_bytes);
    }
    if (rc != 0) {
        kvh_fail_prefix(err, "plugins check %s: seed %llu (layers %d, heads %d, seqs %d, n_ctx %d, budget %u, slack "
                        "%u), step %d, seq %d", ref, (unsigned long long)seed, L, NH, g->n_seq, N, g->budget, g->slack,
                        step, s);
    } else {
        fprintf(out, "ok  seed %-6llu layers %d heads %d seqs %d n_ctx %3d budget %2u slack %u: %d steps, %llu slots "
                "released, %d resets, decode error <= %.3g, attend error <= %.2g\n", (unsigned long long)seed, L, NH,
                g->n_seq, N, g->budget, g->slack, o->steps, (unsigned long long)removed, resets, x.max_err,
                x.max_attn_err);
    }
done:
    kvh_kvcache_free(&c);
    free(st);
    free(orig);
    free(xin);
    free(qr);
    free(kr);
    free(vr);
    free(qpos);
    free(victims);
    free(x.row);
    free(x.probs);
    free(x.dk);
    free(x.dv);
    free(x.kbuf);
    free(x.vbuf);
    return rc;
}

static int one_run(const char *ref, const char *plugin_path, const kvh_plugin_check_options *o, uint64_t seed,
                   FILE *out, int *warned_newest, int *warned_empty, kvh_err *err) {
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    check_run g = {.n_layer = 1 + (int)below(&rng, 3), .n_head = 1 + (int)below(&rng, 4),
                   .n_ctx = 48 + (int)below(&rng, 80), .n_seq = 1 + (int)below(&rng, 3),
                   .budget = 12 + below(&rng, 28), .slack = below(&rng, 3) == 0 ? 0 : below(&rng, 6)};
    if (o->budget) g.budget = o->budget;
    const int HS = 64; /* GPT-2's head size: stores' group sizes divide it (their create must succeed to be named) */
    size_t cap = 256 + (size_t)o->n_sets * 256;
    char *ini = malloc(cap);
    if (!ini) return kvh_fail(err, "plugins check: out of memory");
    size_t u = (size_t)snprintf(ini, cap, "[cache]\nbudget = %u\nslack = %u\n[check]\nplugin = %s\nlayers = all\n",
                                g.budget, g.slack, ref);
    for (int i = 0; i < o->n_sets && u < cap; i++) {
        const char *eq = strchr(o->sets[i], '=');
        if (!eq) {
            free(ini);
            return kvh_fail(err, "plugins check: --set %s: expected KEY=VALUE", o->sets[i]);
        }
        u += (size_t)snprintf(ini + u, cap - u, "%.*s = %s\n", (int)(eq - o->sets[i]), o->sets[i], eq + 1);
    }
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    int rc = kvh_config_load_string(&cfg, ini, "plugins-check", err);
    free(ini);
    if (rc != 0) {
        kvh_config_free(&cfg);
        return -1;
    }
    /* a seeded random model at the run's shape: weights for host->tensor, K/V rows for stores */
    kvh_model model;
    kvh_model_config mc = {.n_vocab = 16, .n_positions = g.n_ctx, .n_embd = g.n_head * HS, .n_head = g.n_head,
                           .n_layer = g.n_layer, .n_inner = 4 * g.n_head * HS, .ln_eps = 1e-5f, .bos_id = 0};
    if (kvh_model_init_random(&model, &mc, seed, "plugins-check", err) != 0) {
        kvh_config_free(&cfg);
        return -1;
    }
    kvh_router *r = NULL;
    if (kvh_router_create_model(&r, &cfg, plugin_path, &model, g.n_seq, err) != 0) {
        kvh_config_free(&cfg);
        kvh_model_free(&model);
        return kvh_fail_prefix(err, "plugins check %s: seed %llu ([cache] budget %u, slack %u; --budget N and --set "
                               "KEY=VALUE choose others)", ref, (unsigned long long)seed, g.budget, g.slack);
    }
    if (!kvh_router_layer_policy_name(r, 0)) {
        if (kvh_router_layer_store_name(r, 0)) {
            rc = store_run(ref, o, seed, &g, &model, r, out, warned_empty, err);
        } else {
            rc = kvh_fail(err, "plugins check: %s is a weight format; the check drives policies and stores (weight "
                          "formats: see tests/test_weight_formats.c)", ref);
        }
        kvh_router_free(r);
        kvh_config_free(&cfg);
        kvh_model_free(&model);
        return rc;
    }
    kvh_layer_policy_settings *st = calloc((size_t)g.n_layer, sizeof *st);
    int32_t *qpos = malloc((size_t)g.n_ctx * sizeof *qpos);
    float *probs = malloc((size_t)g.n_ctx * sizeof *probs);
    float *rows = calloc((size_t)g.n_ctx * (size_t)g.n_head * HS, sizeof *rows);
    kvh_kvcache c;
    memset(&c, 0, sizeof c);
    if (!st || !qpos || !probs || !rows) {
        rc = kvh_fail(err, "plugins check: out of memory");
        goto done;
    }
    kvh_router_layer_settings(r, st);
    if ((rc = kvh_kvcache_init(&c, g.n_seq, g.n_layer, g.n_head, HS, g.n_ctx, st, 0, err)) != 0) goto done;
    if ((rc = kvh_router_bind_cache(r, &c, err)) != 0) goto done;
    uint64_t evicts0 = kvh_router_evict_calls(r);
    int step = 0, s = 0, resets = 0;
    for (step = 0; step < o->steps && rc == 0; step++) {
        for (s = 0; s < g.n_seq && rc == 0; s++) {
            const int32_t p0 = c.next_pos[s];
            const int first = p0 == 0;
            int T = first ? 1 + (int)below(&rng, (uint32_t)(g.n_ctx / 2)) : 1;
            if (p0 + T > g.n_ctx || (!first && below(&rng, 64) == 0)) { /* the sequence slot starts over */
                if ((rc = kvh_router_reset_seq(r, s, err)) != 0) break;
                kvh_kvcache_reset_seq(&c, s);
                resets++;
                continue;
            }
            for (int t = 0; t < T; t++) qpos[t] = p0 + t;
            for (int l = 0; l < g.n_layer && rc == 0; l++) {
                const kvh_layer_policy_settings *ls = &c.layer[l];
                if ((rc = kvh_kvcache_reserve(&c, s, l, (uint32_t)T, err)) != 0) break;
                kvh_kvcache_append(&c, s, l, T, rows, rows, (size_t)g.n_head * HS, qpos);
                if (ls->policy_insert && (rc = ls->policy_insert(ls->policy_ctx, &c, s, l, T, err)) != 0) break;
                attend(&c, s, l, T, qpos, probs, &rng);
                if (ls->report && (rc = ls->policy_report(ls->policy_ctx, &c, s, l, T, qpos, err)) != 0) break;
            }
            if (rc != 0) break;
            c.next_pos[s] = p0 + T;
            if (T > 1 || first) rc = kvh_router_after_prefill(r, &c, s, err);
            else
                for (int l = 0; l < g.n_layer && rc == 0; l++) rc = kvh_router_enforce(r, &c, s, l, 0, err);
            for (int l = 0; l < g.n_layer && rc == 0; l++)
                for (int h = 0; h < g.n_head && rc == 0; h++) {
                    const kvh_head_cache *hc = kvh_kvcache_head(&c, s, l, h);
                    if (hc->budget != KVH_BUDGET_UNLIMITED && (uint64_t)hc->n > (uint64_t)hc->budget + g.slack)
                        rc = kvh_fail(err, "layer %d seq %d head %d holds %u tokens after eviction, more than budget "
                                      "%u + slack %u", l, s, h, hc->n, hc->budget, g.slack);
                    int newest = 0;
                    for (uint32_t j = 0; j < hc->n; j++) newest |= hc->pos[j] == p0 + T - 1;
                    if (hc->n == 0 && !(*warned_empty)++)
                        fprintf(out, "warning: %s emptied layer %d seq %d head %d (legal, but every token is gone)\n",
                                ref, l, s, h);
                    else if (!newest && !(*warned_newest)++)
                        fprintf(out, "warning: %s evicted the newest token (position %d) of layer %d seq %d head %d "
                                "(legal: TOVA does; usually a bug)\n", ref, p0 + T - 1, l, s, h);
                }
            if (rc != 0) break; /* step and s name the failure */
        }
        if (rc != 0) break;
    }
    if (rc != 0) {
        kvh_fail_prefix(err, "plugins check %s: seed %llu (layers %d, heads %d, seqs %d, n_ctx %d, budget %u, slack "
                        "%u), step %d, seq %d", ref, (unsigned long long)seed, g.n_layer, g.n_head, g.n_seq, g.n_ctx,
                        g.budget, g.slack, step, s);
    } else {
        fprintf(out, "ok  seed %-6llu layers %d heads %d seqs %d n_ctx %3d budget %2u slack %u: %d steps, %llu evict "
                "calls, %d resets\n", (unsigned long long)seed, g.n_layer, g.n_head, g.n_seq, g.n_ctx, g.budget,
                g.slack, o->steps, (unsigned long long)(kvh_router_evict_calls(r) - evicts0), resets);
    }
done:
    kvh_kvcache_free(&c);
    kvh_router_free(r);
    kvh_config_free(&cfg);
    kvh_model_free(&model);
    free(st);
    free(qpos);
    free(probs);
    free(rows);
    return rc;
}

int kvh_plugin_check(const char *ref, const char *plugin_path, const kvh_plugin_check_options *o, FILE *out,
                     kvh_err *err) {
    int warned_newest = 0, warned_empty = 0; /* each warning once per check */
    for (int i = 0; i < o->runs; i++)
        if (one_run(ref, plugin_path, o, o->seed + (uint64_t)i, out, &warned_newest, &warned_empty, err) != 0) return -1;
    fprintf(out, "%s: %d runs x %d steps, every answer valid\n", ref, o->runs, o->steps);
    return 0;
}
