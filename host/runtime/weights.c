/* weights.c — packing a session's linear weights into weight-format plugins (see weights.h). */
#define _DEFAULT_SOURCE /* madvise */
#include "runtime/weights.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "runtime/calibration.h"
#include "runtime/plugin_guard.h"

_Static_assert(KVP_MAT_ATTN_QKV == KVH_MAT_ATTN_QKV && KVP_MAT_ATTN_PROJ == KVH_MAT_ATTN_PROJ &&
                   KVP_MAT_MLP_FC == KVH_MAT_MLP_FC && KVP_MAT_MLP_PROJ == KVH_MAT_MLP_PROJ,
               "the model's matrix order is the SDK's");

/* Gives back the whole pages of [p, p + bytes) when they lie in the model's file mapping. */
static size_t release_if_mapped(const kvh_model *m, const void *p, size_t bytes) {
    if (!m->map_base) return 0;
    const uintptr_t base = (uintptr_t)m->map_base, end = base + m->map_len, a = (uintptr_t)p;
    if (a < base || a + bytes > end) return 0;
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t lo = (a + page - 1) & ~(page - 1), hi = (a + bytes) & ~(page - 1);
    if (hi <= lo) return 0;
    return madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0 ? (size_t)(hi - lo) : 0;
}

static int pack_one(kvh_weight_set *ws, const kvh_model *m, const kvh_calibration *cal, const kvh_weight_format *f,
                    int layer, uint32_t which, const float *src, uint32_t layout, uint32_t k, uint32_t n, kvh_err *err) {
    kvh_packed_matrix *pm = &ws->mat[layer * 4 + (int)(which == KVP_MAT_LM_HEAD ? 0 : which)];
    pm->desc = f->desc;
    pm->state = f->state;
    pm->section = f->section;
    pm->file = f->file;
    pm->info = (kvp_weight_info){.struct_size = sizeof pm->info, .layer = (uint32_t)layer, .which = which, .k = k, .n = n,
                                 .act_absmax = kvh_calibration_input(cal, layer, which)};
    kvh_plugin_guard_enter(f->desc->name, f->file, "packed_size", layer);
    const size_t bytes = f->desc->packed_size(f->state, &pm->info);
    kvh_plugin_guard_leave();
    if (bytes == 0)
        return kvh_fail(err, "[%s] weight format '%s' (%s) refuses %s of layer %d (%u x %u): %s", f->section,
                        f->desc->name, f->file, kvp_matrix_name(which), layer, (unsigned)k, (unsigned)n,
                        kvh_router_weight_error(f->error_ctx));
    /* Sanity: a packed matrix larger than twice its fp32 form is not a weight format, it is a bug. */
    if (bytes / 2 > (size_t)k * n * sizeof(float))
        return kvh_fail(err, "[%s] weight format '%s' (%s) asks %zu bytes for %s of layer %d (%u x %u, %zu bytes in "
                        "fp32): more than twice the fp32 size", f->section, f->desc->name, f->file, bytes,
                        kvp_matrix_name(which), layer, (unsigned)k, (unsigned)n, (size_t)k * n * sizeof(float));
    void *dst = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!dst)
        return kvh_fail(err, "out of memory packing %s of layer %d (%zu bytes, [%s])", kvp_matrix_name(which), layer, bytes,
                        f->section);
    memset(dst, 0, bytes);
    kvh_plugin_guard_enter(f->desc->name, f->file, "pack", layer);
    const int rc = f->desc->pack(f->state, &pm->info, src, layout, dst);
    kvh_plugin_guard_leave();
    if (rc != KVP_OK) {
        free(dst);
        return kvh_fail(err, "[%s] weight format '%s' (%s): pack of %s of layer %d failed: %s", f->section,
                        f->desc->name, f->file, kvp_matrix_name(which), layer, kvh_router_weight_error(f->error_ctx));
    }
    pm->packed = dst;
    pm->bytes = bytes;
    pm->info.act_absmax = NULL; /* valid during pack only */
    ws->n_packed++;
    ws->packed_bytes += bytes;
    ws->replaced_fp32_bytes += (size_t)k * n * sizeof(float);
    ws->released_bytes += release_if_mapped(m, src, (size_t)k * n * sizeof(float));
    return 0;
}

/* pack_one for a layer matrix (KVP_MAT_* which, equal to KVH_MAT_*): a deferred F16/BF16 matrix without an
 * fp32 copy is converted into a temporary buffer for the pack (the peak is one matrix), which is then freed
 * and its source pages in the file mapping given back. */
static int pack_layer_matrix(kvh_weight_set *ws, const kvh_model *m, const kvh_calibration *cal,
                             const kvh_weight_format *f, int layer, uint32_t which, const float *src, uint32_t k,
                             uint32_t n, kvh_err *err) {
    if (src || !kvh_model_needs_materialize(m, layer, (int)which))
        return pack_one(ws, m, cal, f, layer, which, src, KVP_LAYOUT_IN_MAJOR, k, n, err);
    const size_t fp32_bytes = (size_t)k * n * sizeof(float);
    float *tmp = aligned_alloc(64, (fp32_bytes + 63) / 64 * 64);
    if (!tmp)
        return kvh_fail(err, "out of memory converting %s of layer %d to fp32 for packing (%zu bytes, [%s])",
                        kvp_matrix_name(which), layer, fp32_bytes, f->section);
    kvh_model_deferred_to_f32(m, layer, (int)which, tmp);
    const int rc = pack_one(ws, m, cal, f, layer, which, tmp, KVP_LAYOUT_IN_MAJOR, k, n, err);
    free(tmp);
    if (rc != 0) return rc;
    (void)kvh_model_deferred_release_source(m, layer, (int)which);
    ws->never_materialized_bytes += fp32_bytes;
    ws->released_bytes += fp32_bytes;
    return 0;
}

int kvh_weights_pack(kvh_weight_set **out, const kvh_model *m, const kvh_router *r, const kvh_calibration *cal,
                     kvh_err *err) {
    *out = NULL;
    const int L = m->cfg.n_layer;
    kvh_weight_format f;
    int any = 0;
    for (int l = 0; l <= L && !any; l++) any = kvh_router_weight_format(r, l, &f);
    if (!any) return 0;
    kvh_weight_set *ws = calloc(1, sizeof *ws);
    if (ws) ws->mat = calloc((size_t)(L + 1) * 4, sizeof *ws->mat);
    if (!ws || !ws->mat) {
        free(ws);
        return kvh_fail(err, "out of memory for the weight formats' table");
    }
    ws->n_layer = L;
    const uint32_t C = (uint32_t)m->cfg.n_embd, F = (uint32_t)m->cfg.n_inner, V = (uint32_t)m->cfg.n_vocab;
    int rc = 0;
    for (int l = 0; l < L && rc == 0; l++) {
        if (!kvh_router_weight_format(r, l, &f)) continue;
        const kvh_layer_weights *w = &m->layers[l];
        if ((rc = pack_layer_matrix(ws, m, cal, &f, l, KVP_MAT_ATTN_QKV, w->attn_w, C, 3 * C, err)) == 0 &&
            (rc = pack_layer_matrix(ws, m, cal, &f, l, KVP_MAT_ATTN_PROJ, w->proj_w, C, C, err)) == 0 &&
            (rc = pack_layer_matrix(ws, m, cal, &f, l, KVP_MAT_MLP_FC, w->fc_w, C, F, err)) == 0)
            rc = pack_layer_matrix(ws, m, cal, &f, l, KVP_MAT_MLP_PROJ, w->fcproj_w, F, C, err);
    }
    if (rc == 0 && kvh_router_weight_format(r, L, &f))
        rc = pack_one(ws, m, cal, &f, L, KVP_MAT_LM_HEAD, m->wte, KVP_LAYOUT_OUT_MAJOR, C, V, err);
    if (rc != 0) {
        kvh_weights_free(ws);
        return -1;
    }
    *out = ws;
    return 0;
}

const kvh_packed_matrix *kvh_weights_matrix(const kvh_weight_set *ws, int layer, uint32_t which) {
    if (!ws || layer < 0 || layer > ws->n_layer) return NULL;
    const kvh_packed_matrix *pm = &ws->mat[layer * 4 + (int)(which == KVP_MAT_LM_HEAD ? 0 : which)];
    return pm->packed && pm->info.which == which ? pm : NULL;
}

size_t kvh_weights_bytes_held(const kvh_model *m, const kvh_weight_set *ws) {
    const size_t fp32 = m->n_params * sizeof(float);
    return ws ? fp32 - ws->replaced_fp32_bytes + ws->packed_bytes : fp32;
}

size_t kvh_weights_bytes_per_token(const kvh_model *m, const kvh_weight_set *ws) {
    const size_t fp32 = kvh_model_weight_bytes_per_token(m);
    return ws ? fp32 - ws->replaced_fp32_bytes + ws->packed_bytes : fp32;
}

const kvh_packed_matrix *kvh_weights_find(const kvh_weight_set *ws, uint32_t caps) {
    if (!ws) return NULL;
    for (int i = 0; i < (ws->n_layer + 1) * 4; i++)
        if (ws->mat[i].packed && (ws->mat[i].desc->caps & caps) == caps) return &ws->mat[i];
    return NULL;
}

const kvh_packed_matrix *kvh_weights_first(const kvh_weight_set *ws) { return kvh_weights_find(ws, 0); }

void kvh_weights_free(kvh_weight_set *ws) {
    if (!ws) return;
    if (ws->mat)
        for (int i = 0; i < (ws->n_layer + 1) * 4; i++) free(ws->mat[i].packed);
    free(ws->mat);
    free(ws);
}
