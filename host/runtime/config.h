/* config.h — the run configuration: what a run file (INI, via inih) and the CLI overrides say.
 * Owns: [model] and [cache] keys (parsed and range-checked here), plugin-instance sections (kept as
 * text with their origin, file:line, so the router can validate them against the plugin's declared
 * parameters and still name the line), --plugins, --set, writing a run back as a normalized INI.
 * Does not own: loading plugins or checking plugin parameters (router.h / plugin.h), the model.
 *
 * Order of application (main.c does this): --config FILE first, then --plugins, then each --set. */
#ifndef KVH_CONFIG_H
#define KVH_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "util/util.h"

#define KVH_CONFIG_DEFAULT_SLACK 32u
/* Most CPU threads accepted, from [model] threads and from --threads alike. */
#define KVH_MAX_THREADS 1024

/* Where a value came from: "run.ini" + line, or "--set" / "--plugins" with line 0. */
typedef struct kvh_origin {
    char file[256];
    int line;
} kvh_origin;

/* "run.ini:14" or "--set". */
void kvh_origin_format(const kvh_origin *o, char *buf, size_t cap);

typedef struct kvh_config_kv {
    char *key;
    char *value;
    kvh_origin origin;
} kvh_config_kv;

/* One plugin instance: a section other than [model] / [cache]. */
typedef struct kvh_config_section {
    char *name;          /* section name: the --set prefix and the name in messages */
    char *plugin;        /* `plugin` key: file or name (default: the section name) */
    kvh_origin plugin_origin;
    char *layers;        /* `layers` key (default "all") */
    kvh_origin layers_origin;
    kvh_origin origin;   /* the section header */
    kvh_config_kv *params; /* [n_params] remaining keys: plugin parameters, unchecked */
    int n_params, cap_params;
} kvh_config_section;

typedef struct kvh_run_config {
    /* [model] */
    char *model;          /* spec: a checkpoint directory or "random:gpt2-medium"; NULL if unset */
    char *calibration;    /* .kvcal activation statistics for weight formats that need them; NULL if unset. A
                             relative path in a run file is relative to the run file's folder */
    char backend[8];      /* "cpu" | "cuda" | "auto" (default "auto") */
    int threads;          /* 0 = automatic */
    /* [cache] */
    uint32_t budget;      /* per-head token budget; 0 = unset (keep every token unless a plugin says) */
    uint32_t slack;       /* default KVH_CONFIG_DEFAULT_SLACK */
    uint32_t prefill_chunk; /* prompt tokens per prefill forward, with budgets enforced after each; 0 = the
                               whole prompt in one forward (the default, and the papers' setting) */
    uint32_t block_size;  /* slots per KV block (paged layout, a power of two); 0 = contiguous slots. Unset
                             (origin line 0 and not from --set): the command's default (replay: 16, else 0) */
    /* [engine] (kvhost replay / serve) */
    uint32_t max_tokens;  /* global budget: KV tokens held by all sequences together; 0 = no limit */
    uint32_t max_seqs;    /* sequences running at once; default KVH_CONFIG_DEFAULT_MAX_SEQS */
    uint32_t step_tokens; /* prompt tokens prefilled per engine step (all requests together); default 256 */
    int prefix_sharing;   /* 1 (default): reuse cached prompt blocks; 0: never */
    kvh_origin model_origin, backend_origin, threads_origin, budget_origin, slack_origin,
        prefill_chunk_origin, calibration_origin, block_size_origin, max_tokens_origin, max_seqs_origin,
        step_tokens_origin, prefix_sharing_origin; /* line 0 (file "") = default */
    /* plugin instances, in the order they appeared */
    kvh_config_section *sections;
    int n_sections, cap_sections;
} kvh_run_config;

/* Defaults: no model, backend auto, threads 0, no budget, slack 32, no plugins. Owns nothing yet. */
void kvh_config_defaults(kvh_run_config *cfg);
#define KVH_CONFIG_DEFAULT_MAX_SEQS 64
#define KVH_CONFIG_DEFAULT_STEP_TOKENS 256
/* True when a key was given (a file line or --set), not left at its default. */
static inline int kvh_origin_given(const kvh_origin *o) { return o->line > 0 || o->file[0] != '\0'; }
void kvh_config_free(kvh_run_config *cfg);

/* Reads an INI run file into cfg (on top of what is there). Errors name file, line and key:
 * "run.ini:14: [cache] budget = 0: budget must be >= 1; omit it to keep every token". Unknown keys in
 * [model]/[cache], duplicate keys, duplicate sections, keys before any section, malformed lines and a
 * malformed `layers` list are errors. On error cfg may hold part of the file; free it. */
int kvh_config_load_ini(kvh_run_config *cfg, const char *path, kvh_err *err);
/* Same, from a string; `name` is used as the file name in messages. */
int kvh_config_load_string(kvh_run_config *cfg, const char *text, const char *name, kvh_err *err);

/* --plugins a.so,b.so: one section per entry, named after the file without directory and ".so",
 * plugin = the entry, layers = all. A section of that name must not exist yet. */
int kvh_config_add_plugins_list(kvh_run_config *cfg, const char *list, kvh_err *err);

/* --set sec.key=value: sets a [model]/[cache] key (checked as in a file) or adds/overrides a key of
 * an existing plugin section (including `plugin` and `layers`). Unknown section -> error. */
int kvh_config_set(kvh_run_config *cfg, const char *assignment, kvh_err *err);

/* The section named `name`, or NULL. */
kvh_config_section *kvh_config_find_section(const kvh_run_config *cfg, const char *name);
/* The value of `key` in section s, or NULL. */
const kvh_config_kv *kvh_config_section_param(const kvh_config_section *s, const char *key);

/* Writes cfg as a normalized INI (what was set, defaults made explicit) that loads back to the same
 * configuration. Returns 0, or -1 on a write error. */
int kvh_config_write_ini(const kvh_run_config *cfg, FILE *f);

#endif
