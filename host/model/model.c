/* model.c — GPT-2 weights: loading a Hugging Face directory (config.json + model.safetensors) or building
 * seeded random weights at a preset's shapes, and releasing them.
 * Owns: kvh_model_load / kvh_model_init_random / kvh_model_free / kvh_model_weight_bytes_per_token, the
 * GPT-2 tensor-name map, the single fp32 arena (converted F16/BF16 or random weights).
 * Does not own: config.json parsing and presets (model_config.c), which files hold the weights
 * (checkpoint.c: single file or shards), the safetensors container (safetensors.c), the tokenizer,
 * the forward pass.
 *
 * Storage: F32 tensors whose data is 4-byte aligned point straight into the read-only file mapping
 * (zero-copy) of a single-file checkpoint; every other tensor, and every tensor of a sharded one, is
 * converted into one arena allocated once, except the four linear matrices of each layer of a
 * single-file F16/BF16 checkpoint: those stay in the file's bytes (deferred, model.h) until a weight
 * format packs them (kvh_model_deferred_to_f32, one matrix of fp32 at a time) or a session needs them
 * in fp32 (kvh_model_materialize: one allocation per matrix). Random weights live entirely in the
 * arena, each tensor starting on a 64-byte boundary. */
#define _GNU_SOURCE /* madvise(MADV_HUGEPAGE) */
#include "model/model.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/mmap_guard.h"
#include "model/checkpoint.h"
#include "model/hub.h"
#include "model/safetensors.h"

#define CONFIG_MAX_BYTES (1u << 20) /* config.json files are ~1 KB; refuse anything above 1 MiB */
#define CHUNK_FLOATS ((size_t)1 << 16) /* unit of parallel work: 256 KiB of fp32 */
#define ARENA_ALIGN_FLOATS 16          /* tensors in the arena start on 64-byte boundaries */

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

void kvh_model_free(kvh_model *m) {
    if (!m) return;
    if (m->deferred)
        for (int i = 0; i < m->cfg.n_layer * 4; i++) free(m->deferred[i].fp32);
    free(m->deferred);
    free(m->layers);
    free(m->arena);
    if (m->map_base) {
        kvh_mmap_guard_remove(m->map_base);
        munmap(m->map_base, m->map_len);
    }
    memset(m, 0, sizeof *m);
}

size_t kvh_model_weight_bytes_per_token(const kvh_model *m) {
    const kvh_model_config *c = &m->cfg;
    size_t V = (size_t)c->n_vocab, C = (size_t)c->n_embd, L = (size_t)c->n_layer, F = (size_t)c->n_inner;
    size_t per_layer = 4 * C * C + 2 * C * F + 9 * C + F; /* every layer matrix and vector */
    size_t floats = L * per_layer + 2 * C /* ln_f */ + V * C /* wte as LM head */ + C /* one wpe row */;
    return floats * sizeof(float);
}

/* Fp32 arena of n floats. Large arenas are 2 MiB aligned and advised as huge pages: random init and
 * conversion write every page once, and 4 KiB page faults dominate that cost otherwise. */
static float *arena_alloc(size_t n_floats) {
    size_t bytes;
    if (kvh_size_mul(n_floats, sizeof(float), &bytes) != 0 || bytes == 0) return NULL;
    const size_t huge = (size_t)2 << 20;
    void *p = NULL;
    if (posix_memalign(&p, bytes >= huge ? huge : 64, bytes) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= huge) (void)madvise(p, bytes / huge * huge, MADV_HUGEPAGE); /* advice only */
#endif
    return p;
}

/* ---- chunked parallel work ----------------------------------------------------------------------
 * A list of jobs over float ranges, split into CHUNK_FLOATS pieces that OpenMP threads take in any
 * order. Each piece's result depends only on (job, element index), so output is independent of the
 * thread count and schedule. */

typedef enum { JOB_NORMAL, JOB_ZERO, JOB_ONE, JOB_CONVERT } job_kind;

typedef struct work_job {
    job_kind kind;
    float *dst;                /* [n] */
    size_t n;
    float std;                 /* JOB_NORMAL */
    uint64_t key;              /* JOB_NORMAL: per-tensor stream key */
    const kvh_st_tensor *src;  /* JOB_CONVERT */
} work_job;

/* splitmix64 finalizer (Steele, Lea, Flood 2014): a bijective 64-bit mix with full avalanche. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Approximately normal samples: element i of a tensor hashes (key, i) with splitmix64 in counter mode
 * and sums the four 16-bit fields of the hash (Irwin-Hall with 4 terms: mean 2, variance 4/12 in
 * units of 65536). Rescaled to mean 0 and the requested std, the samples are bounded to +-3.46 std
 * (sqrt(12)) with excess kurtosis -0.3: close enough to a normal for an initialization whose only job
 * is to give realistic magnitudes, and ~1 ns per element instead of Box-Muller's log/sqrt/cos. */
static void fill_normal(float *dst, size_t start, size_t len, uint64_t key, float std) {
    const float scale = std * 1.7320508075688772f / 65536.0f; /* sqrt(3): Irwin-Hall(4) std is 1/sqrt(3) */
    const float center = 131072.0f - 2.0f; /* 4 * 32768 - 4 * 0.5: sum of (u + 0.5) centred */
    for (size_t i = 0; i < len; i++) {
        uint64_t h = mix64(key + (start + i + 1) * 0x9e3779b97f4a7c15ull);
        uint32_t s = (uint32_t)(h & 0xffff) + (uint32_t)((h >> 16) & 0xffff) + (uint32_t)((h >> 32) & 0xffff) +
                     (uint32_t)(h >> 48);
        dst[start + i] = ((float)s - center) * scale;
    }
}

static void run_piece(const work_job *j, size_t start, size_t len) {
    switch (j->kind) {
    case JOB_NORMAL:
        fill_normal(j->dst, start, len, j->key, j->std);
        break;
    case JOB_ZERO:
        memset(j->dst + start, 0, len * sizeof(float));
        break;
    case JOB_ONE:
        for (size_t i = 0; i < len; i++) j->dst[start + i] = 1.0f;
        break;
    case JOB_CONVERT: {
        kvh_st_tensor view = *j->src; /* sub-range of the source tensor */
        size_t esz = j->src->n_elems ? j->src->n_bytes / j->src->n_elems : 0;
        view.data = (const unsigned char *)j->src->data + start * esz;
        view.n_elems = len;
        view.n_bytes = len * esz;
        kvh_st_to_f32(&view, j->dst + start);
        break;
    }
    }
}

static void run_jobs(const work_job *jobs, int n_jobs, size_t *first_chunk /* [n_jobs + 1] scratch */) {
    first_chunk[0] = 0;
    for (int i = 0; i < n_jobs; i++)
        first_chunk[i + 1] = first_chunk[i] + (jobs[i].n + CHUNK_FLOATS - 1) / CHUNK_FLOATS;
    long total = (long)first_chunk[n_jobs];
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4)
#endif
    for (long c = 0; c < total; c++) {
        int lo = 0, hi = n_jobs - 1; /* job with first_chunk[job] <= c < first_chunk[job + 1] */
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (first_chunk[mid] <= (size_t)c) lo = mid;
            else hi = mid - 1;
        }
        size_t start = ((size_t)c - first_chunk[lo]) * CHUNK_FLOATS;
        size_t len = jobs[lo].n - start < CHUNK_FLOATS ? jobs[lo].n - start : CHUNK_FLOATS;
        run_piece(&jobs[lo], start, len);
    }
}

/* ---- weight slots --------------------------------------------------------------------------------
 * The 4 + 12 L tensors of a GPT-2 in file order, each with its expected shape and the pointer it sets. */

enum { SLOT_NAME_MAX = 96 };

typedef struct slot {
    char name[SLOT_NAME_MAX]; /* without the optional "transformer." prefix */
    int n_dims;
    int64_t shape[2];
    const float **dst;
    job_kind init;     /* random init kind */
    float std;         /* random init std */
    int tag;           /* distinct per tensor: derives the random stream */
    int mat;           /* layer * 4 + KVH_MAT_* for a layer's linear matrix, else -1 */
} slot;

static int slots_build(kvh_model *m, slot **out, int *n_out) {
    const kvh_model_config *c = &m->cfg;
    int L = c->n_layer;
    int64_t V = c->n_vocab, P = c->n_positions, C = c->n_embd, F = c->n_inner;
    int n = 4 + 12 * L;
    slot *s = calloc((size_t)n, sizeof *s);
    if (!s) return -1;
    const float std = 0.02f;
    /* GPT-2 scales the init of residual projections by 1/sqrt(2L) (two residual adds per layer). */
    const float std_proj = 0.02f / sqrtf(2.0f * (float)L);
    int k = 0;
/* nm_fmt is a printf format taking idx; "%.0d" prints nothing for idx 0 (names without a layer). */
#define SLOT(nm_fmt, idx, d0, d1, nd, ptr, kind, sd)                                                     \
    do {                                                                                                \
        snprintf(s[k].name, SLOT_NAME_MAX, nm_fmt, idx);                                                \
        s[k].n_dims = nd;                                                                               \
        s[k].shape[0] = d0;                                                                             \
        s[k].shape[1] = d1;                                                                             \
        s[k].dst = ptr;                                                                                 \
        s[k].init = kind;                                                                               \
        s[k].std = sd;                                                                                  \
        s[k].tag = k + 1;                                                                               \
        s[k].mat = -1;                                                                                  \
        k++;                                                                                            \
    } while (0)
    SLOT("wte.weight%.0d", 0, V, C, 2, &m->wte, JOB_NORMAL, std);
    SLOT("wpe.weight%.0d", 0, P, C, 2, &m->wpe, JOB_NORMAL, std);
    for (int i = 0; i < L; i++) {
        kvh_layer_weights *w = &m->layers[i];
        SLOT("h.%d.ln_1.weight", i, C, 0, 1, &w->ln1_w, JOB_ONE, 0.0f);
        SLOT("h.%d.ln_1.bias", i, C, 0, 1, &w->ln1_b, JOB_ZERO, 0.0f);
        SLOT("h.%d.attn.c_attn.weight", i, C, 3 * C, 2, &w->attn_w, JOB_NORMAL, std);
        s[k - 1].mat = i * 4 + KVH_MAT_ATTN_QKV;
        SLOT("h.%d.attn.c_attn.bias", i, 3 * C, 0, 1, &w->attn_b, JOB_ZERO, 0.0f);
        SLOT("h.%d.attn.c_proj.weight", i, C, C, 2, &w->proj_w, JOB_NORMAL, std_proj);
        s[k - 1].mat = i * 4 + KVH_MAT_ATTN_PROJ;
        SLOT("h.%d.attn.c_proj.bias", i, C, 0, 1, &w->proj_b, JOB_ZERO, 0.0f);
        SLOT("h.%d.ln_2.weight", i, C, 0, 1, &w->ln2_w, JOB_ONE, 0.0f);
        SLOT("h.%d.ln_2.bias", i, C, 0, 1, &w->ln2_b, JOB_ZERO, 0.0f);
        SLOT("h.%d.mlp.c_fc.weight", i, C, F, 2, &w->fc_w, JOB_NORMAL, std);
        s[k - 1].mat = i * 4 + KVH_MAT_MLP_FC;
        SLOT("h.%d.mlp.c_fc.bias", i, F, 0, 1, &w->fc_b, JOB_ZERO, 0.0f);
        SLOT("h.%d.mlp.c_proj.weight", i, F, C, 2, &w->fcproj_w, JOB_NORMAL, std_proj);
        s[k - 1].mat = i * 4 + KVH_MAT_MLP_PROJ;
        SLOT("h.%d.mlp.c_proj.bias", i, C, 0, 1, &w->fcproj_b, JOB_ZERO, 0.0f);
    }
    SLOT("ln_f.weight%.0d", 0, C, 0, 1, &m->lnf_w, JOB_ONE, 0.0f);
    SLOT("ln_f.bias%.0d", 0, C, 0, 1, &m->lnf_b, JOB_ZERO, 0.0f);
#undef SLOT
    *out = s;
    *n_out = n;
    return 0;
}

static size_t slot_elems(const slot *s) {
    return (size_t)s->shape[0] * (s->n_dims == 2 ? (size_t)s->shape[1] : 1);
}

static void shape_str(char *buf, size_t cap, int n_dims, const int64_t *shape) {
    size_t off = 0;
    off += (size_t)snprintf(buf + off, cap - off, "[");
    for (int d = 0; d < n_dims && off < cap; d++)
        off += (size_t)snprintf(buf + off, cap - off, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (off < cap) snprintf(buf + off, cap - off, "]");
}

/* ---- random weights ------------------------------------------------------------------------------ */

int kvh_model_init_random(kvh_model *m, const kvh_model_config *cfg, uint64_t seed, const char *name,
                          kvh_err *err) {
    memset(m, 0, sizeof *m);
    if (kvh_model_config_check(cfg, name, err) != 0) return -1;
    m->cfg = *cfg;
    snprintf(m->name, sizeof m->name, "%s", name);
    snprintf(m->source, sizeof m->source, "%s", name);
    m->is_random = true;
    m->seed = seed;
    m->layers = calloc((size_t)cfg->n_layer, sizeof *m->layers);
    slot *slots = NULL;
    int n = 0;
    work_job *jobs = NULL;
    size_t *scratch = NULL;
    if (!m->layers || slots_build(m, &slots, &n) != 0) goto oom;

    size_t total = 0;
    for (int i = 0; i < n; i++) total += round_up(slot_elems(&slots[i]), ARENA_ALIGN_FLOATS);
    m->arena = arena_alloc(total);
    jobs = calloc((size_t)n, sizeof *jobs);
    scratch = calloc((size_t)n + 1, sizeof *scratch);
    if (!m->arena || !jobs || !scratch) goto oom;
    m->arena_floats = total;

    uint64_t seed_key = mix64(seed ^ 0x6b76686f73742d72ull); /* "kvhost-r" */
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t ne = slot_elems(&slots[i]);
        float *p = m->arena + off;
        *slots[i].dst = p;
        /* the padding up to the next 64-byte boundary is zeroed so the whole arena is defined */
        for (size_t k = ne; k < round_up(ne, ARENA_ALIGN_FLOATS); k++) p[k] = 0.0f;
        jobs[i] = (work_job){.kind = slots[i].init, .dst = p, .n = ne, .std = slots[i].std,
                             .key = mix64(seed_key + (uint64_t)slots[i].tag * 0xd1b54a32d192ed03ull)};
        m->n_params += ne;
        off += round_up(ne, ARENA_ALIGN_FLOATS);
    }
    run_jobs(jobs, n, scratch);
    free(slots);
    free(jobs);
    free(scratch);
    return 0;
oom:;
    size_t bytes = kvh_model_config_param_count(cfg) * sizeof(float);
    free(slots);
    free(jobs);
    free(scratch);
    kvh_model_free(m);
    return kvh_fail(err, "%s: out of memory allocating %.2f GB of random fp32 weights", name, (double)bytes / 1e9);
}

static int load_random(kvh_model *m, const char *spec, kvh_err *err) {
    /* spec = "random:NAME" or "random:NAME:SEED" */
    const char *rest = spec + strlen("random:");
    char preset_name[64];
    const char *colon = strchr(rest, ':');
    size_t nlen = colon ? (size_t)(colon - rest) : strlen(rest);
    if (nlen == 0 || nlen >= sizeof preset_name)
        return kvh_fail(err, "model spec '%s': expected random:NAME or random:NAME:SEED (NAME one of gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl)", spec);
    memcpy(preset_name, rest, nlen);
    preset_name[nlen] = '\0';
    uint64_t seed = KVH_MODEL_DEFAULT_SEED;
    if (colon) {
        const char *s = colon + 1;
        char *end = NULL;
        errno = 0;
        unsigned long long v = strtoull(s, &end, 10);
        if (*s < '0' || *s > '9' || errno != 0 || *end != '\0')
            return kvh_fail(err, "model spec '%s': seed '%s' is not a non-negative decimal integer below 2^64",
                            spec, s);
        seed = (uint64_t)v;
    }
    kvh_model_config cfg;
    if (kvh_model_preset(preset_name, &cfg, err) != 0) return kvh_fail_prefix(err, "model spec '%s'", spec);
    char name[256];
    snprintf(name, sizeof name, "random:%s", preset_name);
    if (kvh_model_init_random(m, &cfg, seed, name, err) != 0) return -1;
    snprintf(m->source, sizeof m->source, "%s", spec);
    return 0;
}

/* ---- Hugging Face directory ---------------------------------------------------------------------- */

/* Tensors a GPT-2 checkpoint may carry that the loader does not use. */
static bool ignorable_tensor(const char *name, int n_layer) {
    const char *p = name;
    if (strncmp(p, "transformer.", 12) == 0) p += 12;
    /* lm_head.weight: GPT-2 ties the LM head to wte (GPT2LMHeadModel saves it, usually deduplicated
     * away). We always use wte; a checkpoint whose lm_head differs from wte would be an untied model,
     * which config.json declares with tie_word_embeddings=false and the config parser rejects. */
    if (strcmp(p, "lm_head.weight") == 0) return true;
    if (strncmp(p, "h.", 2) != 0) return false;
    p += 2;
    if (*p < '0' || *p > '9') return false;
    char *end;
    long layer = strtol(p, &end, 10);
    if (layer >= n_layer) return false;
    /* the causal-mask buffers attn.bias [1,1,P,P] and attn.masked_bias [] of older transformers */
    return strcmp(end, ".attn.bias") == 0 || strcmp(end, ".attn.masked_bias") == 0;
}

static void dir_basename(const char *path, char *out, size_t cap) {
    char buf[4096];
    const char *src = path;
    if (realpath(path, buf)) src = buf;
    size_t len = strlen(src);
    while (len > 1 && src[len - 1] == '/') len--;
    size_t start = len;
    while (start > 0 && src[start - 1] != '/') start--;
    size_t n = len - start;
    if (n >= cap) n = cap - 1;
    memcpy(out, src + start, n);
    out[n] = '\0';
}

/* Gives back the whole pages inside [p, p + bytes) of a read-only file mapping: they come back from the
 * file if read again, so this only lowers the resident set. */
static size_t release_range(const void *p, size_t bytes) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE), a = (uintptr_t)p;
    const uintptr_t lo = (a + page - 1) & ~(page - 1), hi = (a + bytes) & ~(page - 1);
    if (hi <= lo) return 0;
    return madvise((void *)lo, hi - lo, MADV_DONTNEED) == 0 ? (size_t)(hi - lo) : 0;
}

/* Index of the first non-finite element of an F16/BF16 run (all-ones exponent), or len. */
static size_t first_nonfinite_16(const void *data, int dtype, size_t len) {
    const unsigned char *p = data;
    const unsigned expmask = dtype == KVH_ST_F16 ? 0x7c00u : 0x7f80u;
    for (size_t i = 0; i < len; i++)
        if (((unsigned)(p[2 * i] | (p[2 * i + 1] << 8)) & expmask) == expmask) return i;
    return len;
}

/* First non-finite element of slot k's piece [start, start + len): the fp32 data, or for a deferred
 * matrix (fp32 pointer still NULL) its F16/BF16 source in the file. */
static size_t slot_first_nonfinite(const slot *sl, const kvh_st_tensor *src, size_t start, size_t len) {
    if (*sl->dst) return kvh_first_nonfinite(*sl->dst + start, len);
    return first_nonfinite_16((const unsigned char *)src->data + start * 2, src->dtype, len);
}

/* Every weight must be finite: one NaN or infinity makes every logit NaN, and a run would then print
 * token 0 forever or a perplexity of nan with exit 0. Checked once at load, in parallel over pieces of
 * CHUNK_FLOATS; the first bad value in file order is named (tensor, element, row/column). Cost: one read
 * of the weights (0.15 s per GB per core here, docs/security.md), which the first forward pass does anyway.
 * Deferred matrices (fp32 pointer NULL) are checked in their F16/BF16 source (src[k]), whose pages are
 * given back piece by piece as they are read (release: src lies in a file mapping), so the check does
 * not bring the whole file into the resident set. */
static int check_finite(const slot *slots, int n, const kvh_st_tensor *const *src, bool release, const char *prefix,
                        const char *path, kvh_err *err) {
    size_t *first = calloc((size_t)n + 1, sizeof *first);
    if (!first) return kvh_fail(err, "%s: out of memory", path);
    for (int i = 0; i < n; i++) first[i + 1] = first[i] + (slot_elems(&slots[i]) + CHUNK_FLOATS - 1) / CHUNK_FLOATS;
    long total = (long)first[n];
    long bad_chunk = total; /* smallest chunk index holding a non-finite value */
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) reduction(min : bad_chunk)
#endif
    for (long c = 0; c < total; c++) {
        int lo = 0, hi = n - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (first[mid] <= (size_t)c) lo = mid;
            else hi = mid - 1;
        }
        size_t ne = slot_elems(&slots[lo]);
        size_t start = ((size_t)c - first[lo]) * CHUNK_FLOATS;
        size_t len = ne - start < CHUNK_FLOATS ? ne - start : CHUNK_FLOATS;
        if (slot_first_nonfinite(&slots[lo], src[lo], start, len) < len && c < bad_chunk) bad_chunk = c;
        if (release && !*slots[lo].dst) (void)release_range((const unsigned char *)src[lo]->data + start * 2, len * 2);
    }
    int rc = 0;
    if (bad_chunk < total) {
        int k = 0;
        while (first[k + 1] <= (size_t)bad_chunk) k++;
        size_t ne = slot_elems(&slots[k]);
        size_t start = ((size_t)bad_chunk - first[k]) * CHUNK_FLOATS;
        size_t len = ne - start < CHUNK_FLOATS ? ne - start : CHUNK_FLOATS;
        size_t at = start + slot_first_nonfinite(&slots[k], src[k], start, len);
        float v;
        if (*slots[k].dst) v = (*slots[k].dst)[at];
        else {
            kvh_st_tensor one = *src[k];
            one.data = (const unsigned char *)src[k]->data + at * 2;
            one.n_elems = 1;
            one.n_bytes = 2;
            kvh_st_to_f32(&one, &v);
        }
        char where[64] = "";
        if (slots[k].n_dims == 2)
            snprintf(where, sizeof where, " (row %zu, column %zu)", at / (size_t)slots[k].shape[1],
                     at % (size_t)slots[k].shape[1]);
        rc = kvh_fail(err, "%s: tensor '%s%s' holds a non-finite value (%s) at element %zu%s: every output would "
                      "be NaN, so the checkpoint is refused (a corrupt file or a diverged training run?)", path, prefix,
                      slots[k].name, kvh_nonfinite_name(v), at, where);
    }
    free(first);
    return rc;
}

static int load_dir(kvh_model *m, const char *dir, kvh_err *err) {
    char path[4096], snapshot[sizeof m->source];
    struct stat sb;
    const char *hub_id = NULL;
    if (stat(dir, &sb) != 0) { /* not here: a hub id already in the Hugging Face cache? (hub.c) */
        int found = kvh_hub_resolve(dir, snapshot, sizeof snapshot, err);
        if (found < 0) return -1;
        if (found > 0) {
            hub_id = dir;
            dir = snapshot;
        }
    }
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return kvh_fail(err, "model '%s': not a directory (expected a Hugging Face GPT-2 directory with "
                        "config.json and model.safetensors, or random:NAME[:SEED] with NAME one of gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl)", dir);
    if (snprintf(path, sizeof path, "%s/config.json", dir) >= (int)sizeof path)
        return kvh_fail(err, "model '%s': path too long", dir);
    char *text = NULL;
    size_t len = 0;
    if (kvh_read_file(path, CONFIG_MAX_BYTES, &text, &len, err) != 0) return -1;
    int rc = kvh_model_config_parse(text, len, path, &m->cfg, err);
    free(text);
    if (rc != 0) return -1;

    /* model.safetensors, or the shards of model.safetensors.index.json (checkpoint.c) */
    kvh_checkpoint ck;
    if (kvh_checkpoint_open(&ck, dir, err) != 0) return -1;
    snprintf(path, sizeof path, "%s", ck.path);
    const bool sharded = ck.n_files > 1; /* shards are copied into the arena, then unmapped */
    /* A single file's F16/BF16 layer matrices are deferred: they stay in the mapping (model.h). */
    const bool may_defer = !sharded;

    slot *slots = NULL;
    int n = 0;
    const kvh_st_tensor **found = NULL;
    bool *used = NULL;
    work_job *jobs = NULL;
    size_t *scratch = NULL;
    rc = -1;

    m->layers = calloc((size_t)m->cfg.n_layer, sizeof *m->layers);
    if (!m->layers || slots_build(m, &slots, &n) != 0) {
        kvh_fail(err, "%s: out of memory", path);
        goto done;
    }
    found = calloc((size_t)n, sizeof *found);
    used = calloc((size_t)ck.n_tensors + 1, sizeof *used);
    jobs = calloc((size_t)n, sizeof *jobs);
    scratch = calloc((size_t)n + 1, sizeof *scratch);
    if (!found || !used || !jobs || !scratch) {
        kvh_fail(err, "%s: out of memory", path);
        goto done;
    }

    /* "transformer." prefix: checkpoints saved from GPT2LMHeadModel rather than GPT2Model. */
    const char *prefix = "";
    if (kvh_checkpoint_find(&ck, "wte.weight") < 0 && kvh_checkpoint_find(&ck, "transformer.wte.weight") >= 0)
        prefix = "transformer.";

    size_t convert_floats = 0;
    for (int i = 0; i < n; i++) {
        char full[SLOT_NAME_MAX + 16];
        snprintf(full, sizeof full, "%s%s", prefix, slots[i].name);
        const int ti = kvh_checkpoint_find(&ck, full);
        const kvh_st_tensor *t = ti >= 0 ? ck.tensors[ti] : NULL;
        char want[64], got[160];
        shape_str(want, sizeof want, slots[i].n_dims, slots[i].shape);
        if (!t) {
            kvh_fail(err, "%s: missing tensor '%s' (expected shape %s from config.json)", path, full, want);
            goto done;
        }
        if (t->dtype != KVH_ST_F32 && t->dtype != KVH_ST_F16 && t->dtype != KVH_ST_BF16) {
            kvh_fail(err, "%s: tensor '%s' has dtype %s, which is not usable (F32, F16 or BF16 needed)",
                     kvh_checkpoint_file(&ck, ti), full, t->dtype_name);
            goto done;
        }
        bool same = t->n_dims == slots[i].n_dims;
        for (int d = 0; same && d < t->n_dims; d++) same = t->shape[d] == slots[i].shape[d];
        if (!same) {
            shape_str(got, sizeof got, t->n_dims, t->shape);
            kvh_fail(err, "%s: tensor '%s' has shape %s, expected %s (n_vocab %d, n_positions %d, n_embd %d, "
                     "n_inner %d from config.json)", kvh_checkpoint_file(&ck, ti), full, got, want, m->cfg.n_vocab,
                     m->cfg.n_positions,
                     m->cfg.n_embd, m->cfg.n_inner);
            goto done;
        }
        found[i] = t;
        used[ti] = true;
        const bool defer = may_defer && slots[i].mat >= 0 && t->dtype != KVH_ST_F32;
        if (!defer && (sharded || t->dtype != KVH_ST_F32 || ((uintptr_t)t->data % sizeof(float)) != 0))
            convert_floats += round_up(t->n_elems, ARENA_ALIGN_FLOATS);
        m->n_params += t->n_elems;
    }
    for (int k = 0; k < ck.n_tensors; k++) {
        if (used[k] || ignorable_tensor(ck.tensors[k]->name, m->cfg.n_layer)) continue;
        kvh_fail(err, "%s: unexpected tensor '%s' (not a GPT-2 weight for config.json's n_layer = %d; "
                 "wrong config.json or not a GPT-2 checkpoint?)", kvh_checkpoint_file(&ck, k), ck.tensors[k]->name,
                 m->cfg.n_layer);
        goto done;
    }

    /* one arena for every tensor that cannot be used in place */
    if (convert_floats) {
        m->arena = arena_alloc(convert_floats);
        if (!m->arena) {
            kvh_fail(err, "%s: out of memory allocating %.2f GB to convert weights to fp32", path,
                     (double)convert_floats * 4 / 1e9);
            goto done;
        }
        m->arena_floats = convert_floats;
    }
    size_t off = 0;
    int n_jobs = 0;
    bool any_mapped = false;
    for (int i = 0; i < n; i++) {
        const kvh_st_tensor *t = found[i];
        if (!sharded && t->dtype == KVH_ST_F32 && ((uintptr_t)t->data % sizeof(float)) == 0) {
            *slots[i].dst = (const float *)t->data; /* zero-copy into the mapping */
            any_mapped = true;
            continue;
        }
        if (may_defer && slots[i].mat >= 0 && t->dtype != KVH_ST_F32) { /* F16/BF16 layer matrix: stays in the file (model.h) */
            if (!m->deferred && !(m->deferred = calloc((size_t)m->cfg.n_layer * 4, sizeof *m->deferred))) {
                kvh_fail(err, "%s: out of memory", path);
                goto done;
            }
            kvh_deferred_matrix *d = &m->deferred[slots[i].mat];
            d->src = t->data;
            d->n_elems = t->n_elems;
            d->dtype = (int)t->dtype;
            snprintf(d->name, sizeof d->name, "%s%s", prefix, slots[i].name);
            *slots[i].dst = NULL;
            m->n_deferred++;
            m->deferred_floats += t->n_elems;
            continue;
        }
        float *p = m->arena + off;
        size_t padded = round_up(t->n_elems, ARENA_ALIGN_FLOATS);
        for (size_t k = t->n_elems; k < padded; k++) p[k] = 0.0f;
        jobs[n_jobs++] = (work_job){.kind = JOB_CONVERT, .dst = p, .n = t->n_elems, .src = t};
        *slots[i].dst = p;
        off += padded;
    }
    run_jobs(jobs, n_jobs, scratch);
    if (check_finite(slots, n, found, m->n_deferred > 0 && ck.files[0].map_base, prefix, path, err) != 0) goto done;
    if (m->n_deferred && ck.files[0].map_base) { /* the mapping stays: give back what was read of it */
        for (int i = 0; i < n_jobs; i++) (void)release_range(jobs[i].src->data, jobs[i].src->n_bytes);
        for (int i = 0; i < m->cfg.n_layer * 4; i++)
            if (m->deferred[i].src) (void)release_range(m->deferred[i].src, m->deferred[i].n_elems * 2);
    }

    if (any_mapped || m->n_deferred) { /* the model keeps the mapping; the header table is no longer needed */
        m->map_base = ck.files[0].map_base;
        m->map_len = ck.files[0].map_len;
        ck.files[0].map_base = NULL;
    }
    if (hub_id) snprintf(m->name, sizeof m->name, "%s", strrchr(hub_id, '/') ? strrchr(hub_id, '/') + 1 : hub_id);
    else dir_basename(dir, m->name, sizeof m->name);
    snprintf(m->source, sizeof m->source, "%s", dir);
    rc = 0;
done:
    kvh_checkpoint_close(&ck); /* unmaps unless the model took the mapping */
    free(slots);
    free(found);
    free(used);
    free(jobs);
    free(scratch);
    return rc;
}

int kvh_model_load(kvh_model *m, const char *spec, kvh_err *err) {
    memset(m, 0, sizeof *m);
    int rc = strncmp(spec, "random:", 7) == 0 ? load_random(m, spec, err) : load_dir(m, spec, err);
    if (rc != 0) kvh_model_free(m); /* zeroes *m */
    return rc;
}

/* ---- deferred F16/BF16 matrices ------------------------------------------------------------------ */

static kvh_deferred_matrix *deferred_at(const kvh_model *m, int layer, int which) {
    if (!m->deferred || layer < 0 || layer >= m->cfg.n_layer || which < 0 || which > KVH_MAT_MLP_PROJ) return NULL;
    kvh_deferred_matrix *d = &m->deferred[layer * 4 + which];
    return d->src ? d : NULL;
}

static const float **layer_ptr(kvh_model *m, int layer, int which) {
    kvh_layer_weights *w = &m->layers[layer];
    switch (which) {
    case KVH_MAT_ATTN_QKV: return &w->attn_w;
    case KVH_MAT_ATTN_PROJ: return &w->proj_w;
    case KVH_MAT_MLP_FC: return &w->fc_w;
    default: return &w->fcproj_w;
    }
}

const kvh_deferred_matrix *kvh_model_deferred(const kvh_model *m, int layer, int which) {
    return deferred_at(m, layer, which);
}

bool kvh_model_needs_materialize(const kvh_model *m, int layer, int which) {
    const kvh_deferred_matrix *d = deferred_at(m, layer, which);
    return d && !d->fp32;
}

void kvh_model_deferred_to_f32(const kvh_model *m, int layer, int which, float *dst) {
    const kvh_deferred_matrix *d = deferred_at(m, layer, which);
    if (!d) return;
    kvh_st_tensor view = {.dtype = (kvh_st_dtype)d->dtype, .n_dims = 1, .n_elems = d->n_elems,
                          .data = d->src, .n_bytes = d->n_elems * 2};
    work_job job = {.kind = JOB_CONVERT, .dst = dst, .n = d->n_elems, .src = &view};
    size_t scratch[2];
    run_jobs(&job, 1, scratch);
}

size_t kvh_model_deferred_release_source(const kvh_model *m, int layer, int which) {
    const kvh_deferred_matrix *d = deferred_at(m, layer, which);
    return d && m->map_base ? release_range(d->src, d->n_elems * 2) : 0;
}

int kvh_model_materialize(kvh_model *m, int layer, int which, kvh_err *err) {
    kvh_deferred_matrix *d = deferred_at(m, layer, which);
    if (!d || d->fp32) return 0;
    float *p = arena_alloc(d->n_elems);
    if (!p)
        return kvh_fail(err, "%s: out of memory converting tensor '%s' to fp32 (%.1f MB)", m->source, d->name,
                        (double)d->n_elems * 4 / 1e6);
    kvh_model_deferred_to_f32(m, layer, which, p);
    d->fp32 = p;
    *layer_ptr(m, layer, which) = p;
    m->materialized_floats += d->n_elems;
    (void)kvh_model_deferred_release_source(m, layer, which);
    return 0;
}

int kvh_model_materialize_all(kvh_model *m, kvh_err *err) {
    for (int l = 0; l < m->cfg.n_layer; l++)
        for (int w = 0; w <= KVH_MAT_MLP_PROJ; w++)
            if (kvh_model_materialize(m, l, w, err) != 0) return -1;
    return 0;
}
