/* quant_format.c — C side of the CUDA backend's quantized KV support: turns a layer's store plugin and
 * its parsed parameters into the slot format the kernels use, through plugins/quant/kvq_format.h's own
 * kvq_format_init (kvq_format.h is C, not C++, so it is compiled here and not in the .cu files).
 * Owns: which stores the CUDA backend accepts and the messages for those it does not. Does not own the
 * format (kvq_format.h) or the kernels (quant.cuh). */
#include <string.h>

#include "kvp/kvp.h"
#include "kvq_format.h"
#include "quant_format.h"

int kvh_cuda_kvfmt_init(kvh_cuda_kvfmt *out, int64_t bits, int64_t group, int asym, int head_dim, char *msg,
                        size_t cap) {
    memset(out, 0, sizeof *out);
    kvq_format f;
    if (kvq_format_init(&f, bits, group, asym, head_dim, msg, cap) != 0) return -1;
    out->bits = (int32_t)f.bits;
    out->asym = (int32_t)f.asym;
    out->group = (int32_t)f.group;
    out->n_groups = (int32_t)f.n_groups;
    out->header = (int32_t)f.header_bytes;
    out->slot_bytes = (int32_t)f.slot_bytes;
    out->qmax = (int32_t)f.qmax;
    const uint32_t gbytes = f.group * f.bits / 8u;
    out->words = (f.slot_bytes % 4u == 0 && f.header_bytes % 4u == 0 && gbytes % 4u == 0) ? 1 : 0;
    return 0;
}

int kvh_cuda_store_format(const kvh_layer_policy_settings *ls, int layer, int head_dim, kvh_cuda_kvfmt *out,
                          kvh_err *err) {
    memset(out, 0, sizeof *out);
    const char *name = ls->store && ls->store->name ? ls->store->name : "?";
    if (strcmp(name, "int8") != 0 && strcmp(name, "int4") != 0)
        return kvh_fail(err,
                        "the CUDA backend has no kernel for store '%s' yet (layer %d); it runs the int8 / int4 "
                        "stores of plugins/quant. HINT: drop the store plugin or use --backend cpu",
                        name, layer);
    if (!ls->store_param)
        return kvh_fail(err, "cuda backend: layer %d: store '%s' exposes no parameters (store_param unset)", layer,
                        name);
    void *ctx = ls->store_fail_ctx;
    if (ls->store_param(ctx, "kivi") != 0.0)
        return kvh_fail(err,
                        "the CUDA backend has no kernel for store '%s' with kivi = true (KIVI handle slots) yet "
                        "(layer %d). HINT: set %s.kivi=false or use --backend cpu",
                        name, layer, name);
    const double bits = ls->store_param(ctx, "bits"), group = ls->store_param(ctx, "group");
    const int asym = ls->store_param(ctx, "asymmetric") != 0.0;
    char msg[300];
    if (kvh_cuda_kvfmt_init(out, (int64_t)bits, (int64_t)group, asym, head_dim, msg, sizeof msg) != 0)
        return kvh_fail(err, "cuda backend: layer %d: store '%s': %s", layer, name, msg);
    if ((uint32_t)out->slot_bytes != ls->k_slot_bytes || (uint32_t)out->slot_bytes != ls->v_slot_bytes)
        return kvh_fail(err,
                        "cuda backend: layer %d: store '%s' (bits %d, group %d, %s) has %u/%u-byte K/V slots but "
                        "kvq_format.h gives %d bytes: the plugin and the backend disagree on the format",
                        layer, name, out->bits, out->group, out->asym ? "asymmetric" : "symmetric", ls->k_slot_bytes,
                        ls->v_slot_bytes, out->slot_bytes);
    return 0;
}
