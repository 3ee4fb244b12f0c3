/* kvp.h — the kvhost plugin SDK. The only header a plugin author includes. C11, libc only.
 *
 * A plugin is a shared object that exports exactly one function, kvp_plugin_entry(), returning a
 * pointer to a static kvp_descriptor. The host loads it with dlopen(RTLD_NOW | RTLD_LOCAL), calls the
 * entry, checks the ABI version and struct sizes, copies the descriptor into a zeroed host copy and
 * validates it before any hook runs. Plugins link no host symbols: everything they need from the host
 * comes through the kvp_host services table handed to create().
 *
 * Roles. A POLICY decides which tokens stay in a layer's cache (window, sink, h2o, pyramid). A layer
 * has at most one policy; layers without one keep every token. A STORE decides how the layer's tokens
 * are held (int8/int4, KIVI, MiniCache). A WEIGHT FORMAT (ABI 1.3) decides how the layer's linear
 * weights are held: it packs each matrix once at load and multiplies over the packed form (f16, bf16,
 * w8, w4). A layer has at most one plugin of each role.
 *
 * The cache a policy sees. For every (sequence, layer, KV head) the host keeps n_live slots, dense in
 * 0..n_live-1. Slot order is NOT chronological: eviction moves the last live slot into each hole. Each
 * slot carries the token's absolute position (pos[]) and, when the policy asks for them, attention-score
 * accumulators (score[], obs_score[]). GPT-2 bakes positions into K at insert time, so slot order never
 * matters to attention.
 *
 * Budgets and eviction. create() tells the host the layer's per-head token budget. The host lets a head
 * grow to budget + slack, then calls evict() once to bring it back to budget: the cost of a policy is
 * amortized over `slack` tokens. The host validates every answer (indices in range, no duplicates, at
 * least the required count); an invalid answer stops the run with an error naming the plugin.
 *
 * Threading: the host calls a plugin instance's hooks from one thread at a time. Hooks must not block,
 * log on every token or allocate per call: allocate scratch in create().
 *
 * Versioning. KVP_ABI_MAJOR changes break compatibility and the host refuses other majors, naming both.
 * KVP_ABI_MINOR grows when fields are appended at the END of a struct; every struct starts with its size
 * so the host (and the plugin, via KVP_HOST_HAS) can tell which fields exist. Enumerations in ABI structs
 * are fixed-width uint32_t, never C enums. */
#ifndef KVP_KVP_H
#define KVP_KVP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVP_ABI_MAJOR 1u
#define KVP_ABI_MINOR 5u /* 1: store role (kvp_instance slot sizes, encode/decode/attend hooks)
                          * 2: handle stores (append/release hooks, host->shared, counted store memory)
                          * 3: weight-format role (pack/unpack/matmul hooks), host->cpu_level;
                          *    policies see the attention they judge: score_report and insert hooks
                          *    (KVP_CAP_SCORE_REPORT), per-slot metadata (kvp_instance.slot_meta_bytes,
                          *    host->slot_meta, kvp_evict_request.slot_meta); host->tensor (read-only
                          *    fp32 weights for stores that factor them)
                          * 4: kvp_instance.store_flags (KVP_STORE_SELF_CONTAINED, KVP_STORE_DECODE_ATTEND):
                          *    what a store promises about its slots, so the host may share them
                          *    between sequences and skip copies (KVP_INSTANCE_HAS); KVP_CAP_ACT_QUANT for
                          *    weight formats whose products quantize activations
                          * 5: KVP_CAP_MATMUL_PREFILL: a weight format's matmul() serves calls of any
                          *    number of rows, prefill pieces included */
#define KVP_ENTRY_SYMBOL "kvp_plugin_entry"

/* ---- status codes returned by hooks ---------------------------------------------------------- */
#define KVP_OK 0
#define KVP_ERROR (-1) /* the hook failed; it should have called host->set_error() first */

/* ---- roles ------------------------------------------------------------------------------------ */
#define KVP_ROLE_POLICY 1u
#define KVP_ROLE_STORE 2u /* decides HOW tokens are held: encode on insert, attention over the stored form */
#define KVP_ROLE_WEIGHTS 3u /* ABI 1.3: decides how linear weights are held: pack at load, products over them */

/* ---- capability flags: what the policy needs the host to compute --------------------------------- */
#define KVP_CAP_DECODE_SCORES (1u << 0)  /* add each decode step's attention probabilities to score[] */
#define KVP_CAP_PREFILL_SCORES (1u << 1) /* add prefill attention column sums (all queries) to score[] */
#define KVP_CAP_OBS_SCORES (1u << 2)     /* prefill column sums over the last obs_window queries, into obs_score[] */
#define KVP_CAP_HEAD_BUDGETS (1u << 3)   /* the policy sets per-head budgets through head_budgets() */
#define KVP_CAP_SCORE_REPORT (1u << 4)   /* ABI 1.3: the host calls score_report() after each step's attention */
/* ABI 1.4, weight formats: matmul() quantizes its input rows (W8A8, W4A8), so a row's result differs beyond
 * fp32 rounding between matmul() (the host uses it for calls of a few rows: decode) and unpack() + an fp32
 * product (prefill pieces). The host then treats a token's values as depending on how it was computed:
 * the engine does not share prompt blocks between sequences (a shared block would differ from the one a
 * sequence computes itself). */
#define KVP_CAP_ACT_QUANT (1u << 5)
/* ABI 1.5, weight formats: matmul() is the format's product for calls of any number of rows, so the host
 * calls it for prefill pieces too, never unpack() + its own fp32 GEMM (unpack() stays required: the host
 * reads embedding rows and tests read references through it). A format whose matmul() quantizes
 * activations but serves every call this way computes each token the same way however a prompt is split,
 * so it need not declare KVP_CAP_ACT_QUANT (w8.so, w4.so and smoothquant.so do not, since SDK 1.5). */
#define KVP_CAP_MATMUL_PREFILL (1u << 6)

/* ---- parameters ------------------------------------------------------------------------------- */
#define KVP_PARAM_INT 1u
#define KVP_PARAM_FLOAT 2u
#define KVP_PARAM_BOOL 3u

/* One declared parameter. The host parses INI / --set values against this table: unknown names, values
 * of the wrong type and values outside [min_value, max_value] are errors naming file, line and key. */
typedef struct kvp_param {
    const char *name;     /* [a-z0-9_]+ */
    uint32_t type;        /* KVP_PARAM_* */
    double default_value;
    double min_value;
    double max_value;
    const char *help;     /* one line */
} kvp_param;

/* ---- what the host tells an instance about its layer ---------------------------------------- */
typedef struct kvp_layer_info {
    uint32_t struct_size;
    uint32_t layer;       /* index of the layer this instance serves */
    uint32_t n_layer;     /* layers in the model */
    uint32_t n_q_head;    /* query heads */
    uint32_t n_kv_head;   /* KV heads (== n_q_head for GPT-2; fewer for grouped-query models) */
    uint32_t head_dim;
    uint32_t n_ctx;       /* longest sequence the model accepts */
    uint32_t n_seq;       /* sequences in the batch; seq arguments are 0..n_seq-1 */
    uint32_t cache_budget;/* [cache] budget: the run's per-head token budget, 0 if the run set none */
    uint32_t slack;       /* [cache] slack */
} kvp_layer_info;

/* What create() hands back. */
typedef struct kvp_instance {
    uint32_t struct_size; /* set by the host */
    void *state;          /* the plugin's per-layer state, passed to every hook */
    uint32_t budget;      /* REQUIRED: per-head token budget of this layer (>= 1) */
    uint32_t obs_window;  /* with KVP_CAP_OBS_SCORES: how many last prefill queries feed obs_score[] */
    /* ---- ABI 1.1: stores ---- */
    uint32_t k_slot_bytes; /* stores: REQUIRED, bytes one token's K occupies in one head (fixed) */
    uint32_t v_slot_bytes; /* stores: REQUIRED, bytes one token's V occupies in one head (fixed) */
    /* ---- ABI 1.3: policies ---- */
    uint32_t slot_meta_bytes; /* bytes of policy metadata per live slot (0: none, at most 256); the host
                               * zeroes them on insert, moves them with the slot, counts them as KV bytes */
    uint32_t report_rows;     /* with KVP_CAP_SCORE_REPORT: how many of a prefill block's LAST queries
                               * have their full probability rows in kvp_score_report.rows (0 counts as
                               * 1, at most 64); a decode step always has exactly its one row */
    /* ---- ABI 1.4: stores ---- */
    uint32_t store_flags;     /* KVP_STORE_* promises about this instance's slots (0: none). Write it only
                               * when KVP_INSTANCE_HAS(out, store_flags): an older host has no such field */
} kvp_instance;

/* True when the host's kvp_instance has the named field (a plugin running on an older host). */
#define KVP_INSTANCE_HAS(inst, field) \
    ((inst)->struct_size >= offsetof(kvp_instance, field) + sizeof(((kvp_instance *)0)->field))

/* ---- ABI 1.4: store flags (kvp_instance.store_flags), set per instance in create() ------------------
 * A flag is a promise; the host trusts it and does not check it, so set one only when it holds for
 * every slot this instance will ever write. Unknown bits are refused at create.
 *
 * KVP_STORE_SELF_CONTAINED: a slot's bytes are a function of its own token's K (or V) row alone. They
 *   are written once, by encode() or by append() for that slot, and never read or rewritten afterwards
 *   by append() or release() for OTHER slots; a slot is not a handle into per-sequence memory. Then
 *   (1) a slot may be handed to another sequence as it is: the engine shares a cached prompt's blocks
 *   between requests (prefix sharing) for this store; (2) under paged memory append() is handed only
 *   its new slots (first_slot .. first_slot + n_new - 1 are valid; the older slots of k_slots / v_slots
 *   hold unspecified bytes) and release() only the released ones (slots[] are valid, the others not),
 *   instead of a copy of the whole head. NOT self-contained: KIVI-style groups of tokens sharing one
 *   scale (a slot's bytes change when its group fills up), handles, merged slots (MiniCache).
 * KVP_STORE_DECODE_ATTEND: attend() computes attention over exactly the rows decode() returns (the
 *   same result up to fp32 summation order), and decode() reads nothing but the slot and the
 *   instance's read-only format. The host may then attend a step of several queries (a prefill piece)
 *   by decoding the head's slots to fp32 once and running its own attention over them (GEMMs), instead
 *   of one attend() per query; decode() may then be called from several threads at once. Single-query
 *   steps (decoding) still call attend(). */
#define KVP_STORE_SELF_CONTAINED (1u << 0)
#define KVP_STORE_DECODE_ATTEND (1u << 1)

/* ---- the host services table (grows only at the end) --------------------------------------------- */
#define KVP_LOG_ERROR 0
#define KVP_LOG_WARN 1
#define KVP_LOG_INFO 2
#define KVP_LOG_DEBUG 3

struct kvp_tensor;

typedef struct kvp_host {
    uint32_t struct_size;
    uint32_t abi_major;
    uint32_t abi_minor;
    void *ctx; /* the instance's host context: pass it back to every service */
    void (*log)(void *ctx, int level, const char *msg);
    /* Sets the message the host reports when a hook returns KVP_ERROR. Copied; any length, any bytes. */
    void (*set_error)(void *ctx, const char *msg);
    /* Zeroed; NULL on failure. Counted: a store's bytes as KV bytes held (see append below), a
     * policy's apart, as the run record's policy_bytes / policy_bytes_peak. */
    void *(*alloc)(void *ctx, size_t bytes);
    void (*free)(void *ctx, void *p);
    /* Parameter values as parsed and range-checked by the host (declared name; unknown name -> 0). */
    double (*param)(void *ctx, const char *name);
    /* Slot metadata of (seq, head) in this instance's layer, valid until the next host call. */
    uint32_t (*live_count)(void *ctx, uint32_t seq, uint32_t head);
    const int32_t *(*positions)(void *ctx, uint32_t seq, uint32_t head);
    const float *(*scores)(void *ctx, uint32_t seq, uint32_t head);     /* NULL without score caps */
    const float *(*obs_scores)(void *ctx, uint32_t seq, uint32_t head); /* NULL without KVP_CAP_OBS_SCORES */
    /* ---- ABI 1.2 ---- */
    /* One zeroed block of `bytes` shared by every instance of this plugin SECTION in this run (all the
     * layers one INI section claims), e.g. state two layers must both see. The first call allocates it;
     * later calls from any instance of the section return the same pointer. NULL when out of memory or
     * when `bytes` differs from the first call's. The host frees it after every instance is destroyed.
     * Memory from alloc() (and this block) belongs to the section, not the instance: any instance of the
     * section may free what another allocated. */
    void *(*shared)(void *ctx, size_t bytes);
    /* ---- ABI 1.3 ---- */
    /* The highest vector instruction level the plugin's kernels may use: KVP_CPU_* below. The host's
     * choice from the CPU's features, lowered by the user's KVH_ISA; a plugin must not go above it. */
    uint32_t cpu_level;
    /* ABI 1.3: the per-slot policy metadata of (seq, head) in this instance's layer: live_count() slots
     * of kvp_instance.slot_meta_bytes each, slot i at [i * slot_meta_bytes], in step with positions().
     * Writable; valid until the next host call; NULL when the policy declared none, or outside a hook.
     * Lets a layer-wise decision read the other heads' metadata during evict(). */
    void *(*slot_meta)(void *ctx, uint32_t seq, uint32_t head);
    /* ABI 1.3: read-only fp32 weights of decoder layer `layer` (any layer, not only this instance's), for
     * techniques that factor them in create() (a low-rank store's SVD of W_k / W_v). Names, GPT-2's
     * Hugging Face names inside a block: "attn.c_attn.weight" [C, 3C] (input-major, output columns
     * q | k | v), "attn.c_attn.bias" [1, 3C], "attn.c_proj.weight" [C, C], "attn.c_proj.bias" [1, C],
     * "ln_1.weight" / "ln_1.bias" [1, C]. Fills *out and returns KVP_OK; an unknown name or layer, or a
     * host without weights at hand (a test rig), returns KVP_ERROR with the host's own error message
     * already set (return KVP_ERROR from create and the run stops naming your plugin and the tensor).
     * Valid during create() only: weight formats may repack and drop the fp32 copy afterwards. */
    int (*tensor)(void *ctx, uint32_t layer, const char *name, struct kvp_tensor *out);
} kvp_host;

/* ABI 1.3: what host->tensor() fills. */
typedef struct kvp_tensor {
    uint32_t struct_size;  /* set by the plugin before the call: sizeof(kvp_tensor) */
    uint32_t rows, cols;   /* row-major [rows, cols] */
    const float *data;
} kvp_tensor;

#define KVP_CPU_PORTABLE 0u /* plain C */
#define KVP_CPU_AVX2 1u     /* x86-64 AVX2 + FMA + F16C */
#define KVP_CPU_AVX512 2u   /* x86-64 AVX-512 F + BW + DQ + VL (and everything AVX2 has) */

/* True when the host's table has the named field (for plugins running on an older host). */
#define KVP_HOST_HAS(host, field) \
    ((host)->struct_size >= offsetof(kvp_host, field) + sizeof(((kvp_host *)0)->field))

/* ---- hook arguments ----------------------------------------------------------------------------- */

/* evict(): bring (seq, head) down to its budget. */
typedef struct kvp_evict_request {
    uint32_t struct_size;
    uint32_t seq;
    uint32_t head;
    uint32_t n_live;       /* live slots now (> budget) */
    uint32_t budget;       /* target live count */
    uint32_t min_victims;  /* n_live - budget: return at least this many */
    int32_t newest_pos;    /* largest position in the cache (the token just decoded) */
    uint32_t in_prefill;   /* 1 when called right after a prefill block, 0 during decode */
    const int32_t *pos;    /* [n_live] absolute positions */
    const float *score;    /* [n_live] accumulated attention, NULL without score caps */
    const float *obs_score;/* [n_live] observation-window scores, NULL without KVP_CAP_OBS_SCORES */
    /* ---- ABI 1.3 ---- */
    void *slot_meta;       /* [n_live * slot_meta_bytes] this head's per-slot metadata, NULL without */
    uint32_t slot_meta_bytes;
} kvp_evict_request;

/* ABI 1.3. insert(): n_new tokens of one (seq, head) were appended to the layer's cache, in slots
 * first_slot .. first_slot + n_new - 1 (their metadata already zeroed). Lets a policy initialise
 * per-token state. Called once per (seq, head) and forward step, heads in order, after the store wrote
 * the slots and before that layer's attention. */
typedef struct kvp_insert_args {
    uint32_t struct_size;
    uint32_t seq;
    uint32_t head;
    uint32_t n_live;       /* live slots now, new ones included */
    uint32_t first_slot;
    uint32_t n_new;
    const int32_t *pos;    /* [n_live] positions of every live slot */
    void *slot_meta;       /* [n_live * slot_meta_bytes], NULL when the policy declared none */
    uint32_t slot_meta_bytes;
} kvp_insert_args;

/* ABI 1.3. score_report(): the attention probabilities this step's queries put on the live slots of one
 * (seq, head), after the layer's attention and before any eviction of the step. The newest tokens are
 * live already, so every row includes each query's attention to itself. n_queries is 1 in a decode step
 * (col_sum and rows then point at the same row) and the block length T in a prefill block (chunked
 * prefill: one block per chunk). A prefill block delivers the column sums over all T queries and the
 * full rows of the last min(T, report_rows) queries only: T x T probabilities are never materialized.
 * In rows, a query masks the slots whose position is after its own (probability 0 there). */
typedef struct kvp_score_report {
    uint32_t struct_size;
    uint32_t seq;
    uint32_t head;
    uint32_t n_live;
    uint32_t n_queries;    /* queries of this step (1: decode) */
    uint32_t n_rows;       /* rows delivered: the last n_rows queries, oldest first */
    uint32_t in_prefill;   /* 1 when the step has several queries (a prefill block), else 0: a one-token
                            * prompt or last prefill chunk reads as a decode step, as for score[] */
    const int32_t *pos;    /* [n_live] positions of the slots */
    const int32_t *q_pos;  /* [n_rows] positions of the queries whose rows are given */
    const float *col_sum;  /* [n_live] sum over all n_queries of their probabilities */
    const float *rows;     /* [n_rows * n_live] row r at rows + r * n_live */
    void *slot_meta;       /* [n_live * slot_meta_bytes] writable, NULL when the policy declared none */
    uint32_t slot_meta_bytes;
} kvp_score_report;

/* attend(): one query of one head over the head's n stored slots. The store computes
 * out = sum_j p_j * V_j with p = softmax(scale * q . K_j) over the slots whose pos <= q_pos (later
 * positions are masked out: causal attention inside a prefill block), reading K and V straight from
 * their stored form (never decoding the whole head into a buffer). It writes every p_j (0 where masked)
 * into probs[], which the host uses for score accumulation. */
typedef struct kvp_attend_args {
    uint32_t struct_size;
    uint32_t head_dim;
    uint32_t n;            /* live slots */
    int32_t q_pos;         /* position of the query */
    float scale;           /* 1/sqrt(head_dim) */
    const float *q;        /* [head_dim] */
    const int32_t *pos;    /* [n] positions of the slots */
    const void *k_slots;   /* n consecutive K slots of k_slot_bytes */
    const void *v_slots;   /* n consecutive V slots of v_slot_bytes */
    float *out;            /* [head_dim] result */
    float *probs;          /* [n] result: attention probabilities */
} kvp_attend_args;

/* ABI 1.2. append(): T new tokens of one (seq, head) were just appended to the layer's cache, in slots
 * first_slot .. first_slot + n_new - 1; the store writes them from the fp32 rows. Called once per
 * (seq, head) and forward step, in layer order within a step, from one thread at a time, before any
 * attention of that layer in that step. Unlike encode() it knows where it writes (sequence, head,
 * positions, slot index) and sees the head's older slots, so a store may keep per-token state outside
 * the slots (a slot then holds a handle into store-owned memory) or finish work on older slots (e.g.
 * quantize a group of tokens that just filled up). The slot arrays are writable. */
typedef struct kvp_append_args {
    uint32_t struct_size;
    uint32_t seq;
    uint32_t head;
    uint32_t head_dim;
    uint32_t n_new;        /* T tokens appended (>= 1) */
    uint32_t first_slot;   /* slot index of the first new token (== live count before the append) */
    const int32_t *pos;    /* [n_live] positions of every live slot (new ones at first_slot..) */
    const float *k_rows;   /* row t (t < n_new) at k_rows + t * row_stride: head_dim floats */
    const float *v_rows;
    size_t row_stride;     /* floats between consecutive rows */
    void *k_slots;         /* the head's slot array: slot i at k_slots + i * k_slot_bytes */
    void *v_slots;
} kvp_append_args;

/* ABI 1.2. release(): slots of one (seq, head) are about to disappear (evicted by a policy, or the
 * sequence is reset), so a store holding per-token memory outside the slots can free it. Called before
 * the host compacts the slots; the slot contents are still valid during the call. Must not fail. Not
 * called when the whole run ends: destroy() frees everything then. */
typedef struct kvp_release_args {
    uint32_t struct_size;
    uint32_t seq;
    uint32_t head;
    uint32_t n_live;        /* live slots now, before removal */
    const int32_t *pos;     /* [n_live] */
    const void *k_slots;    /* the head's slot arrays, as in kvp_append_args */
    const void *v_slots;
    const uint32_t *slots;  /* [n_slots] indices (< n_live, distinct) of the slots going away */
    uint32_t n_slots;
} kvp_release_args;

#define KVP_WHICH_K 0u
#define KVP_WHICH_V 1u

/* ---- ABI 1.3: weight formats ----------------------------------------------------------------------
 * A weight-format instance serves one decoder layer (kvp_layer_info.layer), or the tied LM head
 * (layer == n_layer) when its section's `lm_head` parameter is true. At load the host calls, for every
 * matrix of that layer, packed_size() then pack() into memory it allocates (and counts as weight bytes
 * held); the fp32 original is then dropped from memory. At run time it calls matmul() for a few input
 * rows (decode) and unpack() for many (prefill: the host unpacks panels of output columns to fp32 and
 * runs its own GEMM). Both read the packed bytes only; they may run on several threads at once for
 * disjoint output ranges of the same matrix, so they must not write shared state or allocate.
 *
 * The matrix W has k inputs and n outputs: y[j] = sum_i x[i] * W(i, j). */
#define KVP_MAT_ATTN_QKV 0u  /* c_attn: k = C, n = 3C (columns q | k | v) */
#define KVP_MAT_ATTN_PROJ 1u /* attn c_proj: k = C, n = C */
#define KVP_MAT_MLP_FC 2u    /* mlp c_fc: k = C, n = F */
#define KVP_MAT_MLP_PROJ 3u  /* mlp c_proj: k = F, n = C */
#define KVP_MAT_LM_HEAD 4u   /* the tied LM head (wte): k = C, n = V */

/* GPT-2's name of a KVP_MAT_* matrix ("attn.c_attn", ...), for messages; "?" for an unknown value. */
static inline const char *kvp_matrix_name(uint32_t which) {
    static const char *const names[] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head"};
    return which <= KVP_MAT_LM_HEAD ? names[which] : "?";
}

/* Layout of the fp32 source handed to pack(). */
#define KVP_LAYOUT_IN_MAJOR 0u  /* W(i, j) at src[i * n + j]: GPT-2's Conv1D weights */
#define KVP_LAYOUT_OUT_MAJOR 1u /* W(i, j) at src[j * k + i]: the LM head (wte rows) */

typedef struct kvp_weight_info {
    uint32_t struct_size;
    uint32_t layer; /* decoder layer; n_layer for the LM head */
    uint32_t which; /* KVP_MAT_* */
    uint32_t k;     /* inputs */
    uint32_t n;     /* outputs */
    /* Calibration statistics of this matrix's input, for formats that scale by them (SmoothQuant): the
     * largest |x_i| each input i took over a calibration text ([model] calibration, `kvhost calibrate`).
     * [k] floats, valid during pack() only; NULL when the run has no calibration file. */
    const float *act_absmax;
} kvp_weight_info;

/* matmul(): y[r * ldy + j] += sum_i x[r * k + i] * W(i, j) for r < rows, n0 <= j < n1. Adds to y (the
 * host puts bias, residual or zero there first). A row's result must not depend on `rows` or on the
 * range's bounds (the host splits ranges across threads and batches rows freely). The host calls matmul()
 * for calls of up to a few rows and unpack() + its own fp32 product above that, unless the format declares
 * KVP_CAP_MATMUL_PREFILL (then matmul() for every call); a format whose matmul() is not the fp32 product
 * of its unpacked values within rounding declares KVP_CAP_ACT_QUANT, unless it declares
 * KVP_CAP_MATMUL_PREFILL. */
typedef struct kvp_matmul_args {
    uint32_t struct_size;
    const kvp_weight_info *w;
    const void *packed; /* what pack() wrote for this matrix */
    const float *x;     /* [rows, k] */
    uint32_t rows;
    uint32_t n0, n1;    /* output range, 0 <= n0 < n1 <= n */
    float *y;
    size_t ldy;         /* floats between rows of y */
} kvp_matmul_args;

/* ---- the descriptor ------------------------------------------------------------------------------ */
typedef struct kvp_descriptor {
    uint32_t abi_major;   /* KVP_ABI_MAJOR the plugin was built with */
    uint32_t abi_minor;   /* KVP_ABI_MINOR the plugin was built with */
    uint32_t struct_size; /* sizeof(kvp_descriptor) the plugin was built with */
    uint32_t role;        /* KVP_ROLE_* */
    uint32_t caps;        /* KVP_CAP_* */
    uint32_t n_params;
    const char *name;     /* short name, [a-z0-9_]+, used as the INI section / --set prefix */
    const char *version;
    const char *summary;  /* one line */
    const kvp_param *params; /* [n_params], may be NULL when n_params == 0 */

    /* REQUIRED. Creates the state for one layer. Reads parameters through host->param(). Must set
     * out->budget. Returns KVP_OK or KVP_ERROR (after host->set_error). */
    int (*create)(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out);
    /* REQUIRED. Frees what create() made. Called once per successful create(). */
    void (*destroy)(void *state);
    /* Optional (may be NULL). A sequence slot is reused for a new sequence: forget its history.
     * A POLICY WITHOUT reset() promises that it keeps no per-sequence state of its own: everything it knows
     * of a sequence is in the host's arrays (score[], obs_score[], slot metadata, budgets). The engine
     * relies on it to share prompt blocks between requests with a snapshot of those arrays (docs/engine.md);
     * a policy with reset() gets no prefix sharing. */
    int (*reset)(void *state, uint32_t seq);
    /* Optional. Per-head budgets for a sequence, called after its prefill with KVP_CAP_HEAD_BUDGETS.
     * Fill budgets[0..n_kv_head-1]; each >= 1. The host validates them. */
    int (*head_budgets)(void *state, uint32_t seq, uint32_t *budgets);
    /* REQUIRED for policies. Writes victim slot indices (each < n_live, no duplicates, at least
     * min_victims, at most n_live) into victims[] (room for n_live entries) and their count into
     * *n_victims. The host compacts the slots afterwards. */
    int (*evict)(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims);

    /* ---- ABI 1.1: stores (role KVP_ROLE_STORE). Slots are fixed-size, so the host owns the memory,
     * compacts by moving whole slots and counts the bytes exactly. decode and attend are REQUIRED for
     * stores, encode too unless the store has append() (ABI 1.2). They must not allocate; encode and
     * attend may be called from several threads at once for different heads. ---- */
    /* Encodes one token row (head_dim floats) of K (which = KVP_WHICH_K) or V into slot. */
    void (*encode)(void *state, uint32_t which, const float *row, void *slot);
    /* Decodes one slot back to head_dim floats (the reference the tests and other backends check against). */
    void (*decode)(void *state, uint32_t which, const void *slot, float *row);
    /* Attention of one query over the stored slots; see kvp_attend_args. */
    void (*attend)(void *state, const kvp_attend_args *args);

    /* ---- ABI 1.2: stores that keep memory outside the fixed-size slots ("handle stores"), or that
     * need the token's coordinates when writing it. Both optional. A store with append() may leave
     * encode() NULL: the host then never calls encode(). Memory a store instance obtains from
     * host->alloc() / host->shared() counts as KV bytes held (kv_bytes_held, peak, --mem-limit): an
     * alloc that would pass the run's KV memory limit returns NULL. alloc/free may be called from
     * create, append, release, reset and destroy, never from attend (which runs on several threads). */
    /* Writes the new tokens' slots (see kvp_append_args). KVP_OK or KVP_ERROR after host->set_error. */
    int (*append)(void *state, const kvp_append_args *args);
    /* Slots are about to be removed (see kvp_release_args). */
    void (*release)(void *state, const kvp_release_args *args);

    /* ---- ABI 1.3: weight formats (role KVP_ROLE_WEIGHTS); all four REQUIRED for that role. A weight
     * format's create() need not set a budget. ---- */
    /* Bytes the packed form of w takes (> 0), or 0 when the format cannot hold this matrix (after
     * host->set_error saying why, e.g. k not a multiple of the group size). */
    size_t (*packed_size)(void *state, const kvp_weight_info *w);
    /* Packs the fp32 matrix src (layout KVP_LAYOUT_*) into dst (packed_size bytes, 64-byte aligned,
     * zeroed). KVP_OK, or KVP_ERROR after host->set_error (e.g. a non-finite weight). */
    int (*pack)(void *state, const kvp_weight_info *w, const float *src, uint32_t src_layout, void *dst);
    /* Writes W(i, j) for n0 <= j < n1 as fp32 rows: dst[(j - n0) * k + i], the values matmul() uses. */
    void (*unpack)(void *state, const kvp_weight_info *w, const void *packed, uint32_t n0, uint32_t n1, float *dst);
    /* Products over the packed form; see kvp_matmul_args. */
    void (*matmul)(void *state, const kvp_matmul_args *args);

    /* ---- ABI 1.3: policies that see the attention they judge. Call order within one forward step:
     * layers strictly in order, 0..n_layer-1, never two layers at once; within a layer insert() for
     * every (seq, head) of the step, then the attention of all heads, then score_report() for every
     * (seq, head): seq in batch order, heads 0..n_kv_head-1, all on one thread. Eviction (evict()) runs
     * after the whole step. So a layer-wise policy sees every head's report before any evict() of that
     * step, and can read other heads' metadata through host->slot_meta(). Neither hook may allocate. */
    /* Optional. See kvp_insert_args. KVP_OK, or KVP_ERROR after host->set_error (stops the run). */
    int (*insert)(void *state, const kvp_insert_args *args);
    /* REQUIRED with KVP_CAP_SCORE_REPORT. See kvp_score_report. KVP_OK, or KVP_ERROR after set_error. */
    int (*score_report)(void *state, const kvp_score_report *report);
} kvp_descriptor;

/* The one exported function. Use KVP_PLUGIN(descriptor) to define it. */
typedef const kvp_descriptor *(*kvp_entry_fn)(void);

#if defined(__GNUC__)
#define KVP_EXPORT __attribute__((visibility("default")))
#else
#define KVP_EXPORT
#endif

#define KVP_PLUGIN(desc) \
    KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void); \
    KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void) { return &(desc); }

/* Fills the ABI header fields of a descriptor initializer. */
#define KVP_DESCRIPTOR_HEADER \
    .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR, .struct_size = sizeof(kvp_descriptor)

/* ---- helpers every policy needs ------------------------------------------------------------------
 * Selection: pick the k slots with the smallest (or largest) key in O(n) expected time, without
 * allocating. idx is caller scratch of n entries (an evict hook may pass its victims[] array, which has
 * room for n_live entries); on return idx[0..k-1] hold the chosen slot indices, in no particular order,
 * and idx[k..n-1] the others. k == 0 or k >= n leaves idx = 0..n-1 (everything or nothing chosen).
 *
 * Order used: by key, ties broken by the smaller slot index, so results are deterministic. For float
 * keys a NaN counts as larger than every number (never chosen by _smallest_ before a number, always
 * chosen by _largest_ first) so a corrupt score cannot break the selection. */

#define KVP__SEL_SMALL_F 0
#define KVP__SEL_LARGE_F 1
#define KVP__SEL_SMALL_I 2
#define KVP__SEL_LARGE_I 3

/* 1 when slot a must come before slot b in the requested order. A strict total order. */
static inline int kvp__before(const void *key, int mode, uint32_t a, uint32_t b) {
    if (mode == KVP__SEL_SMALL_F || mode == KVP__SEL_LARGE_F) {
        float x = ((const float *)key)[a], y = ((const float *)key)[b];
        int xn = x != x, yn = y != y; /* NaN */
        if (xn || yn) {
            if (xn && yn) return a < b;
            /* NaN is "largest" */
            return mode == KVP__SEL_SMALL_F ? yn : xn;
        }
        if (x != y) return mode == KVP__SEL_SMALL_F ? x < y : x > y;
        return a < b;
    } else {
        int32_t x = ((const int32_t *)key)[a], y = ((const int32_t *)key)[b];
        if (x != y) return mode == KVP__SEL_SMALL_I ? x < y : x > y;
        return a < b;
    }
}

/* Quickselect (Lomuto partition, median-of-three pivot) over a strict total order: no equal elements,
 * so there is no degenerate case with repeated keys. All index arithmetic stays in [0, n). */
static inline void kvp__select(const void *key, int mode, uint32_t n, uint32_t k, uint32_t *idx) {
    for (uint32_t i = 0; i < n; i++) idx[i] = i;
    if (k == 0 || k >= n) return;
    uint32_t lo = 0, hi = n - 1, target = k - 1, t;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        /* order idx[lo] <= idx[mid] <= idx[hi], then park the median at hi as the pivot */
        if (kvp__before(key, mode, idx[mid], idx[lo])) { t = idx[mid]; idx[mid] = idx[lo]; idx[lo] = t; }
        if (kvp__before(key, mode, idx[hi], idx[lo])) { t = idx[hi]; idx[hi] = idx[lo]; idx[lo] = t; }
        if (kvp__before(key, mode, idx[hi], idx[mid])) { t = idx[hi]; idx[hi] = idx[mid]; idx[mid] = t; }
        t = idx[mid]; idx[mid] = idx[hi]; idx[hi] = t;
        uint32_t pivot = idx[hi], store = lo;
        for (uint32_t i = lo; i < hi; i++) {
            if (kvp__before(key, mode, idx[i], pivot)) { t = idx[i]; idx[i] = idx[store]; idx[store] = t; store++; }
        }
        t = idx[store]; idx[store] = idx[hi]; idx[hi] = t; /* pivot now at its final rank `store` */
        if (store == target) return;
        if (store < target) lo = store + 1;
        else hi = store - 1; /* store > target >= lo, so store >= 1 */
    }
}

/* The k slots with the smallest float key (e.g. the least-attended tokens: H2O's victims). */
static inline void kvp_select_smallest_f(const float *key, uint32_t n, uint32_t k, uint32_t *idx) {
    kvp__select(key, KVP__SEL_SMALL_F, n, k, idx);
}
/* The k slots with the largest float key (e.g. the heavy hitters to keep). */
static inline void kvp_select_largest_f(const float *key, uint32_t n, uint32_t k, uint32_t *idx) {
    kvp__select(key, KVP__SEL_LARGE_F, n, k, idx);
}
/* The k slots with the smallest int32 key (e.g. the oldest positions: a FIFO window's victims). */
static inline void kvp_select_smallest_i(const int32_t *key, uint32_t n, uint32_t k, uint32_t *idx) {
    kvp__select(key, KVP__SEL_SMALL_I, n, k, idx);
}
/* The k slots with the largest int32 key (e.g. the most recent positions). */
static inline void kvp_select_largest_i(const int32_t *key, uint32_t n, uint32_t k, uint32_t *idx) {
    kvp__select(key, KVP__SEL_LARGE_I, n, k, idx);
}

/* Reads a parameter through the host table, rounded to the nearest integer (the host has already
 * checked the value is an integer in the declared range for KVP_PARAM_INT parameters). */
static inline int64_t kvp_param_int(const kvp_host *host, const char *name) {
    double v = host->param(host->ctx, name);
    return (int64_t)(v < 0 ? v - 0.5 : v + 0.5);
}

/* Parses a layer list "all" | "3" | "0-11" | "12,14,16" | "0-3,8-11" into mask[0..n_layer-1] (1 = claimed).
 * Returns 0, or -1 on a malformed list, a reversed range or a layer >= n_layer (mask left undefined). */
static inline int kvp_parse_layers(const char *text, uint32_t n_layer, unsigned char *mask) {
    for (uint32_t i = 0; i < n_layer; i++) mask[i] = 0;
    while (*text == ' ' || *text == '\t') text++;
    if (strncmp(text, "all", 3) == 0 && strspn(text + 3, " \t") == strlen(text + 3)) {
        for (uint32_t i = 0; i < n_layer; i++) mask[i] = 1;
        return n_layer > 0 ? 0 : -1;
    }
    const char *p = text;
    int any = 0;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        if (*p < '0' || *p > '9') return -1;
        unsigned long a = 0, b;
        while (*p >= '0' && *p <= '9') { a = a * 10 + (unsigned long)(*p - '0'); if (a > 1000000ul) return -1; p++; }
        b = a;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '-') {
            p++;
            while (*p == ' ' || *p == '\t') p++;
            if (*p < '0' || *p > '9') return -1;
            b = 0;
            while (*p >= '0' && *p <= '9') { b = b * 10 + (unsigned long)(*p - '0'); if (b > 1000000ul) return -1; p++; }
        }
        if (b < a || b >= n_layer) return -1;
        for (unsigned long l = a; l <= b; l++) mask[l] = 1;
        any = 1;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '\0') break;
        if (*p != ',') return -1;
        p++;
    }
    return any ? 0 : -1;
}

#ifdef __cplusplus
}
#endif
#endif /* KVP_KVP_H */
