/* kivi_store.h — the KIVI option of int8.so / int4.so as a "handle store" (ABI 1.2): per-layer state that
 * keeps each (seq, head)'s fp32 residual window and the layer's quantized groups in host->alloc memory,
 * slots holding handles (kvq_kivi.h). Owns: which window entry / group row holds which token, growth and
 * release of that memory. Does not own: the format and its math (kvq_kivi.h), parameters (quant.c). */
#ifndef KIVI_STORE_H
#define KIVI_STORE_H

#include <kvp/kvp.h>

#include "kvq_kivi.h"

typedef struct kivi_store {
    const kvp_host *host;
    kivi_format f;
    uint32_t n_kv_head;
    uint32_t n_heads;     /* n_seq * n_kv_head head-states */
    kivi_window *win;     /* [n_heads] */
    void **groups;        /* [groups_cap] group blocks, NULL for a free id */
    uint32_t *free_ids;   /* [groups_cap] stack of released ids (inside the groups allocation) */
    uint32_t n_free;
    uint32_t groups_used; /* ids 0..groups_used-1 have been handed out */
    uint32_t groups_cap;
    uint32_t *idx;        /* [R + G] scratch: the window entries being quantized */
    uint32_t *remap;      /* [R + G] scratch: old window entry -> new handle */
} kivi_store;

/* Makes the state (host->alloc) or returns -1 with a message in err[cap]. */
int kivi_store_create(const kvp_host *host, const kvp_layer_info *layer, int64_t bits, int64_t group, int64_t residual,
                      kivi_store **out, char *err, size_t cap);
int kivi_store_append(kivi_store *st, const kvp_append_args *a);
void kivi_store_release(kivi_store *st, const kvp_release_args *a);
void kivi_store_decode(const kivi_store *st, uint32_t which, const void *slot, float *row);
void kivi_store_attend(const kivi_store *st, const kvp_attend_args *a);

#endif
