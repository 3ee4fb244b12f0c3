/* quant.c — the int8.so / int4.so store plugins: K and V held quantized in groups along head_dim,
 * attention computed straight from the packed slots. Built twice from this file (CMakeLists.txt):
 * KVQ_DEFAULT_BITS and KVQ_NAME pick the default `bits` and the plugin name.
 * Owns: the parameters and their validation, the per-layer format. Does not own: the format itself
 * (kvq_format.h, the single definition shared with tests and other backends), where slots live, who
 * is evicted (a policy; the host compacts by moving whole self-contained slots). */
#include <kvp/kvp.h>

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
     .help = "false: scale = absmax / qmax; true: scale + min per group (unsigned codes)"},
};

static int quant_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    kvq_format fmt;
    char msg[300], err[400];
    if (kvq_format_init(&fmt, kvp_param_int(host, "bits"), kvp_param_int(host, "group"),
                        host->param(host->ctx, "asymmetric") != 0.0, (int64_t)layer->head_dim, msg, sizeof msg) != 0) {
        snprintf(err, sizeof err, "%s (head_dim %u)", msg, (unsigned)layer->head_dim);
        host->set_error(host->ctx, err);
        return KVP_ERROR;
    }
    kvq_format *f = host->alloc(host->ctx, sizeof *f);
    if (!f) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    *f = fmt;
    out->state = f;
    out->k_slot_bytes = f->slot_bytes;
    out->v_slot_bytes = f->slot_bytes;
    return KVP_OK;
}

/* Nothing to free: the host frees what host->alloc gave when the instance goes. */
static void quant_destroy(void *state) { (void)state; }

static void quant_encode(void *state, uint32_t which, const float *row, void *slot) {
    (void)which; /* K and V use the same format */
    kvq_encode(state, row, slot);
}

static void quant_decode(void *state, uint32_t which, const void *slot, float *row) {
    (void)which;
    kvq_decode(state, slot, row);
}

static void quant_attend(void *state, const kvp_attend_args *a) {
    kvq_attend(state, a->q, a->q_pos, a->scale, a->n, a->pos, a->k_slots, a->v_slots, a->out, a->probs);
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .caps = 0,
    .n_params = sizeof params / sizeof params[0],
    .name = KVQ_NAME,
    .version = "1.0.0",
    .summary = "quantized KV store: int8/int4 groups with fp16 scales, attention over the packed form",
    .params = params,
    .create = quant_create,
    .destroy = quant_destroy,
    .encode = quant_encode,
    .decode = quant_decode,
    .attend = quant_attend,
};

KVP_PLUGIN(descriptor)
