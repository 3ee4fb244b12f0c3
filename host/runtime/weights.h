/* weights.h — a session's linear weights held by weight-format plugins (SDK role KVP_ROLE_WEIGHTS).
 * Owns: packing every matrix of the layers a weight format serves (and the tied LM head when its section
 * says lm_head = true) at session start, through the plugin's packed_size / pack hooks; the packed bytes;
 * giving the fp32 originals' memory back where that is safe; the weight byte counts for records.
 * Does not own: the formats or their kernels (the plugins), which layer has which format (router.h), the
 * products at run time (the backend calls the plugin's matmul / unpack through kvh_packed_matrix).
 *
 * Giving memory back: a matrix read from a memory-mapped model.safetensors is released with
 * madvise(MADV_DONTNEED) once packed (whole pages inside it): the kernel drops the pages, and should
 * anything read them again they come back from the file, so another session on the same model still
 * works. Weights in the model's own fp32 arena (random: models, sharded F16/BF16 checkpoints converted
 * at load) stay, because the model may serve other sessions; the record's weight bytes count what the
 * formats hold either way. The layer matrices of a single-file F16/BF16 checkpoint are never in fp32 at
 * all when a format holds them: the model defers their conversion (model.h), and packing converts one
 * matrix at a time into a temporary buffer, packs it, frees it and gives the file pages back; the session
 * converts (kvh_model_materialize) only those no format holds.
 *
 * The LM head is tied to the token embedding (wte): when a format holds it, the backend reads each
 * prompt token's embedding row from the packed form too (unpack of one row), as GGUF models do, so the
 * fp32 wte is not needed and its mapped pages are given back like the others. */
#ifndef KVH_WEIGHTS_H
#define KVH_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "kvp/kvp.h"
#include "model/model.h"
#include "runtime/router.h"
#include "util/util.h"

typedef struct kvh_packed_matrix {
    const kvp_descriptor *desc; /* the format */
    void *state;                /* its instance for this layer */
    kvp_weight_info info;       /* layer, which, k, n */
    void *packed;               /* packed_size bytes, 64-byte aligned */
    size_t bytes;
    const char *section, *file; /* for messages */
} kvh_packed_matrix;

typedef struct kvh_weight_set {
    int n_layer;
    kvh_packed_matrix *mat;     /* [(L + 1) * 4]: layer l, matrix KVP_MAT_* m at l * 4 + m; LM head at L * 4 */
    int n_packed;               /* matrices packed */
    size_t packed_bytes;        /* bytes the formats hold */
    size_t replaced_fp32_bytes; /* fp32 bytes of the matrices they replace */
    size_t released_bytes;      /* fp32 bytes the packed matrices no longer hold in memory: mapped F32 file
                                   pages given back, plus never_materialized_bytes (the record's
                                   weights_fp32_released_bytes) */
    size_t never_materialized_bytes; /* fp32 bytes of deferred F16/BF16 matrices packed straight from the
                                        checkpoint's bytes: their fp32 form was never allocated */
} kvh_weight_set;

/* Packs what the router's weight formats serve, handing each matrix its input statistics from cal (may be
 * NULL: formats that need them refuse). *out is NULL (and 0 returned) when no layer has one. Errors name
 * the section, plugin file, layer and matrix. */
struct kvh_calibration;
int kvh_weights_pack(kvh_weight_set **out, const kvh_model *m, const kvh_router *r, const struct kvh_calibration *cal,
                     kvh_err *err);

/* The packed form of (layer, which), or NULL when it is fp32. layer == n_layer with KVP_MAT_LM_HEAD: the
 * LM head. ws may be NULL. */
const kvh_packed_matrix *kvh_weights_matrix(const kvh_weight_set *ws, int layer, uint32_t which);

/* Bytes of every weight tensor as this session holds them: fp32 tensors at 4 bytes per parameter, the
 * packed ones at their packed size (ws may be NULL: all fp32). */
size_t kvh_weights_bytes_held(const kvh_model *m, const kvh_weight_set *ws);

/* Weight bytes one decode step reads (kvh_model_weight_bytes_per_token's count, with the packed matrices at
 * their packed size). */
size_t kvh_weights_bytes_per_token(const kvh_model *m, const kvh_weight_set *ws);

/* The first packed matrix (layer order), or NULL when ws holds none: for messages. */
const kvh_packed_matrix *kvh_weights_first(const kvh_weight_set *ws);

/* The first packed matrix (layer order) whose format declares every KVP_CAP_* bit of caps, or NULL (ws may
 * be NULL). caps = 0: any packed matrix, as kvh_weights_first. */
const kvh_packed_matrix *kvh_weights_find(const kvh_weight_set *ws, uint32_t caps);

void kvh_weights_free(kvh_weight_set *ws);

#endif
