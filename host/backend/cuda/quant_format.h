/* quant_format.h — the CUDA backend's view of a layer's KV slot format, shared by the C side
 * (quant_format.c, which rebuilds the format with plugins/quant/kvq_format.h's kvq_format_init) and the
 * CUDA side (quant.cuh kernels, which take it by value). Plain C: included from .c and .cu files.
 * Owns: kvh_cuda_kvfmt, the store-to-format check, and the test entry point of the GPU encoder.
 * Does not own: the format itself (kvq_format.h is its single definition). */
#ifndef KVH_CUDA_QUANT_FORMAT_H
#define KVH_CUDA_QUANT_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/kvcache.h"
#include "util/util.h"

#define KVH_CUDA_DENSE_BITS 16 /* kvh_cuda_kvfmt.bits of a layer without a store: dense fp16 slots */

/* One layer's slot format. bits = 16: dense fp16 (head_dim halves per slot, the other fields unused);
 * bits = 8 / 4: kvq_format.h packed slots with these fields copied from its kvq_format. */
typedef struct kvh_cuda_kvfmt {
    int32_t bits;       /* 16, 8 or 4 */
    int32_t asym;       /* 0 symmetric, 1 asymmetric (scale + min per group) */
    int32_t group;      /* G */
    int32_t n_groups;   /* NG = HS / G */
    int32_t header;     /* header bytes (NG * 2 * (asym ? 2 : 1)) */
    int32_t slot_bytes; /* bytes of one slot */
    int32_t qmax;       /* kvq_format.qmax */
    int32_t words;      /* 1 when slot_bytes, header and each group's value bytes are multiples of 4: the
                           attention kernels then read the packed values as 32-bit words */
} kvh_cuda_kvfmt;

#ifdef __cplusplus
extern "C" {
#endif

/* Fills *out from kvq_format_init(bits, group, asym, head_dim); -1 with kvq_format_init's message in
 * msg[cap] when the values are not a valid format. */
int kvh_cuda_kvfmt_init(kvh_cuda_kvfmt *out, int64_t bits, int64_t group, int asym, int head_dim, char *msg,
                        size_t cap);

/* The packed format of layer `layer`, held by store ls->store (non-NULL) at head size head_dim: accepts
 * the int8 / int4 store plugins (plugins/quant) with kivi = false, whose parameters (ls->store_param:
 * bits, group, asymmetric) rebuild the kvq_format, whose slot_bytes must equal the layer's K and V slot
 * sizes. Anything else fails with a message naming the store, the layer and what to do instead. */
int kvh_cuda_store_format(const kvh_layer_policy_settings *ls, int layer, int head_dim, kvh_cuda_kvfmt *out,
                          kvh_err *err);

/* Test entry point (tests/test_cuda.c): encodes n_rows rows of head_dim floats with the GPU encoder of
 * the kvq_format (bits, group, asym, head_dim) into slots (n_rows consecutive slots of its slot_bytes,
 * host memory). Needs a usable device; 0, or -1 with a message. */
int kvh_cuda_quant_encode_rows(const float *rows, int n_rows, int head_dim, int bits, int group, int asym,
                               void *slots, kvh_err *err);

#ifdef __cplusplus
}
#endif

#endif
