/* lorc.c — LoRC (Zhang et al. 2024, "LoRC: Low-Rank Compression for LLMs KV Cache with a Progressive
 * Compression Strategy") as a store: each head's W_k (and W_v) is factored once, W = U S V^T (SVD), and
 * a token's key is held as its rank-r latent c = (k - b_k) V_r, so that K ~ c V_r^T + b_k = x W_r + b_k
 * with W_r the best rank-r approximation of W_k (Eckart-Young). Exact when W_k has rank <= r.
 * Progressive compression (the paper's strategy: deeper layers tolerate more compression, since errors
 * in early layers propagate): layer l gets rank round(rank + (last_rank - rank) * l / (L - 1)).
 * Owns: the factorization (host->tensor(), ABI 1.3, in create()), the slot format, attention over the
 * latents without reconstructing K or V: q.k_j = (V_r^T q) . c_j + q.b_k, and
 * sum_j p_j v_j = (sum_j p_j c_j) V_r^T + b_v (the probabilities sum to 1).
 * Slot format (K and V alike): uint32 head index, then r floats (bits = 32), or with bits = 8 an fp32
 * scale s and r int8 codes u (symmetric, per token: s = max|c_i| / 127, u_i = round(c_i / s), the latent
 * read back as s * u_i). attend() and decode() take no head argument in ABI 1.3, so the slot carries it
 * (append() knows it). 4 + 4r bytes (bits 32) or 8 + r bytes (bits 8) instead of 4 * head_dim.
 * Composing with int8.so on one layer is impossible (a layer has one store, and int8 would quantize the
 * head_dim-wide K/V rows lorc never materializes); quantized latents are this store's `bits = 8`.
 * SVD: the eigen-decomposition of the Gram matrix G = W^T W (head_dim x head_dim) by cyclic Jacobi in
 * double; V_r = the eigenvectors of the r largest eigenvalues. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <kvp/kvp.h>

#define LORC_MAX_HS 256 /* attend() keeps two head_dim-sized rows on the stack */

typedef struct lorc_state {
    uint32_t hs, n_head, rk, rv;
    uint32_t bits; /* 32: fp32 latents; 8: int8 codes + an fp32 scale per token */
    float *vk;   /* [n_head][hs * rk]: V_r of W_k, row d = component d, column i = latent i */
    float *vv;   /* [n_head][hs * rv] */
    float *bk;   /* [n_head][hs] */
    float *bv;   /* [n_head][hs] */
} lorc_state;

static const kvp_param params[] = {
    {.name = "rank", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = LORC_MAX_HS,
     .help = "rank of the first layer's K and V latents (0 = head_dim / 2)"},
    {.name = "last_rank", .type = KVP_PARAM_INT, .default_value = 0, .min_value = 0, .max_value = LORC_MAX_HS,
     .help = "rank of the last layer, linear in between (0 = rank: the same everywhere)"},
    {.name = "bits", .type = KVP_PARAM_INT, .default_value = 32, .min_value = 8, .max_value = 32,
     .help = "32: fp32 latents; 8: int8 latents with one fp32 scale per token (the int8 composition)"},
};

static int fail(const kvp_host *host, const char *msg) {
    host->set_error(host->ctx, msg);
    return KVP_ERROR;
}

/* Cyclic Jacobi on the symmetric a[n*n] (destroyed): eigenvalues in w[n], eigenvectors in columns of v. */
static void jacobi(double *a, double *v, double *w, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < n; j++) v[i * n + j] = i == j;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, diag = 0;
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t j = 0; j < n; j++) {
                if (i == j) diag += a[i * n + j] * a[i * n + j];
                else off += a[i * n + j] * a[i * n + j];
            }
        if (off <= 1e-30 * (diag > 0 ? diag : 1)) break;
        for (uint32_t p = 0; p < n; p++)
            for (uint32_t q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (apq == 0) continue;
                double theta = (a[q * n + q] - a[p * n + p]) / (2 * apq);
                double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
                double c = 1 / sqrt(t * t + 1), s = t * c;
                for (uint32_t k = 0; k < n; k++) { /* A = J^T A J */
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (uint32_t k = 0; k < n; k++) {
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (uint32_t k = 0; k < n; k++) {
                    double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (uint32_t i = 0; i < n; i++) w[i] = a[i * n + i];
}

/* out[hs * r] = the r leading right singular vectors of W's columns col0..col0+hs-1 (W: [C, ld] rows). */
static void top_vectors(const float *W, uint32_t C, uint32_t ld, uint32_t col0, uint32_t hs, uint32_t r, double *g,
                        double *v, double *w, float *out) {
    for (uint32_t i = 0; i < hs; i++)
        for (uint32_t j = i; j < hs; j++) {
            double s = 0;
            for (uint32_t c = 0; c < C; c++) s += (double)W[(size_t)c * ld + col0 + i] * W[(size_t)c * ld + col0 + j];
            g[i * hs + j] = g[j * hs + i] = s;
        }
    jacobi(g, v, w, hs);
    for (uint32_t k = 0; k < r; k++) { /* k-th largest eigenvalue (ties: smaller index) */
        uint32_t best = hs;
        for (uint32_t i = 0; i < hs; i++)
            if (w[i] == w[i] && (best == hs || w[i] > w[best])) best = i;
        for (uint32_t d = 0; d < hs; d++) out[d * r + k] = (float)v[d * hs + best];
        w[best] = NAN; /* taken */
    }
}

static int lorc_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    char msg[200];
    if (!KVP_HOST_HAS(host, tensor) || !host->tensor)
        return fail(host, "this host predates ABI 1.3 (no host->tensor weight access): upgrade kvhost");
    const uint32_t hs = layer->head_dim, nh = layer->n_kv_head;
    if (hs > LORC_MAX_HS || layer->n_q_head != nh) return fail(host, "needs head_dim <= 256 and as many KV heads as query heads");
    int64_t r0 = kvp_param_int(host, "rank"), r1 = kvp_param_int(host, "last_rank");
    const int64_t bits = kvp_param_int(host, "bits");
    if (bits != 32 && bits != 8) {
        snprintf(msg, sizeof msg, "bits = %lld: must be 32 (fp32 latents) or 8 (int8 latents)", (long long)bits);
        return fail(host, msg);
    }
    if (r0 == 0) r0 = hs / 2 ? hs / 2 : 1;
    if (r1 == 0) r1 = r0;
    if (r0 > (int64_t)hs || r1 > (int64_t)hs) {
        snprintf(msg, sizeof msg, "rank %lld / last_rank %lld larger than head_dim %u", (long long)r0, (long long)r1, hs);
        return fail(host, msg);
    }
    double f = layer->n_layer > 1 ? (double)layer->layer / (double)(layer->n_layer - 1) : 0.0;
    uint32_t r = (uint32_t)lround((double)r0 + (double)(r1 - r0) * f);
    if (r < 1) r = 1;
    kvp_tensor w = {.struct_size = sizeof w}, b = {.struct_size = sizeof b};
    if (host->tensor(host->ctx, layer->layer, "attn.c_attn.weight", &w) != KVP_OK ||
        host->tensor(host->ctx, layer->layer, "attn.c_attn.bias", &b) != KVP_OK)
        return KVP_ERROR; /* the host set the message */
    const uint32_t C = w.rows;
    if (w.cols != 3 * nh * hs || b.cols != w.cols) return fail(host, "c_attn has an unexpected shape");
    lorc_state *s = host->alloc(host->ctx, sizeof *s);
    float *vk = s ? host->alloc(host->ctx, (size_t)nh * hs * r * sizeof(float)) : NULL;
    float *vv = vk ? host->alloc(host->ctx, (size_t)nh * hs * r * sizeof(float)) : NULL;
    float *bk = vv ? host->alloc(host->ctx, (size_t)nh * hs * sizeof(float)) : NULL;
    float *bv = bk ? host->alloc(host->ctx, (size_t)nh * hs * sizeof(float)) : NULL;
    double *g = bv ? host->alloc(host->ctx, (size_t)3 * hs * hs * sizeof(double)) : NULL;
    if (!g) return fail(host, "out of memory"); /* the host frees what was allocated */
    double *v = g + (size_t)hs * hs, *ev = v + (size_t)hs * hs;
    const uint32_t CC = nh * hs;
    for (uint32_t h = 0; h < nh; h++) {
        top_vectors(w.data, C, w.cols, CC + h * hs, hs, r, g, v, ev, vk + (size_t)h * hs * r);
        top_vectors(w.data, C, w.cols, 2 * CC + h * hs, hs, r, g, v, ev, vv + (size_t)h * hs * r);
        memcpy(bk + (size_t)h * hs, b.data + CC + h * hs, hs * sizeof(float));
        memcpy(bv + (size_t)h * hs, b.data + 2 * CC + h * hs, hs * sizeof(float));
    }
    host->free(host->ctx, g);
    *s = (lorc_state){.hs = hs, .n_head = nh, .rk = r, .rv = r, .bits = (uint32_t)bits, .vk = vk, .vv = vv, .bk = bk,
                      .bv = bv};
    out->state = s;
    out->k_slot_bytes = out->v_slot_bytes = (uint32_t)(bits == 8 ? 2 * sizeof(uint32_t) + r : sizeof(uint32_t) + r * sizeof(float));
    return KVP_OK;
}

static void lorc_destroy(void *state) { (void)state; /* host->alloc memory is freed by the host */ }

static size_t slot_bytes(const lorc_state *s) {
    return s->bits == 8 ? 2 * sizeof(uint32_t) + s->rk : sizeof(uint32_t) + (size_t)s->rk * sizeof(float);
}

/* An int8 slot's scale and codes (after the head index). */
static float q8_scale(const void *slot) {
    float sc;
    memcpy(&sc, (const char *)slot + sizeof(uint32_t), sizeof sc);
    return sc;
}
static const int8_t *q8_codes(const void *slot) { return (const int8_t *)((const char *)slot + 2 * sizeof(uint32_t)); }

/* slot = head, then the latent of `row` (head_dim floats): (row - b) V_r, as floats or int8 codes. */
static void encode_row(const lorc_state *s, uint32_t head, const float *row, const float *V, const float *b, void *slot) {
    const uint32_t r = s->rk;
    float lat[LORC_MAX_HS];
    memcpy(slot, &head, sizeof head);
    for (uint32_t i = 0; i < r; i++) lat[i] = 0.0f;
    for (uint32_t d = 0; d < s->hs; d++) {
        const float x = row[d] - b[d];
        for (uint32_t i = 0; i < r; i++) lat[i] += x * V[d * r + i];
    }
    if (s->bits == 32) {
        memcpy((char *)slot + sizeof(uint32_t), lat, r * sizeof(float));
        return;
    }
    float amax = 0.0f;
    for (uint32_t i = 0; i < r; i++) amax = fmaxf(amax, fabsf(lat[i]));
    const float sc = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int8_t *u = (int8_t *)((char *)slot + 2 * sizeof(uint32_t));
    memcpy((char *)slot + sizeof(uint32_t), &sc, sizeof sc);
    for (uint32_t i = 0; i < r; i++) {
        float c = roundf(lat[i] * inv);
        u[i] = (int8_t)(c > 127.0f ? 127 : c < -127.0f ? -127 : c);
    }
}

/* The latent of a slot as floats (what attend() uses: s * u for int8 slots). */
static void latent(const lorc_state *s, const void *slot, float *lat) {
    if (s->bits == 32) {
        memcpy(lat, (const char *)slot + sizeof(uint32_t), s->rk * sizeof(float));
        return;
    }
    const float sc = q8_scale(slot);
    const int8_t *u = q8_codes(slot);
    for (uint32_t i = 0; i < s->rk; i++) lat[i] = sc * (float)u[i];
}

static int lorc_append(void *state, const kvp_append_args *a) {
    const lorc_state *s = state;
    const size_t sb = slot_bytes(s);
    for (uint32_t t = 0; t < a->n_new; t++) {
        const size_t slot = (size_t)a->first_slot + t;
        const uint32_t h = a->head;
        encode_row(s, h, a->k_rows + t * a->row_stride, s->vk + (size_t)h * s->hs * s->rk, s->bk + (size_t)h * s->hs,
                   (char *)a->k_slots + slot * sb);
        encode_row(s, h, a->v_rows + t * a->row_stride, s->vv + (size_t)h * s->hs * s->rv, s->bv + (size_t)h * s->hs,
                   (char *)a->v_slots + slot * sb);
    }
    return KVP_OK;
}

static void lorc_decode(void *state, uint32_t which, const void *slot, float *row) {
    const lorc_state *s = state;
    uint32_t h;
    memcpy(&h, slot, sizeof h);
    if (h >= s->n_head) h = 0; /* never written by this store: decode as head 0 rather than read out of bounds */
    float lat[LORC_MAX_HS];
    latent(s, slot, lat);
    const float *V = (which == KVP_WHICH_K ? s->vk : s->vv) + (size_t)h * s->hs * s->rk;
    const float *b = (which == KVP_WHICH_K ? s->bk : s->bv) + (size_t)h * s->hs;
    for (uint32_t d = 0; d < s->hs; d++) {
        float x = b[d];
        for (uint32_t i = 0; i < s->rk; i++) x += lat[i] * V[d * s->rk + i];
        row[d] = x;
    }
}

static void lorc_attend(void *state, const kvp_attend_args *a) {
    const lorc_state *s = state;
    const uint32_t r = s->rk, n = a->n;
    const size_t sb = slot_bytes(s);
    uint32_t h;
    memcpy(&h, a->k_slots, sizeof h); /* n >= 1: the query sees at least itself */
    if (h >= s->n_head) h = 0;
    const float *Vk = s->vk + (size_t)h * s->hs * r, *Vv = s->vv + (size_t)h * s->hs * r;
    const float *bk = s->bk + (size_t)h * s->hs, *bv = s->bv + (size_t)h * s->hs;
    float qk[LORC_MAX_HS], acc[LORC_MAX_HS];
    float qb = 0.0f;
    for (uint32_t i = 0; i < r; i++) qk[i] = 0.0f;
    for (uint32_t d = 0; d < s->hs; d++) {
        qb += a->q[d] * bk[d];
        for (uint32_t i = 0; i < r; i++) qk[i] += a->q[d] * Vk[d * r + i];
    }
    float mx = -INFINITY;
    for (uint32_t j = 0; j < n; j++) {
        if (a->pos[j] > a->q_pos) {
            a->probs[j] = -INFINITY;
            continue;
        }
        const char *slot = (const char *)a->k_slots + j * sb;
        float dot = qb;
        if (s->bits == 32) {
            const float *c = (const float *)(slot + sizeof(uint32_t));
            for (uint32_t i = 0; i < r; i++) dot += qk[i] * c[i];
        } else { /* q . (s u) = s (q . u) */
            const int8_t *u = q8_codes(slot);
            float du = 0.0f;
            for (uint32_t i = 0; i < r; i++) du += qk[i] * (float)u[i];
            dot += q8_scale(slot) * du;
        }
        a->probs[j] = dot * a->scale;
        if (a->probs[j] > mx) mx = a->probs[j];
    }
    float sum = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        a->probs[j] = a->probs[j] == -INFINITY ? 0.0f : expf(a->probs[j] - mx);
        sum += a->probs[j];
    }
    const float inv = 1.0f / sum;
    for (uint32_t i = 0; i < r; i++) acc[i] = 0.0f;
    for (uint32_t j = 0; j < n; j++) {
        a->probs[j] *= inv;
        if (a->probs[j] == 0.0f) continue;
        const char *slot = (const char *)a->v_slots + j * sb;
        if (s->bits == 32) {
            const float *c = (const float *)(slot + sizeof(uint32_t));
            for (uint32_t i = 0; i < r; i++) acc[i] += a->probs[j] * c[i];
        } else {
            const float w = a->probs[j] * q8_scale(slot);
            const int8_t *u = q8_codes(slot);
            for (uint32_t i = 0; i < r; i++) acc[i] += w * (float)u[i];
        }
    }
    for (uint32_t d = 0; d < s->hs; d++) {
        float x = bv[d];
        for (uint32_t i = 0; i < r; i++) x += acc[i] * Vv[d * r + i];
        a->out[d] = x;
    }
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .n_params = sizeof params / sizeof params[0],
    .name = "lorc",
    .version = "1.1.0",
    .summary = "LoRC: K and V as rank-r latents (fp32 or int8) from the SVD of each head's W_k / W_v, progressive rank",
    .params = params,
    .create = lorc_create,
    .destroy = lorc_destroy,
    .decode = lorc_decode,
    .attend = lorc_attend,
    .append = lorc_append,
};

KVP_PLUGIN(descriptor)
