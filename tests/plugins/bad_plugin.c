/* bad_plugin.c — test plugins, one per KIND_* define (see CMakeLists.txt). Each bad_* kind breaks
 * exactly one rule of the SDK contract so the loader/router tests can check the error names it;
 * tp_params (int/float/bool parameters, decode scores) and tp_heads (per-head budgets) are valid.
 * Load-time kinds crash or exit in a constructor or in kvp_plugin_entry, return an unreadable
 * descriptor or string, or an over-long / non-UTF-8 version; exit kinds end the process from a hook
 * (tests/plugin_crash.sh). */
#include <kvp/kvp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "bad"
#endif

#ifdef KIND_UNDEF
/* Defined nowhere: dlopen(RTLD_NOW) must fail with "undefined symbol". */
extern int kvh_test_symbol_that_does_not_exist(int);
#endif

typedef struct tstate {
    const kvp_host *host;
    uint32_t budget;
    uint32_t n_head;
} tstate;

static const kvp_param params[] = {
    {.name = "count", .type = KVP_PARAM_INT, .default_value = 8, .min_value = 1, .max_value = 100,
     .help = "an int parameter in 1..100"},
    {.name = "ratio", .type = KVP_PARAM_FLOAT, .default_value = 0.5, .min_value = 0, .max_value = 1,
     .help = "a float parameter in [0, 1]"},
#if defined(KIND_DUPPARAM)
    {.name = "count", .type = KVP_PARAM_INT, .default_value = 1, .min_value = 1, .max_value = 2, .help = "again"},
#elif defined(KIND_DEFAULT)
    {.name = "level", .type = KVP_PARAM_INT, .default_value = 50, .min_value = 1, .max_value = 10,
     .help = "default above max"},
#elif defined(KIND_BADTYPE)
    {.name = "odd", .type = 77, .default_value = 0, .min_value = 0, .max_value = 1, .help = "unknown type"},
#endif
    {.name = "flag", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1,
     .help = "a bool parameter"},
};

#if defined(KIND_CTORSEGV) || defined(KIND_CTOREXIT)
/* Plugins must not rely on constructors; these break the rule while dlopen runs them. */
__attribute__((constructor)) static void t_ctor(void) {
#ifdef KIND_CTORSEGV
    volatile int *volatile nowhere = NULL; /* volatile: the compiler cannot drop the fault */
    *nowhere = 1;
#else
    exit(0);
#endif
}
#endif

static int t_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
#ifdef KIND_EXITCREATE
    exit(0);
#endif
#ifdef KIND_CREATE
    (void)layer;
    (void)out;
    host->set_error(host->ctx, "create refused: this plugin always fails");
    return KVP_ERROR;
#else
    tstate *s = host->alloc(host->ctx, sizeof *s);
    if (!s) return KVP_ERROR;
    s->host = host;
    s->n_head = layer->n_kv_head;
    s->budget = layer->cache_budget ? layer->cache_budget : (uint32_t)kvp_param_int(host, "count");
#ifdef KIND_BUDGET0
    s->budget = 0;
#endif
    out->state = s;
    out->budget = s->budget;
#ifdef KIND_UNDEF
    out->budget += (uint32_t)kvh_test_symbol_that_does_not_exist(1);
#endif
    return KVP_OK;
#endif
}

static void t_destroy(void *state) { (void)state; }

static int t_reset(void *state, uint32_t seq) {
    (void)state;
    (void)seq;
    return KVP_OK;
}

static int t_head_budgets(void *state, uint32_t seq, uint32_t *budgets) {
    tstate *s = state;
    (void)seq;
    /* head h gets budget + h */
    for (uint32_t h = 0; h < s->n_head; h++) budgets[h] = s->budget + h;
#ifdef KIND_HEADBUDGETS0
    budgets[1] = 0;
#endif
    return KVP_OK;
}

static int t_evict(void *state, const kvp_evict_request *req, uint32_t *victims, uint32_t *n_victims) {
    tstate *s = state;
    (void)s;
    kvp_select_smallest_i(req->pos, req->n_live, req->min_victims, victims);
    *n_victims = req->min_victims;
#if defined(KIND_RANGE)
    victims[0] = req->n_live + 500;
#elif defined(KIND_DUP)
    if (*n_victims >= 2) victims[1] = victims[0];
    else { victims[1] = victims[0]; *n_victims = 2; }
#elif defined(KIND_FEW)
    *n_victims = req->min_victims - 1;
#elif defined(KIND_EXIT)
    exit(0);
#elif defined(KIND_UEXIT)
    _exit(0);
#elif defined(KIND_SEGV)
    {
        /* a plugin bug: write through a null pointer */
        volatile uint32_t *nowhere = NULL;
        *nowhere = req->n_live;
    }
#elif defined(KIND_ERROR)
    {
        /* a very long message with control characters and an ANSI escape */
        char msg[3000];
        memset(msg, 'x', sizeof msg - 1);
        msg[sizeof msg - 1] = '\0';
        memcpy(msg, "evict broke\n\x1b[31mred\x07\r\t", 23);
        s->host->set_error(s->host->ctx, msg);
        return KVP_ERROR;
    }
#endif
    return KVP_OK;
}

#if defined(KIND_LONGVERSION)
static char long_version[80 * 1024]; /* filled by the entry function: 80 KB of '9' */
#endif

static const kvp_descriptor descriptor = {
#if defined(KIND_ABI)
    .abi_major = KVP_ABI_MAJOR + 1, .abi_minor = 0, .struct_size = sizeof(kvp_descriptor),
#elif defined(KIND_SMALL)
    .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR, .struct_size = 16,
#else
    KVP_DESCRIPTOR_HEADER,
#endif
    .role = KVP_ROLE_POLICY,
#if defined(KIND_PARAMS)
    .caps = KVP_CAP_DECODE_SCORES | KVP_CAP_PREFILL_SCORES,
#elif defined(KIND_HEADS) || defined(KIND_HEADBUDGETS0)
    .caps = KVP_CAP_HEAD_BUDGETS,
    .head_budgets = t_head_budgets,
#endif
    .n_params = sizeof params / sizeof params[0],
#if defined(KIND_NAME)
    .name = "Bad-Name!",
#elif defined(KIND_NULLNAME)
    .name = NULL,
#else
    .name = PLUGIN_NAME,
#endif
#if defined(KIND_LONGVERSION)
    .version = long_version,
#elif defined(KIND_BADUTF8)
    .version = "1.0-\xff\xfe",
#elif defined(KIND_STRGARBAGE)
    .version = (const char *)(uintptr_t)24, /* in the never-mapped first page */
#else
    .version = "0.0.1",
#endif
    .summary = "test plugin " PLUGIN_NAME,
    .params = params,
    .create = t_create,
    .destroy = t_destroy,
    .reset = t_reset,
#if !defined(KIND_NOEVICT)
    .evict = t_evict,
#endif
};

#if defined(KIND_NOENTRY)
/* exports a differently named function instead of kvp_plugin_entry */
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry_typo(void);
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry_typo(void) { return &descriptor; }
#elif defined(KIND_NULLENTRY)
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void);
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void) { return descriptor.name ? NULL : &descriptor; }
#elif defined(KIND_ENTRYSEGV)
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void);
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void) {
    const kvp_descriptor *volatile *volatile nowhere = NULL;
    (void)descriptor;
    return (const kvp_descriptor *)*nowhere;
}
#elif defined(KIND_ENTRYGARBAGE)
/* a pointer into the never-mapped first page: reading it would fault */
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void);
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void) {
    (void)descriptor;
    return (const kvp_descriptor *)(uintptr_t)16;
}
#elif defined(KIND_LONGVERSION)
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void);
KVP_EXPORT const kvp_descriptor *kvp_plugin_entry(void) {
    memset(long_version, '9', sizeof long_version - 1);
    return &descriptor;
}
#else
KVP_PLUGIN(descriptor)
#endif
