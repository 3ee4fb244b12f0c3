/* router.h — per-layer routing of plugins: which policy and which store instance serve which layer.
 * Owns: loading each configured instance's plugin (plugin.h), checking its parameters against the
 * descriptor (naming file:line:key), refusing two policies or two stores on one layer (a layer takes
 * at most one of each), one plugin instance per claimed layer with its host services table (kvp_host),
 * calling the policy hooks (create, destroy, reset, head_budgets, evict), validating every answer
 * (including a store's slot sizes), compacting the cache through kvcache.h, timing the hooks, and
 * describing the exact plugin stack for records. A store's per-token hooks (encode, attend) are called
 * by the backend through the settings this router fills; a store's create() budget is ignored.
 * Does not own: the cache storage and compaction (kvcache.h), attention/scores (backend), the run
 * file (config.h), the decode loop (session.c).
 *
 * Eviction rule: a head of (seq, layer) is trimmed when its live count n exceeds budget + slack; the
 * policy's evict() then brings it down to exactly `budget` (or below, if it chooses more victims).
 * So after every kvh_router_enforce, n <= budget + slack for every head of that (seq, layer). */
#ifndef KVH_ROUTER_H
#define KVH_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/config.h"
#include "runtime/kvcache.h"
#include "kvp/kvp.h"
#include "util/util.h"

typedef struct kvh_router kvh_router;

/* Loads the plugins of cfg's sections, validates their parameters and layer claims against the model
 * shape, and creates one instance per claimed layer. A config with no plugin sections gives a router
 * that keeps every token on every layer. plugin_path for lookups is cfg-independent: see
 * kvh_router_create_ex. On failure *out is NULL and nothing is left loaded. */
int kvh_router_create(kvh_router **out, const kvh_run_config *cfg, int n_layer, int n_head, int head_dim, int n_ctx,
                      int n_seq, kvh_err *err);
/* Same, with a --plugin-path (colon-separated directories searched before the defaults; may be NULL). */
int kvh_router_create_ex(kvh_router **out, const kvh_run_config *cfg, const char *plugin_path, int n_layer,
                         int n_head, int head_dim, int n_ctx, int n_seq, kvh_err *err);
/* Same for a model: its shape, and its fp32 weights for the plugins' host->tensor() service (ABI 1.3),
 * which creates read during create(). The model must outlive the router's creation only (instances
 * are created before any weight format repacks the weights). The other constructors give no weights:
 * host->tensor() then fails with a message saying so. */
struct kvh_model;
int kvh_router_create_model(kvh_router **out, const kvh_run_config *cfg, const char *plugin_path,
                            const struct kvh_model *model, int n_seq, kvh_err *err);

/* Fills settings[n_layer]: budget (from the policy instance's create(); KVH_BUDGET_UNLIMITED on
 * keep-all layers), slack ([cache] slack), score flags from the policy's caps, obs_window; on layers
 * with a store: store (its descriptor), store_state, k_slot_bytes, v_slot_bytes, store_fail (0 elsewhere:
 * the caller picks the dense layout). */
void kvh_router_layer_settings(const kvh_router *r, kvh_layer_policy_settings *settings);

/* Counts the store plugins' memory (host->alloc / host->shared, ABI 1.2) in c's bytes_held from now
 * on, and what they already hold. Call once, after creating the cache from kvh_router_layer_settings.
 * Fails when that memory alone passes c's byte limit. */
int kvh_router_bind_cache(kvh_router *r, kvh_kvcache *c, kvh_err *err);

/* For every head of (seq, layer) with n > budget + slack: asks the policy for victims, validates them,
 * removes them and shrinks the head. Keep-all layers return at once. On error (hook failure, invalid
 * victim list) the head being processed is left intact and err names plugin, file, layer, seq, head
 * and hook: "plugin 'h2o' (h2o.so) layer 3 seq 0 head 5: evict returned ...". */
int kvh_router_enforce(kvh_router *r, kvh_kvcache *c, int seq, int layer, int in_prefill, kvh_err *err);

/* After a prefill of `seq`: per-head budgets (KVP_CAP_HEAD_BUDGETS layers; each must be >= 1) written
 * into the cache's heads, then kvh_router_enforce(in_prefill = 1) on every layer. */
int kvh_router_after_prefill(kvh_router *r, kvh_kvcache *c, int seq, kvh_err *err);

/* Sequence slot `seq` starts a new sequence: calls reset() of every instance that has one. */
int kvh_router_reset_seq(kvh_router *r, int seq, kvh_err *err);

/* The weight-format instance serving `layer` (0..n_layer-1; n_layer = the tied LM head). */
typedef struct kvh_weight_format {
    const kvp_descriptor *desc; /* NULL: the layer's weights stay fp32 */
    void *state;
    const char *section, *file; /* for messages */
    void *error_ctx;            /* for kvh_router_weight_error */
} kvh_weight_format;
/* Fills *out and returns 1 when a weight format serves `layer`, else zeroes it and returns 0. */
int kvh_router_weight_format(const kvh_router *r, int layer, kvh_weight_format *out);
/* The message the instance set with host->set_error since the last call (a hook returned an error). */
const char *kvh_router_weight_error(void *error_ctx);

/* Total nanoseconds spent inside plugin hooks (create excluded). */
double kvh_router_hook_ns(const kvh_router *r);
/* Number of evict() calls made so far. */
uint64_t kvh_router_evict_calls(const kvh_router *r);
/* Bytes policy instances hold through host->alloc / host->shared now (their state and scratch; the
 * per-slot metadata the host keeps for them is KV memory, in the cache's bytes_held), and the most they
 * held at once into *peak (may be NULL). Not part of the cache's bytes_held or its limit. 0 for NULL. */
size_t kvh_router_policy_bytes(const kvh_router *r, size_t *peak);

/* The plugin stack as a cJSON object (the caller owns it), sized by its content:
 *   {"budget":B|null,"slack":S,"instances":[{"section","plugin","file","path","version","role":"policy"|"store",
 *    "layers":[..],"params":{name:value,...},"budgets":[per layer] (policies) | "slot_bytes":[[K,V] per layer]
 *    (stores)}],"layers":[policy section name or null per layer],"stores":[store section name or null per layer]}
 * NULL only when out of memory (never a partial description). Records embed it as their `plugins` key. */
struct cJSON;
struct cJSON *kvh_router_describe(const kvh_router *r);
/* The same as text. Writes at most cap bytes including the NUL. Returns the length of the full text
 * (like snprintf: a value >= cap means it was truncated), or -1 when out of memory. */
int kvh_router_describe_json(const kvh_router *r, char *buf, size_t cap);

/* Name of the POLICY plugin serving `layer` ("window"), or NULL for keep-all / out of range. */
const char *kvh_router_layer_policy_name(const kvh_router *r, int layer);
/* Policy section name serving `layer`, or NULL. */
const char *kvh_router_layer_section(const kvh_router *r, int layer);
/* Name of the STORE plugin holding `layer` ("int8"), or NULL for the dense default / out of range. */
const char *kvh_router_layer_store_name(const kvh_router *r, int layer);
/* Store section name holding `layer`, or NULL. */
const char *kvh_router_layer_store_section(const kvh_router *r, int layer);

/* Destroys every instance (destroy hook), frees leftover plugin allocations, dlcloses the plugins. */
void kvh_router_free(kvh_router *r);

#endif
