/* plan.h — `kvhost plan`: deployment sizing arithmetic (parameters, weight and KV-cache memory, batch
 * capacity under tensor parallelism and KV policies, attention arithmetic intensity and roofline ridge).
 * Owns: the model-shape description used for planning (presets, config.json text parsing, explicit
 * dimensions), all the formulas (plan.c, pure: no I/O) and the command (cmd_plan.c: option parsing,
 * table and JSON output). Does not own: model loading (model.h), plugins (they are only described
 * here by their budgets). Formulas and conventions are explained in docs/plan.md. */
#ifndef KVH_PLAN_H
#define KVH_PLAN_H

#include <stdint.h>

#include "util/util.h"

/* ---- model shape ------------------------------------------------------------------------------- */

enum {
    KVH_PLAN_GPT2 = 0,  /* LayerNorm + biases, fused c_attn, 2-matrix GELU MLP, learned wpe, tied head */
    KVH_PLAN_LLAMA = 1, /* RMSNorm, no biases, GQA k/v, 3-matrix SwiGLU MLP, RoPE (no wpe), lm_head */
};

typedef struct kvh_plan_model {
    char name[64];
    int family;          /* KVH_PLAN_GPT2 / KVH_PLAN_LLAMA */
    int64_t n_layer;     /* L */
    int64_t hidden;      /* C (h) */
    int64_t n_head;      /* NH: query heads */
    int64_t n_kv_head;   /* KV heads (== n_head without GQA) */
    int64_t head_dim;    /* HS (d); C / NH unless the config says otherwise */
    int64_t ffn;         /* F: MLP hidden size */
    int64_t vocab;       /* V */
    int64_t n_positions; /* P: learned positions (GPT-2 wpe rows); 0 for RoPE families */
    int tied_head;       /* 1: LM head shares the token embedding */
} kvh_plan_model;

/* Fills m from a preset name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-3-8b. Unknown names fail
 * with the list of known ones. */
int kvh_plan_model_preset(const char *name, kvh_plan_model *m, kvh_err *err);
/* Parses the text of a Hugging Face config.json (GPT-2 keys n_embd/n_layer/n_head/n_inner/vocab_size/
 * n_positions, or LLaMA-style hidden_size/num_hidden_layers/num_attention_heads/num_key_value_heads/
 * intermediate_size/vocab_size/tie_word_embeddings/head_dim). `where` names the file in messages. */
int kvh_plan_model_from_json(const char *text, const char *where, kvh_plan_model *m, kvh_err *err);
/* Checks a shape: positive sizes, heads dividing hidden (unless head_dim was given), KV heads dividing
 * query heads, everything small enough that the byte counts below cannot overflow. */
int kvh_plan_model_check(const kvh_plan_model *m, kvh_err *err);

/* ---- parameter counts -------------------------------------------------------------------------- */

typedef struct kvh_plan_params {
    uint64_t attention;    /* attention projection matrices (q, k, v, o) */
    uint64_t ffn;          /* MLP matrices */
    uint64_t embeddings;   /* token (+ learned position) embeddings */
    uint64_t lm_head;      /* untied output projection (0 when tied) */
    uint64_t norms_biases; /* LayerNorm/RMSNorm weights and all biases */
    uint64_t total;
} kvh_plan_params;

/* Exact: every tensor of the real checkpoint (family-specific; GPT-2 Medium = 354,823,168). */
void kvh_plan_params_exact(const kvh_plan_model *m, kvh_plan_params *p);
/* Simplified textbook convention: L*(4h^2 + 2*h*F) + V*h (no biases, norms, wpe, GQA, gating). */
void kvh_plan_params_simplified(const kvh_plan_model *m, kvh_plan_params *p);

/* ---- precisions -------------------------------------------------------------------------------- */

enum { KVH_PREC_FP32 = 0, KVH_PREC_FP16, KVH_PREC_BF16, KVH_PREC_INT8, KVH_PREC_INT4 };

typedef struct kvh_plan_prec {
    int kind;       /* KVH_PREC_* */
    int64_t group;  /* int8/int4: elements per fp16 scale (along head_dim for KV) */
    int asymmetric; /* int8/int4: one fp16 zero-point per group as well */
} kvh_plan_prec;

int kvh_plan_prec_parse(const char *s, int *kind, kvh_err *err);
const char *kvh_plan_prec_name(int kind);
/* Bits of one element (32, 16, 16, 8, 4). */
int kvh_plan_prec_bits(int kind);
/* Bytes to hold one vector of n elements: ceil(n*bits/8), plus for int8/int4 ceil(n/group) fp16
 * scales (and as many fp16 zero-points when asymmetric). */
uint64_t kvh_plan_vec_bytes(const kvh_plan_prec *p, int64_t n);

/* ---- KV policies ------------------------------------------------------------------------------- */

enum { KVH_POLICY_NONE = 0, KVH_POLICY_WINDOW, KVH_POLICY_SINK, KVH_POLICY_H2O, KVH_POLICY_PYRAMID };

typedef struct kvh_plan_policy {
    int kind;          /* KVH_POLICY_* */
    int64_t a, b;      /* window: a=N; sink: a=S b=W; h2o: a=heavy b=recent; pyramid: a=avg budget */
    double beta;       /* pyramid: top-layer budget = avg/beta (PyramidKV's beta, default 20) */
    double minicache;  /* fraction of layers merged in pairs from the middle layer up; 0 = off */
} kvh_plan_policy;

/* Parses "window:N", "sink:S+W", "h2o:HEAVY+RECENT", "pyramid:AVG" (or "none"); keeps beta and
 * minicache as they are in *p. */
int kvh_plan_policy_parse(const char *spec, kvh_plan_policy *p, kvh_err *err);
/* PyramidKV arithmetic schedule: budgets fall linearly from layer 0 to layer L-1, top = avg/beta,
 * bottom = 2*avg - top, rounded so the total is exactly L*avg. out has L entries. */
int kvh_plan_pyramid_budgets(int64_t avg, double beta, int64_t L, int64_t *out, kvh_err *err);
/* Tokens each layer holds per head at `context` (min(context, budget)); out has L entries. */
int kvh_plan_layer_tokens(const kvh_plan_policy *p, int64_t L, int64_t context, int64_t *out,
                          kvh_err *err);
/* Number of merged layers for a MiniCache ratio (even, counted from layer floor(L/2)); fails when the
 * ratio does not fit in the deeper half. */
int kvh_plan_minicache_layers(double ratio, int64_t L, int64_t *merged, kvh_err *err);

/* ---- arithmetic intensity ---------------------------------------------------------------------- */

typedef struct kvh_plan_ai {
    double flops;
    double bytes;
    double ai; /* flops / bytes */
} kvh_plan_ai;

/* One head of standard (non-fused) attention over N tokens, head size d, every tensor at act_bytes
 * per element: FLOPs 4*N^2*d; bytes act*(3Nd [Q,K,V read] + 2N^2 [S written+read] + 2N^2 [P written+read]
 * + Nd [O written]). */
void kvh_plan_ai_prefill(int64_t N, int64_t d, double act_bytes, kvh_plan_ai *out);
/* One head, one new query over N cached tokens: FLOPs 4*N*d; bytes act*d [q read] + 2*N*kv_vec_bytes
 * [K,V read] + act*4N [s, p written+read] + act*d [o written]. kv_vec_bytes = bytes of one cached
 * d-vector (act*d for an fp cache at activation precision). */
void kvh_plan_ai_decode(int64_t N, int64_t d, double act_bytes, double kv_vec_bytes, kvh_plan_ai *out);

/* ---- the whole plan ---------------------------------------------------------------------------- */

typedef struct kvh_plan_inputs {
    kvh_plan_model model;
    kvh_plan_prec weight_prec;
    kvh_plan_prec kv_prec;
    int act_prec;          /* KVH_PREC_* for Q, S, P, O (and prefill K, V) in the AI figures */
    double gpu_mem_gb;     /* per GPU, GB = 2^30 bytes */
    int64_t context;       /* tokens per request (prompt + generated) */
    int64_t batch;         /* requests (for the "does it fit" line and the decode-step AI) */
    int64_t tp;            /* tensor-parallel degree */
    kvh_plan_policy policy;
    double peak_tflops;    /* dense peak, 1e12 FLOP/s */
    double bandwidth_gbs;  /* memory bandwidth, 1e9 B/s (vendor units) */
} kvh_plan_inputs;

/* H100 SXM defaults: dense fp16/bf16 tensor-core peak 989.4 TFLOP/s, HBM3 3350 GB/s. */
#define KVH_PLAN_DEFAULT_TFLOPS 989.4
#define KVH_PLAN_DEFAULT_BW_GBS 3350.0

void kvh_plan_inputs_default(kvh_plan_inputs *in);

typedef struct kvh_plan_kv {
    uint64_t bytes_per_token;      /* per token, all layers, K+V */
    uint64_t bytes_per_request;    /* context tokens */
    uint64_t bytes_per_request_gpu; /* share of one GPU under TP */
    int64_t max_batch;             /* one GPU holding all weights */
    int64_t max_batch_tp;          /* requests a TP group serves (each GPU holds 1/tp of each) */
} kvh_plan_kv;

typedef struct kvh_plan_result {
    kvh_plan_params exact, simplified;
    uint64_t weight_bytes_exact, weight_bytes_simplified;
    uint64_t weight_bytes_gpu_exact, weight_bytes_gpu_simplified; /* / tp, rounded up */
    uint64_t gpu_mem_bytes;
    int64_t kv_heads_per_gpu;      /* ceil(n_kv_head / tp): KV heads replicated when tp > n_kv_head */
    kvh_plan_kv kv_simplified;     /* all n_head heads full width with the simplified weights */
    kvh_plan_kv kv_exact;          /* n_kv_head heads with the exact weights: the right one */
    kvh_plan_kv kv_policy;         /* kv_exact's convention under the policy stack */
    uint64_t policy_tokens;        /* sum over layers of tokens kept per head at `context` */
    int64_t minicache_merged;      /* layers merged in pairs (0 = off) */
    uint64_t batch_bytes_gpu;      /* exact weights/tp + batch * exact KV share (policy applied) */
    kvh_plan_ai prefill, decode;   /* one head, standard attention, N = context, d = head_dim */
    kvh_plan_ai decode_gqa;        /* decode with K/V read once per KV-head group (shared by the group) */
    kvh_plan_ai decode_linear;     /* decode step's weight matmuls at `batch` (weights + activations) */
    kvh_plan_ai decode_step;       /* decode step: linear + standard attention (policy applied) */
    double ridge;                  /* peak FLOP/s / bandwidth, FLOP/byte */
} kvh_plan_result;

/* Computes everything; fails with a message on nonsense inputs (zero or negative sizes, TP not
 * dividing the heads, ...). Weights bigger than GPU memory are not an error: max_batch is 0. */
int kvh_plan_compute(const kvh_plan_inputs *in, kvh_plan_result *out, kvh_err *err);

/* Decode-step AI at a given batch (linear + standard attention at context, policy applied); used by
 * the batch sweep. linear/attn may be NULL. */
int kvh_plan_decode_step(const kvh_plan_inputs *in, int64_t batch, kvh_plan_ai *linear,
                         kvh_plan_ai *attn, kvh_plan_ai *step, kvh_err *err);

/* `kvhost plan ...`: argv[0] is "plan". Prints the table (and writes --json FILE). Returns the exit
 * code: 0 ok, 1 bad input / failure, prints errors to stderr. */
int kvh_cmd_plan(int argc, char **argv);

#endif
