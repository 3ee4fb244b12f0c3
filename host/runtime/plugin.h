/* plugin.h — loading policy plugins (.so files speaking the kvp.h SDK) and parsing their parameters.
 * Owns: finding a plugin by path or name in the search directories, dlopen/dlsym, the ABI and
 * descriptor checks (in the order the SDK promises), the zeroed host copy of the descriptor, caching
 * one load per file (by realpath), parsing parameter values against a kvp_param, and the
 * `kvhost plugins list|info` command.
 * Does not own: creating plugin instances or calling hooks (router.h), reading run files (config.h). */
#ifndef KVH_PLUGIN_H
#define KVH_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "kvp/kvp.h"
#include "util/util.h"

/* Longest plugin-supplied strings the loader accepts (bytes, without the NUL): a longer one is refused
 * at load, naming the file and the field. */
#define KVH_PLUGIN_NAME_MAX 64    /* name, parameter names */
#define KVH_PLUGIN_VERSION_MAX 64 /* version */
#define KVH_PLUGIN_TEXT_MAX 512   /* summary, parameter help */
#define KVH_PLUGIN_PARAMS_MAX 256 /* parameters */

/* One loaded .so. The descriptor is the host's zeroed copy (fields past the plugin's struct_size are
 * zero), so hook pointers of an older-minor plugin read as NULL. Its strings (name, version, summary)
 * and parameter table (with names and help) are host copies too, read without trusting the pointers
 * (an unreadable one is an error, not a crash), bounded and checked to be printable UTF-8. */
typedef struct kvh_plugin {
    char *path;          /* realpath of the file */
    char *file_name;     /* base name ("window.so"), used in messages */
    void *handle;        /* dlopen handle */
    kvp_descriptor desc; /* validated host copy */
    void **owned;        /* [n_owned] host copies desc points into, freed with the plugin */
    int n_owned;
} kvh_plugin;

/* A set of loaded plugins: each file is loaded once, however many sections use it. */
typedef struct kvh_plugin_registry {
    kvh_plugin **items;
    int n, cap;
} kvh_plugin_registry;

/* Finds the file for a plugin reference. `ref` containing '/' is used as is; otherwise "NAME" and
 * "NAME.so" are looked up in each directory of plugin_path (colon-separated, may be NULL), then the
 * build's plugin dir (KVH_PLUGIN_BUILD_DIR), then <dir of the executable>/../lib/kvhost/plugins, then
 * KVH_PLUGIN_INSTALL_DIR. Writes the path found into out[cap]. Error lists the directories searched. */
int kvh_plugin_find(const char *ref, const char *plugin_path, char *out, size_t cap, kvh_err *err);

/* The search directories, in order, as a NULL-terminated malloc'd array of malloc'd strings (free with
 * kvh_plugin_dirs_free). Returns NULL when out of memory. */
char **kvh_plugin_dirs(const char *plugin_path);
void kvh_plugin_dirs_free(char **dirs);

/* Loads and validates one file (no caching). On failure nothing stays loaded and err names the file
 * and the first problem: cannot load (dlerror) -> no entry symbol -> entry returned NULL -> entry
 * returned unreadable memory -> ABI major mismatch -> descriptor too small -> a string or the parameter
 * table unreadable, too long or not printable UTF-8 -> invalid descriptor (name, role, hooks,
 * parameter table). The plugin's constructors (dlopen), entry function and destructors (dlclose) run
 * under the plugin guard: a crash or exit() there is reported naming the file (plugin_guard.h). */
int kvh_plugin_open(const char *path, kvh_plugin **out, kvh_err *err);
void kvh_plugin_close(kvh_plugin *p);

/* Checks a descriptor copy (name, role, required hooks, parameter table; string lengths and UTF-8,
 * reading at most the limits above from each string). `file` names it in errors. */
int kvh_plugin_validate(const kvp_descriptor *d, const char *file, kvh_err *err);

void kvh_plugin_registry_init(kvh_plugin_registry *reg);
/* Finds (kvh_plugin_find) and loads `ref`, or returns the already loaded plugin of the same file.
 * The registry owns the result. */
int kvh_plugin_registry_load(kvh_plugin_registry *reg, const char *ref, const char *plugin_path,
                             kvh_plugin **out, kvh_err *err);
/* dlcloses everything. Call only after every instance created from these plugins is destroyed. */
void kvh_plugin_registry_free(kvh_plugin_registry *reg);

/* The declared parameter `name`, or NULL. */
const kvp_param *kvh_plugin_param(const kvp_descriptor *d, const char *name);
/* Index of parameter `name` in d->params, or -1. */
int kvh_plugin_param_index(const kvp_descriptor *d, const char *name);

/* Parses `text` as a value of parameter p: INT = whole string a base-10 integer; FLOAT = a finite
 * number; BOOL = true/false/1/0/yes/no/on/off. Then checks [min_value, max_value]. On failure err
 * holds only the reason ("must be >= 1", "expected an integer"); callers prefix where it came from,
 * e.g. "run.ini:14: [h2o] recent = -3: must be >= 1". */
int kvh_plugin_param_parse(const kvp_param *p, const char *text, double *out, kvh_err *err);

/* "int" / "float" / "bool" / "?" */
const char *kvh_plugin_param_type_name(uint32_t type);
/* Formats a value of a parameter of `type` (integers without decimals, bools as true/false). */
void kvh_plugin_param_format(uint32_t type, double v, char *buf, size_t cap);

/* `kvhost plugins list` / `kvhost plugins info FILE` [--plugin-path DIRS]. argv[0] == "plugins".
 * Prints to stdout, errors to stderr; returns the process exit code (0 ok, 1 error, 2 usage). */
int kvh_cmd_plugins(int argc, char **argv);

#endif
