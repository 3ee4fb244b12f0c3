/* model.h — the GPT-2 model: hyper-parameters and weights in one fp32 arena.
 * Owns: kvh_model_config (from config.json or a random: preset), kvh_model (weight pointers into one
 * allocation, or into the memory-mapped safetensors file when it is already fp32), loading by spec, the
 * deferred conversion of an F16/BF16 checkpoint's layer matrices (kvh_model_materialize).
 * Does not own: the tokenizer (tokenizer.h), the forward pass (backend.h), the KV cache (kvcache.h).
 *
 * Shapes use one alphabet: V vocab, P n_positions, C n_embd, NH n_head, HS head size (C/NH), L layers,
 * F MLP inner size (4C for GPT-2). Conv1D weights are input-major: y = x · W + b, W is [in, out]. */
#ifndef KVH_MODEL_H
#define KVH_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/util.h"

typedef struct kvh_model_config {
    int n_vocab;     /* V */
    int n_positions; /* P: longest sequence the learned position table covers */
    int n_embd;      /* C */
    int n_head;      /* NH */
    int n_layer;     /* L */
    int n_inner;     /* F: MLP hidden size (config n_inner, or 4C when null) */
    float ln_eps;    /* LayerNorm epsilon, 1e-5 for GPT-2 */
    int bos_id;      /* <|endoftext|> = 50256 for GPT-2 */
} kvh_model_config;

typedef struct kvh_layer_weights {
    const float *ln1_w, *ln1_b;     /* [C] */
    const float *attn_w, *attn_b;   /* c_attn: [C, 3C], [3C]; output columns are [q | k | v] */
    const float *proj_w, *proj_b;   /* attn c_proj: [C, C], [C] */
    const float *ln2_w, *ln2_b;     /* [C] */
    const float *fc_w, *fc_b;       /* mlp c_fc: [C, F], [F] */
    const float *fcproj_w, *fcproj_b; /* mlp c_proj: [F, C], [C] */
} kvh_layer_weights;

typedef struct kvh_model {
    kvh_model_config cfg;
    char name[256];   /* "gpt2-tiny-wt", "random:gpt2-medium", ... (for records) */
    char source[1024];/* directory path, or the random: spec */
    bool is_random;   /* seeded random weights: text output is meaningless, label it so */
    uint64_t seed;    /* seed of random weights (0 for loaded checkpoints) */

    const float *wte;        /* [V, C]; also the tied LM head */
    const float *wpe;        /* [P, C] */
    kvh_layer_weights *layers; /* [L] */
    const float *lnf_w, *lnf_b; /* [C] */

    /* storage behind the pointers above */
    float *arena;            /* owned fp32 arena (converted or random weights), may be NULL */
    size_t arena_floats;
    void *map_base;          /* mmap of model.safetensors when weights point into it (or deferred
                                matrices are read from it), else NULL */
    size_t map_len;
    size_t n_params;         /* total parameter count (tied LM head counted once) */

    /* Deferred conversion (single-file F16/BF16 checkpoints): the four linear matrices of every layer
     * stay in the file's F16/BF16 bytes at load and their fp32 pointers above are NULL until
     * kvh_model_materialize converts them (a weight format packs them straight from those bytes
     * instead, through kvh_model_deferred_to_f32, so their fp32 form is never held). NULL when the
     * model has none (F32 or sharded checkpoints, random weights). */
    struct kvh_deferred_matrix *deferred; /* [L * 4]: layer l, matrix KVH_MAT_* w at l * 4 + w */
    int n_deferred;                /* matrices deferred at load */
    size_t deferred_floats;        /* their elements in all */
    size_t materialized_floats;    /* fp32 floats allocated since by kvh_model_materialize (the model's
                                      memory beside the arena: one allocation per matrix) */
} kvh_model;

/* The four linear matrices of a layer, in the SDK's KVP_MAT_* order. */
enum { KVH_MAT_ATTN_QKV = 0, KVH_MAT_ATTN_PROJ = 1, KVH_MAT_MLP_FC = 2, KVH_MAT_MLP_PROJ = 3 };

typedef struct kvh_deferred_matrix {
    const void *src;   /* n_elems elements in the model's file mapping; NULL: this matrix is not deferred */
    size_t n_elems;
    int dtype;         /* kvh_st_dtype: KVH_ST_F16 or KVH_ST_BF16 */
    float *fp32;       /* owned converted copy once materialized, else NULL */
    char name[112];    /* tensor name as in the file, for messages */
} kvh_deferred_matrix;

/* Fills cfg with one of the named GPT-2 presets: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl".
 * Returns -1 with a message listing the known names otherwise. */
int kvh_model_preset(const char *name, kvh_model_config *cfg, kvh_err *err);

/* Parses a Hugging Face GPT-2 config.json text (path is used in messages only). Rejects missing or
 * non-integer fields, non-gpt2 model types, n_embd % n_head != 0, and dimensions beyond sane limits
 * (so a hostile file cannot make the loader allocate petabytes). */
int kvh_model_config_parse(const char *json_text, size_t len, const char *path, kvh_model_config *cfg,
                           kvh_err *err);

/* Loads a model by spec:
 *   "random:gpt2-medium" / "random:gpt2-medium:SEED"  seeded random weights at the preset's shapes
 *   "/path/to/dir"   a Hugging Face GPT-2 directory with config.json and model.safetensors
 * On failure *m is left zeroed and nothing is leaked. */
int kvh_model_load(kvh_model *m, const char *spec, kvh_err *err);
void kvh_model_free(kvh_model *m);

/* Bytes of weights the decoder reads per generated token (all matrices, embeddings row reads excluded
 * except the LM head which reads all of wte): used for the bandwidth figure in benchmarks. */
size_t kvh_model_weight_bytes_per_token(const kvh_model *m);

/* ---- additions (model_config.c / model.c) ------------------------------------------------------ */

/* Seed of "random:NAME" specs that give none. */
#define KVH_MODEL_DEFAULT_SEED 1234u

/* Parameter count a config implies (wte counted once as the tied LM head), computed without
 * allocating: V*C + P*C + L*(4*C*C + 2*C*F + 9*C + F) + 2*C (= L*(12*C*C + 13*C) when F = 4C). */
size_t kvh_model_config_param_count(const kvh_model_config *cfg);

/* Checks a config against the loader's limits (the ones kvh_model_config_parse enforces); `what`
 * names the source in messages. */
int kvh_model_config_check(const kvh_model_config *cfg, const char *what, kvh_err *err);

/* Builds seeded random GPT-2-style weights for any valid config (tests and benchmarks use small
 * configs; kvh_model_load uses it for "random:" specs). name is stored in m->name and m->source.
 * Values depend only on (seed, tensor, element index), never on the thread count. On failure *m is
 * zeroed and nothing is leaked. */
int kvh_model_init_random(kvh_model *m, const kvh_model_config *cfg, uint64_t seed, const char *name,
                          kvh_err *err);

/* ---- deferred F16/BF16 matrices (model.c) -------------------------------------------------------- */

/* The deferred record of layer's matrix `which` (KVH_MAT_*) when it was deferred at load (materialized
 * or not), else NULL. */
const kvh_deferred_matrix *kvh_model_deferred(const kvh_model *m, int layer, int which);

/* True when the matrix was deferred and has no fp32 copy yet (its kvh_layer_weights pointer is NULL). */
bool kvh_model_needs_materialize(const kvh_model *m, int layer, int which);

/* Converts a deferred matrix into dst (n_elems floats, caller-owned) without keeping anything: for
 * packing it into a weight format with one matrix of fp32 at a time. The source was checked finite at
 * load. Works whether or not the matrix is materialized. */
void kvh_model_deferred_to_f32(const kvh_model *m, int layer, int which, float *dst);

/* Gives the deferred matrix's source pages in the file mapping back to the kernel (they come back from
 * the file if read again): after it was packed or materialized. Returns the bytes given back. */
size_t kvh_model_deferred_release_source(const kvh_model *m, int layer, int which);

/* Converts a deferred matrix into an fp32 copy the model owns and points its kvh_layer_weights field at
 * it (no-op when not deferred or already done). Counted in m->materialized_floats. It writes the model:
 * sessions on one model are created (and so call it) from one thread, never while another session of
 * the model runs a forward pass. Fails only for memory, naming the tensor. */
int kvh_model_materialize(kvh_model *m, int layer, int which, kvh_err *err);

/* Every deferred matrix (tests, tools that read kvh_layer_weights directly). */
int kvh_model_materialize_all(kvh_model *m, kvh_err *err);

#endif
