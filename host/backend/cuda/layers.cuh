/* layers.cuh — the CUDA backend's non-attention kernels: embedding, LayerNorm (with the previous
 * projection's bias folded in), the QKV epilogue that also appends K/V to the device cache (dense fp16
 * layers; quantized layers are encoded by quant.cuh), bias +
 * GELU, fp32 -> fp16 conversion of weights, and a batched slot copy for cache compaction.
 * Layout: "kernels" first, then "launchers" (host functions that pick the grid and check the launch).
 * Shapes: R rows (new tokens), C n_embd, F MLP inner, HS head size, NH heads, L layers.
 * The projections themselves are cuBLAS GEMMs (backend_cuda.cu). */
#ifndef KVH_CUDA_LAYERS_CUH
#define KVH_CUDA_LAYERS_CUH

#include "common.cuh"
#include "tables.cuh"

/* ================================ kernels ================================ */

/* x[r, :] = wte[tok_r, :] + wpe[pos_r, :] (fp16 tables, fp32 residual stream). grid R, block 256. */
__global__ void embed_kernel(float *x, const __half *wte, const __half *wpe, const cuda_row *rows, int C) {
    const int r = blockIdx.x;
    const cuda_row row = rows[r];
    const __half *te = wte + (size_t)row.tok * C;
    const __half *pe = wpe + (size_t)row.pos * C;
    float *xr = x + (size_t)r * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) xr[c] = __half2float(te[c]) + __half2float(pe[c]);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* One warp per output row i: xr = x[src_i] (+= pending bias, written back), out[i] = LayerNorm(xr) * w + b
 * in fp16. src = NULL means src_i = i. Two passes like the CPU: mean, then mean squared deviation.
 * grid ceil(n_out / 4), block 128. */
__global__ void layernorm_kernel(__half *out, float *x, const float *pending_bias, const float *w, const float *b,
                                 const int *src, int n_out, int C, float eps) {
    const int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (i >= n_out) return;
    const int r = src ? src[i] : i;
    float *xr = x + (size_t)r * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float v = xr[c];
        if (pending_bias) {
            v += pending_bias[c];
            xr[c] = v;
        }
        sum += v;
    }
    const float mean = warp_sum(sum) / (float)C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = xr[c] - mean;
        var += d * d;
    }
    const float rstd = rsqrtf(warp_sum(var) / (float)C + eps);
    __half *o = out + (size_t)i * C;
    for (int c = lane; c < C; c += 32) o[c] = __float2half((xr[c] - mean) * rstd * w[c] + b[c]);
}

/* The QKV epilogue of layer l: y[R, 3C] (fp32 GEMM output) + bias. Q columns go to q[R, C] (fp16); with
 * write_kv, K and V columns go straight into the cache slots of their (entry, head) (dense fp16); a
 * quantized layer (write_kv = 0) leaves them to kv_quant_encode_kernel (quant.cuh). Either way the slot's
 * device metadata is set: position, zeroed score accumulators. grid (R, ceil(3C / 256)), block 256. */
__global__ void qkv_epilogue_kernel(__half *q, const float *y, const float *bias, const cuda_row *rows,
                                    const cuda_entry *entries, const cuda_head *heads /* this layer, [B, NH] */,
                                    int32_t *dpos, float *dscore, float *dobs, int C, int HS, int NH, int L, int l,
                                    int n_ctx, int write_kv) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= 3 * C) return;
    if (c < C) {
        q[(size_t)r * C + c] = __float2half(y[(size_t)r * 3 * C + c] + bias[c]);
        return;
    }
    const cuda_row row = rows[r];
    const int which = (c - C) / C; /* 0: K, 1: V */
    const int cc = (c - C) % C;
    const int h = cc / HS, d = cc % HS;
    const cuda_head hd = heads[row.entry * NH + h];
    const uint32_t slot = hd.first + (uint32_t)row.t;
    if (write_kv) {
        __half *dst = (__half *)(which == 0 ? hd.k : hd.v);
        dst[(size_t)slot * HS + d] = __float2half(y[(size_t)r * 3 * C + c] + bias[c]);
    }
    if (which == 0 && d == 0) {
        const size_t mi = cuda_meta_index(entries[row.entry].seq, l, h, (int)slot, L, NH, n_ctx);
        dpos[mi] = row.pos;
        if (dscore) dscore[mi] = 0.0f;
        if (dobs) dobs[mi] = 0.0f;
    }
}

/* h[i] = GELU_tanh(y[i] + bias[i % F]) in fp16, over R*F elements. */
__global__ void bias_gelu_kernel(__half *h, const float *y, const float *bias, size_t n, int F) {
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = y[i] + bias[i % (size_t)F];
        h[i] = __float2half(0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v))));
    }
}

__global__ void f32_to_f16_kernel(__half *dst, const float *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2half(src[i]);
}

/* Up to COPY_BATCH device-to-device slot moves in one launch (cache compaction). The moves of one
 * compaction never overlap (holes below the new live count, sources above it), so they run in parallel;
 * the host (backend_cuda.cu mem_copy) starts a new launch before queueing a move that overlaps a queued one.
 * Passed by value as a kernel parameter, so the host may reuse its list as soon as the launch returns. */
#define COPY_BATCH 128
typedef struct copy_list {
    int n;
    void *dst[COPY_BATCH];
    const void *src[COPY_BATCH];
    uint32_t bytes[COPY_BATCH];
} copy_list;

__global__ void batched_copy_kernel(const copy_list list) {
    const int i = blockIdx.x;
    if (i >= list.n) return;
    const size_t nb = list.bytes[i];
    const uintptr_t a = (uintptr_t)list.dst[i] | (uintptr_t)list.src[i] | (uintptr_t)nb;
    if ((a & 15u) == 0) {
        uint4 *d = (uint4 *)list.dst[i];
        const uint4 *s = (const uint4 *)list.src[i];
        for (size_t k = threadIdx.x; k < nb / 16; k += blockDim.x) d[k] = s[k];
    } else if ((a & 3u) == 0) {
        uint32_t *d = (uint32_t *)list.dst[i];
        const uint32_t *s = (const uint32_t *)list.src[i];
        for (size_t k = threadIdx.x; k < nb / 4; k += blockDim.x) d[k] = s[k];
    } else {
        unsigned char *d = (unsigned char *)list.dst[i];
        const unsigned char *s = (const unsigned char *)list.src[i];
        for (size_t k = threadIdx.x; k < nb; k += blockDim.x) d[k] = s[k];
    }
}

/* ================================ launchers ================================ */

static int launch_embed(cudaStream_t st, float *x, const __half *wte, const __half *wpe, const cuda_row *rows, int R,
                        int C, kvh_err *err) {
    embed_kernel<<<R, 256, 0, st>>>(x, wte, wpe, rows, C);
    KVH_CUDA_LAUNCHED(err, "embed_kernel");
    return 0;
}

static int launch_layernorm(cudaStream_t st, __half *out, float *x, const float *pending_bias, const float *w,
                            const float *b, const int *src, int n_out, int C, float eps, kvh_err *err) {
    layernorm_kernel<<<(n_out + 3) / 4, 128, 0, st>>>(out, x, pending_bias, w, b, src, n_out, C, eps);
    KVH_CUDA_LAUNCHED(err, "layernorm_kernel");
    return 0;
}

static int launch_qkv_epilogue(cudaStream_t st, __half *q, const float *y, const float *bias, const cuda_row *rows,
                               const cuda_entry *entries, const cuda_head *heads, int32_t *dpos, float *dscore,
                               float *dobs, int R, int C, int HS, int NH, int L, int l, int n_ctx, int write_kv,
                               kvh_err *err) {
    dim3 grid(R, (3 * C + 255) / 256);
    qkv_epilogue_kernel<<<grid, 256, 0, st>>>(q, y, bias, rows, entries, heads, dpos, dscore, dobs, C, HS, NH, L, l,
                                              n_ctx, write_kv);
    KVH_CUDA_LAUNCHED(err, "qkv_epilogue_kernel");
    return 0;
}

static int launch_bias_gelu(cudaStream_t st, __half *h, const float *y, const float *bias, int R, int F, kvh_err *err) {
    size_t n = (size_t)R * F;
    size_t blocks = (n + 255) / 256;
    if (blocks > 4096) blocks = 4096;
    bias_gelu_kernel<<<(unsigned)blocks, 256, 0, st>>>(h, y, bias, n, F);
    KVH_CUDA_LAUNCHED(err, "bias_gelu_kernel");
    return 0;
}

static int launch_f32_to_f16(cudaStream_t st, __half *dst, const float *src, size_t n, kvh_err *err) {
    size_t blocks = (n + 255) / 256;
    if (blocks > 8192) blocks = 8192;
    if (blocks == 0) return 0;
    f32_to_f16_kernel<<<(unsigned)blocks, 256, 0, st>>>(dst, src, n);
    KVH_CUDA_LAUNCHED(err, "f32_to_f16_kernel");
    return 0;
}

static int launch_batched_copy(cudaStream_t st, const copy_list *list, kvh_err *err) {
    if (list->n == 0) return 0;
    batched_copy_kernel<<<list->n, 128, 0, st>>>(*list);
    KVH_CUDA_LAUNCHED(err, "batched_copy_kernel");
    return 0;
}

#endif
