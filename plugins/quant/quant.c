/* quant.c — the int8.so / int4.so store plugins: K and V held quantized in groups along head_dim,
 * attention computed straight from the packed slots. Built twice from this file (CMakeLists.txt):
 * KVQ_DEFAULT_BITS and KVQ_NAME pick the default `bits` and the plugin name. With kivi = true the
 * layer is a KIVI-style handle store instead (kivi_store.c: per-channel keys, per-token values, fp32
 * residual window).
 * Owns: the parameters and their validation, the per-layer format. Does not own: the format itself
 * (kvq_format.h / kvq_kivi.h, the single definitions shared with tests and other backends), where slots
 * live, who is evicted (a policy; the host compacts by moving whole self-contained slots). */
#include <kvp/kvp.h>

#include "kivi_store.h"
#include "kvq_format.h"

#ifndef KVQ_DEFAULT_BITS
#define KVQ_DEFAULT_BITS 8
#endif
#ifndef KVQ_NAME
#define KVQ_NAME "int8"
#endif

static const kvp_param params[] = {
    {.name = "bits", .type = KVP_PARAM_INT, .default_value = KVQ_DEFAULT_BITS, .min_value = 1, .max_value = 64,
     .help = "bits per value: 8 or 4"},
    {.name = "group", .type = KVP_PARAM_INT, .default_value = 32, .min_value = 1, .max_value = 4096,
     .help = "values sharing one fp16 scale, along head_dim; must divide head_dim (even for 4 bits)"},
    {.name = "asymmetric", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "false: scale = absmax / qmax; true: scale + min per group (unsigned codes); kivi is always asymmetric"},
    {.name = "kivi", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "KIVI: keys per channel over `group` tokens, values per token, asymmetric, newest tokens fp32"},
    {.name = "residual", .type = KVP_PARAM_INT, .default_value = 128, .min_value = 0, .max_value = KIVI_MAX_RESIDUAL,
     .help = "kivi: the `group` oldest of the fp32 window are quantized once it holds residual + group tokens"},
};

/* Per-layer state. The format comes first so the non-kivi hooks can read the state as a kvq_format. */
typedef struct quant_state {
    kvq_format fmt;
    kivi_store *kivi; /* NULL unless kivi = true */
} quant_state;

static int quant_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    kvq_format fmt;
    char msg[300], err[400];
    if (host->param(host->ctx, "kivi") != 0.0) {
        kivi_store *ks = NULL;
        if (!KVP_HOST_HAS(host, shared)) {
            host->set_error(host->ctx, "kivi = true needs a host with ABI 1.2 (append / release hooks)");
            return KVP_ERROR;
        }
        if (kivi_store_create(host, layer, kvp_param_int(host, "bits"), kvp_param_int(host, "group"),
                              kvp_param_int(host, "residual"), &ks, msg, sizeof msg) != 0) {
            snprintf(err, sizeof err, "%s (head_dim %u)", msg, (unsigned)layer->head_dim);
            host->set_error(host->ctx, err);
            return KVP_ERROR;
        }
        quant_state *qs = host->alloc(host->ctx, sizeof *qs);
        if (!qs) {
            host->set_error(host->ctx, "out of memory");
            return KVP_ERROR;
        }
        qs->kivi = ks;
        out->state = qs;
        out->k_slot_bytes = 4; /* a uint32 handle (kvq_kivi.h) */
        out->v_slot_bytes = 4;
        return KVP_OK;
    }
    if (kvq_format_init(&fmt, kvp_param_int(host, "bits"), kvp_param_int(host, "group"),
                        host->param(host->ctx, "asymmetric") != 0.0, (int64_t)layer->head_dim, msg, sizeof msg) != 0) {
        snprintf(err, sizeof err, "%s (head_dim %u)", msg, (unsigned)layer->head_dim);
        host->set_error(host->ctx, err);
        return KVP_ERROR;
    }
    quant_state *qs = host->alloc(host->ctx, sizeof *qs);
    if (!qs) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    qs->fmt = fmt;
    out->state = qs;
    out->k_slot_bytes = fmt.slot_bytes;
    out->v_slot_bytes = fmt.slot_bytes;
    /* Each slot is one token's row quantized in groups along head_dim, scales inside the slot: nothing
     * outside it, nothing shared with other tokens (unlike kivi's per-channel groups across tokens), and
     * kvq_attend is attention over kvq_decode's rows (kvq_format.h). */
    if (KVP_INSTANCE_HAS(out, store_flags)) out->store_flags = KVP_STORE_SELF_CONTAINED | KVP_STORE_DECODE_ATTEND;
    return KVP_OK;
}

/* Nothing to free: the host frees what host->alloc gave at the end of the run (it belongs to the section). */
static void quant_destroy(void *state) { (void)state; }

static void quant_encode(void *state, uint32_t which, const float *row, void *slot) {
    (void)which; /* K and V use the same format */
    kvq_encode(state, row, slot);
}

static void quant_decode(void *state, uint32_t which, const void *slot, float *row) {
    const quant_state *qs = state;
    if (qs->kivi) {
        kivi_store_decode(qs->kivi, which, slot, row);
        return;
    }
    kvq_decode(state, slot, row);
}

/* ABI 1.2: the host calls append instead of encode. Without kivi it encodes each row in place (the same
 * bytes encode() writes); with kivi it hands the rows to the handle store. */
static int quant_append(void *state, const kvp_append_args *a) {
    const quant_state *qs = state;
    if (qs->kivi) return kivi_store_append(qs->kivi, a);
    const size_t sb = qs->fmt.slot_bytes;
    for (uint32_t t = 0; t < a->n_new; t++) {
        kvq_encode(&qs->fmt, a->k_rows + (size_t)t * a->row_stride, (char *)a->k_slots + (a->first_slot + t) * sb);
        kvq_encode(&qs->fmt, a->v_rows + (size_t)t * a->row_stride, (char *)a->v_slots + (a->first_slot + t) * sb);
    }
    return KVP_OK;
}

static void quant_release(void *state, const kvp_release_args *a) {
    const quant_state *qs = state;
    if (qs->kivi) kivi_store_release(qs->kivi, a);
}

static void quant_attend(void *state, const kvp_attend_args *a) {
    const quant_state *qs = state;
    if (qs->kivi) {
        kivi_store_attend(qs->kivi, a);
        return;
    }
    kvq_attend(state, a->q, a->q_pos, a->scale, a->n, a->pos, a->k_slots, a->v_slots, a->out, a->probs);
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = KVQ_NAME,
    .version = "1.0.0",
    .summary = "quantized KV store: int8/int4 groups with fp16 scales, attention over the packed form; kivi = true: "
               "KIVI (keys per channel, values per token, always asymmetric, fp32 residual window)",
    .params = params,
    .create = quant_create,
    .destroy = quant_destroy,
    .encode = quant_encode,
    .decode = quant_decode,
    .attend = quant_attend,
    .append = quant_append,
    .release = quant_release,
};

KVP_PLUGIN(descriptor)
