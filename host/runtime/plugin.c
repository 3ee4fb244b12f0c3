/* plugin.c — the plugin loader: search, dlopen, ABI/descriptor checks, per-file cache, parameter
 * parsing. See plugin.h. Does not create instances or call hooks (router.c). */
#define _GNU_SOURCE /* realpath, strdup, pipe2 */
#include "runtime/plugin.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/plugin_guard.h"
#include "util/utf8.h"

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
    if (minor == 2) return offsetof(kvp_descriptor, release) + sizeof(((kvp_descriptor *)0)->release);
    /* minor 3 added the weight-format hooks, then the policy insert / score_report hooks */
    return offsetof(kvp_descriptor, score_report) + sizeof(((kvp_descriptor *)0)->score_report);
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
    /* The executable's own prefix before the build tree it was compiled in: an installed kvhost must load
     * the plugins installed with it, not those of a build tree that happens to still exist. */
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
    if (ok && push_dir(&dirs, &n, &cap, KVH_PLUGIN_BUILD_DIR, strlen(KVH_PLUGIN_BUILD_DIR)) != 0) ok = 0;
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

/* A plugin-supplied text field: at most `max` bytes, well-formed UTF-8 without control characters (it
 * is printed by `plugins list|info` and written into records). Reads at most max + 1 bytes of s. */
static int check_text(const char *s, size_t max, const char *nm, const char *file, const char *field,
                      kvh_err *err) {
    size_t n = strnlen(s, max + 1), bad;
    if (n > max)
        return kvh_fail(err, "plugin '%s' (%s): %s is longer than %zu bytes (the limit for plugin strings)", nm, file,
                        field, max);
    if (!kvh_utf8_valid(s, n, &bad))
        return kvh_fail(err, "plugin '%s' (%s): %s is not valid UTF-8 (byte 0x%02x at offset %zu)", nm, file, field,
                        (unsigned char)s[bad], bad);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return kvh_fail(err, "plugin '%s' (%s): %s contains a control character (0x%02x at offset %zu)", nm, file,
                            field, (unsigned char)s[i], i);
    return 0;
}

int kvh_plugin_validate(const kvp_descriptor *d, const char *file, kvh_err *err) {
    char shown[400];
    if (!d->name || strnlen(d->name, KVH_PLUGIN_NAME_MAX + 1) > KVH_PLUGIN_NAME_MAX || !valid_ident(d->name)) {
        safe_str(d->name, shown, sizeof shown);
        return kvh_fail(err, "plugin %s: invalid name '%s' (expected [a-z0-9_]+, at most %d bytes)", file, shown,
                        KVH_PLUGIN_NAME_MAX);
    }
    const char *nm = d->name;
    if (d->role != KVP_ROLE_POLICY && d->role != KVP_ROLE_STORE && d->role != KVP_ROLE_WEIGHTS)
        return kvh_fail(err,
                        "plugin '%s' (%s): unknown role %u (this host knows %u = policy, %u = store, %u = weight format)",
                        nm, file, (unsigned)d->role, (unsigned)KVP_ROLE_POLICY, (unsigned)KVP_ROLE_STORE,
                        (unsigned)KVP_ROLE_WEIGHTS);
    if (d->role == KVP_ROLE_WEIGHTS && d->abi_minor < 3)
        return kvh_fail(err, "plugin '%s' (%s): weight formats need ABI 1.3 or newer (built for 1.%u)", nm, file,
                        (unsigned)d->abi_minor);
    if (d->role == KVP_ROLE_STORE && d->abi_minor < 1)
        return kvh_fail(err, "plugin '%s' (%s): stores need ABI 1.1 or newer (built for 1.%u)", nm, file,
                        (unsigned)d->abi_minor);
    if (!d->version) return kvh_fail(err, "plugin '%s' (%s): version string is NULL", nm, file);
    if (!d->summary) return kvh_fail(err, "plugin '%s' (%s): summary string is NULL", nm, file);
    if (!d->version[0]) return kvh_fail(err, "plugin '%s' (%s): version string is empty", nm, file);
    if (check_text(d->version, KVH_PLUGIN_VERSION_MAX, nm, file, "version string", err) != 0) return -1;
    if (check_text(d->summary, KVH_PLUGIN_TEXT_MAX, nm, file, "summary", err) != 0) return -1;
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
    if (d->role == KVP_ROLE_WEIGHTS) {
        const char *missing = !d->packed_size ? "packed_size" : !d->pack ? "pack" : !d->unpack ? "unpack"
                              : !d->matmul ? "matmul" : NULL;
        if (missing)
            return kvh_fail(err, "plugin '%s' (%s): required weight-format hook %s is NULL", nm, file, missing);
    }
    const uint32_t known_caps = KVP_CAP_DECODE_SCORES | KVP_CAP_PREFILL_SCORES | KVP_CAP_OBS_SCORES | KVP_CAP_HEAD_BUDGETS |
                                (d->abi_minor >= 3 ? KVP_CAP_SCORE_REPORT : 0u) |
                                (d->abi_minor >= 4 ? KVP_CAP_ACT_QUANT : 0u) |
                                (d->abi_minor >= 5 ? KVP_CAP_MATMUL_PREFILL : 0u);
    if (d->caps & ~known_caps)
        return kvh_fail(err, "plugin '%s' (%s): unknown capability bits 0x%x%s", nm, file, (unsigned)(d->caps & ~known_caps),
                        (d->caps & ~known_caps & KVP_CAP_SCORE_REPORT) ? " (KVP_CAP_SCORE_REPORT needs ABI 1.3)" : "");
    if ((d->caps & KVP_CAP_ACT_QUANT) && d->role != KVP_ROLE_WEIGHTS)
        return kvh_fail(err, "plugin '%s' (%s): declares KVP_CAP_ACT_QUANT but is not a weight format", nm, file);
    if ((d->caps & KVP_CAP_MATMUL_PREFILL) && d->role != KVP_ROLE_WEIGHTS)
        return kvh_fail(err, "plugin '%s' (%s): declares KVP_CAP_MATMUL_PREFILL but is not a weight format", nm, file);
    if ((d->caps & KVP_CAP_SCORE_REPORT) && (d->role != KVP_ROLE_POLICY || !d->score_report))
        return kvh_fail(err, "plugin '%s' (%s): declares KVP_CAP_SCORE_REPORT but %s", nm, file,
                        d->role != KVP_ROLE_POLICY ? "is not a policy" : "score_report is NULL");
    if (d->abi_minor >= 3 && d->role != KVP_ROLE_POLICY && d->insert)
        return kvh_fail(err, "plugin '%s' (%s): has an insert hook but is not a policy (stores use append)", nm, file);
    if ((d->caps & KVP_CAP_HEAD_BUDGETS) && !d->head_budgets)
        return kvh_fail(err, "plugin '%s' (%s): declares KVP_CAP_HEAD_BUDGETS but head_budgets is NULL", nm, file);
    if (d->n_params > KVH_PLUGIN_PARAMS_MAX)
        return kvh_fail(err, "plugin '%s' (%s): %u parameters (at most %d)", nm, file, (unsigned)d->n_params,
                        KVH_PLUGIN_PARAMS_MAX);
    if (d->n_params > 0 && !d->params)
        return kvh_fail(err, "plugin '%s' (%s): n_params = %u but params is NULL", nm, file, (unsigned)d->n_params);
    for (uint32_t i = 0; i < d->n_params; i++) {
        const kvp_param *p = &d->params[i];
        if (!p->name || strnlen(p->name, KVH_PLUGIN_NAME_MAX + 1) > KVH_PLUGIN_NAME_MAX || !valid_ident(p->name)) {
            safe_str(p->name, shown, sizeof shown);
            return kvh_fail(err, "plugin '%s' (%s): parameter %u has an invalid name '%s' (expected [a-z0-9_]+, at "
                            "most %d bytes)", nm, file, (unsigned)i, shown, KVH_PLUGIN_NAME_MAX);
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
        char field[KVH_PLUGIN_NAME_MAX + 32];
        snprintf(field, sizeof field, "help of parameter '%s'", p->name);
        if (check_text(p->help, KVH_PLUGIN_TEXT_MAX, nm, file, field, err) != 0) return -1;
    }
    return 0;
}

/* ---- reading what a plugin hands over ------------------------------------------------------------ */

/* The descriptor, its strings and its parameter table live in the plugin's memory, and a buggy plugin
 * can return any pointer. They are copied through a pipe: the kernel reads the plugin's memory on
 * write() and answers EFAULT for an unmapped address, where a plain read would kill kvhost. */
typedef struct reader {
    int fd[2];
} reader;

#define READ_CHUNK 4096 /* <= PIPE_BUF and <= any pipe's capacity: one write never blocks */

static int reader_open(reader *r) { return pipe2(r->fd, O_CLOEXEC | O_NONBLOCK); }

static void reader_close(reader *r) {
    close(r->fd[0]);
    close(r->fd[1]);
}

/* Copies n bytes from src to dst; -1 (nothing usable in dst) when any of them is unreadable. */
static int copy_in(reader *r, void *dst, const void *src, size_t n) {
    for (size_t off = 0; off < n;) {
        size_t k = n - off < READ_CHUNK ? n - off : READ_CHUNK;
        ssize_t w = write(r->fd[1], (const char *)src + off, k);
        if (w > 0) {
            /* take back what went in, whole or not, so the pipe is empty for the next chunk */
            ssize_t got = read(r->fd[0], (char *)dst + off, (size_t)w);
            if (got != w) return -1;
        }
        if (w != (ssize_t)k) return -1;
        off += k;
    }
    return 0;
}

/* A malloc'd copy of the NUL-terminated string at src, of at most max bytes. Memory protection is per
 * page, so one byte probed through the pipe vouches for the rest of its page; the string is then
 * measured in place up to its NUL or the page end (never a byte past the NUL: no over-read of what
 * follows it). Returns 0 (copy in *out), 1 (longer than max bytes) or -1 (unreadable, or out of
 * memory: *oom set). */
static int copy_string(reader *r, const char *src, size_t max, char **out, int *oom) {
    *out = NULL;
    *oom = 0;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t len = 0;
    for (;;) {
        const char *at = src + len;
        char probe;
        if (copy_in(r, &probe, at, 1) != 0) return -1;
        size_t room = page - (size_t)((uintptr_t)at % page), want = max + 1 - len;
        if (room > want) room = want;
        size_t k = strnlen(at, room);
        len += k;
        if (k < room) break; /* the NUL */
        if (len > max) return 1;
    }
    char *buf = malloc(len + 1);
    if (!buf) {
        *oom = 1;
        return -1;
    }
    memcpy(buf, src, len);
    buf[len] = '\0';
    *out = buf;
    return 0;
}

static int own(kvh_plugin *p, void *mem) {
    void **no = realloc(p->owned, (size_t)(p->n_owned + 1) * sizeof *no);
    if (!no) {
        free(mem);
        return -1;
    }
    p->owned = no;
    p->owned[p->n_owned++] = mem;
    return 0;
}

/* Replaces *field (a plugin pointer) with a host copy. `what` names the field in errors. A NULL field
 * stays NULL (the validator reports it). */
static int own_string(reader *r, kvh_plugin *p, const char **field, size_t max, const char *what, kvh_err *err) {
    if (!*field) return 0;
    char *copy;
    int oom;
    int rc = copy_string(r, *field, max, &copy, &oom);
    if (rc == 1)
        return kvh_fail(err, "plugin %s: %s is longer than %zu bytes (the limit for plugin strings)", p->file_name,
                        what, max);
    if (rc != 0)
        return oom ? kvh_fail(err, "plugin %s: out of memory", p->file_name)
                   : kvh_fail(err, "plugin %s: %s points to unreadable memory (%p)", p->file_name, what,
                              (const void *)*field);
    if (own(p, copy) != 0) return kvh_fail(err, "plugin %s: out of memory", p->file_name);
    *field = copy;
    return 0;
}

/* The descriptor's strings and parameter table, copied into host memory (desc then points there). */
static int own_descriptor_data(reader *r, kvh_plugin *p, kvh_err *err) {
    kvp_descriptor *d = &p->desc;
    if (own_string(r, p, &d->name, KVH_PLUGIN_NAME_MAX, "name", err) != 0) return -1;
    if (own_string(r, p, &d->version, KVH_PLUGIN_VERSION_MAX, "version string", err) != 0) return -1;
    if (own_string(r, p, &d->summary, KVH_PLUGIN_TEXT_MAX, "summary", err) != 0) return -1;
    if (d->n_params == 0 || !d->params || d->n_params > KVH_PLUGIN_PARAMS_MAX) return 0; /* the validator says why */
    kvp_param *params = calloc(d->n_params, sizeof *params);
    if (!params || own(p, params) != 0) return kvh_fail(err, "plugin %s: out of memory", p->file_name);
    if (copy_in(r, params, d->params, (size_t)d->n_params * sizeof *params) != 0)
        return kvh_fail(err, "plugin %s: the parameter table (%u entries at %p) is not readable memory", p->file_name,
                        (unsigned)d->n_params, (const void *)d->params);
    d->params = params;
    for (uint32_t i = 0; i < d->n_params; i++) {
        char what[64];
        snprintf(what, sizeof what, "the name of parameter %u", (unsigned)i);
        if (own_string(r, p, &params[i].name, KVH_PLUGIN_NAME_MAX, what, err) != 0) return -1;
        snprintf(what, sizeof what, "the help of parameter %u", (unsigned)i);
        if (own_string(r, p, &params[i].help, KVH_PLUGIN_TEXT_MAX, what, err) != 0) return -1;
    }
    return 0;
}

/* ---- loading ------------------------------------------------------------------------------------- */

/* dlclose runs the plugin's destructors: guarded like its constructors. */
static void close_handle(void *h, const char *path) {
    kvh_plugin_guard_enter_load(path, "in its destructors, run by dlclose");
    dlclose(h);
    kvh_plugin_guard_leave();
}

int kvh_plugin_open(const char *path, kvh_plugin **out, kvh_err *err) {
    *out = NULL;
    const char *file = base_name(path);
    kvh_plugin *p = calloc(1, sizeof *p);
    if (!p) return kvh_fail(err, "plugin %s: out of memory", file);
    char real[PATH_MAX];
    if (!realpath(path, real)) {
        free(p);
        return kvh_fail(err, "plugin %s: cannot load: %s", path, strerror(errno));
    }
    p->path = strdup(real);
    p->file_name = strdup(file);
    if (!p->path || !p->file_name) {
        kvh_plugin_close(p);
        return kvh_fail(err, "plugin %s: out of memory", file);
    }
    dlerror();
    kvh_plugin_guard_enter_load(p->path, "in its constructors, run by dlopen");
    p->handle = dlopen(real, RTLD_NOW | RTLD_LOCAL);
    kvh_plugin_guard_leave();
    if (!p->handle) {
        const char *e = dlerror();
        kvh_fail(err, "plugin %s: cannot load: %s", file, e ? e : "unknown dlopen error");
        kvh_plugin_close(p);
        return -1;
    }
    dlerror();
    void *sym = dlsym(p->handle, KVP_ENTRY_SYMBOL);
    if (!sym) {
        kvh_fail(err, "plugin %s: no %s() entry symbol (build it with KVP_PLUGIN(descriptor) and export that function)",
                 file, KVP_ENTRY_SYMBOL);
        kvh_plugin_close(p);
        return -1;
    }
    kvp_entry_fn entry;
    memcpy(&entry, &sym, sizeof entry); /* object -> function pointer without a pedantic warning */
    kvh_plugin_guard_enter_load(p->path, "in " KVP_ENTRY_SYMBOL "()");
    const kvp_descriptor *d = entry();
    kvh_plugin_guard_leave();
    reader rd;
    if (reader_open(&rd) != 0) {
        kvh_fail(err, "plugin %s: cannot check the descriptor: pipe: %s", file, strerror(errno));
        kvh_plugin_close(p);
        return -1;
    }
    int rc = -1;
    kvp_descriptor head; /* the fixed ABI header: abi_major, abi_minor, struct_size */
    const size_t head_bytes = offsetof(kvp_descriptor, role);
    size_t need;
    if (!d) {
        kvh_fail(err, "plugin %s: %s() returned NULL", file, KVP_ENTRY_SYMBOL);
    } else if (copy_in(&rd, &head, d, head_bytes) != 0) {
        kvh_fail(err, "plugin %s: %s() returned %p, which is not readable memory (it must return a pointer to its "
                 "static kvp_descriptor)", file, KVP_ENTRY_SYMBOL, (const void *)d);
    } else if (head.abi_major != KVP_ABI_MAJOR) {
        kvh_fail(err, "plugin %s: built for ABI %u, host speaks %u (rebuild the plugin against this kvhost's SDK)", file,
                 (unsigned)head.abi_major, (unsigned)KVP_ABI_MAJOR);
    } else if (head.struct_size < (need = descriptor_min_size(head.abi_minor))) {
        kvh_fail(err, "plugin %s: descriptor struct_size %u is smaller than the %zu bytes ABI %u.%u requires", file,
                 (unsigned)head.struct_size, need, (unsigned)KVP_ABI_MAJOR, (unsigned)head.abi_minor);
    } else {
        size_t n = head.struct_size < sizeof p->desc ? head.struct_size : sizeof p->desc;
        if (copy_in(&rd, &p->desc, d, n) != 0) {
            memset(&p->desc, 0, sizeof p->desc);
            kvh_fail(err, "plugin %s: the descriptor at %p (struct_size %u) is not readable memory", file,
                     (const void *)d, (unsigned)head.struct_size);
        } else if (own_descriptor_data(&rd, p, err) == 0 && kvh_plugin_validate(&p->desc, file, err) == 0) {
            rc = 0;
        }
    }
    reader_close(&rd);
    if (rc != 0) {
        kvh_plugin_close(p);
        return -1;
    }
    *out = p;
    return 0;
}

void kvh_plugin_close(kvh_plugin *p) {
    if (!p) return;
    if (p->handle) close_handle(p->handle, p->path);
    for (int i = 0; i < p->n_owned; i++) free(p->owned[i]);
    free(p->owned);
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
