/* backend.h — the compute backend interface: one forward pass of the GPT-2 decoder over a batch.
 * Owns: the kvh_batch description (which sequences get which new tokens), the per-phase timers, the
 * vtable every backend implements (CPU now, CUDA behind the same table).
 * Does not own: the decode loop, sampling or plugins. A backend reads and appends to the KV cache and
 * accumulates attention scores for layers whose settings ask for them; it never evicts.
 *
 * Shapes: B entries in a batch, T_b new tokens for entry b, Ttot = sum T_b, V vocab, C n_embd. */
#ifndef KVH_BACKEND_H
#define KVH_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/kvcache.h"
#include "model/model.h"
#include "util/util.h"

/* One forward call: entry b appends tokens[b][0..n_tokens[b]-1] to cache sequence seq[b] at positions
 * next_pos[seq], next_pos[seq]+1, ... */
typedef struct kvh_batch {
    int n;                        /* B entries */
    const int *seq;               /* [B] cache sequence of each entry (distinct) */
    const int32_t *const *tokens; /* [B] pointers to the entry's new token ids */
    const int *n_tokens;          /* [B] T_b >= 1 */
    bool all_logits;              /* false: logits of each entry's last token, [B, V];
                                     true: logits of every new token, [Ttot, V] in entry order */
} kvh_batch;

/* Accumulated wall time per phase, nanoseconds. */
typedef struct kvh_phase_times {
    uint64_t embed;     /* token + position embedding */
    uint64_t attn_proj; /* ln_1, QKV projection, attention output projection, residual */
    uint64_t attn_core; /* cache append, q·k, softmax, weighted V sum, score accumulation */
    uint64_t mlp;       /* ln_2, c_fc, GELU, c_proj, residual */
    uint64_t lm_head;   /* ln_f and logits */
} kvh_phase_times;

typedef struct kvh_backend kvh_backend;

typedef struct kvh_backend_ops {
    const char *name;
    /* Runs the batch; logits laid out as kvh_batch says. The cache must have room (the backend reserves
     * slots itself and fails cleanly with the cache's message if the byte limit is hit). */
    int (*forward)(kvh_backend *be, kvh_kvcache *cache, const kvh_batch *batch, float *logits, kvh_err *err);
    void (*destroy)(kvh_backend *be);
    /* Optional: where this backend wants K/V slot data (NULL = host memory). The session creates the
     * cache with it, so compaction moves slots inside that memory. */
    const kvh_kv_memory *(*kv_memory)(kvh_backend *be);
    /* Optional: called before a policy evicts from (seq, layer), so a backend that keeps positions or
     * score accumulators elsewhere (device) brings the host copies in the cache up to date... */
    int (*before_evict)(kvh_backend *be, kvh_kvcache *cache, int seq, int layer, kvh_err *err);
    /* ...and after the host compacted the metadata, so it can refresh its own copies. */
    int (*after_evict)(kvh_backend *be, kvh_kvcache *cache, int seq, int layer, kvh_err *err);
    /* Optional: bytes of device memory this backend's kv_memory has taken for K/V slots (regions held,
     * free blocks and size-class rounding included; never returned before destroy, so also the peak).
     * The cache counts slot bytes; this is what they cost on the device. */
    size_t (*kv_memory_reserved)(kvh_backend *be);
} kvh_backend_ops;

struct kvh_backend {
    const kvh_backend_ops *ops;
    const kvh_model *model;
    int threads;
    kvh_phase_times times;
    char device[128]; /* human-readable device description for records */
    char kernels[128]; /* the math kernels that run, for records (CPU: BLAS core + kvhost's ISA level) */
    uint32_t kv_dense_elem_bytes; /* bytes per K/V element in layers without a store (4 = fp32, 2 = fp16) */
    void *impl;       /* backend-private state */
    /* Linear weights held by weight-format plugins (weights.h), set by the session after packing; NULL:
     * every matrix is the model's fp32. Backends that cannot run them refuse at session creation. */
    const struct kvh_weight_set *weights;
    /* When set (`kvhost calibrate`), every linear input row is folded into these statistics. */
    struct kvh_calibration *calibration;
};

/* Creates a backend by name: "cpu", "cuda" or "auto" (cuda when a device is present, else cpu). */
int kvh_backend_create(kvh_backend **out, const char *name, const kvh_model *model, int threads, kvh_err *err);
void kvh_backend_destroy(kvh_backend *be);

/* CPU backend constructor (backend_cpu.c). */
int kvh_backend_cpu_create(kvh_backend **out, const kvh_model *model, int threads, kvh_err *err);

#endif
