/* config.c — run configuration from INI files (inih) and CLI overrides. See config.h.
 * Line numbers: the Debian libinih has no line-number handler argument, so we feed inih through our
 * own line reader (ini_parse_stream) that counts lines, strips leading whitespace (so an indented key
 * is a key, never a multi-line continuation), rejects over-long lines and registers section headers
 * itself (inih does not call the handler for an empty section). */
#define _XOPEN_SOURCE 700 /* realpath */
#include "runtime/config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvp/kvp.h"

#define LAYER_SYNTAX_MAX 4096u /* layer numbers accepted before the model is known */
#define RUN_FILE_MAX_BYTES (16 << 20) /* run files are a few KB; 256 per-layer sections stay far below */

void kvh_origin_format(const kvh_origin *o, char *buf, size_t cap) {
    if (o->line > 0) snprintf(buf, cap, "%s:%d", o->file, o->line);
    else snprintf(buf, cap, "%s", o->file[0] ? o->file : "(default)");
}

static void origin_set(kvh_origin *o, const char *file, int line) {
    snprintf(o->file, sizeof o->file, "%s", file);
    o->line = line;
}

void kvh_config_defaults(kvh_run_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->backend, sizeof cfg->backend, "auto");
    cfg->slack = KVH_CONFIG_DEFAULT_SLACK;
    cfg->max_seqs = KVH_CONFIG_DEFAULT_MAX_SEQS;
    cfg->step_tokens = KVH_CONFIG_DEFAULT_STEP_TOKENS;
    cfg->prefix_sharing = 1;
}

static void section_free(kvh_config_section *s) {
    free(s->name);
    free(s->plugin);
    free(s->layers);
    for (int i = 0; i < s->n_params; i++) {
        free(s->params[i].key);
        free(s->params[i].value);
    }
    free(s->params);
}

void kvh_config_free(kvh_run_config *cfg) {
    free(cfg->model);
    free(cfg->calibration);
    for (int i = 0; i < cfg->n_sections; i++) section_free(&cfg->sections[i]);
    free(cfg->sections);
    kvh_config_defaults(cfg);
}

kvh_config_section *kvh_config_find_section(const kvh_run_config *cfg, const char *name) {
    for (int i = 0; i < cfg->n_sections; i++)
        if (strcmp(cfg->sections[i].name, name) == 0) return &cfg->sections[i];
    return NULL;
}

const kvh_config_kv *kvh_config_section_param(const kvh_config_section *s, const char *key) {
    for (int i = 0; i < s->n_params; i++)
        if (strcmp(s->params[i].key, key) == 0) return &s->params[i];
    return NULL;
}

static int replace_str(char **dst, const char *src) {
    char *c = strdup(src);
    if (!c) return -1;
    free(*dst);
    *dst = c;
    return 0;
}

static int valid_section_name(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_' || *s == '-'))
            return 0;
    return 1;
}

static int valid_key(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_')) return 0;
    return 1;
}

/* Adds a plugin section; fails on a bad or duplicate name. */
static int add_section(kvh_run_config *cfg, const char *name, const kvh_origin *where, kvh_config_section **out,
                       kvh_err *err) {
    char at[300];
    kvh_origin_format(where, at, sizeof at);
    if (!valid_section_name(name))
        return kvh_fail(err, "%s: invalid section name [%s] (letters, digits, '_' and '-' only)", at, name);
    /* inih keeps 49 characters of a section name for the keys below it (found by tests/fuzz/fuzz_ini.c) */
    if (strlen(name) > 49)
        return kvh_fail(err, "%s: section name [%.60s...] is longer than 49 characters", at, name);
    kvh_config_section *old = kvh_config_find_section(cfg, name);
    if (old) {
        char prev[300];
        kvh_origin_format(&old->origin, prev, sizeof prev);
        return kvh_fail(err, "%s: duplicate section [%s] (first defined at %s; use a different section name and "
                        "plugin = FILE to load one plugin twice)", at, name, prev);
    }
    if (cfg->n_sections == cfg->cap_sections) {
        int nc = cfg->cap_sections ? cfg->cap_sections * 2 : 4;
        kvh_config_section *ns = realloc(cfg->sections, (size_t)nc * sizeof *ns);
        if (!ns) return kvh_fail(err, "%s: out of memory", at);
        cfg->sections = ns;
        cfg->cap_sections = nc;
    }
    kvh_config_section *s = &cfg->sections[cfg->n_sections];
    memset(s, 0, sizeof *s);
    s->name = strdup(name);
    s->plugin = strdup(name);
    s->layers = strdup("all");
    if (!s->name || !s->plugin || !s->layers) {
        section_free(s);
        return kvh_fail(err, "%s: out of memory", at);
    }
    s->origin = *where;
    s->plugin_origin = *where;
    s->layers_origin = *where;
    cfg->n_sections++;
    if (out) *out = s;
    return 0;
}

/* Parses a whole-string base-10 integer in [lo, hi]. */
static int parse_int(const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end != '\0' || errno == ERANGE || x < lo || x > hi) return -1;
    *out = x;
    return 0;
}

/* An integer [cache] key in lo..hi: "at: [cache] key = value: <below>" under lo, "must be <= hi" above. */
static int cache_uint(const char *at, const char *key, const char *value, long long lo, long long hi,
                      const char *below, uint32_t *out, kvh_err *err) {
    long long x;
    if (parse_int(value, LLONG_MIN, LLONG_MAX, &x) != 0)
        return kvh_fail(err, "%s: [cache] %s = %s: expected an integer", at, key, value);
    if (x < lo) return kvh_fail(err, "%s: [cache] %s = %s: %s", at, key, value, below);
    if (x > hi) return kvh_fail(err, "%s: [cache] %s = %s: must be <= %lld", at, key, value, hi);
    *out = (uint32_t)x;
    return 0;
}

/* Sets one key of [model] / [cache] / a plugin section. `dup_check`: the value must not be set yet by
 * this same source (a file); --set passes 0 and overrides. */
static int set_key(kvh_run_config *cfg, const char *section, const char *key, const char *value,
                   const kvh_origin *where, int dup_check, kvh_err *err) {
    char at[300];
    kvh_origin_format(where, at, sizeof at);
    long long x;
    if (strcmp(section, "engine") == 0) {
        kvh_origin *o = NULL;
        if (strcmp(key, "max_tokens") == 0) o = &cfg->max_tokens_origin;
        else if (strcmp(key, "max_seqs") == 0) o = &cfg->max_seqs_origin;
        else if (strcmp(key, "step_tokens") == 0) o = &cfg->step_tokens_origin;
        else if (strcmp(key, "prefix_sharing") == 0) o = &cfg->prefix_sharing_origin;
        else
            return kvh_fail(err, "%s: [engine] unknown key '%s' (known keys: max_tokens, max_seqs, step_tokens, "
                            "prefix_sharing)", at, key);
        if (dup_check && o->line > 0 && strcmp(o->file, where->file) == 0)
            return kvh_fail(err, "%s: [engine] duplicate key '%s' (already set at line %d)", at, key, o->line);
        if (o == &cfg->max_tokens_origin) {
            if (parse_int(value, 0, 1ll << 31, &x) != 0)
                return kvh_fail(err, "%s: [engine] max_tokens = %s: expected an integer in 0..2^31 (0 = no limit)", at,
                                value);
            cfg->max_tokens = (uint32_t)x;
        } else if (o == &cfg->max_seqs_origin) {
            if (parse_int(value, 1, 4096, &x) != 0)
                return kvh_fail(err, "%s: [engine] max_seqs = %s: expected an integer in 1..4096", at, value);
            cfg->max_seqs = (uint32_t)x;
        } else if (o == &cfg->step_tokens_origin) {
            if (parse_int(value, 1, 1 << 20, &x) != 0)
                return kvh_fail(err, "%s: [engine] step_tokens = %s: expected an integer in 1..2^20", at, value);
            cfg->step_tokens = (uint32_t)x;
        } else {
            if (strcmp(value, "on") == 0 || strcmp(value, "1") == 0 || strcmp(value, "true") == 0) cfg->prefix_sharing = 1;
            else if (strcmp(value, "off") == 0 || strcmp(value, "0") == 0 || strcmp(value, "false") == 0)
                cfg->prefix_sharing = 0;
            else return kvh_fail(err, "%s: [engine] prefix_sharing = %s: expected on or off", at, value);
        }
        *o = *where;
        return 0;
    }
    if (strcmp(section, "model") == 0 || strcmp(section, "cache") == 0) {
        kvh_origin *o = NULL;
        int is_model = section[0] == 'm';
        if (is_model && strcmp(key, "spec") == 0) o = &cfg->model_origin;
        else if (is_model && strcmp(key, "backend") == 0) o = &cfg->backend_origin;
        else if (is_model && strcmp(key, "threads") == 0) o = &cfg->threads_origin;
        else if (is_model && strcmp(key, "calibration") == 0) o = &cfg->calibration_origin;
        else if (!is_model && strcmp(key, "budget") == 0) o = &cfg->budget_origin;
        else if (!is_model && strcmp(key, "slack") == 0) o = &cfg->slack_origin;
        else if (!is_model && strcmp(key, "prefill_chunk") == 0) o = &cfg->prefill_chunk_origin;
        else if (!is_model && strcmp(key, "block_size") == 0) o = &cfg->block_size_origin;
        else
            return kvh_fail(err, "%s: [%s] unknown key '%s' (known keys: %s)", at, section, key,
                            is_model ? "spec, backend, threads, calibration" : "budget, slack, prefill_chunk, block_size");
        if (dup_check && o->line > 0 && strcmp(o->file, where->file) == 0) {
            return kvh_fail(err, "%s: [%s] duplicate key '%s' (already set at line %d)", at, section, key, o->line);
        }
        if (o == &cfg->model_origin) {
            if (!*value) return kvh_fail(err, "%s: [model] spec is empty", at);
            if (replace_str(&cfg->model, value) != 0) return kvh_fail(err, "%s: out of memory", at);
        } else if (o == &cfg->calibration_origin) {
            if (!*value) return kvh_fail(err, "%s: [model] calibration is empty (omit the key for none)", at);
            if (replace_str(&cfg->calibration, value) != 0) return kvh_fail(err, "%s: out of memory", at);
        } else if (o == &cfg->backend_origin) {
            if (strcmp(value, "cpu") && strcmp(value, "cuda") && strcmp(value, "auto"))
                return kvh_fail(err, "%s: [model] backend = %s: expected cpu, cuda or auto", at, value);
            snprintf(cfg->backend, sizeof cfg->backend, "%s", value);
        } else if (o == &cfg->threads_origin) {
            if (parse_int(value, 0, KVH_MAX_THREADS, &x) != 0)
                return kvh_fail(err, "%s: [model] threads = %s: expected an integer in 0..%d (0 = automatic)", at, value,
                                KVH_MAX_THREADS);
            cfg->threads = (int)x;
        } else if (o == &cfg->budget_origin) {
            if (cache_uint(at, "budget", value, 1, 1ll << 30, "budget must be >= 1; omit it to keep every token",
                           &cfg->budget, err) != 0)
                return -1;
        } else if (o == &cfg->block_size_origin) {
            if (parse_int(value, 0, 4096, &x) != 0 || (x & (x - 1)) != 0)
                return kvh_fail(err, "%s: [cache] block_size = %s: expected 0 (contiguous slots) or a power of two up to "
                                "4096", at, value);
            cfg->block_size = (uint32_t)x;
        } else if (o == &cfg->prefill_chunk_origin) {
            if (cache_uint(at, "prefill_chunk", value, 0, 1ll << 20, "must be >= 1 (or 0 for the whole prompt at once)",
                           &cfg->prefill_chunk, err) != 0)
                return -1;
        } else {
            if (cache_uint(at, "slack", value, 0, 1ll << 20, "must be >= 0", &cfg->slack, err) != 0) return -1;
        }
        *o = *where;
        return 0;
    }
    kvh_config_section *s = kvh_config_find_section(cfg, section);
    if (!s) return kvh_fail(err, "%s: no section [%s] to set '%s' in", at, section, key);
    if (strcmp(key, "plugin") == 0 || strcmp(key, "layers") == 0) {
        int is_plugin = key[0] == 'p';
        kvh_origin *o = is_plugin ? &s->plugin_origin : &s->layers_origin;
        /* the default origin is the section header line; a real key has a later line */
        if (dup_check && o->line > s->origin.line && strcmp(o->file, where->file) == 0)
            return kvh_fail(err, "%s: [%s] duplicate key '%s' (already set at line %d)", at, section, key, o->line);
        if (!*value) return kvh_fail(err, "%s: [%s] %s is empty", at, section, key);
        if (!is_plugin) {
            unsigned char mask[LAYER_SYNTAX_MAX];
            if (kvp_parse_layers(value, LAYER_SYNTAX_MAX, mask) != 0)
                return kvh_fail(err, "%s: [%s] layers = %s: expected all, N, A-B or a comma list of those "
                                "(e.g. 0-5,8,10-11), ranges ascending", at, section, value);
        }
        if (replace_str(is_plugin ? &s->plugin : &s->layers, value) != 0) return kvh_fail(err, "%s: out of memory", at);
        *o = *where;
        return 0;
    }
    if (!valid_key(key)) return kvh_fail(err, "%s: [%s] invalid key '%s' (expected [a-z0-9_]+)", at, section, key);
    for (int i = 0; i < s->n_params; i++) {
        kvh_config_kv *kv = &s->params[i];
        if (strcmp(kv->key, key) != 0) continue;
        if (dup_check && strcmp(kv->origin.file, where->file) == 0)
            return kvh_fail(err, "%s: [%s] duplicate key '%s' (already set at line %d)", at, section, key, kv->origin.line);
        if (replace_str(&kv->value, value) != 0) return kvh_fail(err, "%s: out of memory", at);
        kv->origin = *where;
        return 0;
    }
    if (s->n_params == s->cap_params) {
        int nc = s->cap_params ? s->cap_params * 2 : 4;
        kvh_config_kv *np = realloc(s->params, (size_t)nc * sizeof *np);
        if (!np) return kvh_fail(err, "%s: out of memory", at);
        s->params = np;
        s->cap_params = nc;
    }
    kvh_config_kv *kv = &s->params[s->n_params];
    kv->key = strdup(key);
    kv->value = strdup(value);
    if (!kv->key || !kv->value) {
        free(kv->key);
        free(kv->value);
        return kvh_fail(err, "%s: out of memory", at);
    }
    kv->origin = *where;
    s->n_params++;
    return 0;
}

/* ---- INI reading ------------------------------------------------------------------------------- */

typedef struct ini_state {
    kvh_run_config *cfg;
    const char *file;
    const char *dir;  /* absolute directory of the file (relative plugin paths resolve here), or NULL */
    FILE *f;          /* or: */
    const char *text; /* string source, advanced as read */
    int line;         /* line number of the chunk last handed to inih */
    int at_line_start;
    int failed;
    int seen_model, seen_cache, seen_engine; /* header line, 0 = not seen in this file */
    kvh_err *err;
} ini_state;

static char *read_chunk(ini_state *st, char *buf, int num) {
    if (st->f) return fgets(buf, num, st->f);
    if (!st->text || !*st->text) return NULL;
    int i = 0;
    while (i < num - 1 && st->text[i]) {
        buf[i] = st->text[i];
        i++;
        if (buf[i - 1] == '\n') break;
    }
    buf[i] = '\0';
    st->text += i;
    return buf;
}

static void trim_right(char *s) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n')) s[--n] = '\0';
}

static char *line_reader(char *buf, int num, void *stream) {
    ini_state *st = stream;
    if (st->failed) return NULL;
    if (!read_chunk(st, buf, num)) return NULL;
    st->line++;
    size_t len = strlen(buf);
    /* The limit holds for the last line too (a 199-character last line would not survive the normalized
     * write-back of kvh_config_write_ini; found by tests/fuzz/fuzz_ini.c). */
    if (len == (size_t)num - 1 && buf[len - 1] != '\n') {
        st->failed = 1;
        kvh_fail(st->err, "%s:%d: line longer than %d characters", st->file, st->line, num - 2);
        return NULL;
    }
    /* strip leading whitespace: an indented key is a key, not a continuation line */
    size_t lead = strspn(buf, " \t");
    if (lead) memmove(buf, buf + lead, len - lead + 1);
    /* section headers: register them ourselves (empty sections never reach the handler) */
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (!close) {
            st->failed = 1;
            kvh_fail(st->err, "%s:%d: malformed line: section header without ']'", st->file, st->line);
            return NULL;
        }
        char rest[8];
        snprintf(rest, sizeof rest, "%s", close + 1);
        trim_right(rest);
        if (rest[0] && rest[0] != ';' && rest[0] != '#') {
            st->failed = 1;
            kvh_fail(st->err, "%s:%d: unexpected text after the section header", st->file, st->line);
            return NULL;
        }
        char name[256];
        size_t n = (size_t)(close - buf - 1);
        if (n >= sizeof name) n = sizeof name - 1;
        memcpy(name, buf + 1, n);
        name[n] = '\0';
        kvh_origin where;
        origin_set(&where, st->file, st->line);
        if (strcmp(name, "model") == 0 || strcmp(name, "cache") == 0 || strcmp(name, "engine") == 0) {
            int *seen = name[0] == 'm' ? &st->seen_model : name[0] == 'c' ? &st->seen_cache : &st->seen_engine;
            if (*seen) {
                st->failed = 1;
                kvh_fail(st->err, "%s:%d: duplicate section [%s] (first at line %d)", st->file, st->line, name, *seen);
                return NULL;
            }
            *seen = st->line;
        } else if (add_section(st->cfg, name, &where, NULL, st->err) != 0) {
            st->failed = 1;
            return NULL;
        }
    }
    return buf;
}

static int key_handler(void *user, const char *section, const char *name, const char *value) {
    ini_state *st = user;
    if (st->failed) return 0;
    kvh_origin where;
    origin_set(&where, st->file, st->line);
    if (!section[0]) {
        st->failed = 1;
        kvh_fail(st->err, "%s:%d: key '%s' outside any section (start with [model], [cache] or a plugin section)",
                 st->file, st->line, name);
        return 0;
    }
    /* `plugin = ../x.so` in a run file means next to the run file, wherever kvhost is started from; a bare
     * name (no '/') is still searched in the plugin directories. */
    char joined[PATH_MAX];
    /* [model] calibration = FILE likewise means next to the run file (it is always a path). */
    const int is_calibration = strcmp(section, "model") == 0 && strcmp(name, "calibration") == 0 && value[0];
    if (st->dir && ((strcmp(name, "plugin") == 0 && strcmp(section, "model") != 0 && strcmp(section, "cache") != 0 &&
                     strcmp(section, "engine") != 0 &&
                     strchr(value, '/')) || is_calibration) && value[0] != '/') {
        if ((size_t)snprintf(joined, sizeof joined, "%s/%s", st->dir, value) >= sizeof joined) {
            st->failed = 1;
            kvh_fail(st->err, "%s:%d: [%s] plugin = %s: path too long", st->file, st->line, section, value);
            return 0;
        }
        value = joined;
    }
    if (set_key(st->cfg, section, name, value, &where, 1, st->err) != 0) {
        st->failed = 1;
        return 0;
    }
    return 1;
}

static int load_common(kvh_run_config *cfg, ini_state *st, kvh_err *err) {
    int rc = ini_parse_stream(line_reader, st, key_handler, st);
    if (st->failed) return -1;
    if (rc > 0) return kvh_fail(err, "%s:%d: malformed line (expected [section], key = value or a ; comment)", st->file, rc);
    if (rc < 0) return kvh_fail(err, "%s: out of memory while parsing", st->file);
    (void)cfg;
    return 0;
}

int kvh_config_load_ini(kvh_run_config *cfg, const char *path, kvh_err *err) {
    /* a regular file of bounded size: a FIFO would block the open, /dev/zero would be read forever */
    int fd = kvh_open_regular(path, err);
    if (fd < 0) return kvh_fail_prefix(err, "run file");
    struct stat sb;
    if (fstat(fd, &sb) != 0 || sb.st_size > RUN_FILE_MAX_BYTES) {
        close(fd);
        return kvh_fail(err, "%s: run file is larger than the limit of %d bytes", path, RUN_FILE_MAX_BYTES);
    }
    FILE *f = fdopen(fd, "r");
    if (!f) {
        close(fd);
        return kvh_fail(err, "%s: cannot open run file: %s", path, strerror(errno));
    }
    char dir[PATH_MAX], real[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    ini_state st = {.cfg = cfg, .file = path, .dir = realpath(dir, real) ? real : NULL, .f = f, .err = err};
    int rc = load_common(cfg, &st, err);
    if (rc == 0 && ferror(f)) rc = kvh_fail(err, "%s: read error", path);
    fclose(f);
    return rc;
}

int kvh_config_load_string(kvh_run_config *cfg, const char *text, const char *name, kvh_err *err) {
    ini_state st = {.cfg = cfg, .file = name, .text = text, .err = err};
    return load_common(cfg, &st, err);
}

/* ---- CLI ----------------------------------------------------------------------------------------- */

int kvh_config_add_plugins_list(kvh_run_config *cfg, const char *list, kvh_err *err) {
    const char *p = list;
    kvh_origin where;
    origin_set(&where, "--plugins", 0);
    for (;;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        while (len && (*p == ' ' || *p == '\t')) { p++; len--; }
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        if (len == 0) return kvh_fail(err, "--plugins %s: empty entry (expected a comma list like window.so,sink.so)", list);
        char ref[1024];
        if (len >= sizeof ref) return kvh_fail(err, "--plugins: entry too long");
        memcpy(ref, p, len);
        ref[len] = '\0';
        const char *base = strrchr(ref, '/');
        base = base ? base + 1 : ref;
        char name[1024];
        memcpy(name, base, strlen(base) + 1);
        size_t nl = strlen(name);
        if (nl > 3 && strcmp(name + nl - 3, ".so") == 0) name[nl - 3] = '\0';
        kvh_config_section *s;
        if (add_section(cfg, name, &where, &s, err) != 0) return -1;
        if (replace_str(&s->plugin, ref) != 0) return kvh_fail(err, "--plugins: out of memory");
        if (!c) break;
        p = c + 1;
    }
    return 0;
}

int kvh_config_set(kvh_run_config *cfg, const char *assignment, kvh_err *err) {
    const char *eq = strchr(assignment, '=');
    const char *dot = strchr(assignment, '.');
    if (!eq || !dot || dot > eq || dot == assignment || eq == dot + 1)
        return kvh_fail(err, "--set %s: expected SECTION.KEY=VALUE (e.g. sink.window=256, cache.budget=128)", assignment);
    char section[256], key[256];
    size_t sl = (size_t)(dot - assignment), kl = (size_t)(eq - dot - 1);
    if (sl >= sizeof section || kl >= sizeof key) return kvh_fail(err, "--set %s: section or key too long", assignment);
    memcpy(section, assignment, sl);
    section[sl] = '\0';
    memcpy(key, dot + 1, kl);
    key[kl] = '\0';
    trim_right(section);
    trim_right(key);
    const char *value = eq + 1;
    while (*value == ' ' || *value == '\t') value++;
    char *v = strdup(value);
    if (!v) return kvh_fail(err, "--set: out of memory");
    trim_right(v);
    kvh_origin where;
    origin_set(&where, "--set", 0);
    int rc = 0;
    if (strcmp(section, "model") != 0 && strcmp(section, "cache") != 0 && strcmp(section, "engine") != 0 &&
        !kvh_config_find_section(cfg, section)) {
        char names[512] = "";
        size_t u = 0;
        for (int i = 0; i < cfg->n_sections && u < sizeof names; i++) {
            int w = snprintf(names + u, sizeof names - u, "%s%s", i ? ", " : "", cfg->sections[i].name);
            if (w > 0) u += (size_t)w;
        }
        rc = kvh_fail(err, "--set %s: no section [%s]; sections are: model, cache%s%s (add the plugin with --plugins "
                      "or --config first)", assignment, section, names[0] ? ", " : "", names);
    } else {
        rc = set_key(cfg, section, key, v, &where, 0, err);
    }
    free(v);
    return rc;
}

/* ---- writing back -------------------------------------------------------------------------------- */

/* "key = value", or "key=value" when the value starts with ';' (inih reads " ;" as an inline comment)
 * or when the spaces would push the line past the reader's limit of INI_MAX_LINE - 2 characters (the
 * loaded line had key, separator and value, so the compact form fits). Found by tests/fuzz/fuzz_ini.c. */
static void put_kv(FILE *f, const char *key, const char *value) {
    int compact = value[0] == ';' || strlen(key) + strlen(value) + 3 > (size_t)INI_MAX_LINE - 2;
    fprintf(f, compact ? "%s=%s\n" : "%s = %s\n", key, value);
}

int kvh_config_write_ini(const kvh_run_config *cfg, FILE *f) {
    fprintf(f, "; kvhost run configuration (normalized)\n[model]\n");
    if (cfg->model) put_kv(f, "spec", cfg->model);
    if (cfg->calibration) put_kv(f, "calibration", cfg->calibration);
    fprintf(f, "backend = %s\nthreads = %d\n\n[cache]\n", cfg->backend, cfg->threads);
    if (cfg->budget) fprintf(f, "budget = %u\n", (unsigned)cfg->budget);
    fprintf(f, "slack = %u\n", (unsigned)cfg->slack);
    if (cfg->prefill_chunk) fprintf(f, "prefill_chunk = %u\n", (unsigned)cfg->prefill_chunk);
    if (kvh_origin_given(&cfg->block_size_origin)) fprintf(f, "block_size = %u\n", (unsigned)cfg->block_size);
    if (kvh_origin_given(&cfg->max_tokens_origin) || kvh_origin_given(&cfg->max_seqs_origin) ||
        kvh_origin_given(&cfg->step_tokens_origin) || kvh_origin_given(&cfg->prefix_sharing_origin))
        fprintf(f, "\n[engine]\nmax_tokens = %u\nmax_seqs = %u\nstep_tokens = %u\nprefix_sharing = %s\n",
                (unsigned)cfg->max_tokens, (unsigned)cfg->max_seqs, (unsigned)cfg->step_tokens,
                cfg->prefix_sharing ? "on" : "off");
    for (int i = 0; i < cfg->n_sections; i++) {
        const kvh_config_section *s = &cfg->sections[i];
        fprintf(f, "\n[%s]\n", s->name);
        put_kv(f, "plugin", s->plugin);
        put_kv(f, "layers", s->layers);
        for (int j = 0; j < s->n_params; j++) put_kv(f, s->params[j].key, s->params[j].value);
    }
    return ferror(f) ? -1 : 0;
}
