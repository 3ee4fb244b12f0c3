/* attention.cuh — attention over the device KV cache (dense fp16 slots, or the packed int8 / int4 slots
 * of kvq_format.h dequantized on the fly: quant.cuh), for decode and prefill alike.
 * Owns: the split-context partial kernel with online softmax (each (row, head, split) block reads each
 * live slot of its split once; no T x T matrix is ever stored), the combine kernel that merges the splits
 * and writes the fp16 output and the per-row softmax statistics, and the score kernel that adds the final
 * probabilities to the device accumulators for layers whose policy asks (same rules as backend_cpu.c
 * accumulate_scores), and the report kernel that writes the probabilities a score-report policy reads (ABI
 * 1.3: decode rows, prefill column sums reduced on the device plus the last report_rows rows) for the host
 * to copy off. Causal masking by position: slot j is visible to a query iff pos[j] <= query pos.
 * The partial and score kernels are templates on the layer's slot format <BITS, ASYM> (BITS 16: dense
 * fp16; 8 / 4: packed, ASYM its asymmetric flag), chosen per layer by the launchers; the format's
 * runtime fields (group, header, slot_bytes) come by value in a kvh_cuda_kvfmt.
 * Layout: kernels, then launchers. Shapes: R rows, NH heads, HS <= 128 head size, S splits, C = NH*HS. */
#ifndef KVH_CUDA_ATTENTION_CUH
#define KVH_CUDA_ATTENTION_CUH

#include <math.h>

#include "common.cuh"
#include "layers.cuh"
#include "quant.cuh"
#include "tables.cuh"

#define ATTN_THREADS 128 /* threads per block = keys per tile */
#define ATTN_MAX_HS 128
#define ATTN_MAX_SPLITS 32

/* ================================ kernels ================================ */

/* q·k for one slot, fp32 accumulation; q in shared memory as fp32. The same code serves the partial and
 * the score kernels, so both see bit-identical scores. */
__device__ __forceinline__ float slot_dot(const float *qs, const __half *k, int HS) {
    float s = 0.0f;
    if ((HS & 7) == 0) {
        const uint4 *kr = (const uint4 *)k;
        for (int i = 0; i < HS / 8; i++) {
            uint4 u = kr[i];
            const __half2 *h2 = (const __half2 *)&u;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float2 f = __half22float2(h2[e]);
                s += qs[8 * i + 2 * e] * f.x;
                s += qs[8 * i + 2 * e + 1] * f.y;
            }
        }
    } else {
        for (int d = 0; d < HS; d++) s += qs[d] * __half2float(k[d]);
    }
    return s;
}

/* q·k of slot j of a head in the layer's format (qg: group sums of q, packed formats only). */
template <int BITS, int ASYM>
__device__ __forceinline__ float kv_dot(const float *qs, const float *qg, const void *k, uint32_t j, int HS,
                                        const kvh_cuda_kvfmt &f) {
    if constexpr (BITS == KVH_CUDA_DENSE_BITS) return slot_dot(qs, (const __half *)k + (size_t)j * HS, HS);
    else return q_slot_dot<BITS, ASYM>(qs, qg, (const unsigned char *)k + (size_t)j * (size_t)f.slot_bytes, f);
}

/* Loads row r's query of head h into qs[HS] (fp32) and, for packed formats, its group sums into qg[NG]
 * (summed in index order, identically in every kernel). Ends with a barrier. */
template <int BITS>
__device__ __forceinline__ void load_query(float *qs, float *qg, const __half *q, int r, int h, int C, int HS,
                                           const kvh_cuda_kvfmt &f) {
    for (int d = threadIdx.x; d < HS; d += blockDim.x) qs[d] = __half2float(q[(size_t)r * C + (size_t)h * HS + d]);
    __syncthreads();
    if constexpr (BITS != KVH_CUDA_DENSE_BITS) {
        for (int g = threadIdx.x; g < f.n_groups; g += blockDim.x) {
            float sum = 0.0f;
            for (int i = 0; i < f.group; i++) sum += qs[g * f.group + i];
            qg[g] = sum;
        }
        __syncthreads();
    }
}

/* Block-wide max / sum over ATTN_THREADS threads (4 warps); red: 32 floats of shared scratch. */
__device__ __forceinline__ float block_max(float v, float *red) {
    v = warp_max(v);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float m = red[0];
    for (int i = 1; i < ATTN_THREADS / 32; i++) m = fmaxf(m, red[i]);
    return m;
}
__device__ __forceinline__ float block_sum(float v, float *red) {
    v = warp_sum(v);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < ATTN_THREADS / 32; i++) s += red[i];
    return s;
}

/* Split `s` of S over n live slots: [j0, j1). */
__device__ __forceinline__ void split_range(uint32_t n, int S, int s, uint32_t *j0, uint32_t *j1) {
    const uint32_t chunk = (n + (uint32_t)S - 1) / (uint32_t)S;
    uint32_t a = chunk * (uint32_t)s;
    uint32_t b = a + chunk;
    if (a > n) a = n;
    if (b > n) b = n;
    *j0 = a;
    *j1 = b;
}

/* grid (R, NH, S), block ATTN_THREADS. Writes the split's running max m, sum l and unnormalized
 * output acc[HS] to part_ml[(r*NH + h)*S + s][2] and part_acc[((r*NH + h)*S + s)*HS ..]. */
template <int BITS, int ASYM>
__global__ void __launch_bounds__(ATTN_THREADS) attn_partial_kernel(
    float *part_acc, float *part_ml, const __half *q /* [R, C] */, const cuda_row *rows, const cuda_entry *entries,
    const cuda_head *heads /* this layer [B, NH] */, const int32_t *dpos, int C, int HS, int NH, int L, int l, int n_ctx,
    int S, float scale, const kvh_cuda_kvfmt f) {
    __shared__ float qs[ATTN_MAX_HS];
    __shared__ float qg[ATTN_MAX_HS];
    __shared__ float ps[ATTN_THREADS];
    __shared__ float vred[ATTN_THREADS];
    __shared__ float red[32];
    const int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
    const cuda_row row = rows[r];
    const cuda_head hd = heads[row.entry * NH + h];
    const int32_t *pos = dpos + cuda_meta_index(entries[row.entry].seq, l, h, 0, L, NH, n_ctx);
    uint32_t j0, j1;
    split_range(hd.n, S, s, &j0, &j1);
    load_query<BITS>(qs, qg, q, r, h, C, HS, f);

    const int ngroups = ATTN_THREADS / HS; /* V accumulation: thread (g, d) sums keys g, g+ngroups, ... */
    const int g = tid / HS, d = tid % HS;
    const bool v_active = g < ngroups;
    q_elem ve = {0, 0, 0}; /* packed formats: where element d of a V slot lives */
    if constexpr (BITS != KVH_CUDA_DENSE_BITS) ve = q_elem_of<BITS>(d, f);
    const size_t vstride = BITS == KVH_CUDA_DENSE_BITS ? (size_t)HS * sizeof(__half) : (size_t)f.slot_bytes;
    float m = -INFINITY, lsum = 0.0f, acc = 0.0f;
    for (uint32_t tile = j0; tile < j1; tile += ATTN_THREADS) {
        const uint32_t j = tile + (uint32_t)tid;
        float sc = -INFINITY;
        if (j < j1 && pos[j] <= row.pos) sc = kv_dot<BITS, ASYM>(qs, qg, hd.k, j, HS, f) * scale;
        const float tmax = block_max(sc, red);
        const float m_new = fmaxf(m, tmax);
        if (m_new == -INFINITY) continue; /* block-uniform: nothing visible yet */
        const float p = sc == -INFINITY ? 0.0f : expf(sc - m_new);
        ps[tid] = p;
        const float tsum = block_sum(p, red); /* its barriers also publish ps[] */
        const float corr = expf(m - m_new);   /* m = -inf gives 0 */
        lsum = lsum * corr + tsum;
        if (v_active) {
            acc *= corr;
            const uint32_t cnt = j1 - tile < ATTN_THREADS ? j1 - tile : ATTN_THREADS;
            const unsigned char *vt = (const unsigned char *)hd.v + (size_t)tile * vstride;
            for (uint32_t jj = (uint32_t)g; jj < cnt; jj += (uint32_t)ngroups) {
                const float pj = ps[jj];
                if (pj == 0.0f) continue;
                const unsigned char *vs = vt + (size_t)jj * vstride;
                if constexpr (BITS == KVH_CUDA_DENSE_BITS) acc += pj * __half2float(((const __half *)vs)[d]);
                else acc += pj * q_dequant<BITS, ASYM>(vs, ve);
            }
        }
        m = m_new;
        __syncthreads(); /* ps[] is rewritten by the next tile */
    }
    vred[tid] = v_active ? acc : 0.0f;
    __syncthreads();
    const size_t part = ((size_t)r * NH + h) * (size_t)S + (size_t)s;
    if (tid < HS) {
        float a = 0.0f;
        for (int gi = 0; gi < ngroups; gi++) a += vred[gi * HS + tid];
        part_acc[part * HS + tid] = a;
    }
    if (tid == 0) {
        part_ml[part * 2] = m;
        part_ml[part * 2 + 1] = lsum;
    }
}

/* grid (R, NH), block HS. Merges the S splits: out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M). Writes
 * the fp16 output att[R, C] and the row's softmax statistics stat[(r*NH + h)][2] = (M, L). */
__global__ void attn_combine_kernel(__half *att, float *stat, const float *part_acc, const float *part_ml, int C,
                                    int HS, int NH, int S) {
    const int r = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    const size_t base = ((size_t)r * NH + h) * (size_t)S;
    float M = -INFINITY;
    for (int s = 0; s < S; s++) M = fmaxf(M, part_ml[(base + s) * 2]);
    float Lsum = 0.0f, o = 0.0f;
    for (int s = 0; s < S; s++) {
        const float ms = part_ml[(base + s) * 2];
        if (ms == -INFINITY) continue;
        const float w = expf(ms - M);
        Lsum += part_ml[(base + s) * 2 + 1] * w;
        o += part_acc[(base + s) * HS + d] * w;
    }
    att[(size_t)r * C + (size_t)h * HS + d] = __float2half(o / Lsum);
    if (d == 0) {
        stat[((size_t)r * NH + h) * 2] = M;
        stat[((size_t)r * NH + h) * 2 + 1] = Lsum;
    }
}

/* grid (R, NH, S), block ATTN_THREADS. Adds p_j = e^(s_j - M) / L to the head's accumulators:
 * score[] when (prefill block and prefill_scores) or (decode and decode_scores); obs[] for the last
 * obs_window queries of a prefill block. A prefill block is an entry with T > 1 (as on the CPU). */
template <int BITS, int ASYM>
__global__ void __launch_bounds__(ATTN_THREADS) attn_scores_kernel(
    float *dscore, float *dobs, const float *stat, const __half *q, const cuda_row *rows, const cuda_entry *entries,
    const cuda_head *heads, const int32_t *dpos, int C, int HS, int NH, int L, int l, int n_ctx, int S, float scale,
    int decode_scores, int prefill_scores, int obs_window, const kvh_cuda_kvfmt f) {
    __shared__ float qs[ATTN_MAX_HS];
    __shared__ float qg[ATTN_MAX_HS];
    const int r = blockIdx.x, h = blockIdx.y, s = blockIdx.z, tid = threadIdx.x;
    const cuda_row row = rows[r];
    const cuda_entry ent = entries[row.entry];
    const bool prefill = ent.T > 1;
    const bool want_score = dscore && (prefill ? prefill_scores : decode_scores);
    const bool want_obs = dobs && prefill && ent.T - row.t <= obs_window;
    if (!want_score && !want_obs) return; /* block-uniform */
    const cuda_head hd = heads[row.entry * NH + h];
    const size_t mi0 = cuda_meta_index(ent.seq, l, h, 0, L, NH, n_ctx);
    const int32_t *pos = dpos + mi0;
    uint32_t j0, j1;
    split_range(hd.n, S, s, &j0, &j1);
    load_query<BITS>(qs, qg, q, r, h, C, HS, f);
    const float M = stat[((size_t)r * NH + h) * 2];
    const float inv = 1.0f / stat[((size_t)r * NH + h) * 2 + 1];
    for (uint32_t j = j0 + (uint32_t)tid; j < j1; j += ATTN_THREADS) {
        if (pos[j] > row.pos) continue;
        const float p = expf(kv_dot<BITS, ASYM>(qs, qg, hd.k, j, HS, f) * scale - M) * inv;
        if (want_score) atomicAdd(&dscore[mi0 + j], p);
        if (want_obs) atomicAdd(&dobs[mi0 + j], p);
    }
}

/* grid (B, NH, G), block ATTN_THREADS. The score report (ABI 1.3) of one (entry, head) of a layer whose
 * policy asked, in the layout of kvcache.h kvh_report_col / kvh_report_row at drep + hd.rep: a decode
 * entry (T == 1) writes its one row; a prefill block (T > 1) the column sums over its T queries, then the
 * rows of its last R = min(T, report_rows) queries. p_j = e^(s_j - M) / L with the row's statistics from
 * the combine kernel (the probabilities attention used), 0 where slot j is after the query (masked). Each
 * thread owns one slot of a tile (tiles grid-strided over the G blocks of the head) and walks the entry's
 * queries in order, so a column sum is reduced on the device in the CPU's order, without atomics, and
 * never more than n + R * n floats per head leave the device (no T x T matrix). */
template <int BITS, int ASYM>
__global__ void __launch_bounds__(ATTN_THREADS) attn_report_kernel(
    float *drep, const float *stat, const __half *q, const cuda_row *rows, const cuda_entry *entries,
    const cuda_head *heads, const int32_t *dpos, int C, int HS, int NH, int L, int l, int n_ctx, float scale,
    int report_rows, const kvh_cuda_kvfmt f) {
    __shared__ float qs[ATTN_MAX_HS];
    __shared__ float qg[ATTN_MAX_HS];
    const int b = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
    const cuda_entry ent = entries[b];
    const cuda_head hd = heads[b * NH + h];
    const int32_t *pos = dpos + cuda_meta_index(ent.seq, l, h, 0, L, NH, n_ctx);
    const int T = ent.T;
    const int R = T < report_rows ? T : report_rows;
    const uint32_t n = hd.n;
    float *out = drep + hd.rep;
    /* tile and t loops are block-uniform: every thread reaches load_query's barriers */
    for (uint32_t tile = blockIdx.z * ATTN_THREADS; tile < n; tile += gridDim.z * ATTN_THREADS) {
        const uint32_t j = tile + (uint32_t)tid;
        const bool live = j < n;
        const int32_t pj = live ? pos[j] : 0;
        float col = 0.0f;
        for (int t = 0; t < T; t++) {
            const int r = ent.row0 + t;
            load_query<BITS>(qs, qg, q, r, h, C, HS, f);
            if (live) {
                float p = 0.0f;
                if (pj <= rows[r].pos) {
                    const float M = stat[((size_t)r * NH + h) * 2];
                    const float inv = 1.0f / stat[((size_t)r * NH + h) * 2 + 1];
                    p = expf(kv_dot<BITS, ASYM>(qs, qg, hd.k, j, HS, f) * scale - M) * inv;
                }
                if (T > 1) col += p;
                if (t >= T - R) out[(T > 1 ? (size_t)(1 + t - (T - R)) * n : 0) + j] = p;
            }
            __syncthreads(); /* qs / qg are rewritten for the next query */
        }
        if (live && T > 1) out[j] = col;
    }
}

/* ================================ launchers ================================ */

/* Splits along the context so that R*NH*S blocks fill the device (about 4 blocks per multiprocessor),
 * without splits shorter than 64 slots. n_max: the longest live count (or n_ctx when the launch must not
 * depend on the step, as in a captured graph). */
static int attn_choose_splits(int R, int NH, uint32_t n_max, int n_sm) {
    const long target = 4L * (n_sm > 0 ? n_sm : 100);
    long want = (target + (long)R * NH - 1) / ((long)R * NH);
    long cap = ((long)n_max + 63) / 64;
    if (want > cap) want = cap;
    if (want > ATTN_MAX_SPLITS) want = ATTN_MAX_SPLITS;
    if (want < 1) want = 1;
    return (int)want;
}

/* Calls FN(BITS, ASYM) with the template arguments of format f (dense fp16, int8 / int4, sym / asym). */
#define KV_FORMAT_DISPATCH(f, FN)                                                               \
    do {                                                                                        \
        switch ((f).bits * 2 + ((f).asym ? 1 : 0)) {                                            \
        case KVH_CUDA_DENSE_BITS * 2: FN(KVH_CUDA_DENSE_BITS, 0); break;                        \
        case 16: FN(8, 0); break;                                                               \
        case 17: FN(8, 1); break;                                                               \
        case 8: FN(4, 0); break;                                                                \
        case 9: FN(4, 1); break;                                                                \
        default: return kvh_fail(err, "cuda backend: no attention kernel for a %d-bit%s slot format", (f).bits, \
                                 (f).asym ? " asymmetric" : "");                                \
        }                                                                                       \
    } while (0)

static int launch_attention(cudaStream_t st, __half *att, float *stat, float *part_acc, float *part_ml,
                            const __half *q, const cuda_row *rows, const cuda_entry *entries, const cuda_head *heads,
                            const int32_t *dpos, int R, int C, int HS, int NH, int L, int l, int n_ctx, int S,
                            const kvh_cuda_kvfmt &f, kvh_err *err) {
    const float scale = 1.0f / sqrtf((float)HS);
#define ATTN_PARTIAL(B_, A_)                                                                                     \
    attn_partial_kernel<B_, A_><<<dim3(R, NH, S), ATTN_THREADS, 0, st>>>(part_acc, part_ml, q, rows, entries, heads, \
                                                                       dpos, C, HS, NH, L, l, n_ctx, S, scale, f)
    KV_FORMAT_DISPATCH(f, ATTN_PARTIAL);
#undef ATTN_PARTIAL
    KVH_CUDA_LAUNCHED(err, "attn_partial_kernel");
    attn_combine_kernel<<<dim3(R, NH), HS, 0, st>>>(att, stat, part_acc, part_ml, C, HS, NH, S);
    KVH_CUDA_LAUNCHED(err, "attn_combine_kernel");
    return 0;
}

static int launch_attn_scores(cudaStream_t st, float *dscore, float *dobs, const float *stat, const __half *q,
                              const cuda_row *rows, const cuda_entry *entries, const cuda_head *heads,
                              const int32_t *dpos, int R, int C, int HS, int NH, int L, int l, int n_ctx, int S,
                              int decode_scores, int prefill_scores, int obs_window, const kvh_cuda_kvfmt &f,
                              kvh_err *err) {
    const float scale = 1.0f / sqrtf((float)HS);
#define ATTN_SCORES(B_, A_)                                                                                       \
    attn_scores_kernel<B_, A_><<<dim3(R, NH, S), ATTN_THREADS, 0, st>>>(dscore, dobs, stat, q, rows, entries, heads, \
                                                                      dpos, C, HS, NH, L, l, n_ctx, S, scale,       \
                                                                      decode_scores, prefill_scores, obs_window, f)
    KV_FORMAT_DISPATCH(f, ATTN_SCORES);
#undef ATTN_SCORES
    KVH_CUDA_LAUNCHED(err, "attn_scores_kernel");
    return 0;
}

/* Blocks per (entry, head) of the report kernel: one per 128-slot tile of the longest head (n_max; n_ctx in
 * a captured graph), at most 64 (the kernel strides over the rest). */
static int attn_report_blocks(uint32_t n_max) {
    uint32_t g = (n_max + ATTN_THREADS - 1) / ATTN_THREADS;
    return g < 1 ? 1 : g > 64 ? 64 : (int)g;
}

/* The score report of one layer whose policy asked, B entries, G blocks per (entry, head). */
static int launch_attn_report(cudaStream_t st, float *drep, const float *stat, const __half *q, const cuda_row *rows,
                              const cuda_entry *entries, const cuda_head *heads, const int32_t *dpos, int B, int C,
                              int HS, int NH, int L, int l, int n_ctx, int G, int report_rows,
                              const kvh_cuda_kvfmt &f, kvh_err *err) {
    const float scale = 1.0f / sqrtf((float)HS);
#define ATTN_REPORT(B_, A_)                                                                                         \
    attn_report_kernel<B_, A_><<<dim3(B, NH, G), ATTN_THREADS, 0, st>>>(drep, stat, q, rows, entries, heads, dpos, C, \
                                                                      HS, NH, L, l, n_ctx, scale, report_rows, f)
    KV_FORMAT_DISPATCH(f, ATTN_REPORT);
#undef ATTN_REPORT
    KVH_CUDA_LAUNCHED(err, "attn_report_kernel");
    return 0;
}

#endif
