/* plugin.c — the plugin loader: search, dlopen, ABI/descriptor checks, per-file cache, parameter
 * parsing. See plugin.h. Does not create instances or call hooks (router.c). */
#define _GNU_SOURCE /* realpath, strdup */
#include "plugin.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef KVH_PLUGIN_BUILD_DIR
#define KVH_PLUGIN_BUILD_DIR ""
#endif
#ifndef KVH_PLUGIN_INSTALL_DIR
#define KVH_PLUGIN_INSTALL_DIR ""
#endif

/* Bytes a descriptor of ABI 1.minor must have: everything up to and including the last field of
 * that minor. Minor 0 ends with evict. New minors append fields and add a case here. */
static size_t descriptor_min_size(uint32_t minor) {
    if (minor == 0) return offsetof(kvp_descriptor, evict) + sizeof(((kvp_descriptor *)0)->evict);
    /* minor 1 added the store hooks, minor 2 append/release (newer minors keep them) */
    if (minor == 1) return offsetof(kvp_descriptor, attend) + sizeof(((kvp_descriptor *)0)->attend);
    return offsetof(kvp_descriptor, release) + sizeof(((kvp_descriptor *)0)->release);
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

/* ---- search ------------------------------------------------------------------------------------ */

static int push_dir(char ***dirs, int *n, int *cap, const char *d, size_t len) {
    if (len == 0) return 0;
    for (int i = 0; i < *n; i++)
        if (strlen((*dirs)[i]) == len && memcmp((*dirs)[i], d, len) == 0) return 0;
    if (*n + 2 > *cap) {
        int nc = *cap ? *cap * 2 : 8;
        char **nd = realloc(*dirs, (size_t)nc * sizeof *nd);
        if (!nd) return -1;
        *dirs = nd;
        *cap = nc;
    }
    char *s = malloc(len + 1);
    if (!s) return -1;
    memcpy(s, d, len);
    s[len] = '\0';
    (*dirs)[(*n)++] = s;
    (*dirs)[*n] = NULL;
    return 0;
}

char **kvh_plugin_dirs(const char *plugin_path) {
    char **dirs = NULL;
    int n = 0, cap = 0;
    dirs = calloc(1, sizeof *dirs); /* always an allocated, NULL-terminated array */
    if (!dirs) return NULL;
    cap = 1;
    int ok = 1;
    if (plugin_path) {
        const char *p = plugin_path;
        while (ok) {
            const char *c = strchr(p, ':');
            size_t len = c ? (size_t)(c - p) : strlen(p);
            if (push_dir(&dirs, &n, &cap, p, len) != 0) ok = 0;
            if (!c) break;
            p = c + 1;
        }
    }
    if (ok && push_dir(&dirs, &n, &cap, KVH_PLUGIN_BUILD_DIR, strlen(KVH_PLUGIN_BUILD_DIR)) != 0) ok = 0;
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (ok && len > 0) {
        exe[len] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char d[PATH_MAX + 32];
            snprintf(d, sizeof d, "%s/../lib/kvhost/plugins", exe);
            char real[PATH_MAX];
            const char *use = realpath(d, real) ? real : d;
            if (push_dir(&dirs, &n, &cap, use, strlen(use)) != 0) ok = 0;
        }
    }
    if (ok && push_dir(&dirs, &n, &cap, KVH_PLUGIN_INSTALL_DIR, strlen(KVH_PLUGIN_INSTALL_DIR)) != 0) ok = 0;
    if (!ok) {
        kvh_plugin_dirs_free(dirs);
        return NULL;
    }
    return dirs;
}

void kvh_plugin_dirs_free(char **dirs) {
    if (!dirs) return;
    for (char **d = dirs; *d; d++) free(*d);
    free(dirs);
}

static int is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int has_so_suffix(const char *s) {
    size_t n = strlen(s);
    return n >= 3 && strcmp(s + n - 3, ".so") == 0;
}

int kvh_plugin_find(const char *ref, const char *plugin_path, char *out, size_t cap, kvh_err *err) {
    if (!ref || !*ref) return kvh_fail(err, "empty plugin name");
    if (strchr(ref, '/')) {
        errno = 0;
        if (!is_file(ref))
            return kvh_fail(err, "plugin file %s: %s", ref, errno ? strerror(errno) : "not a regular file");
        if ((size_t)snprintf(out, cap, "%s", ref) >= cap) return kvh_fail(err, "plugin path too long: %s", ref);
        return 0;
    }
    char **dirs = kvh_plugin_dirs(plugin_path);
    if (!dirs) return kvh_fail(err, "out of memory listing plugin directories");
    char searched[600] = "";
    size_t used = 0;
    for (char **d = dirs; *d; d++) {
        for (int variant = 0; variant < 2; variant++) {
            if (variant == 1 && has_so_suffix(ref)) break;
            char cand[PATH_MAX + 64];
            snprintf(cand, sizeof cand, "%s/%s%s", *d, ref, variant ? ".so" : "");
            if (is_file(cand)) {
                int bad = (size_t)snprintf(out, cap, "%s", cand) >= cap;
                kvh_plugin_dirs_free(dirs);
                return bad ? kvh_fail(err, "plugin path too long: %s", cand) : 0;
            }
        }
        if (used < sizeof searched) {
            int w = snprintf(searched + used, sizeof searched - used, "%s%s", used ? ", " : "", *d);
            if (w > 0) used += (size_t)w;
        }
    }
    kvh_plugin_dirs_free(dirs);
    return kvh_fail(err, "plugin '%s' not found; searched: %s (add --plugin-path DIR, or give a path containing '/')",
                    ref, searched[0] ? searched : "(no directories)");
}

/* ---- validation ---------------------------------------------------------------------------------- */

static int valid_ident(const char *s) {
    if (!s || !*s) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return 0;
    return 1;
}

/* Copies a plugin-supplied string for an error message, bounded and with odd bytes escaped. */
static void safe_str(const char *s, char *buf, size_t cap) {
    if (!s) {
        snprintf(buf, cap, "(null)");
        return;
    }
    size_t o = 0;
    for (size_t i = 0; s[i] && i < 64 && o + 5 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x7f) o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        else buf[o++] = (char)c;
    }
    buf[o] = '\0';
}

static int is_integral(double v) { return isfinite(v) && floor(v) == v; }

int kvh_plugin_validate(const kvp_descriptor *d, const char *file, kvh_err *err) {
    char shown[400];
    if (!valid_ident(d->name)) {
        safe_str(d->name, shown, sizeof shown);
        return kvh_fail(err, "plugin %s: invalid name '%s' (expected [a-z0-9_]+)", file, shown);
    }
    const char *nm = d->name;
    if (d->role != KVP_ROLE_POLICY && d->role != KVP_ROLE_STORE)
        return kvh_fail(err, "plugin '%s' (%s): unknown role %u (this host knows %u = policy, %u = store)", nm, file,
                        (unsigned)d->role, (unsigned)KVP_ROLE_POLICY, (unsigned)KVP_ROLE_STORE);
    if (d->role == KVP_ROLE_STORE && d->abi_minor < 1)
        return kvh_fail(err, "plugin '%s' (%s): stores need ABI 1.1 or newer (built for 1.%u)", nm, file,
                        (unsigned)d->abi_minor);
    if (!d->version) return kvh_fail(err, "plugin '%s' (%s): version string is NULL", nm, file);
    if (!d->summary) return kvh_fail(err, "plugin '%s' (%s): summary string is NULL", nm, file);
    if (!d->create) return kvh_fail(err, "plugin '%s' (%s): required hook create is NULL", nm, file);
    if (!d->destroy) return kvh_fail(err, "plugin '%s' (%s): required hook destroy is NULL", nm, file);
    if (d->role == KVP_ROLE_POLICY && !d->evict)
        return kvh_fail(err, "plugin '%s' (%s): required hook evict is NULL (policies must evict)", nm, file);
    if (d->role == KVP_ROLE_STORE) {
        if (!d->encode && !(d->abi_minor >= 2 && d->append))
            return kvh_fail(err, "plugin '%s' (%s): required store hook encode is NULL (and no append hook, ABI 1.2)",
                            nm, file);
        if (!d->decode) return kvh_fail(err, "plugin '%s' (%s): required store hook decode is NULL", nm, file);
        if (!d->attend) return kvh_fail(err, "plugin '%s' (%s): required store hook attend is NULL", nm, file);
    }
    const uint32_t known_caps = KVP_CAP_DECODE_SCORES | KVP_CAP_PREFILL_SCORES | KVP_CAP_OBS_SCORES | KVP_CAP_HEAD_BUDGETS;
    if (d->caps & ~known_caps)
        return kvh_fail(err, "plugin '%s' (%s): unknown capability bits 0x%x", nm, file, (unsigned)(d->caps & ~known_caps));
    if ((d->caps & KVP_CAP_HEAD_BUDGETS) && !d->head_budgets)
        return kvh_fail(err, "plugin '%s' (%s): declares KVP_CAP_HEAD_BUDGETS but head_budgets is NULL", nm, file);
    if (d->n_params > 256) return kvh_fail(err, "plugin '%s' (%s): %u parameters (at most 256)", nm, file, (unsigned)d->n_params);
    if (d->n_params > 0 && !d->params)
        return kvh_fail(err, "plugin '%s' (%s): n_params = %u but params is NULL", nm, file, (unsigned)d->n_params);
    for (uint32_t i = 0; i < d->n_params; i++) {
        const kvp_param *p = &d->params[i];
        if (!valid_ident(p->name)) {
            safe_str(p->name, shown, sizeof shown);
            return kvh_fail(err, "plugin '%s' (%s): parameter %u has an invalid name '%s' (expected [a-z0-9_]+)", nm,
                            file, (unsigned)i, shown);
        }
        if (strcmp(p->name, "plugin") == 0 || strcmp(p->name, "layers") == 0)
            return kvh_fail(err, "plugin '%s' (%s): parameter name '%s' is reserved by the INI section", nm, file, p->name);
        for (uint32_t j = 0; j < i; j++)
            if (strcmp(d->params[j].name, p->name) == 0)
                return kvh_fail(err, "plugin '%s' (%s): duplicate parameter name '%s'", nm, file, p->name);
        if (p->type != KVP_PARAM_INT && p->type != KVP_PARAM_FLOAT && p->type != KVP_PARAM_BOOL)
            return kvh_fail(err, "plugin '%s' (%s): parameter '%s' has unknown type %u", nm, file, p->name, (unsigned)p->type);
        if (isnan(p->default_value) || isnan(p->min_value) || isnan(p->max_value))
            return kvh_fail(err, "plugin '%s' (%s): parameter '%s' has a NaN default or bound", nm, file, p->name);
        if (!(p->min_value <= p->max_value))
            return kvh_fail(err, "plugin '%s' (%s): parameter '%s': min %g > max %g", nm, file, p->name, p->min_value,
                            p->max_value);
        if (p->default_value < p->min_value || p->default_value > p->max_value)
            return kvh_fail(err, "plugin '%s' (%s): parameter '%s': default %g outside its range [%g, %g]", nm, file,
                            p->name, p->default_value, p->min_value, p->max_value);
        if (p->type == KVP_PARAM_INT && !is_integral(p->default_value))
            return kvh_fail(err, "plugin '%s' (%s): int parameter '%s' has a non-integer default %g", nm, file, p->name,
                            p->default_value);
        if (p->type == KVP_PARAM_BOOL && p->default_value != 0 && p->default_value != 1)
            return kvh_fail(err, "plugin '%s' (%s): bool parameter '%s' has default %g (expected 0 or 1)", nm, file,
                            p->name, p->default_value);
        if (!p->help || !*p->help)
            return kvh_fail(err, "plugin '%s' (%s): parameter '%s' has no help text", nm, file, p->name);
    }
    return 0;
}

/* ---- loading ------------------------------------------------------------------------------------- */

int kvh_plugin_open(const char *path, kvh_plugin **out, kvh_err *err) {
    *out = NULL;
    const char *file = base_name(path);
    char real[PATH_MAX];
    if (!realpath(path, real)) return kvh_fail(err, "plugin %s: cannot load: %s", path, strerror(errno));
    dlerror();
    void *h = dlopen(real, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        return kvh_fail(err, "plugin %s: cannot load: %s", file, e ? e : "unknown dlopen error");
    }
    dlerror();
    void *sym = dlsym(h, KVP_ENTRY_SYMBOL);
    if (!sym) {
        dlclose(h);
        return kvh_fail(err, "plugin %s: no %s() entry symbol (build it with KVP_PLUGIN(descriptor) and "
                        "export that function)", file, KVP_ENTRY_SYMBOL);
    }
    kvp_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* object -> function pointer without a pedantic warning */
    const kvp_descriptor *d = entry();
    if (!d) {
        dlclose(h);
        return kvh_fail(err, "plugin %s: %s() returned NULL", file, KVP_ENTRY_SYMBOL);
    }
    if (d->abi_major != KVP_ABI_MAJOR) {
        uint32_t major = d->abi_major;
        dlclose(h);
        return kvh_fail(err, "plugin %s: built for ABI %u, host speaks %u (rebuild the plugin against this kvhost's SDK)",
                        file, (unsigned)major, (unsigned)KVP_ABI_MAJOR);
    }
    size_t need = descriptor_min_size(d->abi_minor);
    if (d->struct_size < need) {
        uint32_t sz = d->struct_size, minor = d->abi_minor;
        dlclose(h);
        return kvh_fail(err, "plugin %s: descriptor struct_size %u is smaller than the %zu bytes ABI %u.%u requires",
                        file, (unsigned)sz, need, (unsigned)KVP_ABI_MAJOR, (unsigned)minor);
    }
    kvh_plugin *p = calloc(1, sizeof *p);
    if (!p) {
        dlclose(h);
        return kvh_fail(err, "plugin %s: out of memory", file);
    }
    size_t n = d->struct_size < sizeof p->desc ? d->struct_size : sizeof p->desc;
    memcpy(&p->desc, d, n);
    p->handle = h;
    p->path = strdup(real);
    p->file_name = strdup(file);
    if (!p->path || !p->file_name) {
        kvh_plugin_close(p);
        return kvh_fail(err, "plugin %s: out of memory", file);
    }
    if (kvh_plugin_validate(&p->desc, file, err) != 0) {
        kvh_plugin_close(p);
        return -1;
    }
    *out = p;
    return 0;
}

void kvh_plugin_close(kvh_plugin *p) {
    if (!p) return;
    if (p->handle) dlclose(p->handle);
    free(p->path);
    free(p->file_name);
    free(p);
}

void kvh_plugin_registry_init(kvh_plugin_registry *reg) { memset(reg, 0, sizeof *reg); }

int kvh_plugin_registry_load(kvh_plugin_registry *reg, const char *ref, const char *plugin_path,
                             kvh_plugin **out, kvh_err *err) {
    *out = NULL;
    char path[PATH_MAX];
    if (kvh_plugin_find(ref, plugin_path, path, sizeof path, err) != 0) return -1;
    char real[PATH_MAX];
    if (!realpath(path, real)) return kvh_fail(err, "plugin %s: %s", path, strerror(errno));
    for (int i = 0; i < reg->n; i++) {
        if (strcmp(reg->items[i]->path, real) == 0) {
            *out = reg->items[i];
            return 0;
        }
    }
    if (reg->n == reg->cap) {
        int nc = reg->cap ? reg->cap * 2 : 4;
        kvh_plugin **ni = realloc(reg->items, (size_t)nc * sizeof *ni);
        if (!ni) return kvh_fail(err, "out of memory loading plugin %s", ref);
        reg->items = ni;
        reg->cap = nc;
    }
    kvh_plugin *p;
    if (kvh_plugin_open(real, &p, err) != 0) return -1;
    reg->items[reg->n++] = p;
    *out = p;
    return 0;
}

void kvh_plugin_registry_free(kvh_plugin_registry *reg) {
    for (int i = 0; i < reg->n; i++) kvh_plugin_close(reg->items[i]);
    free(reg->items);
    memset(reg, 0, sizeof *reg);
}

/* ---- parameters ---------------------------------------------------------------------------------- */

int kvh_plugin_param_index(const kvp_descriptor *d, const char *name) {
    for (uint32_t i = 0; i < d->n_params; i++)
        if (strcmp(d->params[i].name, name) == 0) return (int)i;
    return -1;
}

const kvp_param *kvh_plugin_param(const kvp_descriptor *d, const char *name) {
    int i = kvh_plugin_param_index(d, name);
    return i < 0 ? NULL : &d->params[i];
}

const char *kvh_plugin_param_type_name(uint32_t type) {
    switch (type) {
    case KVP_PARAM_INT: return "int";
    case KVP_PARAM_FLOAT: return "float";
    case KVP_PARAM_BOOL: return "bool";
    default: return "?";
    }
}

void kvh_plugin_param_format(uint32_t type, double v, char *buf, size_t cap) {
    if (type == KVP_PARAM_BOOL) snprintf(buf, cap, "%s", v != 0 ? "true" : "false");
    else if (type == KVP_PARAM_INT && fabs(v) < 9.0e15) snprintf(buf, cap, "%lld", (long long)v);
    else snprintf(buf, cap, "%.9g", v);
}

int kvh_plugin_param_parse(const kvp_param *p, const char *text, double *out, kvh_err *err) {
    char buf[64];
    double v;
    while (*text == ' ' || *text == '\t') text++;
    if (!*text) return kvh_fail(err, "empty value, expected %s %s", p->type == KVP_PARAM_INT ? "an" : "a",
                                kvh_plugin_param_type_name(p->type));
    if (p->type == KVP_PARAM_BOOL) {
        if (!strcasecmp(text, "true") || !strcmp(text, "1") || !strcasecmp(text, "yes") || !strcasecmp(text, "on")) v = 1;
        else if (!strcasecmp(text, "false") || !strcmp(text, "0") || !strcasecmp(text, "no") || !strcasecmp(text, "off")) v = 0;
        else return kvh_fail(err, "expected a bool (true/false/1/0/yes/no/on/off)");
    } else if (p->type == KVP_PARAM_INT) {
        char *end;
        errno = 0;
        long long x = strtoll(text, &end, 10);
        while (*end == ' ' || *end == '\t') end++;
        if (end == text || *end != '\0') return kvh_fail(err, "expected an integer");
        if (errno == ERANGE) return kvh_fail(err, "integer out of range");
        v = (double)x;
    } else if (p->type == KVP_PARAM_FLOAT) {
        char *end;
        errno = 0;
        v = strtod(text, &end);
        while (*end == ' ' || *end == '\t') end++;
        if (end == text || *end != '\0') return kvh_fail(err, "expected a number");
        if (!isfinite(v)) return kvh_fail(err, "expected a finite number");
    } else {
        return kvh_fail(err, "parameter has unknown type %u", (unsigned)p->type);
    }
    if (v < p->min_value) {
        kvh_plugin_param_format(p->type, p->min_value, buf, sizeof buf);
        return kvh_fail(err, "must be >= %s", buf);
    }
    if (v > p->max_value) {
        kvh_plugin_param_format(p->type, p->max_value, buf, sizeof buf);
        return kvh_fail(err, "must be <= %s", buf);
    }
    *out = v;
    return 0;
}
