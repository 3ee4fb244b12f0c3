/* tables.cuh — the small per-forward tables the host uploads once per forward call and every kernel
 * reads: which token / position / batch entry each activation row is, and where each (entry, head)'s
 * K/V slots live (dense fp16 or packed int8/int4, per layer) with its live count and, on layers whose
 * policy asked for the score report, where its report goes. Owns only these layouts (host and device agree on them). */
#ifndef KVH_CUDA_TABLES_CUH
#define KVH_CUDA_TABLES_CUH

#include <cuda_fp16.h>
#include <stdint.h>

/* One activation row (one new token of one batch entry). */
typedef struct cuda_row {
    int32_t tok;   /* token id */
    int32_t pos;   /* absolute position */
    int32_t entry; /* batch entry b */
    int32_t t;     /* index of this token among the entry's new tokens (0..T_b-1) */
} cuda_row;

/* One batch entry. */
typedef struct cuda_entry {
    int32_t seq;  /* cache sequence */
    int32_t row0; /* first row of the entry */
    int32_t T;    /* new tokens T_b */
    int32_t last; /* row whose logits are returned when only the last token's are asked */
} cuda_entry;

/* One (layer, entry, head): the slot data and live count after this forward's append. */
typedef struct cuda_head {
    void *k;        /* [cap] K slots of the layer's format: dense fp16 [cap, HS] __half, or packed
                       kvq_format.h slots of its slot_bytes (quant.cuh) */
    void *v;        /* [cap] V slots, same format */
    uint32_t n;     /* live slots (including this forward's new tokens) */
    uint32_t first; /* slot of the entry's first new token */
    uint64_t rep;   /* layers whose policy asked for the score report (ABI 1.3): offset in floats of this
                       head's report in the device report buffer (layout of kvcache.h kvh_report_col / _row:
                       decode n floats, prefill block n * (1 + min(T, report_rows))); 0 elsewhere */
} cuda_head;

/* Metadata index of slot `slot` of (seq, layer, head) in the device pos / score arrays, which hold
 * n_ctx slots per head: [n_seq, L, NH, n_ctx]. */
__host__ __device__ static inline size_t cuda_meta_index(int seq, int l, int h, int slot, int L, int NH, int n_ctx) {
    return (((size_t)seq * (size_t)L + (size_t)l) * (size_t)NH + (size_t)h) * (size_t)n_ctx + (size_t)slot;
}

#endif
