/* kivi_store.c — the KIVI option of int8.so / int4.so (quant.c: kivi = true) as a handle store: every
 * slot holds a uint32 handle (kvq_kivi.h) naming a window entry or a quantized group row. Per
 * (seq, head) an fp32 window holds the newest tokens; as soon as it holds R + G live tokens, the G
 * oldest (smallest positions) are quantized together into one group, so after every append between R
 * and R + G - 1 of the head's newest unquantized tokens stay fp32. Released tokens: a group is freed
 * when its last row goes, a window entry is marked dead and reclaimed at the next compaction.
 * Memory (all host->alloc, counted by the host as KV bytes): the state, [n_seq * n_kv_head] windows,
 * 2 x (R + G) uint32 scratch, the group table (12-16 bytes per id, doubling from 16), window blocks
 * (cap x (8*HS + 4) bytes, cap doubling from 8 up to R + G; freed when the window empties on release)
 * and one block of group_bytes per live group.
 * Owns: that bookkeeping. Does not own: the format and its math (kvq_kivi.h), parameters (quant.c). */
#include "kivi_store.h"

#include <stdio.h>

static int fail(kivi_store *st, const char *msg) {
    st->host->set_error(st->host->ctx, msg);
    return KVP_ERROR;
}

int kivi_store_create(const kvp_host *host, const kvp_layer_info *layer, int64_t bits, int64_t group, int64_t residual,
                      kivi_store **out, char *err, size_t cap) {
    kivi_format f;
    if (kivi_format_init(&f, bits, group, residual, (int64_t)layer->head_dim, err, cap) != 0) return -1;
    const uint64_t n_heads = (uint64_t)layer->n_seq * layer->n_kv_head;
    if (n_heads > KIVI_MAX_HEADS) {
        snprintf(err, cap, "kivi: %llu sequences x KV heads exceed the handle format's %u per layer",
                 (unsigned long long)n_heads, KIVI_MAX_HEADS);
        return -1;
    }
    if ((uint64_t)f.residual + f.group > KIVI_MAX_WINDOW) {
        snprintf(err, cap, "kivi: residual %u + group %u exceeds the window limit %u", f.residual, f.group,
                 KIVI_MAX_WINDOW);
        return -1;
    }
    kivi_store *st = host->alloc(host->ctx, sizeof *st);
    kivi_window *win = st ? host->alloc(host->ctx, (size_t)n_heads * sizeof *win) : NULL;
    uint32_t *scratch = win ? host->alloc(host->ctx, (size_t)2 * (f.residual + f.group) * sizeof(uint32_t)) : NULL;
    if (!scratch) {
        if (win) host->free(host->ctx, win);
        if (st) host->free(host->ctx, st);
        snprintf(err, cap, "kivi: out of memory (or past the KV memory limit) for the layer's state");
        return -1;
    }
    st->host = host;
    st->f = f;
    st->n_kv_head = layer->n_kv_head;
    st->n_heads = (uint32_t)n_heads;
    st->win = win;
    st->idx = scratch;
    st->remap = scratch + f.residual + f.group;
    *out = st;
    return 0;
}

/* ---- groups -------------------------------------------------------------------------------------- */

/* A new group id with a block of group_bytes, or UINT32_MAX (error set) when memory is refused. */
static uint32_t group_new(kivi_store *st, void **block) {
    uint32_t gid;
    if (st->n_free) {
        gid = st->free_ids[st->n_free - 1];
    } else {
        if (st->groups_used == st->groups_cap) {
            const uint32_t cap = st->groups_cap ? 2 * st->groups_cap : 16;
            if (cap > KIVI_MAX_GROUPS) {
                fail(st, "kivi: too many live quantized groups in one layer (the handle format holds 2^22)");
                return UINT32_MAX;
            }
            void **tab = st->host->alloc(st->host->ctx, (size_t)cap * (sizeof(void *) + sizeof(uint32_t)));
            if (!tab) {
                fail(st, "kivi: out of memory (or past the KV memory limit) growing the group table");
                return UINT32_MAX;
            }
            uint32_t *fr = (uint32_t *)(tab + cap);
            if (st->groups) {
                memcpy(tab, st->groups, (size_t)st->groups_used * sizeof(void *));
                st->host->free(st->host->ctx, st->groups);
            }
            st->groups = tab;
            st->free_ids = fr; /* the free stack is empty here */
            st->groups_cap = cap;
        }
        gid = st->groups_used;
    }
    void *b = st->host->alloc(st->host->ctx, st->f.group_bytes);
    if (!b) {
        fail(st, "kivi: out of memory (or past the KV memory limit) for a quantized group");
        return UINT32_MAX;
    }
    if (st->n_free) st->n_free--;
    else st->groups_used++;
    st->groups[gid] = b;
    *block = b;
    return gid;
}

static void group_drop_row(kivi_store *st, uint32_t gid) {
    void *b = st->groups[gid];
    uint32_t *live = kivi_group_live(b);
    if (--*live == 0) {
        st->host->free(st->host->ctx, b);
        st->groups[gid] = NULL;
        st->free_ids[st->n_free++] = gid;
    }
}

/* ---- windows ------------------------------------------------------------------------------------- */

static size_t window_entry_bytes(const kivi_store *st) { return (size_t)st->f.head_dim * 2 * sizeof(float) + 4; }

static void window_point(const kivi_store *st, kivi_window *w, void *block, uint32_t cap) {
    w->block = block;
    w->k = block;
    w->v = w->k + (size_t)cap * st->f.head_dim;
    w->pos = (int32_t *)(w->v + (size_t)cap * st->f.head_dim);
    w->cap = cap;
}

static int window_grow(kivi_store *st, kivi_window *w) {
    const uint32_t most = st->f.residual + st->f.group;
    uint32_t cap = w->cap ? 2 * w->cap : 8;
    if (cap > most) cap = most;
    void *b = st->host->alloc(st->host->ctx, (size_t)cap * window_entry_bytes(st));
    if (!b) return fail(st, "kivi: out of memory (or past the KV memory limit) growing a residual window");
    kivi_window old = *w;
    window_point(st, w, b, cap);
    if (old.block) {
        const size_t HS = st->f.head_dim;
        memcpy(w->k, old.k, (size_t)old.n * HS * sizeof(float));
        memcpy(w->v, old.v, (size_t)old.n * HS * sizeof(float));
        memcpy(w->pos, old.pos, (size_t)old.n * sizeof(int32_t));
        st->host->free(st->host->ctx, old.block);
    }
    return KVP_OK;
}

static void put_handle(const kvp_append_args *a, uint32_t slot, uint32_t h) {
    memcpy((unsigned char *)a->k_slots + (size_t)slot * 4u, &h, 4);
    memcpy((unsigned char *)a->v_slots + (size_t)slot * 4u, &h, 4);
}

/* Removes dead entries and the nq entries qidx[] (now rows 0..nq-1 of group gid) from head-state hs's
 * window, then rewrites the handles of the first n_slots slots that point into it. */
static void window_compact(kivi_store *st, uint32_t hs, const kvp_append_args *a, uint32_t n_slots,
                           const uint32_t *qidx, uint32_t nq, uint32_t gid) {
    kivi_window *w = &st->win[hs];
    const size_t HS = st->f.head_dim;
    uint32_t *remap = st->remap;
    for (uint32_t i = 0; i < w->n; i++) remap[i] = UINT32_MAX;
    for (uint32_t r = 0; r < nq; r++) remap[qidx[r]] = kivi_handle_group(gid, r);
    uint32_t j = 0;
    for (uint32_t i = 0; i < w->n; i++) {
        if (remap[i] != UINT32_MAX || w->pos[i] == KIVI_DEAD_POS) continue;
        if (j != i) {
            memcpy(w->k + j * HS, w->k + i * HS, HS * sizeof(float));
            memcpy(w->v + j * HS, w->v + i * HS, HS * sizeof(float));
            w->pos[j] = w->pos[i];
        }
        remap[i] = kivi_handle_window(hs, j++);
    }
    w->n = w->live = j;
    for (uint32_t s = 0; s < n_slots; s++) {
        const uint32_t h = kivi_slot_handle((const unsigned char *)a->k_slots + (size_t)s * 4u);
        if (kivi_handle_in_window(h) && kivi_handle_head(h) == hs) put_handle(a, s, remap[kivi_handle_index(h)]);
    }
}

/* The G oldest live window tokens become one quantized group. */
static int window_quantize_oldest(kivi_store *st, uint32_t hs, const kvp_append_args *a, uint32_t n_slots) {
    kivi_window *w = &st->win[hs];
    const uint32_t G = st->f.group;
    uint32_t *idx = st->idx;
    kvp_select_smallest_i(w->pos, w->n, G, idx); /* dead entries sit at INT32_MAX: never among the G */
    for (uint32_t i = 1; i < G; i++) /* rows in position order */
        for (uint32_t k = i; k > 0 && w->pos[idx[k]] < w->pos[idx[k - 1]]; k--) {
            uint32_t t = idx[k];
            idx[k] = idx[k - 1];
            idx[k - 1] = t;
        }
    void *block;
    const uint32_t gid = group_new(st, &block);
    if (gid == UINT32_MAX) return KVP_ERROR;
    kivi_quantize_group(&st->f, w->k, w->v, idx, block);
    window_compact(st, hs, a, n_slots, idx, G, gid);
    return KVP_OK;
}

int kivi_store_append(kivi_store *st, const kvp_append_args *a) {
    const uint32_t HS = st->f.head_dim, trigger = st->f.residual + st->f.group;
    if (a->head_dim != HS || a->seq * st->n_kv_head + a->head >= st->n_heads)
        return fail(st, "kivi: append with a head_dim, sequence or head that create() did not announce");
    const uint32_t hs = a->seq * st->n_kv_head + a->head;
    kivi_window *w = &st->win[hs];
    for (uint32_t t = 0; t < a->n_new; t++) {
        const uint32_t slot = a->first_slot + t;
        if (w->n == w->cap) {
            if (w->live < w->n) window_compact(st, hs, a, slot, NULL, 0, 0);
            else if (window_grow(st, w) != KVP_OK) return KVP_ERROR;
        }
        const uint32_t i = w->n++;
        memcpy(w->k + (size_t)i * HS, a->k_rows + (size_t)t * a->row_stride, HS * sizeof(float));
        memcpy(w->v + (size_t)i * HS, a->v_rows + (size_t)t * a->row_stride, HS * sizeof(float));
        w->pos[i] = a->pos[slot];
        w->live++;
        put_handle(a, slot, kivi_handle_window(hs, i));
        if (w->live == trigger && window_quantize_oldest(st, hs, a, slot + 1) != KVP_OK) return KVP_ERROR;
    }
    return KVP_OK;
}

void kivi_store_release(kivi_store *st, const kvp_release_args *a) {
    for (uint32_t i = 0; i < a->n_slots; i++) {
        const uint32_t h = kivi_slot_handle((const unsigned char *)a->k_slots + (size_t)a->slots[i] * 4u);
        if (!kivi_handle_in_window(h)) {
            group_drop_row(st, kivi_handle_gid(h));
            continue;
        }
        kivi_window *w = &st->win[kivi_handle_head(h)];
        w->pos[kivi_handle_index(h)] = KIVI_DEAD_POS;
        if (--w->live == 0) {
            st->host->free(st->host->ctx, w->block);
            memset(w, 0, sizeof *w);
        }
    }
}

void kivi_store_decode(const kivi_store *st, uint32_t which, const void *slot, float *row) {
    kivi_decode_handle(&st->f, st->win, st->groups, which, kivi_slot_handle(slot), row);
}

void kivi_store_attend(const kivi_store *st, const kvp_attend_args *a) {
    kivi_attend(&st->f, st->win, st->groups, a->q, a->q_pos, a->scale, a->n, a->pos, a->k_slots, a->out, a->probs);
}
