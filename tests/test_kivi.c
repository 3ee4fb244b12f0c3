/* test_kivi.c — the KIVI option of int8.so / int4.so (plugins/quant: kvq_kivi.h, kivi_store.c):
 * per-channel key and per-token value round trips within the closed-form bound, attention over handles
 * against a double-precision attention over the decoded rows, random append / release sequences
 * against a reference model (which tokens are live, which are still fp32 and decode exactly, what the
 * others decode to), the memory formula, bad parameters, and end to end through the session (the
 * residual window covering the sequence gives the fp32 logits; int8 / int4 close to fp32; h2o on top
 * keeps its budget; a too small KV memory limit is a clean error).
 *
 * Bounds (s = the STORED fp16 scale of a channel (keys) or value group, m = the stored min, qmax = 255
 * or 15, range = max - m over the G values sharing s):
 *   range / qmax <= s <= (range / qmax) * (1 + 2^-10) + 2^-24
 *   |x - x^| <= s / 2 + 2^-20 * (|x| + |m| + s)
 * Attention: out[d] within 1e-5 * sum_j p_j |v_jd| of the double-precision attention over decode()d
 * rows, probabilities within 1e-5 * max p. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../plugins/quant/kvq_kivi.h"
#include "runtime/config.h"
#include "helpers/test_util.h"
#include "runtime/kvcache.h"
#include "kvp/kvp.h"
#include "model/model.h"
#include "runtime/router.h"
#include "model/sampler.h"
#include "runtime/session.h"

#define PDIR KVH_BUILD_DIR "/plugins"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd_u32(void) { return (uint32_t)(kvh_test_xorshift(&rng_state) >> 16); }
static float rnd_unit(void) { return (float)rnd_u32() / 4294967296.0f * 2.0f - 1.0f; } /* [-1, 1) */

/* |x - x^| within the bound for one group sharing (s, m) whose true values span [lo, hi]. */
static void check_group(const char *what, float s, float m, float lo, float hi, float qmax, const float *x,
                        const float *xh, size_t stride, uint32_t n) {
    const double range = (double)hi - (double)m;
    cr_assert_leq((double)m, (double)lo, "%s: min %g above the smallest value %g", what, (double)m, (double)lo);
    cr_assert_geq((double)s * qmax, range * (1 - 1e-7), "%s: scale %g too small for range %g", what, (double)s, range);
    cr_assert_leq((double)s, range / qmax * (1 + 1.0 / 1024) + ldexp(1, -24), "%s: scale %g too large", what, (double)s);
    for (uint32_t i = 0; i < n; i++) {
        const double a = x[i * stride], b = xh[i * stride];
        const double tol = s / 2.0 + ldexp(1, -20) * (fabs(a) + fabs(m) + s);
        cr_assert_leq(fabs(a - b), tol, "%s element %u: %.9g decoded as %.9g (s %g)", what, i, a, b, (double)s);
    }
}

static void check_round_trip(uint32_t bits, uint32_t G, uint32_t HS, float spread) {
    kivi_format f;
    char msg[256];
    cr_assert_eq(kivi_format_init(&f, bits, G, 0, HS, msg, sizeof msg), 0, "%s", msg);
    cr_assert_eq(f.group_bytes, 8u + 8u * HS + 2u * G * HS * bits / 8u, "group bytes formula");
    float *k = malloc((size_t)2 * G * HS * sizeof(float)), *v = malloc((size_t)2 * G * HS * sizeof(float));
    float *kd = malloc((size_t)G * HS * sizeof(float)), *vd = malloc((size_t)G * HS * sizeof(float));
    uint32_t idx[512];
    unsigned char *block = malloc(f.group_bytes);
    /* 2G rows in the window, the group takes every other one (row r = entry idx[r]) */
    for (uint32_t i = 0; i < 2 * G * HS; i++) {
        const uint32_t d = i % HS;
        k[i] = spread * rnd_unit() + (float)d * 0.25f - 3.0f; /* channels offset differently: KIVI's case */
        v[i] = spread * rnd_unit();
    }
    for (uint32_t r = 0; r < G; r++) idx[r] = 2 * r + 1;
    if (HS >= 4) { /* a constant channel decodes exactly */
        for (uint32_t r = 0; r < 2 * G; r++) k[(size_t)r * HS + 3] = 1.5f;
    }
    memset(block, 0xa5, f.group_bytes);
    kivi_quantize_group(&f, k, v, idx, block);
    cr_assert_eq(*kivi_group_live(block), G);
    float *kg = malloc((size_t)G * HS * sizeof(float)), *vg = malloc((size_t)G * HS * sizeof(float));
    for (uint32_t r = 0; r < G; r++) {
        memcpy(kg + (size_t)r * HS, k + (size_t)idx[r] * HS, HS * sizeof(float));
        memcpy(vg + (size_t)r * HS, v + (size_t)idx[r] * HS, HS * sizeof(float));
        kivi_decode_key(&f, block, r, kd + (size_t)r * HS);
        kivi_decode_value(&f, block, r, vd + (size_t)r * HS);
    }
    char what[96];
    for (uint32_t d = 0; d < HS; d++) { /* keys: per channel over the G tokens */
        float lo = kg[d], hi = kg[d];
        for (uint32_t r = 1; r < G; r++) {
            lo = fminf(lo, kg[(size_t)r * HS + d]);
            hi = fmaxf(hi, kg[(size_t)r * HS + d]);
        }
        snprintf(what, sizeof what, "int%u G%u HS%u key channel %u", bits, G, HS, d);
        check_group(what, kivi_key_scale(&f, block, d), kivi_key_min(&f, block, d), lo, hi, (float)f.qmax, kg + d,
                    kd + d, HS, G);
    }
    for (uint32_t r = 0; r < G; r++) /* values: per token, groups of G channels */
        for (uint32_t g = 0; g < HS / G; g++) {
            const float *x = vg + (size_t)r * HS + (size_t)g * G;
            float lo = x[0], hi = x[0];
            for (uint32_t i = 1; i < G; i++) {
                lo = fminf(lo, x[i]);
                hi = fmaxf(hi, x[i]);
            }
            snprintf(what, sizeof what, "int%u G%u HS%u value row %u group %u", bits, G, HS, r, g);
            const unsigned char *slot = kivi_value_slot(&f, block, r);
            check_group(what, kvq_scale(&f.v, slot, g), kvq_min(&f.v, slot, g), lo, hi, (float)f.qmax, x,
                        vd + (size_t)r * HS + (size_t)g * G, 1, G);
        }
    if (HS >= 4)
        for (uint32_t r = 0; r < G; r++) cr_assert_eq(kd[(size_t)r * HS + 3], 1.5f, "constant channel not exact");
    free(k);
    free(v);
    free(kd);
    free(vd);
    free(kg);
    free(vg);
    free(block);
}

Test(kivi, keys_per_channel_values_per_token_within_the_bound) {
    const uint32_t bits[2] = {8, 4};
    for (int b = 0; b < 2; b++) {
        check_round_trip(bits[b], 32, 64, 1.0f);
        check_round_trip(bits[b], 16, 64, 20.0f);
        check_round_trip(bits[b], 8, 32, 0.01f);
        check_round_trip(bits[b], 64, 64, 3.0f);
        check_round_trip(bits[b], 2, 6, 1.0f);
    }
}

/* ---- attention over handles -------------------------------------------------------------------------- */

/* Double-precision attention over decode()d rows of n handles; compare with kivi_attend. */
static void check_attend_handles(const kivi_format *f, const kivi_window *win, void *const *groups, const uint32_t *h,
                                 const int32_t *pos, uint32_t n, int32_t q_pos, const char *what) {
    const uint32_t HS = f->head_dim;
    float *q = malloc(HS * sizeof(float)), *out = malloc(HS * sizeof(float)), *probs = malloc(n * sizeof(float));
    float *K = malloc((size_t)n * HS * sizeof(float)), *V = malloc((size_t)n * HS * sizeof(float));
    double *p = malloc(n * sizeof(double));
    for (uint32_t d = 0; d < HS; d++) q[d] = 2.0f * rnd_unit();
    for (uint32_t j = 0; j < n; j++) {
        kivi_decode_handle(f, win, groups, 0, h[j], K + (size_t)j * HS);
        kivi_decode_handle(f, win, groups, 1, h[j], V + (size_t)j * HS);
    }
    const float scale = 1.0f / sqrtf((float)HS);
    kivi_attend(f, win, groups, q, q_pos, scale, n, pos, h, out, probs);
    double mx = -INFINITY, sum = 0;
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > q_pos) continue;
        double s = 0;
        for (uint32_t d = 0; d < HS; d++) s += (double)q[d] * K[(size_t)j * HS + d];
        p[j] = s * scale;
        mx = fmax(mx, p[j]);
    }
    for (uint32_t j = 0; j < n; j++) {
        p[j] = pos[j] > q_pos ? 0 : exp(p[j] - mx);
        sum += p[j];
    }
    double pmax = 0;
    for (uint32_t j = 0; j < n; j++) pmax = fmax(pmax, p[j] /= sum);
    for (uint32_t j = 0; j < n; j++) {
        if (pos[j] > q_pos) cr_assert_eq(probs[j], 0.0f, "%s: masked slot %u has p %g", what, j, (double)probs[j]);
        cr_assert_leq(fabs(probs[j] - p[j]), 1e-5 * pmax, "%s: p[%u] %g vs %g", what, j, (double)probs[j], p[j]);
    }
    for (uint32_t d = 0; d < HS; d++) {
        double o = 0, mag = 0;
        for (uint32_t j = 0; j < n; j++) {
            o += p[j] * V[(size_t)j * HS + d];
            mag += p[j] * fabs(V[(size_t)j * HS + d]);
        }
        cr_assert_leq(fabs(out[d] - o), 1e-5 * mag + 1e-30, "%s: out[%u] %.9g vs %.9g", what, d, (double)out[d], o);
    }
    free(q);
    free(out);
    free(probs);
    free(K);
    free(V);
    free(p);
}

Test(kivi, attention_over_handles_equals_fp32_attention_over_decoded_rows) {
    const uint32_t cfgs[][3] = {{8, 32, 64}, {4, 32, 64}, {4, 16, 64}, {8, 8, 32}, {4, 4, 12}};
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        const uint32_t bits = cfgs[c][0], G = cfgs[c][1], HS = cfgs[c][2], NGR = 5, NW = 37;
        kivi_format f;
        char msg[256];
        cr_assert_eq(kivi_format_init(&f, bits, G, 16, HS, msg, sizeof msg), 0, "%s", msg);
        /* two head-states' windows (the second one is the one used), NGR groups */
        kivi_window win[2];
        memset(win, 0, sizeof win);
        float *wk = malloc((size_t)NW * HS * sizeof(float)), *wv = malloc((size_t)NW * HS * sizeof(float));
        for (size_t i = 0; i < (size_t)NW * HS; i++) {
            wk[i] = 3.0f * rnd_unit() + 0.5f;
            wv[i] = rnd_unit();
        }
        win[1].k = wk;
        win[1].v = wv;
        win[1].n = win[1].live = win[1].cap = NW;
        void *groups[5];
        float *rk = malloc((size_t)G * HS * sizeof(float)), *rv = malloc((size_t)G * HS * sizeof(float));
        uint32_t idx[512];
        for (uint32_t r = 0; r < G; r++) idx[r] = r;
        for (uint32_t gi = 0; gi < NGR; gi++) {
            for (size_t i = 0; i < (size_t)G * HS; i++) {
                rk[i] = 3.0f * rnd_unit() + (float)(i % HS) * 0.1f;
                rv[i] = rnd_unit() * (1.0f + (float)gi);
            }
            groups[gi] = malloc(f.group_bytes);
            kivi_quantize_group(&f, rk, rv, idx, groups[gi]);
        }
        /* every token once, shuffled (so groups interleave and the q*s cache misses) */
        const uint32_t n = NGR * G + NW;
        uint32_t *h = malloc(n * sizeof *h);
        int32_t *pos = malloc(n * sizeof *pos);
        uint32_t k = 0;
        for (uint32_t gi = 0; gi < NGR; gi++)
            for (uint32_t r = 0; r < G; r++) h[k++] = kivi_handle_group(gi, r);
        for (uint32_t i = 0; i < NW; i++) h[k++] = kivi_handle_window(1, i);
        for (uint32_t i = n - 1; i > 0; i--) {
            uint32_t j = rnd_u32() % (i + 1), t = h[i];
            h[i] = h[j];
            h[j] = t;
        }
        for (uint32_t i = 0; i < n; i++) pos[i] = (int32_t)i;
        char what[64];
        snprintf(what, sizeof what, "int%u G%u HS%u", bits, G, HS);
        check_attend_handles(&f, win, groups, h, pos, n, (int32_t)n, what);         /* everything visible */
        check_attend_handles(&f, win, groups, h, pos, n, (int32_t)(n / 3), what);   /* causal mask */
        check_attend_handles(&f, win, groups, h, pos, 1, 0, what);                  /* one slot */
        for (uint32_t gi = 0; gi < NGR; gi++) free(groups[gi]);
        free(rk);
        free(rv);
        free(wk);
        free(wv);
        free(h);
        free(pos);
    }
}

/* ---- the plugin under a fake host: append / release against a reference model ------------------------ */

typedef struct fake_alloc {
    struct fake_alloc *prev, *next;
    size_t size;
    size_t pad;
} fake_alloc;

typedef struct fake_host {
    kvp_host host;
    size_t bytes, limit;
    fake_alloc *list;
    char error[512];
    double bits, group, residual;
} fake_host;

static void *f_alloc(void *ctx, size_t n) {
    fake_host *fh = ctx;
    if (fh->limit && fh->bytes + n > fh->limit) return NULL;
    fake_alloc *a = calloc(1, sizeof *a + (n ? n : 1));
    cr_assert_not_null(a);
    a->size = n;
    a->next = fh->list;
    if (fh->list) fh->list->prev = a;
    fh->list = a;
    fh->bytes += n;
    return a + 1;
}
static void f_free(void *ctx, void *p) {
    fake_host *fh = ctx;
    if (!p) return;
    fake_alloc *a = (fake_alloc *)p - 1;
    if (a->prev) a->prev->next = a->next;
    else fh->list = a->next;
    if (a->next) a->next->prev = a->prev;
    fh->bytes -= a->size;
    free(a);
}
static void f_set_error(void *ctx, const char *msg) { snprintf(((fake_host *)ctx)->error, 512, "%s", msg); }
static void f_log(void *ctx, int level, const char *msg) { (void)ctx, (void)level, (void)msg; }
static double f_param(void *ctx, const char *name) {
    fake_host *fh = ctx;
    if (!strcmp(name, "kivi")) return 1;
    if (!strcmp(name, "bits")) return fh->bits;
    if (!strcmp(name, "group")) return fh->group;
    if (!strcmp(name, "residual")) return fh->residual;
    return 0;
}
static void *f_shared(void *ctx, size_t n) { return f_alloc(ctx, n); }
static void fake_free_all(fake_host *fh) {
    while (fh->list) f_free(fh, fh->list + 1);
}

static const kvp_descriptor *load_plugin(const char *file, void **dl) {
    *dl = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(*dl, "%s", dlerror());
    kvp_entry_fn entry;
    void *sym = dlsym(*dl, KVP_ENTRY_SYMBOL);
    cr_assert_not_null(sym);
    memcpy(&entry, &sym, sizeof entry);
    return entry();
}

enum { FNSEQ = 2, FNH = 2, FHS = 64, FCAP = 2048 };

typedef struct emu_head {
    uint32_t k[FCAP], v[FCAP];
    int32_t pos[FCAP];
    uint32_t n;
    int32_t next_pos;
    /* reference: per position, 1 = quantized; the live unquantized positions */
    unsigned char quantized[FCAP];
    int32_t unq[FCAP];
    uint32_t n_unq;
} emu_head;

static float ref_elem(int32_t p, int hs, uint32_t d, int which) {
    return (which ? 0.7f : 1.3f) * sinf(0.731f * (float)p + 0.37f * (float)d + 1.1f * (float)hs + (float)which) +
           (which ? 0.0f : 0.05f * (float)d);
}

typedef struct emu {
    fake_host fh;
    void *dl;
    const kvp_descriptor *d;
    void *state;
    uint32_t G, R, bits;
    emu_head *heads; /* [FNSEQ * FNH] */
    size_t fixed;
} emu;

static void emu_init(emu *e, const char *plugin, uint32_t bits, uint32_t G, uint32_t R) {
    memset(e, 0, sizeof *e);
    e->fh.host = (kvp_host){.struct_size = sizeof(kvp_host), .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR,
                            .ctx = &e->fh, .log = f_log, .set_error = f_set_error, .alloc = f_alloc, .free = f_free,
                            .param = f_param, .shared = f_shared};
    e->fh.bits = bits;
    e->fh.group = G;
    e->fh.residual = R;
    e->G = G;
    e->R = R;
    e->bits = bits;
    e->d = load_plugin(plugin, &e->dl);
    kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1, .n_q_head = FNH, .n_kv_head = FNH,
                         .head_dim = FHS, .n_ctx = FCAP, .n_seq = FNSEQ};
    kvp_instance inst = {.struct_size = sizeof inst};
    cr_assert_eq(e->d->create(&e->fh.host, &li, &inst), KVP_OK, "%s", e->fh.error);
    cr_assert_eq(inst.k_slot_bytes, 4);
    cr_assert_eq(inst.v_slot_bytes, 4);
    e->state = inst.state;
    e->heads = calloc(FNSEQ * FNH, sizeof *e->heads);
    e->fixed = e->fh.bytes;
}

static void emu_free(emu *e) {
    e->d->destroy(e->state);
    fake_free_all(&e->fh);
    free(e->heads);
    dlclose(e->dl);
}

static int emu_append(emu *e, uint32_t seq, uint32_t head, uint32_t T) {
    emu_head *hd = &e->heads[seq * FNH + head];
    cr_assert_leq(hd->n + T, (uint32_t)FCAP);
    float *kr = malloc((size_t)T * FHS * sizeof(float)), *vr = malloc((size_t)T * FHS * sizeof(float));
    const int hs = (int)(seq * FNH + head);
    for (uint32_t t = 0; t < T; t++) {
        hd->pos[hd->n + t] = hd->next_pos + (int32_t)t;
        for (uint32_t d = 0; d < FHS; d++) {
            kr[t * FHS + d] = ref_elem(hd->next_pos + (int32_t)t, hs, d, 0);
            vr[t * FHS + d] = ref_elem(hd->next_pos + (int32_t)t, hs, d, 1);
        }
    }
    memset(hd->k + hd->n, 0xee, T * 4);
    memset(hd->v + hd->n, 0xee, T * 4);
    kvp_append_args a = {.struct_size = sizeof a, .seq = seq, .head = head, .head_dim = FHS, .n_new = T,
                         .first_slot = hd->n, .pos = hd->pos, .k_rows = kr, .v_rows = vr, .row_stride = FHS,
                         .k_slots = hd->k, .v_slots = hd->v};
    int rc = e->d->append(e->state, &a);
    free(kr);
    free(vr);
    if (rc != KVP_OK) return rc;
    hd->n += T;
    /* reference rule: after each token, R + G live unquantized -> the G oldest are quantized */
    for (uint32_t t = 0; t < T; t++) {
        hd->unq[hd->n_unq++] = hd->next_pos++;
        if (hd->n_unq == e->R + e->G) {
            for (uint32_t i = 0; i < e->G; i++) { /* G smallest: selection by repeated minimum */
                uint32_t best = i;
                for (uint32_t k = i + 1; k < hd->n_unq; k++)
                    if (hd->unq[k] < hd->unq[best]) best = k;
                int32_t tmp = hd->unq[i];
                hd->unq[i] = hd->unq[best];
                hd->unq[best] = tmp;
                hd->quantized[hd->unq[i]] = 1;
            }
            memmove(hd->unq, hd->unq + e->G, (hd->n_unq - e->G) * sizeof(int32_t));
            hd->n_unq -= e->G;
        }
    }
    return KVP_OK;
}

/* Releases n_rel random slots, then compacts like the host (last live slot into each hole). */
static void emu_release(emu *e, uint32_t seq, uint32_t head, uint32_t n_rel) {
    emu_head *hd = &e->heads[seq * FNH + head];
    if (n_rel > hd->n) n_rel = hd->n;
    uint32_t *all = malloc((hd->n + 1) * sizeof *all);
    for (uint32_t i = 0; i < hd->n; i++) all[i] = i;
    for (uint32_t i = 0; i < n_rel; i++) {
        uint32_t j = i + rnd_u32() % (hd->n - i), t = all[i];
        all[i] = all[j];
        all[j] = t;
    }
    kvp_release_args a = {.struct_size = sizeof a, .seq = seq, .head = head, .n_live = hd->n, .pos = hd->pos,
                          .k_slots = hd->k, .v_slots = hd->v, .slots = all, .n_slots = n_rel};
    e->d->release(e->state, &a);
    unsigned char *dead = calloc(hd->n + 1, 1);
    for (uint32_t i = 0; i < n_rel; i++) {
        dead[all[i]] = 1;
        const int32_t p = hd->pos[all[i]];
        for (uint32_t k = 0; k < hd->n_unq; k++)
            if (hd->unq[k] == p) {
                hd->unq[k] = hd->unq[--hd->n_unq];
                break;
            }
    }
    uint32_t new_n = hd->n - n_rel, src = hd->n;
    for (uint32_t hole = 0; hole < new_n; hole++) {
        if (!dead[hole]) continue;
        do src--;
        while (dead[src]);
        hd->k[hole] = hd->k[src];
        hd->v[hole] = hd->v[src];
        hd->pos[hole] = hd->pos[src];
    }
    hd->n = new_n;
    free(dead);
    free(all);
}

/* Every live slot decodes to its token: exactly when the reference says it is still fp32, within the
 * quantization bound otherwise. Returns the number of distinct live groups. */
static uint32_t emu_check(emu *e, const char *when) {
    float row[FHS];
    const double qstep = e->bits == 8 ? 1.0 / 255 : 1.0 / 15;
    uint32_t *gids = malloc(FCAP * FNSEQ * FNH * sizeof *gids), ng = 0;
    for (int hs = 0; hs < FNSEQ * FNH; hs++) {
        emu_head *hd = &e->heads[hs];
        for (uint32_t j = 0; j < hd->n; j++) {
            cr_assert_eq(hd->k[j], hd->v[j], "%s: head %d slot %u: K and V handles differ", when, hs, j);
            const int32_t p = hd->pos[j];
            const int in_window = kivi_handle_in_window(hd->k[j]);
            cr_assert_eq(in_window, !hd->quantized[p], "%s: head %d pos %d should be %s", when, hs, p,
                         hd->quantized[p] ? "quantized" : "fp32");
            if (!in_window) {
                uint32_t g = kivi_handle_gid(hd->k[j]), k;
                for (k = 0; k < ng && gids[k] != g; k++) {}
                if (k == ng) gids[ng++] = g;
            }
            for (int which = 0; which < 2; which++) {
                e->d->decode(e->state, (uint32_t)which, which ? &hd->v[j] : &hd->k[j], row);
                for (uint32_t d = 0; d < FHS; d++) {
                    const float x = ref_elem(p, hs, d, which);
                    /* values per token span [-0.7, 0.7]; keys per channel over <= G tokens span <= 2.6 */
                    const double tol = in_window ? 0.0 : (which ? 1.4 : 2.6) * qstep * (1 + 1.0 / 1024) / 2 + 1e-6;
                    cr_assert_leq(fabs((double)row[d] - x), tol, "%s: head %d pos %d %s[%u]: %.9g decoded as %.9g",
                                  when, hs, p, which ? "V" : "K", d, (double)x, (double)row[d]);
                }
            }
        }
    }
    free(gids);
    return ng;
}

/* Attention through the plugin vs double-precision attention over the plugin's decode()d rows. */
static void emu_check_attend(emu *e, uint32_t hs) {
    emu_head *hd = &e->heads[hs];
    if (hd->n == 0) return;
    const uint32_t n = hd->n;
    float q[FHS], out[FHS], *probs = malloc(n * sizeof(float)), *K = malloc((size_t)n * FHS * sizeof(float));
    float *V = malloc((size_t)n * FHS * sizeof(float));
    double *p = malloc(n * sizeof(double));
    for (uint32_t d = 0; d < FHS; d++) q[d] = rnd_unit();
    for (uint32_t j = 0; j < n; j++) {
        e->d->decode(e->state, 0, &hd->k[j], K + (size_t)j * FHS);
        e->d->decode(e->state, 1, &hd->v[j], V + (size_t)j * FHS);
    }
    int32_t lo = hd->pos[0], hi = hd->pos[0];
    for (uint32_t j = 1; j < n; j++) {
        lo = hd->pos[j] < lo ? hd->pos[j] : lo;
        hi = hd->pos[j] > hi ? hd->pos[j] : hi;
    }
    int32_t qp = hi - (int32_t)(rnd_u32() % 8); /* a query that sees at least one slot */
    if (qp < lo) qp = lo;
    kvp_attend_args a = {.struct_size = sizeof a, .head_dim = FHS, .n = n, .q_pos = qp, .scale = 0.125f, .q = q,
                         .pos = hd->pos, .k_slots = hd->k, .v_slots = hd->v, .out = out, .probs = probs};
    e->d->attend(e->state, &a);
    double mx = -INFINITY, sum = 0, pmax = 0;
    for (uint32_t j = 0; j < n; j++) {
        double s = 0;
        for (uint32_t d = 0; d < FHS; d++) s += (double)q[d] * K[(size_t)j * FHS + d];
        p[j] = s * 0.125;
        if (hd->pos[j] <= qp) mx = fmax(mx, p[j]);
    }
    for (uint32_t j = 0; j < n; j++) sum += p[j] = hd->pos[j] > qp ? 0 : exp(p[j] - mx);
    for (uint32_t j = 0; j < n; j++) pmax = fmax(pmax, p[j] /= sum);
    for (uint32_t j = 0; j < n; j++) cr_assert_leq(fabs(probs[j] - p[j]), 1e-5 * pmax, "p[%u]", j);
    for (uint32_t d = 0; d < FHS; d++) {
        double o = 0, mag = 0;
        for (uint32_t j = 0; j < n; j++) {
            o += p[j] * V[(size_t)j * FHS + d];
            mag += p[j] * fabs(V[(size_t)j * FHS + d]);
        }
        cr_assert_leq(fabs(out[d] - o), 1e-5 * mag + 1e-30, "out[%u] %.9g vs %.9g", d, (double)out[d], o);
    }
    free(probs);
    free(K);
    free(V);
    free(p);
}

/* Window capacity by the documented rule: 8, 16, 32, ... capped at R + G, enough for `peak` entries. */
static size_t window_cap(uint32_t peak, uint32_t most) {
    if (peak == 0) return 0;
    size_t c = 8;
    while (c < peak && c < most) c *= 2;
    return c < most ? c : most;
}

Test(kivi, memory_is_what_the_formula_says) {
    const uint32_t cfgs[][3] = {{4, 32, 128}, {8, 32, 128}, {4, 16, 0}, {8, 64, 40}};
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        const uint32_t bits = cfgs[c][0], G = cfgs[c][1], R = cfgs[c][2];
        emu e;
        emu_init(&e, bits == 8 ? PDIR "/int8.so" : PDIR "/int4.so", bits, G, R);
        const size_t gb = 8u + 8u * FHS + 2u * G * FHS * bits / 8u, wb = 8u * FHS + 4u;
        /* seq 0: one 700-token prefill; seq 1 head 0: token by token; seq 1 head 1: nothing */
        uint32_t counts[FNSEQ * FNH] = {700, 700, 0, 0};
        cr_assert_eq(emu_append(&e, 0, 0, 700), KVP_OK, "%s", e.fh.error);
        cr_assert_eq(emu_append(&e, 0, 1, 700), KVP_OK, "%s", e.fh.error);
        for (uint32_t step = 1; step <= 333; step++) {
            cr_assert_eq(emu_append(&e, 1, 0, 1), KVP_OK, "%s", e.fh.error);
            counts[2] = step;
            if (step % 37 != 0 && step != 333) continue;
            size_t want = e.fixed, groups = 0;
            for (int hs = 0; hs < FNSEQ * FNH; hs++) {
                const uint32_t N = counts[hs];
                const size_t q = N >= R + G ? (N - R) / G : 0;
                groups += q;
                want += window_cap(N < R + G ? N : R + G, R + G) * wb + q * gb;
            }
            size_t tab = 0;
            while (tab < groups) tab = tab ? 2 * tab : 16;
            want += tab * (sizeof(void *) + 4);
            cr_assert_eq(e.fh.bytes, want, "int%u G%u R%u after %u tokens: held %zu bytes, formula %zu", bits, G, R,
                         step, e.fh.bytes, want);
            cr_assert_eq(emu_check(&e, "formula"), groups);
        }
        /* per quantized token: 2*HS*bits/8 + (8 + 8*HS)/G bytes (HS 64, G 32: int4 80.25, int8 144.25) */
        if (G == 32) cr_assert_float_eq((double)gb / G, bits == 8 ? 144.25 : 80.25, 1e-9);
        emu_free(&e);
    }
}

Test(kivi, random_append_and_release_against_a_reference) {
    const uint32_t cfgs[][3] = {{4, 32, 40}, {8, 16, 0}, {4, 8, 5}};
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        const uint32_t bits = cfgs[c][0], G = cfgs[c][1], R = cfgs[c][2];
        emu e;
        emu_init(&e, bits == 8 ? PDIR "/int8.so" : PDIR "/int4.so", bits, G, R);
        char when[96];
        for (int step = 0; step < 400; step++) {
            const uint32_t seq = rnd_u32() % FNSEQ, head = rnd_u32() % FNH;
            emu_head *hd = &e.heads[seq * FNH + head];
            const uint32_t op = rnd_u32() % 10;
            if (op < 6 || hd->n < 4) {
                uint32_t T = op == 0 ? 1 + rnd_u32() % 90 : 1 + rnd_u32() % 4;
                if (hd->n + T > 600 || hd->next_pos + (int32_t)T >= FCAP) emu_release(&e, seq, head, hd->n / 2 + 1);
                else cr_assert_eq(emu_append(&e, seq, head, T), KVP_OK, "%s", e.fh.error);
            } else if (op < 9) {
                emu_release(&e, seq, head, 1 + rnd_u32() % (hd->n / 3 + 1));
            } else {
                emu_release(&e, seq, head, hd->n); /* a sequence reset releases everything */
                hd->next_pos = 0;
                memset(hd->quantized, 0, sizeof hd->quantized);
                hd->n_unq = 0;
            }
            snprintf(when, sizeof when, "int%u G%u R%u step %d", bits, G, R, step);
            emu_check(&e, when);
            if (step % 25 == 0) emu_check_attend(&e, seq * FNH + head);
        }
        /* release everything: only the fixed state and the group table (16 * 2^k ids) remain */
        for (int hs = 0; hs < FNSEQ * FNH; hs++) emu_release(&e, (uint32_t)hs / FNH, (uint32_t)hs % FNH, e.heads[hs].n);
        const size_t rest = e.fh.bytes - e.fixed, per_id = sizeof(void *) + 4;
        cr_assert_eq(rest % per_id, 0, "%zu bytes left after releasing every token", rest);
        size_t ids = rest / per_id;
        cr_assert(ids == 0 || (ids >= 16 && (ids & (ids - 1)) == 0), "%zu bytes left: not a group table", rest);
        emu_free(&e);
    }
}

Test(kivi, out_of_memory_in_append_is_an_error_with_a_message) {
    emu e;
    emu_init(&e, PDIR "/int4.so", 4, 32, 8);
    e.fh.limit = e.fh.bytes + 5000; /* room for a window of 8 (4128 bytes), not for a group */
    cr_assert_eq(emu_append(&e, 0, 0, 8), KVP_OK, "%s", e.fh.error);
    cr_assert_eq(emu_append(&e, 0, 0, 40), KVP_ERROR);
    cr_assert(strstr(e.fh.error, "kivi: out of memory"), "%s", e.fh.error);
    emu_free(&e);
}

/* ---- through the router: parameters ----------------------------------------------------------------- */

static void expect_error(const char *ini, int hs, const char *n1, const char *n2) {
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    kvh_config_defaults(&cfg);
    int rc = kvh_config_load_string(&cfg, ini, "run.ini", &err);
    if (rc == 0) rc = kvh_router_create_ex(&r, &cfg, PDIR, 2, 2, hs, 256, 1, &err);
    cr_assert_eq(rc, -1, "accepted:\n%s", ini);
    cr_assert_null(r);
    cr_assert(strstr(err.msg, n1), "lacks '%s': %s", n1, err.msg);
    if (n2) cr_assert(strstr(err.msg, n2), "lacks '%s': %s", n2, err.msg);
    kvh_config_free(&cfg);
}

Test(kivi, bad_parameters_are_rejected_clearly) {
    expect_error("[int4]\nkivi = true\ngroup = 24\n", 64, "group = 24 does not divide head_dim 64", "int4");
    expect_error("[int4]\nkivi = true\nresidual = -1\n", 64, "run.ini:3: [int4] residual = -1", NULL);
    expect_error("[int8]\nkivi = true\nbits = 5\n", 64, "bits = 5: must be 8 or 4", NULL);
    expect_error("[int4]\nkivi = true\ngroup = 3\n", 66, "with bits = 4 the group must be even", NULL);
    expect_error("[int8]\nkivi = maybe\n", 64, "kivi = maybe", NULL);
    expect_error("[int8]\nkivi = true\n", 8, "group = 32 does not divide head_dim 8", NULL);
    /* a valid kivi section: 4-byte handle slots */
    kvh_run_config cfg;
    kvh_router *r = NULL;
    kvh_err err = {{0}};
    kvh_config_defaults(&cfg);
    cr_assert_eq(kvh_config_load_string(&cfg, "[int4]\nkivi = true\nresidual = 0\ngroup = 16\n", "run.ini", &err), 0);
    cr_assert_eq(kvh_router_create_ex(&r, &cfg, PDIR, 2, 2, 64, 256, 1, &err), 0, "%s", err.msg);
    kvh_layer_policy_settings st[2];
    kvh_router_layer_settings(r, st);
    cr_assert_eq(st[0].k_slot_bytes, 4);
    cr_assert_eq(st[1].v_slot_bytes, 4);
    kvh_router_free(r);
    kvh_config_free(&cfg);
}

/* ---- end to end on the tiny model ------------------------------------------------------------------- */

static int session_try(kvh_session **s, const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                       size_t limit, kvh_err *err) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    int rc = plugins ? kvh_config_add_plugins_list(&cfg, plugins, err) : 0;
    for (int i = 0; rc == 0 && i < n_sets; i++) rc = kvh_config_set(&cfg, sets[i], err);
    kvh_session_options o = kvh_session_default_options();
    o.threads = 2;
    o.plugin_path = PDIR;
    o.kv_mem_limit = limit;
    if (rc == 0) rc = kvh_session_create(s, m, &cfg, &o, err);
    kvh_config_free(&cfg);
    return rc;
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets) {
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(session_try(&s, m, plugins, sets, n_sets, 0, &err), 0, "%s: %s", plugins ? plugins : "-", err.msg);
    return s;
}

/* Prefill `prompt`, then greedy decode n_new tokens; logits before each step into trace[n_new * V]. */
static void greedy(kvh_session *s, const int32_t *prompt, int P, int n_new, float *trace, int32_t *toks, uint32_t cap) {
    const int V = s->model->cfg.n_vocab;
    float *logits = malloc((size_t)V * sizeof(float));
    kvh_err err = {{0}};
    int seq = 0, np = P, one = 1;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &prompt, .n_tokens = &np, .all_logits = false};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), 0, "%s", err.msg);
    for (int i = 0; i < n_new; i++) {
        if (trace) memcpy(trace + (size_t)i * V, logits, (size_t)V * sizeof(float));
        int32_t t = kvh_argmax(logits, V);
        toks[i] = t;
        const int32_t *tp = &t;
        kvh_batch d = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &one, .all_logits = false};
        cr_assert_eq(kvh_session_forward(s, &d, logits, &err), 0, "step %d: %s", i, err.msg);
        if (cap)
            for (int l = 0; l < s->cache.n_layer; l++)
                cr_assert_leq(kvh_kvcache_max_live(&s->cache, l), cap, "step %d layer %d", i, l);
    }
    free(logits);
}

Test(kivi, tiny_model_end_to_end) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt is absent");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int P = 300, N = 24, V = m.cfg.n_vocab;
    int32_t *prompt = malloc(P * sizeof *prompt), t0[200], t1[200];
    for (int i = 0; i < P; i++) prompt[i] = (int32_t)((i * 7919 + 13) % V);
    float *l0 = malloc((size_t)N * V * sizeof(float)), *l1 = malloc((size_t)N * V * sizeof(float));
    kvh_session *s = session_with(&m, NULL, NULL, 0);
    greedy(s, prompt, P, N, l0, t0, 0);
    const size_t fp32_bytes = s->cache.bytes_held;
    kvh_session_free(s);
    /* the window covers the whole sequence: fp32 attention (different summation order only) */
    const char *all_fp32[] = {"int4.kivi=true", "int4.residual=400"};
    s = session_with(&m, "int4.so", all_fp32, 2);
    greedy(s, prompt, P, N, l1, t1, 0);
    kvh_session_free(s);
    double d = kvh_test_compare("kivi, residual >= length vs fp32", l1, l0, (size_t)N * V, 1e-5);
    fprintf(stderr, "tiny kivi, residual >= length: max |logit diff| from fp32 %.3g\n", d);
    cr_assert_leq(d, 1e-5);
    cr_assert(memcmp(t0, t1, N * sizeof *t0) == 0, "greedy tokens differ with every token in the fp32 window");
    /* int8 / int4 KIVI, default group 32 (= the tiny model's head_dim), a short residual window */
    const char *k8[] = {"int8.kivi=true", "int8.residual=32"};
    s = session_with(&m, "int8.so", k8, 2);
    greedy(s, prompt, P, N, l1, t1, 0);
    const size_t kivi8_bytes = s->cache.bytes_held;
    kvh_session_free(s);
    double d8 = kvh_test_compare("tiny kivi int8 vs fp32 logits", l1, l0, (size_t)V, 0.05);
    int same8 = 0;
    for (int i = 0; i < N; i++) same8 += t1[i] == t0[i];
    const char *k4[] = {"int4.kivi=true", "int4.residual=32"};
    s = session_with(&m, "int4.so", k4, 2);
    greedy(s, prompt, P, N, l1, t1, 0);
    const size_t kivi4_bytes = s->cache.bytes_held;
    kvh_session_free(s);
    double d4 = kvh_test_compare("tiny kivi int4 vs fp32 logits", l1, l0, (size_t)V, 0.5);
    int same4 = 0;
    for (int i = 0; i < N; i++) same4 += t1[i] == t0[i];
    fprintf(stderr, "tiny kivi (residual 32): max |logit diff| int8 %.4g, int4 %.4g; greedy equal %d/%d, %d/%d; "
            "bytes fp32 %zu int8 %zu int4 %zu\n", d8, d4, same8, N, same4, N, fp32_bytes, kivi8_bytes, kivi4_bytes);
    cr_assert_leq(d8, 0.05);
    cr_assert_leq(d4, 0.5);
    cr_assert_geq(same8, N - 3);
    cr_assert_lt(kivi4_bytes, kivi8_bytes);
    cr_assert_lt(kivi8_bytes, fp32_bytes / 2);
    /* h2o on top: live <= budget + slack at every step, for 150 steps past the prompt */
    const char *h2o[] = {"int4.kivi=true", "int4.residual=16", "cache.budget=64", "cache.slack=8"};
    s = session_with(&m, "h2o.so,int4.so", h2o, 4);
    greedy(s, prompt, P, 150, NULL, t1, 72);
    kvh_session_free(s);
    const char *win[] = {"int8.kivi=true", "int8.residual=8", "int8.group=16", "cache.budget=50", "cache.slack=5"};
    s = session_with(&m, "window.so,int8.so", win, 5);
    greedy(s, prompt, 40, 150, NULL, t1, 55);
    kvh_session_free(s);
    /* a KV memory limit too small for the store: a clean error naming plugin, hook and cause */
    s = NULL;
    const char *lim[] = {"int4.kivi=true"};
    cr_assert_eq(session_try(&s, &m, "int4.so", lim, 1, 200 * 1024, &err), 0, "%s", err.msg);
    int seq = 0, np = P;
    const int32_t *pp = prompt;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &pp, .n_tokens = &np};
    float *logits = malloc((size_t)V * sizeof(float));
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), -1, "the limit was not enforced");
    fprintf(stderr, "mem-limit error: %s\n", err.msg);
    cr_assert(strstr(err.msg, "int4"), "%s", err.msg);
    cr_assert(strstr(err.msg, "append failed"), "%s", err.msg);
    cr_assert(strstr(err.msg, "kivi: out of memory"), "%s", err.msg);
    cr_assert_leq(s->cache.bytes_held, (size_t)200 * 1024);
    kvh_session_free(s);
    free(logits);
    free(prompt);
    free(l0);
    free(l1);
    kvh_model_free(&m);
}
