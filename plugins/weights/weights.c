/* weights.c — the f16.so, bf16.so, w8.so and w4.so weight-format plugins (SDK role KVP_ROLE_WEIGHTS,
 * ABI 1.3; w8/w4 declare 1.5's KVP_CAP_MATMUL_PREFILL): one source built four times (CMakeLists.txt), WF_KIND and WF_NAME picking the format.
 * Owns: parameters and their validation, packing a matrix (gathering input-major columns into packed
 * output rows), choosing the kernel build from host->cpu_level (and, at AVX-512, whether the CPU has VNNI
 * for w8/w4's integer products). Does not own: the formats (wformat.h),
 * the kernels (wformat_kernels.c), where packed bytes live or which layers use the format (the host). */
#include <kvp/kvp.h>
#include <math.h>
#include <stdio.h>

#include "wformat.h"
#include "wformat_act.h"
#include "wformat_kernels.h"

#ifndef WF_KIND
#define WF_KIND WF_W8
#endif
#ifndef WF_NAME
#define WF_NAME "w8"
#endif

#define WF_QUANTIZED (WF_KIND == WF_W8 || WF_KIND == WF_W4)

static const kvp_param params[] = {
    {.name = "lm_head", .type = KVP_PARAM_BOOL, .default_value = 1, .min_value = 0, .max_value = 1,
     .help = "also hold the tied LM head (wte as the output projection) in this format"},
#if WF_QUANTIZED
    {.name = "group", .type = KVP_PARAM_INT, .default_value = 32, .min_value = 32, .max_value = 4096,
     .help = "inputs sharing one fp16 scale: a multiple of 32 that divides every matrix's input count"},
#endif
};

typedef struct wf_state {
    wf_spec spec;
    uint32_t level; /* WF_LEVEL_*: the host's cpu_level, and VNNI when the CPU has it at AVX-512 */
    const kvp_host *host;
} wf_state;

static int wf_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    (void)layer;
    wf_state *st = host->alloc(host->ctx, sizeof *st);
    if (!st) {
        host->set_error(host->ctx, "out of memory");
        return KVP_ERROR;
    }
    st->spec.kind = WF_KIND;
    st->spec.group = 0;
#if WF_QUANTIZED
    const int64_t group = kvp_param_int(host, "group");
    if (group % 32 != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "group = %lld: must be a multiple of 32 (e.g. 32, 64 or 128)", (long long)group);
        host->set_error(host->ctx, msg);
        host->free(host->ctx, st);
        return KVP_ERROR;
    }
    st->spec.group = (uint32_t)group;
#endif
    const uint32_t cpu = KVP_HOST_HAS(host, cpu_level) ? host->cpu_level : KVP_CPU_PORTABLE;
    st->level = cpu >= KVP_CPU_AVX512 ? (wf_cpu_has_vnni() ? WF_LEVEL_AVX512_VNNI : WF_LEVEL_AVX512)
                : cpu >= KVP_CPU_AVX2 ? WF_LEVEL_AVX2 : WF_LEVEL_PORTABLE;
    st->host = host;
    out->state = st;
    out->budget = 1; /* unused by weight formats; set so an older host's checks pass */
    return KVP_OK;
}

static void wf_destroy(void *state) {
    wf_state *st = state;
    if (st) st->host->free(st->host->ctx, st);
}

static size_t wf_packed_size(void *state, const kvp_weight_info *w) {
    wf_state *st = state;
    const size_t rb = wf_row_bytes(st->spec, w->k);
    char msg[200];
    if (WF_QUANTIZED && w->k > WF_MAX_K) {
        snprintf(msg, sizeof msg, "%s of layer %u: %u inputs; " WF_NAME " holds matrices of at most %u inputs",
                 kvp_matrix_name(w->which), (unsigned)w->layer, (unsigned)w->k, WF_MAX_K);
        st->host->set_error(st->host->ctx, msg);
        return 0;
    }
    if (rb == 0) {
        if (w->k % 32)
            snprintf(msg, sizeof msg, "%s of layer %u: %u inputs is not a multiple of 32", kvp_matrix_name(w->which),
                     (unsigned)w->layer, (unsigned)w->k);
        else
            snprintf(msg, sizeof msg, "%s of layer %u: group %u does not divide its %u inputs", kvp_matrix_name(w->which),
                     (unsigned)w->layer, (unsigned)st->spec.group, (unsigned)w->k);
        st->host->set_error(st->host->ctx, msg);
        return 0;
    }
    return rb * w->n;
}

/* Packs 32 outputs at a time: their columns are gathered from an input-major source row by row (each
 * source row read once, contiguously) into a k x 32 transposed block, then packed row by row. */
static int wf_pack(void *state, const kvp_weight_info *w, const float *src, uint32_t src_layout, void *dst) {
    wf_state *st = state;
    const uint32_t k = w->k, n = w->n, B = 32;
    const size_t rb = wf_row_bytes(st->spec, k);
    float *block = st->host->alloc(st->host->ctx, (size_t)B * k * sizeof(float));
    if (!block) {
        st->host->set_error(st->host->ctx, "out of memory for the packing buffer");
        return KVP_ERROR;
    }
    for (uint32_t j0 = 0; j0 < n; j0 += B) {
        const uint32_t nb = n - j0 < B ? n - j0 : B;
        for (uint32_t i = 0; i < k; i++)
            for (uint32_t b = 0; b < nb; b++) {
                const float v = src_layout == KVP_LAYOUT_OUT_MAJOR ? src[(size_t)(j0 + b) * k + i]
                                                                   : src[(size_t)i * n + j0 + b];
                if (!isfinite(v)) {
                    char msg[200];
                    snprintf(msg, sizeof msg, "%s of layer %u: weight (input %u, output %u) is %g, not finite",
                             kvp_matrix_name(w->which), (unsigned)w->layer, (unsigned)i, (unsigned)(j0 + b), (double)v);
                    st->host->set_error(st->host->ctx, msg);
                    st->host->free(st->host->ctx, block);
                    return KVP_ERROR;
                }
                block[(size_t)b * k + i] = v;
            }
        for (uint32_t b = 0; b < nb; b++)
            wf_pack_row(st->spec, k, block + (size_t)b * k, (uint8_t *)dst + (size_t)(j0 + b) * rb);
    }
    st->host->free(st->host->ctx, block);
    return KVP_OK;
}

static void wf_unpack(void *state, const kvp_weight_info *w, const void *packed, uint32_t n0, uint32_t n1, float *dst) {
    wf_state *st = state;
    const size_t rb = wf_row_bytes(st->spec, w->k);
    for (uint32_t j = n0; j < n1; j++)
        wf_unpack_row(st->spec, w->k, (const uint8_t *)packed + (size_t)j * rb, dst + (size_t)(j - n0) * w->k);
}

static void wf_matmul_hook(void *state, const kvp_matmul_args *a) {
    const wf_state *st = state;
    wf_matmul(st->spec, st->level, a->w->k, a->packed, a->x, a->rows, a->n0, a->n1, a->y, a->ldy);
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_WEIGHTS,
#if WF_KIND == WF_W8 || WF_KIND == WF_W4
    /* every product (decode and prefill) over int8 activations, one arithmetic per token however a prompt
     * is split: no KVP_CAP_ACT_QUANT (SDK 1.5) */
    .caps = KVP_CAP_MATMUL_PREFILL,
#else
    .caps = 0,
#endif
    .n_params = sizeof params / sizeof params[0],
    .name = WF_NAME,
    .version = "1.0",
#if WF_KIND == WF_F16
    .summary = "weights as IEEE fp16 (2 bytes each), products in fp32",
#elif WF_KIND == WF_BF16
    .summary = "weights as bfloat16 (2 bytes each), products in fp32",
#elif WF_KIND == WF_W8
    .summary = "weights as int8 with one fp16 scale per group of inputs (symmetric, like GGML Q8_0); products "
               "in integers over int8 activations (per 32 inputs), decode and prefill",
#else
    .summary = "weights as 4-bit codes with one fp16 scale per group of inputs (like GGML Q4_0); products "
               "in integers over int8 activations (per 32 inputs), decode and prefill",
#endif
    .params = params,
    .create = wf_create,
    .destroy = wf_destroy,
    .packed_size = wf_packed_size,
    .pack = wf_pack,
    .unpack = wf_unpack,
    .matmul = wf_matmul_hook,
};

KVP_PLUGIN(descriptor)
