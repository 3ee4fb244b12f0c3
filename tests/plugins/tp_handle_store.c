/* tp_handle_store.c — a minimal "handle store" for the ABI 1.2 host tests (tests/test_store_abi.c).
 * Each token's K and V rows live in their own host->alloc block (deliberately one allocation per token,
 * so the host's store-memory count is exactly predictable); both slots of the token hold the block's
 * address. append() writes new tokens, release() frees them, attend() is plain fp32 attention through
 * the pointers, encode is NULL (append replaces it). create() also checks host->shared(): every instance
 * of the section must get the same block, and a different size must be refused. */
#include <kvp/kvp.h>
#include <math.h>
#include <stdio.h>

typedef struct shared_block {
    uint32_t instances;   /* instances created so far in this section */
} shared_block;

typedef struct store {
    const kvp_host *host;
    uint32_t head_dim;
    shared_block *shared;
} store;

static int hs_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    shared_block *sb = host->shared(host->ctx, sizeof *sb);
    if (!sb) {
        host->set_error(host->ctx, "host->shared returned NULL");
        return KVP_ERROR;
    }
    if (host->shared(host->ctx, sizeof *sb + 8) != NULL) {
        host->set_error(host->ctx, "host->shared accepted a different size");
        return KVP_ERROR;
    }
    if (sb->instances != layer->layer) { /* layers = all: instances are created in layer order */
        host->set_error(host->ctx, "the shared block is not shared across the section's instances");
        return KVP_ERROR;
    }
    sb->instances++;
    store *st = host->alloc(host->ctx, sizeof *st);
    if (!st) return KVP_ERROR;
    st->host = host;
    st->head_dim = layer->head_dim;
    st->shared = sb;
    out->state = st;
    out->k_slot_bytes = out->v_slot_bytes = sizeof(float *);
    return KVP_OK;
}

static void hs_destroy(void *state) { (void)state; }

static float *row_of(const void *slots, uint32_t i) {
    float *p;
    memcpy(&p, (const char *)slots + (size_t)i * sizeof p, sizeof p);
    return p;
}

static int hs_append(void *state, const kvp_append_args *a) {
    store *st = state;
    const uint32_t HS = st->head_dim;
    if (a->head_dim != HS) {
        st->host->set_error(st->host->ctx, "append: head_dim differs from create()");
        return KVP_ERROR;
    }
    for (uint32_t t = 0; t < a->n_new; t++) {
        float *block = st->host->alloc(st->host->ctx, (size_t)2 * HS * sizeof(float));
        if (!block) {
            char msg[96];
            snprintf(msg, sizeof msg, "out of memory for the token at position %d", (int)a->pos[a->first_slot + t]);
            st->host->set_error(st->host->ctx, msg);
            return KVP_ERROR;
        }
        memcpy(block, a->k_rows + t * a->row_stride, HS * sizeof(float));
        memcpy(block + HS, a->v_rows + t * a->row_stride, HS * sizeof(float));
        const size_t at = (size_t)(a->first_slot + t) * sizeof block;
        memcpy((char *)a->k_slots + at, &block, sizeof block);
        memcpy((char *)a->v_slots + at, &block, sizeof block);
    }
    return KVP_OK;
}

static void hs_release(void *state, const kvp_release_args *a) {
    store *st = state;
    for (uint32_t i = 0; i < a->n_slots; i++) st->host->free(st->host->ctx, row_of(a->k_slots, a->slots[i]));
}

static void hs_decode(void *state, uint32_t which, const void *slot, float *row) {
    store *st = state;
    memcpy(row, row_of(slot, 0) + (which == KVP_WHICH_V ? st->head_dim : 0), st->head_dim * sizeof(float));
}

static void hs_attend(void *state, const kvp_attend_args *a) {
    store *st = state;
    const uint32_t HS = st->head_dim;
    float mx = -INFINITY;
    for (uint32_t j = 0; j < a->n; j++) {
        if (a->pos[j] > a->q_pos) {
            a->probs[j] = -INFINITY;
            continue;
        }
        const float *k = row_of(a->k_slots, j);
        float s = 0.0f;
        for (uint32_t d = 0; d < HS; d++) s += a->q[d] * k[d];
        a->probs[j] = s * a->scale;
        if (a->probs[j] > mx) mx = a->probs[j];
    }
    float sum = 0.0f;
    for (uint32_t j = 0; j < a->n; j++) {
        a->probs[j] = a->probs[j] == -INFINITY ? 0.0f : expf(a->probs[j] - mx);
        sum += a->probs[j];
    }
    for (uint32_t d = 0; d < HS; d++) a->out[d] = 0.0f;
    for (uint32_t j = 0; j < a->n; j++) {
        a->probs[j] /= sum;
        const float *v = row_of(a->v_slots, j) + HS;
        for (uint32_t d = 0; d < HS; d++) a->out[d] += a->probs[j] * v[d];
    }
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .name = "tp_handle_store",
    .version = "1.0.0",
    .summary = "test store: per-token host->alloc blocks behind pointer slots (ABI 1.2)",
    .create = hs_create,
    .destroy = hs_destroy,
    .decode = hs_decode,
    .attend = hs_attend,
    .append = hs_append,
    .release = hs_release,
};

KVP_PLUGIN(descriptor)
