/* router.c — per-layer plugin instances (one policy and one store at most per layer), the host
 * services table and hook calls. See router.h.
 * Does not own cache storage (kvcache.c), plugin loading details (plugin.c) or calling store hooks
 * per token (the backend does: it encodes and attends through kvh_layer_policy_settings.store). */
#define _POSIX_C_SOURCE 200809L
#include "runtime/router.h"

#include "backend/cpu_features.h"

#include <cjson/cJSON.h>
#include <stdalign.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "runtime/plugin.h"
#include "runtime/plugin_guard.h"
#include "util/sanitizer.h"

/* Every plugin allocation carries this header, so the section's leftovers are freed at the end of the run,
 * after every instance of the section is destroyed (alloc memory belongs to the section, not the instance). */
typedef union alloc_hdr {
    struct {
        union alloc_hdr *prev, *next;
        size_t size;
    } h;
    max_align_t align;
} alloc_hdr;

/* One configured section (plugin instance group). */
typedef struct group {
    char *section;
    kvh_plugin *plugin;     /* owned by the registry */
    double *values;         /* [n_params] parsed parameter values */
    unsigned char *mask;    /* [L] layers claimed */
    const kvh_config_section *cfg; /* for origins in messages (valid during create only) */
    alloc_hdr *allocs;      /* live allocations of the section's instances (doubly linked): any instance
                             * of a section may free what another allocated (ABI 1.2 shared state) */
    void *shared;           /* host->shared() block, NULL until asked for */
    size_t shared_bytes;
} group;

/* The per-instance host context: one per claimed layer. kvp_host.ctx points here. */
typedef struct host_ctx {
    kvp_host host;
    kvh_router *r;
    group *g;
    int layer;
    kvh_kvcache *cache;     /* the cache during a hook call, NULL otherwise */
    char error[512];        /* last set_error message (raw bytes, NUL-terminated) */
    int has_error;
    int error_truncated;    /* the plugin's message was longer than error[] */
    kvp_instance inst;
    int created;
    kvh_plugin_site site;   /* plugin name, file name, layer: for crash messages of store hooks */
} host_ctx;

struct kvh_router {
    int n_layer, n_head, head_dim, n_ctx, n_seq;
    uint32_t budget, slack;
    kvh_plugin_registry reg;
    group *groups;
    int n_groups;
    host_ctx **layer_ctx;   /* [L] policy instance, NULL = keep-all */
    host_ctx **store_ctx;   /* [L] store instance, NULL = dense fp32 (the backend's own layout) */
    host_ctx **weight_ctx;  /* [L + 1] weight-format instance per layer, [L] = the tied LM head; NULL = fp32 */
    uint32_t *head_budget;  /* [NH] scratch for head_budgets() */
    uint64_t hook_ns;
    uint64_t evict_calls;
    kvh_kvcache *cache;     /* bound cache: store memory is counted in its bytes_held (NULL: not yet) */
    const kvh_model *model; /* weights for host->tensor() during creation; NULL afterwards and without one */
    int warned_newest, warned_all; /* the once-per-run warnings of kvh_router_enforce */
    size_t store_bytes;     /* bytes store instances hold through alloc/shared */
    size_t policy_bytes, policy_bytes_peak; /* the same for policy instances (not KV bytes: reported apart) */
};

/* ---- messages ---------------------------------------------------------------------------------- */

/* Copies plugin-supplied text into buf with control and non-ASCII bytes escaped (\xNN), truncated
 * with "..." when it does not fit. */
static int escape_text(const char *s, char *buf, size_t cap) {
    size_t o = 0;
    int cut = 0;
    if (cap == 0) return 1;
    for (size_t i = 0; s[i]; i++) {
        unsigned char c = (unsigned char)s[i];
        size_t need = (c < 0x20 || c >= 0x7f || c == '\\') ? 4 : 1;
        if (o + need + 4 >= cap) {
            if (o + 4 <= cap) memcpy(buf + o, "...", 3), o += 3;
            cut = 1;
            break;
        }
        if (c == '\\') buf[o++] = '\\', buf[o++] = '\\';
        else if (need == 4) o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        else buf[o++] = (char)c;
    }
    buf[o] = '\0';
    return cut;
}

static int hook_fail(host_ctx *x, int seq, int head, const char *hook, kvh_err *err) {
    char msg[700];
    if (x->has_error) {
        int cut = escape_text(x->error, msg, sizeof msg - 4);
        if (x->error_truncated && !cut) strcat(msg, "...");
    } else snprintf(msg, sizeof msg, "(the plugin gave no message)");
    char where[96] = "";
    if (seq >= 0) snprintf(where, sizeof where, " seq %d", seq);
    if (head >= 0) snprintf(where + strlen(where), sizeof where - strlen(where), " head %d", head);
    return kvh_fail(err, "plugin '%s' (%s) layer %d%s: %s failed: %s", x->g->plugin->desc.name,
                    x->g->plugin->file_name, x->layer, where, hook, msg);
}

/* ---- host services ------------------------------------------------------------------------------- */

static void svc_log(void *ctx, int level, const char *msg) {
    host_ctx *x = ctx;
    static const char *names[] = {"error", "warning", "info", "debug"};
    char text[600];
    escape_text(msg ? msg : "(null)", text, sizeof text);
    const char *lv = level >= 0 && level <= 3 ? names[level] : "log";
    fprintf(stderr, "[plugin %s layer %d] %s: %s\n", x->g->plugin->desc.name, x->layer, lv, text);
}

static void svc_set_error(void *ctx, const char *msg) {
    host_ctx *x = ctx;
    if (!msg) msg = "(null message)";
    size_t n = 0;
    while (n < sizeof x->error - 1 && msg[n]) n++; /* bounded: never reads past what fits */
    memcpy(x->error, msg, n);
    x->error[n] = '\0';
    x->error_truncated = msg[n] != '\0';
    x->has_error = 1;
}

static int is_store(const group *g) { return g->plugin->desc.role == KVP_ROLE_STORE; }
static int is_weights(const group *g) { return g->plugin->desc.role == KVP_ROLE_WEIGHTS; }

static int is_policy(const group *g) { return g->plugin->desc.role == KVP_ROLE_POLICY; }

/* Store memory is KV memory: counted in the bound cache's bytes_held, refused past its limit. Policy
 * memory (state, scratch) is counted apart, in policy_bytes, and not bounded by the KV limit. */
static int account_grow(host_ctx *x, size_t bytes) {
    if (is_policy(x->g)) {
        x->r->policy_bytes += bytes;
        if (x->r->policy_bytes > x->r->policy_bytes_peak) x->r->policy_bytes_peak = x->r->policy_bytes;
        return 0;
    }
    if (!is_store(x->g)) return 0;
    if (x->r->cache && kvh_kvcache_store_grow(x->r->cache, bytes) != 0) return -1;
    x->r->store_bytes += bytes;
    return 0;
}

static void account_shrink(host_ctx *x, size_t bytes) {
    if (is_policy(x->g)) {
        x->r->policy_bytes -= bytes < x->r->policy_bytes ? bytes : x->r->policy_bytes;
        return;
    }
    if (!is_store(x->g)) return;
    if (x->r->cache) kvh_kvcache_store_shrink(x->r->cache, bytes);
    x->r->store_bytes -= bytes < x->r->store_bytes ? bytes : x->r->store_bytes;
}

static void *group_alloc(host_ctx *x, size_t bytes) {
    if (bytes > SIZE_MAX - sizeof(alloc_hdr)) return NULL;
    if (account_grow(x, bytes) != 0) return NULL;
    alloc_hdr *a = calloc(1, sizeof(alloc_hdr) + (bytes ? bytes : 1));
    if (!a) {
        account_shrink(x, bytes);
        return NULL;
    }
    group *g = x->g;
    a->h.size = bytes;
    a->h.next = g->allocs;
    if (g->allocs) g->allocs->h.prev = a;
    g->allocs = a;
    return a + 1;
}

static void group_free(host_ctx *x, void *p) {
    if (!p) return;
    group *g = x->g;
    alloc_hdr *a = (alloc_hdr *)p - 1;
    if (a->h.prev) a->h.prev->h.next = a->h.next;
    else g->allocs = a->h.next;
    if (a->h.next) a->h.next->h.prev = a->h.prev;
    account_shrink(x, a->h.size);
    free(a);
}

static void *svc_alloc(void *ctx, size_t bytes) { return group_alloc(ctx, bytes); }
static void svc_free(void *ctx, void *p) { group_free(ctx, p); }

static void *svc_shared(void *ctx, size_t bytes) {
    host_ctx *x = ctx;
    group *g = x->g;
    if (g->shared) return bytes == g->shared_bytes ? g->shared : NULL;
    g->shared = group_alloc(x, bytes);
    if (g->shared) g->shared_bytes = bytes;
    return g->shared;
}

static double svc_param(void *ctx, const char *name) {
    host_ctx *x = ctx;
    if (!name) return 0;
    int i = kvh_plugin_param_index(&x->g->plugin->desc, name);
    return i < 0 ? 0 : x->g->values[i];
}

static kvh_head_cache *svc_head(host_ctx *x, uint32_t seq, uint32_t head) {
    if (!x->cache || seq >= (uint32_t)x->r->n_seq || head >= (uint32_t)x->r->n_head) return NULL;
    return kvh_kvcache_head(x->cache, (int)seq, x->layer, (int)head);
}
static uint32_t svc_live_count(void *ctx, uint32_t seq, uint32_t head) {
    kvh_head_cache *hc = svc_head(ctx, seq, head);
    return hc ? hc->n : 0;
}
static const int32_t *svc_positions(void *ctx, uint32_t seq, uint32_t head) {
    kvh_head_cache *hc = svc_head(ctx, seq, head);
    return hc ? hc->pos : NULL;
}
static const float *svc_scores(void *ctx, uint32_t seq, uint32_t head) {
    kvh_head_cache *hc = svc_head(ctx, seq, head);
    return hc ? hc->score : NULL;
}
static const float *svc_obs_scores(void *ctx, uint32_t seq, uint32_t head) {
    kvh_head_cache *hc = svc_head(ctx, seq, head);
    return hc ? hc->obs_score : NULL;
}
/* host->tensor(): one of a layer's fp32 tensors by its Hugging Face name inside the block. */
static int svc_tensor(void *ctx, uint32_t layer, const char *name, kvp_tensor *out) {
    host_ctx *x = ctx;
    char msg[300];
    const kvh_model *m = x->r->model;
    if (!out || out->struct_size < sizeof *out) {
        svc_set_error(x, "host->tensor: out is NULL or its struct_size is not set to sizeof(kvp_tensor)");
        return KVP_ERROR;
    }
    if (!m) {
        svc_set_error(x, "host->tensor: this host has no model weights at hand (only during create, in a session)");
        return KVP_ERROR;
    }
    const uint32_t C = (uint32_t)m->cfg.n_embd;
    if (!name || layer >= (uint32_t)m->cfg.n_layer) {
        snprintf(msg, sizeof msg, "host->tensor: layer %u out of range (the model has %d layers)", layer, m->cfg.n_layer);
        svc_set_error(x, msg);
        return KVP_ERROR;
    }
    /* A deferred F16/BF16 matrix (model.h) is converted to fp32 the first time a plugin asks for it: this
     * runs during session creation, which is single-threaded per model (session.c). */
    for (int mat = KVH_MAT_ATTN_QKV; mat <= KVH_MAT_ATTN_PROJ && name; mat++) {
        const char *nm = mat == KVH_MAT_ATTN_QKV ? "attn.c_attn.weight" : "attn.c_proj.weight";
        kvh_err merr = {{0}};
        if (strcmp(name, nm) == 0 && kvh_model_needs_materialize(m, (int)layer, mat) &&
            kvh_model_materialize((kvh_model *)m, (int)layer, mat, &merr) != 0) {
            svc_set_error(x, merr.msg);
            return KVP_ERROR;
        }
    }
    const kvh_layer_weights *w = &m->layers[layer];
    static const char *const names[] = {"attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                                        "attn.c_proj.bias", "ln_1.weight", "ln_1.bias"};
    const float *data[] = {w->attn_w, w->attn_b, w->proj_w, w->proj_b, w->ln1_w, w->ln1_b};
    const uint32_t rows[] = {C, 1, C, 1, 1, 1}, cols[] = {3 * C, 3 * C, C, C, C, C};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(name, names[i]) == 0) {
            out->rows = rows[i];
            out->cols = cols[i];
            out->data = data[i];
            return KVP_OK;
        }
    char shown[80];
    escape_text(name, shown, sizeof shown);
    snprintf(msg, sizeof msg, "host->tensor: no tensor '%s' (known: attn.c_attn.weight, attn.c_attn.bias, "
             "attn.c_proj.weight, attn.c_proj.bias, ln_1.weight, ln_1.bias)", shown);
    svc_set_error(x, msg);
    return KVP_ERROR;
}

static void *svc_slot_meta(void *ctx, uint32_t seq, uint32_t head) {
    kvh_head_cache *hc = svc_head(ctx, seq, head);
    return hc ? hc->meta : NULL;
}

/* ---- creation ------------------------------------------------------------------------------------- */

static int validate_params(group *g, const kvh_config_section *s, kvh_err *err) {
    const kvp_descriptor *d = &g->plugin->desc;
    g->values = calloc(d->n_params ? d->n_params : 1, sizeof *g->values);
    if (!g->values) return kvh_fail(err, "[%s]: out of memory", s->name);
    for (uint32_t i = 0; i < d->n_params; i++) g->values[i] = d->params[i].default_value;
    for (int i = 0; i < s->n_params; i++) {
        const kvh_config_kv *kv = &s->params[i];
        char at[300];
        kvh_origin_format(&kv->origin, at, sizeof at);
        int pi = kvh_plugin_param_index(d, kv->key);
        if (pi < 0) {
            char list[512] = "";
            size_t u = 0;
            for (uint32_t j = 0; j < d->n_params && u < sizeof list; j++) {
                int w = snprintf(list + u, sizeof list - u, "%s%s", j ? ", " : "", d->params[j].name);
                if (w > 0) u += (size_t)w;
            }
            if (d->n_params)
                return kvh_fail(err, "%s: [%s] unknown parameter '%s' for plugin '%s' (%s); its parameters are: %s", at,
                                s->name, kv->key, d->name, g->plugin->file_name, list);
            return kvh_fail(err, "%s: [%s] unknown parameter '%s': plugin '%s' (%s) has no parameters", at, s->name,
                            kv->key, d->name, g->plugin->file_name);
        }
        if (kvh_plugin_param_parse(&d->params[pi], kv->value, &g->values[pi], err) != 0)
            return kvh_fail_prefix(err, "%s: [%s] %s = %s", at, s->name, kv->key, kv->value);
    }
    return 0;
}

/* Policy metadata per slot and prefill rows per report (ABI 1.3): bounded so a garbage value cannot ask
 * for gigabytes; both are far above what a counter or a short history needs. */
#define KVH_SLOT_META_MAX 256u
#define KVH_REPORT_ROWS_MAX 64u

/* Largest slot a store may ask for, per token and head: 16x the dense fp32 row. Anything larger is
 * certainly a bug (uninitialized field, bytes per layer instead of per head). */
#define STORE_SLOT_MAX_FACTOR 16u

static int create_instance(kvh_router *r, group *g, int layer, kvh_err *err) {
    host_ctx *x = calloc(1, sizeof *x);
    if (!x) return kvh_fail(err, "[%s] layer %d: out of memory", g->section, layer);
    if (is_store(g)) r->store_ctx[layer] = x;
    else if (is_weights(g)) r->weight_ctx[layer] = x;
    else r->layer_ctx[layer] = x;
    x->r = r;
    x->g = g;
    x->layer = layer;
    x->site = (kvh_plugin_site){.plugin = g->plugin->desc.name, .file = g->plugin->file_name, .layer = layer};
    x->host = (kvp_host){
        .struct_size = sizeof(kvp_host),
        .abi_major = KVP_ABI_MAJOR,
        .abi_minor = KVP_ABI_MINOR,
        .ctx = x,
        .log = svc_log,
        .set_error = svc_set_error,
        .alloc = svc_alloc,
        .free = svc_free,
        .param = svc_param,
        .live_count = svc_live_count,
        .positions = svc_positions,
        .scores = svc_scores,
        .obs_scores = svc_obs_scores,
        .shared = svc_shared,
        .cpu_level = (uint32_t)kvh_cpu_isa(), /* KVP_CPU_* and kvh_isa share their values */
        .slot_meta = svc_slot_meta,
        .tensor = svc_tensor,
    };
    kvp_layer_info info = {
        .struct_size = sizeof info,
        .layer = (uint32_t)layer,
        .n_layer = (uint32_t)r->n_layer,
        .n_q_head = (uint32_t)r->n_head,
        .n_kv_head = (uint32_t)r->n_head,
        .head_dim = (uint32_t)r->head_dim,
        .n_ctx = (uint32_t)r->n_ctx,
        .n_seq = (uint32_t)r->n_seq,
        .cache_budget = r->budget,
        .slack = r->slack,
    };
    x->inst.struct_size = sizeof x->inst;
    const kvp_descriptor *d = &g->plugin->desc;
    kvh_plugin_guard_enter(d->name, g->plugin->file_name, "create", layer);
    int create_rc = d->create(&x->host, &info, &x->inst);
    kvh_plugin_guard_leave();
    if (create_rc != KVP_OK) {
        hook_fail(x, -1, -1, "create", err);
        return kvh_fail_prefix(err, "[%s]", g->section);
    }
    x->created = 1;
    if (is_weights(g)) return 0; /* a weight format has no budget; its matrices are checked when packed */
    if (is_store(g)) {
        /* A store's budget is meaningless (policies choose who stays); its slot sizes are what counts. */
        const uint64_t max_bytes = (uint64_t)r->head_dim * sizeof(float) * STORE_SLOT_MAX_FACTOR;
        const uint32_t sizes[2] = {x->inst.k_slot_bytes, x->inst.v_slot_bytes};
        const char *names[2] = {"k_slot_bytes", "v_slot_bytes"};
        for (int i = 0; i < 2; i++) {
            if (sizes[i] < 1)
                return kvh_fail(err, "[%s] store '%s' (%s) layer %d: create set %s 0 (a store must give the bytes one "
                                "token's row occupies in one head, >= 1)", g->section, d->name, g->plugin->file_name,
                                layer, names[i]);
            if (sizes[i] > max_bytes)
                return kvh_fail(err, "[%s] store '%s' (%s) layer %d: create set %s %u, more than %u x the fp32 row of "
                                "head_dim %d (%llu bytes): not a per-token, per-head size", g->section, d->name,
                                g->plugin->file_name, layer, names[i], (unsigned)sizes[i], STORE_SLOT_MAX_FACTOR,
                                r->head_dim, (unsigned long long)max_bytes);
        }
        /* ABI 1.4: an older store never writes store_flags, and the host zeroed it before create(). */
        const uint32_t known = KVP_STORE_SELF_CONTAINED | KVP_STORE_DECODE_ATTEND;
        if (x->inst.store_flags & ~known)
            return kvh_fail(err, "[%s] store '%s' (%s) layer %d: create set unknown store_flags bits 0x%x", g->section,
                            d->name, g->plugin->file_name, layer, (unsigned)(x->inst.store_flags & ~known));
        return 0;
    }
    if (x->inst.store_flags)
        return kvh_fail(err, "[%s] plugin '%s' (%s) layer %d: create set store_flags 0x%x but is not a store", g->section,
                        d->name, g->plugin->file_name, layer, (unsigned)x->inst.store_flags);
    if (x->inst.budget < 1)
        return kvh_fail(err, "[%s] plugin '%s' (%s) layer %d: create set budget %u (must be >= 1)", g->section, d->name,
                        g->plugin->file_name, layer, (unsigned)x->inst.budget);
    if ((d->caps & KVP_CAP_OBS_SCORES) && x->inst.obs_window < 1)
        return kvh_fail(err, "[%s] plugin '%s' (%s) layer %d: asks for observation-window scores but create set "
                        "obs_window 0 (must be >= 1)", g->section, d->name, g->plugin->file_name, layer);
    /* ABI 1.3 fields: a 1.2 plugin never writes them, and the host zeroed them before create(). */
    if (x->inst.slot_meta_bytes > KVH_SLOT_META_MAX)
        return kvh_fail(err, "[%s] plugin '%s' (%s) layer %d: create set slot_meta_bytes %u (at most %u per slot)",
                        g->section, d->name, g->plugin->file_name, layer, (unsigned)x->inst.slot_meta_bytes,
                        (unsigned)KVH_SLOT_META_MAX);
    if (x->inst.report_rows > KVH_REPORT_ROWS_MAX)
        return kvh_fail(err, "[%s] plugin '%s' (%s) layer %d: create set report_rows %u (at most %u)", g->section,
                        d->name, g->plugin->file_name, layer, (unsigned)x->inst.report_rows, (unsigned)KVH_REPORT_ROWS_MAX);
    return 0;
}

static int create_impl(kvh_router **out, const kvh_run_config *cfg, const char *plugin_path, const kvh_model *model,
                       int n_layer, int n_head, int head_dim, int n_ctx, int n_seq, kvh_err *err) {
    *out = NULL;
    if (n_layer < 1 || n_head < 1 || head_dim < 1 || n_ctx < 1 || n_seq < 1)
        return kvh_fail(err, "router: invalid model shape (layers %d, heads %d, head_dim %d, ctx %d, seqs %d)", n_layer,
                        n_head, head_dim, n_ctx, n_seq);
    kvh_router *r = calloc(1, sizeof *r);
    if (!r) return kvh_fail(err, "router: out of memory");
    r->n_layer = n_layer;
    r->n_head = n_head;
    r->head_dim = head_dim;
    r->n_ctx = n_ctx;
    r->n_seq = n_seq;
    r->budget = cfg->budget;
    r->slack = cfg->slack;
    r->model = model;
    kvh_plugin_registry_init(&r->reg);
    r->layer_ctx = calloc((size_t)n_layer, sizeof *r->layer_ctx);
    r->store_ctx = calloc((size_t)n_layer, sizeof *r->store_ctx);
    r->weight_ctx = calloc((size_t)n_layer + 1, sizeof *r->weight_ctx);
    r->head_budget = calloc((size_t)n_head, sizeof *r->head_budget);
    r->groups = calloc(cfg->n_sections ? (size_t)cfg->n_sections : 1, sizeof *r->groups);
    if (!r->layer_ctx || !r->store_ctx || !r->weight_ctx || !r->head_budget || !r->groups) {
        kvh_router_free(r);
        return kvh_fail(err, "router: out of memory");
    }
    /* group index + 1 claiming each layer: [0, L) policies, [L, 2L) stores, [2L, 3L) weight formats,
     * [3L] the LM head's weight format */
    int *owner = calloc((size_t)n_layer * 3 + 1, sizeof *owner);
    if (!owner) {
        kvh_router_free(r);
        return kvh_fail(err, "router: out of memory");
    }
    int rc = 0;
    for (int i = 0; i < cfg->n_sections && rc == 0; i++) {
        const kvh_config_section *s = &cfg->sections[i];
        group *g = &r->groups[r->n_groups++];
        g->cfg = s;
        g->section = strdup(s->name);
        g->mask = calloc((size_t)n_layer, 1);
        if (!g->section || !g->mask) {
            rc = kvh_fail(err, "router: out of memory");
            break;
        }
        char at[300];
        kvh_origin_format(&s->plugin_origin, at, sizeof at);
        if (kvh_plugin_registry_load(&r->reg, s->plugin, plugin_path, &g->plugin, err) != 0) {
            rc = kvh_fail_prefix(err, "%s: [%s] plugin = %s", at, s->name, s->plugin);
            break;
        }
        if ((rc = validate_params(g, s, err)) != 0) break;
        kvh_origin_format(&s->layers_origin, at, sizeof at);
        if (kvp_parse_layers(s->layers, (uint32_t)n_layer, g->mask) != 0) {
            rc = kvh_fail(err, "%s: [%s] layers = %s: expected all, N, A-B or a comma list of those, with layers in "
                          "0..%d (the model has %d layers)", at, s->name, s->layers, n_layer - 1, n_layer);
            break;
        }
        const int store = is_store(g), weights = is_weights(g);
        const char *role = store ? "store" : weights ? "weight format" : "policy",
                   *roles = store ? "stores" : weights ? "weight formats" : "policies";
        for (int l = 0; l < n_layer; l++) {
            if (!g->mask[l]) continue;
            int *own = &owner[store ? n_layer + l : weights ? 2 * n_layer + l : l];
            if (*own) {
                const kvh_config_section *o = r->groups[*own - 1].cfg;
                char at2[300];
                kvh_origin_format(&o->layers_origin, at2, sizeof at2);
                rc = kvh_fail(err, "%s: layer %d is claimed by two %s: [%s] (%s) and [%s] (%s); a layer takes at "
                              "most one %s%s", at, l, roles, o->name, at2, s->name, at, role,
                              store ? " (stores do not stack: each holds the whole token in its own form; a store "
                                      "that can also quantize says so in its parameters, e.g. lorc's bits = 8: "
                                      "kvhost plugins info NAME)" : "");
                break;
            }
            *own = i + 1;
        }
        /* A weight format's `lm_head` parameter also gives it the tied LM head: one section at most. */
        const int lm = weights ? kvh_plugin_param_index(&g->plugin->desc, "lm_head") : -1;
        if (rc == 0 && lm >= 0 && g->values[lm] != 0) {
            if (owner[3 * n_layer]) {
                const kvh_config_section *o = r->groups[owner[3 * n_layer] - 1].cfg;
                kvh_origin_format(&s->origin, at, sizeof at);
                rc = kvh_fail(err, "%s: [%s] and [%s] both hold the LM head (lm_head = true); set lm_head = false in "
                              "one of them", at, o->name, s->name);
                break;
            }
            owner[3 * n_layer] = i + 1;
        }
    }
    for (int gi = 0; gi < r->n_groups && rc == 0; gi++) {
        group *g = &r->groups[gi];
        for (int l = 0; l < n_layer && rc == 0; l++)
            if (g->mask[l]) rc = create_instance(r, g, l, err);
        if (rc == 0 && owner[3 * n_layer] == gi + 1) rc = create_instance(r, g, n_layer, err);
    }
    free(owner);
    r->model = NULL; /* host->tensor() serves create() only */
    for (int gi = 0; gi < r->n_groups; gi++) r->groups[gi].cfg = NULL;
    if (rc != 0) {
        kvh_router_free(r);
        return -1;
    }
    *out = r;
    return 0;
}

int kvh_router_create_model(kvh_router **out, const kvh_run_config *cfg, const char *plugin_path,
                            const kvh_model *model, int n_seq, kvh_err *err) {
    const kvh_model_config *mc = &model->cfg;
    return create_impl(out, cfg, plugin_path, model, mc->n_layer, mc->n_head, mc->n_head ? mc->n_embd / mc->n_head : 0,
                       mc->n_positions, n_seq, err);
}

int kvh_router_create_ex(kvh_router **out, const kvh_run_config *cfg, const char *plugin_path, int n_layer,
                         int n_head, int head_dim, int n_ctx, int n_seq, kvh_err *err) {
    return create_impl(out, cfg, plugin_path, NULL, n_layer, n_head, head_dim, n_ctx, n_seq, err);
}

int kvh_router_create(kvh_router **out, const kvh_run_config *cfg, int n_layer, int n_head, int head_dim, int n_ctx,
                      int n_seq, kvh_err *err) {
    return kvh_router_create_ex(out, cfg, NULL, n_layer, n_head, head_dim, n_ctx, n_seq, err);
}

void kvh_router_free(kvh_router *r) {
    if (!r) return;
    r->cache = NULL; /* the cache may already be gone; nothing is accounted at teardown */
    host_ctx **sets[3] = {r->layer_ctx, r->store_ctx, r->weight_ctx};
    for (int k = 0; k < 3; k++) {
        if (!sets[k]) continue;
        for (int l = 0; l < r->n_layer + (k == 2); l++) {
            host_ctx *x = sets[k][l];
            if (!x) continue;
            if (x->created) {
                kvh_plugin_guard_enter(x->g->plugin->desc.name, x->g->plugin->file_name, "destroy", l);
                x->g->plugin->desc.destroy(x->inst.state);
                kvh_plugin_guard_leave();
            }
        }
    }
    /* Leftover plugin memory goes with its section, after every instance of it is destroyed. */
    for (int i = 0; i < r->n_groups; i++) {
        group *g = &r->groups[i];
        while (g->allocs) {
            alloc_hdr *a = g->allocs;
            g->allocs = a->h.next;
            account_shrink(&(host_ctx){.r = r, .g = g}, a->h.size);
            free(a);
        }
    }
    for (int k = 0; k < 3; k++) {
        if (!sets[k]) continue;
        for (int l = 0; l < r->n_layer + (k == 2); l++) free(sets[k][l]);
    }
    for (int i = 0; i < r->n_groups; i++) {
        free(r->groups[i].section);
        free(r->groups[i].values);
        free(r->groups[i].mask);
    }
    free(r->groups);
    free(r->layer_ctx);
    free(r->store_ctx);
    free(r->weight_ctx);
    free(r->head_budget);
    kvh_plugin_registry_free(&r->reg);
    free(r);
}

/* ---- queries ------------------------------------------------------------------------------------- */

/* kvh_layer_policy_settings.store_fail: the backend reports a failed store hook through the router's
 * message format. */
static int store_fail(void *ctx, int seq, int head, const char *hook, kvh_err *err) {
    host_ctx *x = ctx;
    int rc = hook_fail(x, seq, head, hook, err);
    x->has_error = 0; /* reported: a later failure without a message must not repeat this one */
    return rc;
}

const kvh_plugin_site *kvh_plugin_site_of(const void *store_fail_ctx) {
    static const kvh_plugin_site unknown = {.plugin = "?", .file = "store plugin", .layer = -1};
    return store_fail_ctx ? &((const host_ctx *)store_fail_ctx)->site : &unknown;
}

int kvh_router_bind_cache(kvh_router *r, kvh_kvcache *c, kvh_err *err) {
    if (r->store_bytes && kvh_kvcache_store_grow(c, r->store_bytes) != 0)
        return kvh_fail(err, "KV memory limit %zu bytes is smaller than the %zu bytes the store plugins hold before "
                        "the first token", c->bytes_limit, r->store_bytes);
    r->cache = c;
    return 0;
}

/* Under AddressSanitizer, the policy metadata past each head's live slots (up to its capacity) is poisoned
 * while the layer's policy hooks run for (seq, layer): a hook that writes past the last live slot's
 * metadata is stopped at that write, and plugin_guard names the plugin. Elsewhere the host itself moves
 * and zeroes those bytes, so they are unpoisoned again when the hook returns. Without ASan: nothing. */
static void meta_tails(kvh_kvcache *c, int seq, int layer, int poison) {
#ifdef KVH_ASAN
    const size_t mb = c->layer[layer].slot_meta_bytes;
    if (!mb) return;
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, seq, layer, h);
        if (!hc->meta || hc->cap <= hc->n) continue;
        void *tail = hc->meta + (size_t)hc->n * mb;
        const size_t len = (size_t)(hc->cap - hc->n) * mb;
        if (poison) ASAN_POISON_MEMORY_REGION(tail, len);
        else ASAN_UNPOISON_MEMORY_REGION(tail, len);
    }
#else
    (void)c, (void)seq, (void)layer, (void)poison;
#endif
}

/* kvh_layer_policy_settings.policy_insert: the policy's insert hook for every head of (seq, layer). */
static int policy_insert(void *ctx, kvh_kvcache *c, int seq, int layer, int T, kvh_err *err) {
    host_ctx *x = ctx;
    const kvp_descriptor *d = &x->g->plugin->desc;
    const uint32_t mb = c->layer[layer].slot_meta_bytes;
    x->cache = c;
    uint64_t t0 = kvh_now_ns();
    meta_tails(c, seq, layer, 1);
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, seq, layer, h);
        kvp_insert_args a = {.struct_size = sizeof a, .seq = (uint32_t)seq, .head = (uint32_t)h, .n_live = hc->n,
                             .first_slot = hc->n - (uint32_t)T, .n_new = (uint32_t)T, .pos = hc->pos,
                             .slot_meta = hc->meta, .slot_meta_bytes = mb};
        x->has_error = 0;
        kvh_plugin_guard_enter(d->name, x->g->plugin->file_name, "insert", layer);
        int hrc = d->insert(x->inst.state, &a);
        kvh_plugin_guard_leave();
        if (hrc != KVP_OK) {
            meta_tails(c, seq, layer, 0);
            x->cache = NULL;
            x->r->hook_ns += kvh_now_ns() - t0;
            return hook_fail(x, seq, h, "insert", err);
        }
    }
    meta_tails(c, seq, layer, 0);
    x->cache = NULL;
    x->r->hook_ns += kvh_now_ns() - t0;
    return 0;
}

/* kvh_layer_policy_settings.policy_report: hands each head's buffered probabilities of this step to the
 * policy's score_report (layout in kvcache.h). qpos[T]: the step's query positions. */
static int policy_report(void *ctx, kvh_kvcache *c, int seq, int layer, int T, const int32_t *qpos, kvh_err *err) {
    host_ctx *x = ctx;
    const kvp_descriptor *d = &x->g->plugin->desc;
    const kvh_layer_policy_settings *ls = &c->layer[layer];
    const uint32_t R = (uint32_t)T < ls->report_rows ? (uint32_t)T : ls->report_rows;
    x->cache = c;
    uint64_t t0 = kvh_now_ns();
    meta_tails(c, seq, layer, 1);
    for (int h = 0; h < c->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, seq, layer, h);
        kvp_score_report rep = {.struct_size = sizeof rep, .seq = (uint32_t)seq, .head = (uint32_t)h, .n_live = hc->n,
                                .n_queries = (uint32_t)T, .n_rows = R, .in_prefill = T > 1, .pos = hc->pos,
                                .q_pos = qpos + (T - (int)R), .col_sum = kvh_report_col(hc),
                                .rows = kvh_report_row(hc, T, 0), .slot_meta = hc->meta,
                                .slot_meta_bytes = ls->slot_meta_bytes};
        x->has_error = 0;
        kvh_plugin_guard_enter(d->name, x->g->plugin->file_name, "score_report", layer);
        int hrc = d->score_report(x->inst.state, &rep);
        kvh_plugin_guard_leave();
        if (hrc != KVP_OK) {
            meta_tails(c, seq, layer, 0);
            x->cache = NULL;
            x->r->hook_ns += kvh_now_ns() - t0;
            return hook_fail(x, seq, h, "score_report", err);
        }
    }
    meta_tails(c, seq, layer, 0);
    x->cache = NULL;
    x->r->hook_ns += kvh_now_ns() - t0;
    return 0;
}

void kvh_router_layer_settings(const kvh_router *r, kvh_layer_policy_settings *settings) {
    for (int l = 0; l < r->n_layer; l++) {
        kvh_layer_policy_settings *s = &settings[l];
        memset(s, 0, sizeof *s);
        s->slack = r->slack;
        const host_ctx *st = r->store_ctx[l];
        if (st) {
            s->store = &st->g->plugin->desc;
            s->store_state = st->inst.state;
            s->store_flags = st->inst.store_flags;
            s->k_slot_bytes = st->inst.k_slot_bytes;
            s->v_slot_bytes = st->inst.v_slot_bytes;
            s->store_fail = store_fail;
            s->store_fail_ctx = (void *)st;
            s->store_param = svc_param;
        }
        const host_ctx *x = r->layer_ctx[l];
        if (!x) {
            s->budget = KVH_BUDGET_UNLIMITED;
            continue;
        }
        uint32_t caps = x->g->plugin->desc.caps;
        s->budget = x->inst.budget;
        s->decode_scores = (caps & KVP_CAP_DECODE_SCORES) != 0;
        s->prefill_scores = (caps & KVP_CAP_PREFILL_SCORES) != 0;
        s->track_scores = s->decode_scores || s->prefill_scores;
        s->obs_scores = (caps & KVP_CAP_OBS_SCORES) != 0;
        s->obs_window = s->obs_scores ? x->inst.obs_window : 0;
        const kvp_descriptor *d = &x->g->plugin->desc;
        s->slot_meta_bytes = x->inst.slot_meta_bytes;
        s->report = (caps & KVP_CAP_SCORE_REPORT) != 0 && d->score_report;
        s->report_rows = s->report ? (x->inst.report_rows ? x->inst.report_rows : 1u) : 0u;
        s->policy_insert = d->insert ? policy_insert : NULL;
        s->policy_report = s->report ? policy_report : NULL;
        s->policy_ctx = (void *)x;
        s->policy = d;
    }
}

const char *kvh_router_layer_policy_name(const kvh_router *r, int layer) {
    if (!r || layer < 0 || layer >= r->n_layer || !r->layer_ctx[layer]) return NULL;
    return r->layer_ctx[layer]->g->plugin->desc.name;
}

const char *kvh_router_layer_section(const kvh_router *r, int layer) {
    if (!r || layer < 0 || layer >= r->n_layer || !r->layer_ctx[layer]) return NULL;
    return r->layer_ctx[layer]->g->section;
}

const char *kvh_router_layer_store_name(const kvh_router *r, int layer) {
    if (!r || layer < 0 || layer >= r->n_layer || !r->store_ctx[layer]) return NULL;
    return r->store_ctx[layer]->g->plugin->desc.name;
}

const char *kvh_router_layer_store_section(const kvh_router *r, int layer) {
    if (!r || layer < 0 || layer >= r->n_layer || !r->store_ctx[layer]) return NULL;
    return r->store_ctx[layer]->g->section;
}

int kvh_router_weight_format(const kvh_router *r, int layer, kvh_weight_format *out) {
    memset(out, 0, sizeof *out);
    if (!r || layer < 0 || layer > r->n_layer || !r->weight_ctx[layer]) return 0;
    const host_ctx *x = r->weight_ctx[layer];
    out->desc = &x->g->plugin->desc;
    out->state = x->inst.state;
    out->section = x->g->section;
    out->file = x->g->plugin->file_name;
    out->error_ctx = (void *)x;
    return 1;
}

const char *kvh_router_weight_error(void *error_ctx) {
    host_ctx *x = error_ctx;
    if (!x || !x->has_error) return "no message (the plugin did not call set_error)";
    x->has_error = 0;
    return x->error;
}

double kvh_router_hook_ns(const kvh_router *r) { return r ? (double)r->hook_ns : 0.0; }
uint64_t kvh_router_evict_calls(const kvh_router *r) { return r ? r->evict_calls : 0; }

size_t kvh_router_policy_bytes(const kvh_router *r, size_t *peak) {
    if (peak) *peak = r ? r->policy_bytes_peak : 0;
    return r ? r->policy_bytes : 0;
}

/* ---- hooks ---------------------------------------------------------------------------------------- */

int kvh_router_enforce(kvh_router *r, kvh_kvcache *c, int seq, int layer, int in_prefill, kvh_err *err) {
    if (layer < 0 || layer >= r->n_layer) return kvh_fail(err, "router: layer %d out of range", layer);
    host_ctx *x = r->layer_ctx[layer];
    if (!x) return 0;
    if (seq < 0 || seq >= r->n_seq || seq >= c->n_seq)
        return kvh_fail(err, "router: sequence %d out of range (%d sequences)", seq, r->n_seq);
    if (c->n_layer != r->n_layer || c->n_head != r->n_head)
        return kvh_fail(err, "router: cache shape (%d layers, %d heads) differs from the router's (%d, %d)", c->n_layer,
                        c->n_head, r->n_layer, r->n_head);
    const kvp_descriptor *d = &x->g->plugin->desc;
    uint32_t slack = c->layer[layer].slack;
    for (int h = 0; h < r->n_head; h++) {
        kvh_head_cache *hc = kvh_kvcache_head(c, seq, layer, h);
        uint32_t budget = hc->budget;
        if (budget == KVH_BUDGET_UNLIMITED || (uint64_t)hc->n <= (uint64_t)budget + slack) continue;
        uint32_t n_live = hc->n;
        if (n_live > c->scratch_len)
            return kvh_fail(err, "plugin '%s' (%s) layer %d seq %d head %d: %u live slots exceed the victim scratch (%u)",
                            d->name, x->g->plugin->file_name, layer, seq, h, n_live, c->scratch_len);
        int32_t newest = hc->pos[0];
        for (uint32_t i = 1; i < n_live; i++)
            if (hc->pos[i] > newest) newest = hc->pos[i];
        kvp_evict_request req = {
            .struct_size = sizeof req,
            .seq = (uint32_t)seq,
            .head = (uint32_t)h,
            .n_live = n_live,
            .budget = budget,
            .min_victims = n_live - budget,
            .newest_pos = newest,
            .in_prefill = in_prefill ? 1u : 0u,
            .pos = hc->pos,
            .score = hc->score,
            .obs_score = hc->obs_score,
            .slot_meta = hc->meta,
            .slot_meta_bytes = c->layer[layer].slot_meta_bytes,
        };
        uint32_t *victims = c->scratch_victims;
        uint32_t n_victims = 0;
        x->has_error = 0;
        x->cache = c;
        uint64_t t0 = kvh_now_ns();
        meta_tails(c, seq, layer, 1);
        kvh_plugin_guard_enter(d->name, x->g->plugin->file_name, "evict", layer);
        int hrc = d->evict(x->inst.state, &req, victims, &n_victims);
        kvh_plugin_guard_leave();
        meta_tails(c, seq, layer, 0);
        r->hook_ns += kvh_now_ns() - t0;
        r->evict_calls++;
        x->cache = NULL;
        if (hrc != KVP_OK) return hook_fail(x, seq, h, "evict", err);
        if (hc->n != n_live)
            return kvh_fail(err, "plugin '%s' (%s) layer %d seq %d head %d: the live count changed during evict",
                            d->name, x->g->plugin->file_name, layer, seq, h);
        if (kvh_kvcache_validate_victims(c, n_live, budget, victims, n_victims, err) != 0)
            return kvh_fail_prefix(err, "plugin '%s' (%s) layer %d seq %d head %d: evict returned a bad victim list",
                                   d->name, x->g->plugin->file_name, layer, seq, h);
        /* Legal answers that are rarely meant: say so once per run (stderr, like host->log). */
        if (n_victims == n_live && !r->warned_all++)
            fprintf(stderr, "kvhost: warning: plugin '%s' (%s) layer %d seq %d head %d evicted every token (%u); legal, "
                    "but the head now holds nothing (warned once per run)\n", d->name, x->g->plugin->file_name, layer,
                    seq, h, n_live);
        else if (!r->warned_newest)
            for (uint32_t i = 0; i < n_victims; i++)
                if (hc->pos[victims[i]] == newest) {
                    r->warned_newest = 1;
                    fprintf(stderr, "kvhost: warning: plugin '%s' (%s) layer %d seq %d head %d evicted the newest token "
                            "(position %d); legal (TOVA may, by design), usually a bug (warned once per run)\n", d->name,
                            x->g->plugin->file_name, layer, seq, h, (int)newest);
                    break;
                }
        if (kvh_kvcache_remove(c, seq, layer, h, victims, n_victims, err) != 0)
            return kvh_fail_prefix(err, "plugin '%s' (%s) layer %d seq %d head %d: evicting", d->name,
                                   x->g->plugin->file_name, layer, seq, h);
        kvh_kvcache_shrink(c, seq, layer, h);
    }
    return 0;
}

int kvh_router_after_prefill(kvh_router *r, kvh_kvcache *c, int seq, kvh_err *err) {
    if (seq < 0 || seq >= r->n_seq || seq >= c->n_seq)
        return kvh_fail(err, "router: sequence %d out of range (%d sequences)", seq, r->n_seq);
    for (int l = 0; l < r->n_layer; l++) {
        host_ctx *x = r->layer_ctx[l];
        if (!x) continue;
        const kvp_descriptor *d = &x->g->plugin->desc;
        if ((d->caps & KVP_CAP_HEAD_BUDGETS) && d->head_budgets) {
            for (int h = 0; h < r->n_head; h++) r->head_budget[h] = x->inst.budget;
            x->has_error = 0;
            x->cache = c;
            uint64_t t0 = kvh_now_ns();
            kvh_plugin_guard_enter(d->name, x->g->plugin->file_name, "head_budgets", l);
            int hrc = d->head_budgets(x->inst.state, (uint32_t)seq, r->head_budget);
            kvh_plugin_guard_leave();
            r->hook_ns += kvh_now_ns() - t0;
            x->cache = NULL;
            if (hrc != KVP_OK) return hook_fail(x, seq, -1, "head_budgets", err);
            for (int h = 0; h < r->n_head; h++)
                if (r->head_budget[h] < 1)
                    return kvh_fail(err, "plugin '%s' (%s) layer %d seq %d: head_budgets gave head %d budget %u (must be >= 1)",
                                    d->name, x->g->plugin->file_name, l, seq, h, (unsigned)r->head_budget[h]);
            for (int h = 0; h < r->n_head; h++) kvh_kvcache_head(c, seq, l, h)->budget = r->head_budget[h];
        }
        if (kvh_router_enforce(r, c, seq, l, 1, err) != 0) return -1;
    }
    return 0;
}

int kvh_router_reset_seq(kvh_router *r, int seq, kvh_err *err) {
    if (seq < 0 || seq >= r->n_seq) return kvh_fail(err, "router: sequence %d out of range (%d sequences)", seq, r->n_seq);
    for (int k = 0; k < 2; k++)
        for (int l = 0; l < r->n_layer; l++) {
            host_ctx *x = k ? r->store_ctx[l] : r->layer_ctx[l];
            if (!x || !x->g->plugin->desc.reset) continue;
            x->has_error = 0;
            uint64_t t0 = kvh_now_ns();
            kvh_plugin_guard_enter(x->g->plugin->desc.name, x->g->plugin->file_name, "reset", l);
            int hrc = x->g->plugin->desc.reset(x->inst.state, (uint32_t)seq);
            kvh_plugin_guard_leave();
            r->hook_ns += kvh_now_ns() - t0;
            if (hrc != KVP_OK) return hook_fail(x, seq, -1, "reset", err);
        }
    return 0;
}

/* ---- description ------------------------------------------------------------------------------- */

/* cJSON reports out of memory only through NULL results: every addition below is checked. */
static int add_str(cJSON *o, const char *k, const char *v) { return cJSON_AddStringToObject(o, k, v) ? 0 : -1; }
static int add_num(cJSON *o, const char *k, double v) { return cJSON_AddNumberToObject(o, k, v) ? 0 : -1; }
static int push(cJSON *arr, cJSON *item) {
    if (!item) return -1;
    cJSON_AddItemToArray(arr, item);
    return 0;
}

static int describe_instance(const kvh_router *r, const group *g, cJSON *o) {
    const kvp_descriptor *d = &g->plugin->desc;
    const int store = is_store(g), weights = is_weights(g);
    if (add_str(o, "section", g->section) || add_str(o, "plugin", d->name) || add_str(o, "file", g->plugin->file_name) ||
        add_str(o, "path", g->plugin->path) || add_str(o, "version", d->version) ||
        add_str(o, "role", store ? "store" : weights ? "weights" : "policy"))
        return -1;
    host_ctx *const *ctx = store ? r->store_ctx : weights ? r->weight_ctx : r->layer_ctx;
    cJSON *layers = cJSON_AddArrayToObject(o, "layers");
    /* policies: per-layer budgets; stores: per-layer [k_slot_bytes, v_slot_bytes]; weight formats: whether
     * they hold the LM head too */
    cJSON *per = weights ? NULL : cJSON_AddArrayToObject(o, store ? "slot_bytes" : "budgets");
    if (!layers || (!per && !weights)) return -1;
    if (weights && !cJSON_AddBoolToObject(o, "lm_head", ctx[r->n_layer] && ctx[r->n_layer]->g == g)) return -1;
    for (int l = 0; l < r->n_layer; l++) {
        if (!g->mask[l] || !ctx[l]) continue;
        if (push(layers, cJSON_CreateNumber(l))) return -1;
        if (weights) continue;
        if (store) {
            cJSON *kv = cJSON_CreateArray();
            if (push(per, kv) || push(kv, cJSON_CreateNumber(ctx[l]->inst.k_slot_bytes)) ||
                push(kv, cJSON_CreateNumber(ctx[l]->inst.v_slot_bytes)))
                return -1;
        } else if (push(per, cJSON_CreateNumber(ctx[l]->inst.budget))) {
            return -1;
        }
    }
    cJSON *params = cJSON_AddObjectToObject(o, "params");
    if (!params) return -1;
    for (uint32_t i = 0; i < d->n_params; i++) {
        const cJSON *added = d->params[i].type == KVP_PARAM_BOOL
                                 ? cJSON_AddBoolToObject(params, d->params[i].name, g->values[i] != 0)
                                 : cJSON_AddNumberToObject(params, d->params[i].name, g->values[i]);
        if (!added) return -1;
    }
    return 0;
}

cJSON *kvh_router_describe(const kvh_router *r) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    int bad = (r->budget ? !cJSON_AddNumberToObject(root, "budget", r->budget) : !cJSON_AddNullToObject(root, "budget")) ||
              add_num(root, "slack", r->slack);
    cJSON *insts = bad ? NULL : cJSON_AddArrayToObject(root, "instances");
    if (!insts) bad = 1;
    for (int gi = 0; !bad && gi < r->n_groups; gi++) {
        cJSON *o = cJSON_CreateObject();
        bad = push(insts, o) || describe_instance(r, &r->groups[gi], o);
    }
    cJSON *per_layer = bad ? NULL : cJSON_AddArrayToObject(root, "layers");
    cJSON *per_layer_store = per_layer ? cJSON_AddArrayToObject(root, "stores") : NULL;
    /* weight formats per layer, and the LM head's as the last entry (null: fp32) */
    cJSON *per_layer_weights = per_layer_store ? cJSON_AddArrayToObject(root, "weights") : NULL;
    if (!per_layer_weights) bad = 1;
    for (int l = 0; !bad && l < r->n_layer; l++) {
        const char *p = kvh_router_layer_section(r, l), *st = kvh_router_layer_store_section(r, l);
        bad = push(per_layer, p ? cJSON_CreateString(p) : cJSON_CreateNull()) ||
              push(per_layer_store, st ? cJSON_CreateString(st) : cJSON_CreateNull());
    }
    for (int l = 0; !bad && l <= r->n_layer; l++) {
        const host_ctx *w = r->weight_ctx[l];
        bad = push(per_layer_weights, w ? cJSON_CreateString(w->g->section) : cJSON_CreateNull());
    }
    if (bad) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

int kvh_router_describe_json(const kvh_router *r, char *buf, size_t cap) {
    cJSON *root = kvh_router_describe(r);
    if (!root) return -1;
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return -1;
    size_t len = strlen(text);
    if (cap > 0) {
        size_t n = len < cap - 1 ? len : cap - 1;
        memcpy(buf, text, n);
        buf[n] = '\0';
    }
    cJSON_free(text);
    return len > (size_t)INT32_MAX ? -1 : (int)len;
}
