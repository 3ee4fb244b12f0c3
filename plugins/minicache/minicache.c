/* minicache.c — the minicache.so store plugin: MiniCache (Liu et al. 2024) cross-layer KV merging.
 * Layers S, S+1 (S+2, S+3, ...) pair up from start_layer S (default n_layer / 2) to the end; per token
 * and head, the two layers' K (and V) unit directions are merged by SLERP into one direction both
 * layers share, each layer keeping its own magnitude, unless the two directions are too far apart
 * (the retention rule), in which case each layer keeps its own direction.
 * Owns: the handle-slot format of paired layers, the per-pair direction arenas, the pending table that
 * lets the upper layer find the lower layer's entry for the same token, the streaming d_min / d_max
 * statistics, attention over the stored form. Does not own: the math (mc_math.h), which tokens stay
 * (a policy; the host moves whole handle slots and calls release() for the ones that go), or where the
 * slot arrays live (the host).
 *
 * Storage.
 *   Plain layers (below S, or a leftover last layer): slot = head_dim fp32 (exactly the dense layout).
 *   Paired layers: slot = {uint32 entry; float norm} (8 bytes) for K and for V. An entry is one unit
 *   direction (head_dim fp32) in the pair's arena, with a refcount: 1 when one layer's token uses it
 *   (a retained token, or a lower-layer token not merged yet), 2 when merged (both layers' slots of
 *   the token point at it). release() drops references; an entry at 0 goes to the arena's free list.
 *   Arenas (one per pair, K and V entries alike) grow by doubling through host->alloc, so every byte is
 *   counted as KV memory and bounded by --mem-limit.
 * Order of work in one forward step (the host calls append in layer order, before that layer attends):
 *   lower layer: every new token gets its own entry e_a, slot {entry, |x_a|}; the entry is noted in the
 *     pending table under (seq, head, pos) when the upper layer is claimed by the section.
 *   upper layer: for each new token, d = arccos(e_a . e_b) / pi for K and for V; the running d_min /
 *     d_max of (pair, seq, head, K|V) are first updated with the whole block, then each token is
 *     retained (d >= d_max - gamma (d_max - d_min): own entry e_b) or merged (the lower entry is
 *     overwritten with SLERP(e_a, e_b; t), refcount 2, upper slot {same entry, |x_b|}).
 *   So the lower layer attends over e_a during the step that wrote the token and over the merged
 *   direction afterwards. The paper computes d_min / d_max over the whole prefill; this store sees
 *   tokens as they come, so the statistics are over the tokens of this (pair, seq, head) seen so far,
 *   including the current block (for a one-block prefill this is the paper's rule exactly).
 * Memory (bytes held, per token and head of one pair): 2 layers x (K + V) x 8 bytes of slots, plus
 * (head_dim x 4 + 8) bytes per live entry: 2 entries (K, V) when merged, 4 when retained; plus the
 * arena's unused capacity (< half after a doubling), the pending table (n_seq x n_kv_head x n_ctx x 12
 * bytes per pair) and the statistics (n_seq x n_kv_head x 40 bytes per pair). */
#include <kvp/kvp.h>
#include <stdio.h>

#include "mc_math.h"

#define MC_NONE UINT32_MAX /* slot handle of a token whose append failed: decodes to zeros */

typedef struct mc_handle {
    uint32_t entry;
    float norm;
} mc_handle;

typedef struct mc_pending {
    int32_t tag; /* pos + 1 of the token noted here, 0 = empty */
    uint32_t k_entry;
    uint32_t v_entry;
} mc_pending;

typedef struct mc_stat {
    double k_min, k_max, v_min, v_max;
    uint64_t n; /* tokens seen (0: no statistics yet) */
} mc_stat;

/* One pair of layers: lives in the section-shared block. */
typedef struct mc_pair {
    uint32_t lower_claimed, upper_claimed;
    /* arena: chunk[n_chunks] blocks of MC_CHUNK entries; entries 0..top-1 used once, n_free of them on
     * the free list starting at free_head */
    void **chunk;
    uint32_t n_chunks, chunk_cap;
    uint32_t top, n_free, free_head;
    mc_pending *pending; /* [n_seq * n_kv_head * n_ctx], allocated on first use */
    mc_stat *stat;       /* [n_seq * n_kv_head], allocated on first use */
    uint64_t merged_k, merged_v, retained_k, retained_v;
} mc_pair;

typedef struct mc_shared {
    uint32_t n_pairs;
    uint32_t logged;
    mc_pair pairs[]; /* [n_pairs] */
} mc_shared;

typedef struct mc_state {
    const kvp_host *host;
    uint32_t layer, hs, n_seq, n_head, n_ctx;
    int role;           /* 0 plain, 1 lower of a pair, 2 upper of a pair */
    uint32_t start, n_pairs;
    double t, gamma;
    mc_shared *sh;
    mc_pair *pair;      /* NULL for plain layers */
    float *ea, *eb, *em; /* scratch [hs] each */
} mc_state;

static const kvp_param params[] = {
    {.name = "start_layer", .type = KVP_PARAM_INT, .default_value = -1, .min_value = -1, .max_value = 65535,
     .help = "first merged layer S: pairs (S,S+1),(S+2,S+3),...; -1 = n_layer / 2"},
    {.name = "t", .type = KVP_PARAM_FLOAT, .default_value = 0.6, .min_value = 0, .max_value = 1,
     .help = "SLERP interpolation weight toward the upper layer's direction (paper: 0.6)"},
    {.name = "gamma", .type = KVP_PARAM_FLOAT, .default_value = 0.05, .min_value = 0, .max_value = 1,
     .help = "retention threshold: keep tokens with d >= d_max - gamma (d_max - d_min) unmerged; 1 = merge none"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

/* ---- the arena ----------------------------------------------------------------------------------------
 * Entries live in fixed-size chunks of MC_CHUNK entries (vectors first, then refcounts), allocated on
 * demand and never moved: no copy on growth and at most one partly used chunk per pair, so the bytes
 * held track the live entries. The chunk table (pointers) grows by doubling. Free entries form an
 * intrusive list threaded through their (unused) vectors. */

#define MC_CHUNK_SHIFT 8u
#define MC_CHUNK (1u << MC_CHUNK_SHIFT)

static inline float *entry_vec(const mc_pair *p, uint32_t e, uint32_t hs) {
    return (float *)p->chunk[e >> MC_CHUNK_SHIFT] + (size_t)(e & (MC_CHUNK - 1)) * hs;
}
static inline uint32_t *entry_ref(const mc_pair *p, uint32_t e, uint32_t hs) {
    return (uint32_t *)((float *)p->chunk[e >> MC_CHUNK_SHIFT] + (size_t)MC_CHUNK * hs) + (e & (MC_CHUNK - 1));
}

/* Makes room for `need` more entries without a later allocation. 0, or -1 (arena still valid). */
static int arena_reserve(mc_state *st, mc_pair *p, uint32_t need) {
    const kvp_host *host = st->host;
    const uint32_t hs = st->hs;
    while ((uint64_t)p->n_free + ((uint64_t)p->n_chunks * MC_CHUNK - p->top) < need) {
        if (p->n_chunks >= (UINT32_MAX >> MC_CHUNK_SHIFT) - 1) return -1;
        if (p->n_chunks == p->chunk_cap) {
            uint32_t cap = p->chunk_cap ? 2 * p->chunk_cap : 16;
            void **t = host->alloc(host->ctx, (size_t)cap * sizeof(void *));
            if (!t) return -1;
            if (p->chunk) {
                memcpy(t, p->chunk, (size_t)p->n_chunks * sizeof(void *));
                host->free(host->ctx, p->chunk);
            }
            p->chunk = t;
            p->chunk_cap = cap;
        }
        void *c = host->alloc(host->ctx, (size_t)MC_CHUNK * ((size_t)hs * sizeof(float) + sizeof(uint32_t)));
        if (!c) return -1;
        p->chunk[p->n_chunks++] = c;
    }
    return 0;
}

/* A fresh entry with refcount 1 (room reserved by arena_reserve). */
static uint32_t arena_take(mc_pair *p, uint32_t hs) {
    uint32_t e;
    if (p->n_free) {
        e = p->free_head;
        memcpy(&p->free_head, entry_vec(p, e, hs), sizeof(uint32_t));
        p->n_free--;
    } else {
        e = p->top++;
    }
    *entry_ref(p, e, hs) = 1;
    return e;
}

static void arena_drop(mc_pair *p, uint32_t e, uint32_t hs) {
    if (e == MC_NONE || e >= p->top) return; /* a failed append's slot */
    uint32_t *r = entry_ref(p, e, hs);
    if (*r == 0) return; /* already free: never double-list an entry */
    if (--*r == 0) {
        memcpy(entry_vec(p, e, hs), &p->free_head, sizeof(uint32_t));
        p->free_head = e;
        p->n_free++;
    }
}

/* ---- create / destroy / reset ------------------------------------------------------------------------ */

static int mc_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    char msg[256];
    if (!KVP_HOST_HAS(host, shared) || !host->shared)
        return fail(host, "minicache needs a kvhost with plugin ABI 1.2 (host->shared, append/release hooks)");
    if (layer->head_dim == 0 || layer->n_layer == 0 || layer->n_ctx == 0) return fail(host, "empty layer geometry");
    int64_t s = kvp_param_int(host, "start_layer");
    uint32_t start = s < 0 ? layer->n_layer / 2 : (uint32_t)s;
    if (start >= layer->n_layer) {
        snprintf(msg, sizeof msg, "start_layer %u must be below n_layer %u (or -1 for n_layer / 2)", (unsigned)start,
                 (unsigned)layer->n_layer);
        return fail(host, msg);
    }
    uint32_t n_pairs = (layer->n_layer - start) / 2;
    mc_shared *sh = host->shared(host->ctx, sizeof(mc_shared) + (size_t)n_pairs * sizeof(mc_pair));
    if (!sh) return fail(host, "out of memory (section-shared state)");
    sh->n_pairs = n_pairs;
    mc_state *st = host->alloc(host->ctx, sizeof *st + 3 * (size_t)layer->head_dim * sizeof(float));
    if (!st) return fail(host, "out of memory (layer state)");
    st->host = host;
    st->layer = layer->layer;
    st->hs = layer->head_dim;
    st->n_seq = layer->n_seq;
    st->n_head = layer->n_kv_head;
    st->n_ctx = layer->n_ctx;
    st->start = start;
    st->n_pairs = n_pairs;
    st->t = host->param(host->ctx, "t");
    st->gamma = host->param(host->ctx, "gamma");
    st->sh = sh;
    st->ea = (float *)(st + 1);
    st->eb = st->ea + layer->head_dim;
    st->em = st->eb + layer->head_dim;
    st->role = 0;
    if (layer->layer >= start && (layer->layer - start) / 2 < n_pairs) {
        st->pair = &sh->pairs[(layer->layer - start) / 2];
        st->role = (layer->layer - start) % 2 == 0 ? 1 : 2;
        if (st->role == 1) st->pair->lower_claimed = 1;
        else st->pair->upper_claimed = 1;
    }
    out->state = st;
    out->budget = layer->cache_budget ? layer->cache_budget : layer->n_ctx;
    if (st->role == 0) {
        out->k_slot_bytes = out->v_slot_bytes = layer->head_dim * (uint32_t)sizeof(float);
    } else {
        out->k_slot_bytes = out->v_slot_bytes = (uint32_t)sizeof(mc_handle);
    }
    return KVP_OK;
}

/* Memory from host->alloc is freed by the host with the section; the summary is logged once. */
static void mc_destroy(void *state) {
    mc_state *st = state;
    if (!st || st->role == 0 || st->sh->logged) return;
    st->sh->logged = 1;
    uint64_t mk = 0, mv = 0, rk = 0, rv = 0;
    for (uint32_t i = 0; i < st->sh->n_pairs; i++) {
        mk += st->sh->pairs[i].merged_k;
        mv += st->sh->pairs[i].merged_v;
        rk += st->sh->pairs[i].retained_k;
        rv += st->sh->pairs[i].retained_v;
    }
    if (mk + rk == 0) return;
    char msg[400];
    snprintf(msg, sizeof msg,
             "layers %u..%u in %u pairs (t %.3g, gamma %.3g): merged K %llu / %llu tokens (%.1f %%), "
             "V %llu / %llu (%.1f %%); retained fraction %.4f",
             (unsigned)st->start, (unsigned)(st->start + 2 * st->n_pairs - 1), (unsigned)st->n_pairs, st->t, st->gamma,
             (unsigned long long)mk, (unsigned long long)(mk + rk), 100.0 * (double)mk / (double)(mk + rk),
             (unsigned long long)mv, (unsigned long long)(mv + rv),
             mv + rv ? 100.0 * (double)mv / (double)(mv + rv) : 0.0,
             (double)(rk + rv) / (double)(mk + rk + mv + rv));
    st->host->log(st->host->ctx, KVP_LOG_INFO, msg);
}

static int mc_reset(void *state, uint32_t seq) {
    mc_state *st = state;
    if (!st->pair || seq >= st->n_seq) return KVP_OK;
    mc_pair *p = st->pair;
    if (p->stat) memset(p->stat + (size_t)seq * st->n_head, 0, (size_t)st->n_head * sizeof(mc_stat));
    if (p->pending)
        memset(p->pending + (size_t)seq * st->n_head * st->n_ctx, 0,
               (size_t)st->n_head * st->n_ctx * sizeof(mc_pending));
    return KVP_OK;
}

/* ---- append ------------------------------------------------------------------------------------------ */

static void copy_rows(const kvp_append_args *a, void *slots, const float *rows, uint32_t hs) {
    for (uint32_t t = 0; t < a->n_new; t++)
        memcpy((float *)slots + (size_t)(a->first_slot + t) * hs, rows + (size_t)t * a->row_stride, hs * sizeof(float));
}

/* Marks the block's slots as holding nothing (decode to zeros, release ignores them). */
static void mark_none(const kvp_append_args *a) {
    mc_handle *k = a->k_slots, *v = a->v_slots;
    for (uint32_t t = 0; t < a->n_new; t++) {
        k[a->first_slot + t] = (mc_handle){MC_NONE, 0.0f};
        v[a->first_slot + t] = (mc_handle){MC_NONE, 0.0f};
    }
}

/* Writes a token's own entry (unit direction of row) into slot; returns the entry. */
static uint32_t own_entry(mc_state *st, const float *row, mc_handle *slot) {
    mc_pair *p = st->pair;
    uint32_t e = arena_take(p, st->hs);
    double nr = mc_unit(row, st->hs, entry_vec(p, e, st->hs));
    *slot = (mc_handle){e, (float)nr};
    return e;
}

static int append_lower(mc_state *st, const kvp_append_args *a) {
    mc_pair *p = st->pair;
    const kvp_host *host = st->host;
    const int note = p->upper_claimed && a->seq < st->n_seq && a->head < st->n_head;
    if (note && !p->pending) {
        size_t n = (size_t)st->n_seq * st->n_head * st->n_ctx;
        p->pending = host->alloc(host->ctx, n * sizeof(mc_pending));
        if (!p->pending) {
            mark_none(a);
            return fail(host, "out of memory (pending table): KV memory limit reached?");
        }
    }
    if (a->n_new > UINT32_MAX / 2 || arena_reserve(st, p, 2 * a->n_new) != 0) {
        mark_none(a);
        return fail(host, "out of memory growing the direction arena: KV memory limit reached?");
    }
    mc_handle *ks = a->k_slots, *vs = a->v_slots;
    mc_pending *pend = note ? p->pending + ((size_t)a->seq * st->n_head + a->head) * st->n_ctx : NULL;
    for (uint32_t t = 0; t < a->n_new; t++) {
        uint32_t slot = a->first_slot + t;
        uint32_t ek = own_entry(st, a->k_rows + (size_t)t * a->row_stride, &ks[slot]);
        uint32_t ev = own_entry(st, a->v_rows + (size_t)t * a->row_stride, &vs[slot]);
        if (pend) {
            int32_t pos = a->pos[slot];
            if (pos >= 0) pend[(uint32_t)pos % st->n_ctx] = (mc_pending){pos + 1, ek, ev};
        }
    }
    return KVP_OK;
}

/* One token of the upper layer, K or V: merge into the lower entry `le` or take its own. Returns 1
 * when merged. */
static int upper_token(mc_state *st, const float *row, uint32_t le, double d_min, double d_max, mc_handle *slot) {
    mc_pair *p = st->pair;
    const uint32_t hs = st->hs;
    double nr = mc_unit(row, hs, st->eb);
    float *va = entry_vec(p, le, hs);
    double d = mc_angular_distance(va, st->eb, hs);
    if (mc_retain(d, d_min, d_max, st->gamma)) {
        uint32_t e = arena_take(p, hs);
        memcpy(entry_vec(p, e, hs), st->eb, hs * sizeof(float));
        *slot = (mc_handle){e, (float)nr};
        return 0;
    }
    mc_slerp(va, st->eb, hs, st->t, st->em);
    memcpy(va, st->em, hs * sizeof(float));
    (*entry_ref(p, le, hs))++;
    *slot = (mc_handle){le, (float)nr};
    return 1;
}

/* Lower entry of (seq, head, pos) noted in this step, or MC_NONE. */
static const mc_pending *pending_of(const mc_state *st, const kvp_append_args *a, int32_t pos) {
    const mc_pair *p = st->pair;
    if (!p->pending || pos < 0 || a->seq >= st->n_seq || a->head >= st->n_head) return NULL;
    const mc_pending *e = p->pending + ((size_t)a->seq * st->n_head + a->head) * st->n_ctx + (uint32_t)pos % st->n_ctx;
    if (e->tag != pos + 1 || e->k_entry >= p->top || e->v_entry >= p->top || *entry_ref(p, e->k_entry, st->hs) != 1 ||
        *entry_ref(p, e->v_entry, st->hs) != 1)
        return NULL;
    return e;
}

static void stat_add(double *mn, double *mx, int first, double d) {
    if (first || d < *mn) *mn = d;
    if (first || d > *mx) *mx = d;
}

static int append_upper(mc_state *st, const kvp_append_args *a) {
    mc_pair *p = st->pair;
    const kvp_host *host = st->host;
    const uint32_t hs = st->hs;
    const int paired = p->lower_claimed && a->seq < st->n_seq && a->head < st->n_head;
    if (paired && !p->stat) {
        p->stat = host->alloc(host->ctx, (size_t)st->n_seq * st->n_head * sizeof(mc_stat));
        if (!p->stat) {
            mark_none(a);
            return fail(host, "out of memory (retention statistics): KV memory limit reached?");
        }
    }
    if (a->n_new > UINT32_MAX / 2 || arena_reserve(st, p, 2 * a->n_new) != 0) {
        mark_none(a);
        return fail(host, "out of memory growing the direction arena: KV memory limit reached?");
    }
    mc_handle *ks = a->k_slots, *vs = a->v_slots;
    /* pass 1: the block's distances into the running statistics */
    mc_stat *sg = paired ? &p->stat[(size_t)a->seq * st->n_head + a->head] : NULL;
    if (sg) {
        for (uint32_t t = 0; t < a->n_new; t++) {
            const mc_pending *pe = pending_of(st, a, a->pos[a->first_slot + t]);
            if (!pe) continue;
            mc_unit(a->k_rows + (size_t)t * a->row_stride, hs, st->eb);
            double dk = mc_angular_distance(entry_vec(p, pe->k_entry, hs), st->eb, hs);
            mc_unit(a->v_rows + (size_t)t * a->row_stride, hs, st->eb);
            double dv = mc_angular_distance(entry_vec(p, pe->v_entry, hs), st->eb, hs);
            stat_add(&sg->k_min, &sg->k_max, sg->n == 0, dk);
            stat_add(&sg->v_min, &sg->v_max, sg->n == 0, dv);
            sg->n++;
        }
    }
    /* pass 2: merge or retain each token (distances recomputed: same inputs, same values) */
    for (uint32_t t = 0; t < a->n_new; t++) {
        uint32_t slot = a->first_slot + t;
        const float *kr = a->k_rows + (size_t)t * a->row_stride, *vr = a->v_rows + (size_t)t * a->row_stride;
        const mc_pending *pe = sg ? pending_of(st, a, a->pos[slot]) : NULL;
        if (!pe) { /* no partner: the upper layer holds the token alone */
            own_entry(st, kr, &ks[slot]);
            own_entry(st, vr, &vs[slot]);
            continue;
        }
        uint32_t le_k = pe->k_entry, le_v = pe->v_entry;
        if (upper_token(st, kr, le_k, sg->k_min, sg->k_max, &ks[slot])) p->merged_k++;
        else p->retained_k++;
        if (upper_token(st, vr, le_v, sg->v_min, sg->v_max, &vs[slot])) p->merged_v++;
        else p->retained_v++;
        /* consumed: a later block cannot merge into the same lower entry again */
        ((mc_pending *)pe)->tag = 0;
    }
    return KVP_OK;
}

static int mc_append(void *state, const kvp_append_args *a) {
    mc_state *st = state;
    if (a->head_dim != st->hs) return fail(st->host, "append: head_dim differs from create()'s");
    if (st->role == 0) {
        copy_rows(a, a->k_slots, a->k_rows, st->hs);
        copy_rows(a, a->v_slots, a->v_rows, st->hs);
        return KVP_OK;
    }
    return st->role == 1 ? append_lower(st, a) : append_upper(st, a);
}

/* ---- release / decode / attend ------------------------------------------------------------------------- */

static void mc_release(void *state, const kvp_release_args *a) {
    mc_state *st = state;
    if (st->role == 0) return;
    mc_pair *p = st->pair;
    const mc_handle *ks = a->k_slots, *vs = a->v_slots;
    for (uint32_t i = 0; i < a->n_slots; i++) {
        uint32_t s = a->slots[i];
        if (s >= a->n_live) continue;
        if (st->role == 1 && p->pending && a->seq < st->n_seq && a->head < st->n_head && a->pos[s] >= 0) {
            /* a lower token going away before its upper partner arrived: forget the note */
            mc_pending *pe = p->pending + ((size_t)a->seq * st->n_head + a->head) * st->n_ctx +
                             (uint32_t)a->pos[s] % st->n_ctx;
            if (pe->tag == a->pos[s] + 1) pe->tag = 0;
        }
        arena_drop(p, ks[s].entry, st->hs);
        arena_drop(p, vs[s].entry, st->hs);
    }
}

static void mc_decode(void *state, uint32_t which, const void *slot, float *row) {
    (void)which;
    const mc_state *st = state;
    if (st->role == 0) {
        memcpy(row, slot, st->hs * sizeof(float));
        return;
    }
    const mc_handle *h = slot;
    const mc_pair *p = st->pair;
    if (h->entry == MC_NONE || h->entry >= p->top) {
        for (uint32_t i = 0; i < st->hs; i++) row[i] = 0.0f;
        return;
    }
    const float *e = entry_vec(p, h->entry, st->hs);
    for (uint32_t i = 0; i < st->hs; i++) row[i] = h->norm * e[i];
}

/* Softmax of probs[0..n-1] in place (masked entries hold -INFINITY). */
static void softmax_masked(float *probs, uint32_t n, float mx) {
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        float e = probs[j] == -INFINITY ? 0.0f : expf(probs[j] - mx);
        probs[j] = e;
        sum += e;
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (uint32_t j = 0; j < n; j++) probs[j] *= inv;
}

static void mc_attend(void *state, const kvp_attend_args *a) {
    const mc_state *st = state;
    const uint32_t hs = a->head_dim, n = a->n;
    float *o = a->out, *pr = a->probs;
    float mx = -INFINITY;
    if (st->role == 0) {
        const float *K = a->k_slots, *V = a->v_slots;
        for (uint32_t j = 0; j < n; j++) {
            if (a->pos[j] > a->q_pos) {
                pr[j] = -INFINITY;
                continue;
            }
            const float *kj = K + (size_t)j * hs;
            float s = 0.0f;
            for (uint32_t d = 0; d < hs; d++) s += a->q[d] * kj[d];
            s *= a->scale;
            pr[j] = s;
            if (s > mx) mx = s;
        }
        softmax_masked(pr, n, mx);
        for (uint32_t d = 0; d < hs; d++) o[d] = 0.0f;
        for (uint32_t j = 0; j < n; j++) {
            if (pr[j] == 0.0f) continue;
            const float *vj = V + (size_t)j * hs;
            for (uint32_t d = 0; d < hs; d++) o[d] += pr[j] * vj[d];
        }
        return;
    }
    const mc_pair *p = st->pair;
    const mc_handle *K = a->k_slots, *V = a->v_slots;
    for (uint32_t j = 0; j < n; j++) {
        if (a->pos[j] > a->q_pos) {
            pr[j] = -INFINITY;
            continue;
        }
        float s = 0.0f;
        if (K[j].entry < p->top) {
            const float *e = entry_vec(p, K[j].entry, hs);
            for (uint32_t d = 0; d < hs; d++) s += a->q[d] * e[d];
            s *= a->scale * K[j].norm;
        }
        pr[j] = s;
        if (s > mx) mx = s;
    }
    softmax_masked(pr, n, mx);
    for (uint32_t d = 0; d < hs; d++) o[d] = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        if (pr[j] == 0.0f || V[j].entry >= p->top) continue;
        const float w = pr[j] * V[j].norm;
        const float *e = entry_vec(p, V[j].entry, hs);
        for (uint32_t d = 0; d < hs; d++) o[d] += w * e[d];
    }
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = "minicache",
    .version = "1.0.0",
    .summary = "MiniCache: SLERP-merged K/V directions shared by adjacent deep layers, per-layer magnitudes",
    .params = params,
    .create = mc_create,
    .destroy = mc_destroy,
    .reset = mc_reset,
    .decode = mc_decode,
    .attend = mc_attend,
    .append = mc_append,
    .release = mc_release,
};

KVP_PLUGIN(descriptor)
