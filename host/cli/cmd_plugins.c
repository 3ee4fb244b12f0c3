/* cmd_plugins.c — the `kvhost plugins list|info|check` command: what plugins the search directories hold,
 * one plugin's parameters, ranges, help and capabilities, and the options of `check` (plugin_check.h
 * drives it). Owns the printing, and running each
 * `list` probe in a child process so a file that crashes or exits while loading is reported and the
 * listing goes on; loading and validation are plugin.c's. Declared in plugin.h (kvh_cmd_plugins). */
#define _GNU_SOURCE /* realpath, strsignal */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/plugin.h"
#include "runtime/plugin_check.h"

static void usage(FILE *f) {
    fprintf(f, "usage: kvhost plugins list [--plugin-path DIR[:DIR...]]\n"
               "       kvhost plugins info NAME|FILE.so [--plugin-path DIR[:DIR...]]\n"
               "       kvhost plugins check NAME|FILE.so [--seed N] [--runs N] [--steps N] [--budget N]\n"
               "                                        [--set KEY=VALUE]... [--tol X] [--plugin-path DIR[:DIR...]]\n"
               "           drives a policy through randomized insert/score/evict/reset sequences, or a store\n"
               "           through insert/read/release/reset sequences, at small shapes and validates every\n"
               "           answer (docs/plugin-guide.md, sections 2 and 7); --tol: a store's largest relative\n"
               "           error of a decoded row against its fp32 row (0.25)\n"
               "Plugins are looked up by path (anything containing '/') or by name in --plugin-path,\n"
               "<kvhost dir>/../lib/kvhost/plugins, the build's plugin directory and the install directory.\n");
}

static void caps_text(uint32_t caps, char *buf, size_t cap) {
    static const struct { uint32_t bit; const char *name; } names[] = {
        {KVP_CAP_DECODE_SCORES, "decode-scores"},
        {KVP_CAP_PREFILL_SCORES, "prefill-scores"},
        {KVP_CAP_OBS_SCORES, "obs-scores"},
        {KVP_CAP_HEAD_BUDGETS, "head-budgets"},
        {KVP_CAP_SCORE_REPORT, "score-report"},
        {KVP_CAP_ACT_QUANT, "act-quant (decode products over quantized activations)"},
        {KVP_CAP_MATMUL_PREFILL, "matmul-prefill (its own product for prefill too)"},
    };
    size_t u = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((caps & names[i].bit) && u < cap) {
            int w = snprintf(buf + u, cap - u, "%s%s", u ? ", " : "", names[i].name);
            if (w > 0) u += (size_t)w;
        }
    if (!buf[0]) snprintf(buf, cap, "none");
}

static const char *role_name(uint32_t role) {
    return role == KVP_ROLE_POLICY ? "policy" : role == KVP_ROLE_STORE ? "store" : role == KVP_ROLE_WEIGHTS ? "weights" : "?";
}

static int filter_so(const struct dirent *e) {
    size_t n = strlen(e->d_name);
    return n > 3 && strcmp(e->d_name + n - 3, ".so") == 0;
}

/* Loads `path` in a child process and puts its listing line (return 0) or why it is skipped (return -1)
 * into out. Loading runs plugin code (constructors, the entry function): in-process, a file that
 * crashes or calls exit() there would end the listing, so the child takes the risk; its plugin guard
 * has already named the file and the stage on stderr when it dies. */
static int probe(const char *path, char *out, size_t cap) {
    int fd[2];
    if (pipe(fd) != 0) {
        snprintf(out, cap, "cannot probe it: pipe: %s", strerror(errno));
        return -1;
    }
    fflush(stdout); /* the child must not write the parent's buffered output again */
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(out, cap, "cannot probe it: fork: %s", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        return -1;
    }
    if (pid == 0) {
        close(fd[0]);
        char msg[8192];
        kvh_plugin *p;
        kvh_err err = {{0}};
        if (kvh_plugin_open(path, &p, &err) == 0) {
            snprintf(msg, sizeof msg, "+%-14s %-8s %-7s %s  [%s]\n", p->desc.name, p->desc.version,
                     role_name(p->desc.role), p->desc.summary, path);
            kvh_plugin_close(p);
        } else {
            snprintf(msg, sizeof msg, "-%s", err.msg);
        }
        const char *m = msg;
        size_t left = strlen(msg);
        while (left > 0) {
            ssize_t w = write(fd[1], m, left);
            if (w <= 0) break;
            m += w;
            left -= (size_t)w;
        }
        _exit(0);
    }
    close(fd[1]);
    size_t len = 0;
    char buf[8192];
    for (;;) {
        ssize_t r = read(fd[0], buf + len, sizeof buf - 1 - len);
        if (r > 0 && (len += (size_t)r) < sizeof buf - 1) continue;
        if (r < 0 && errno == EINTR) continue;
        break;
    }
    buf[len] = '\0';
    close(fd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFSIGNALED(status)) {
        snprintf(out, cap, "the process probing it crashed with signal %d (%s) while loading it (the listing goes on)",
                 WTERMSIG(status), strsignal(WTERMSIG(status)));
        return -1;
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || len == 0) {
        snprintf(out, cap, "it ended the process probing it while loading (exit status %d; the listing goes on)",
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        return -1;
    }
    snprintf(out, cap, "%s", buf + 1);
    return buf[0] == '+' ? 0 : -1;
}

static int cmd_list(const char *plugin_path) {
    char **dirs = kvh_plugin_dirs(plugin_path);
    if (!dirs) {
        fprintf(stderr, "kvhost: out of memory\n");
        return 1;
    }
    char **seen = NULL;
    size_t n_seen = 0;
    int found = 0, failed = 0;
    for (char **d = dirs; *d; d++) {
        struct dirent **ents;
        int n = scandir(*d, &ents, filter_so, alphasort);
        if (n < 0) continue;
        for (int i = 0; i < n; i++) {
            char path[PATH_MAX + 256];
            snprintf(path, sizeof path, "%s/%s", *d, ents[i]->d_name);
            int dup = 0;
            for (size_t j = 0; j < n_seen && !dup; j++) dup = strcmp(seen[j], ents[i]->d_name) == 0;
            if (!dup) {
                char **ns = realloc(seen, (n_seen + 1) * sizeof *ns);
                if (ns) {
                    seen = ns;
                    seen[n_seen] = strdup(ents[i]->d_name);
                    if (seen[n_seen]) n_seen++;
                }
                char line[8192];
                if (probe(path, line, sizeof line) == 0) {
                    fputs(line, stdout);
                    found++;
                } else {
                    fprintf(stderr, "kvhost: skipping %s: %s\n", path, line);
                    failed++;
                }
            }
            free(ents[i]);
        }
        free(ents);
    }
    for (size_t j = 0; j < n_seen; j++) free(seen[j]);
    free(seen);
    if (!found && !failed) {
        fprintf(stderr, "kvhost: no plugins found; searched:");
        for (char **d = dirs; *d; d++) fprintf(stderr, " %s", *d);
        fprintf(stderr, "\n");
    }
    kvh_plugin_dirs_free(dirs);
    return 0;
}

static int cmd_info(const char *ref, const char *plugin_path) {
    kvh_plugin_registry reg;
    kvh_plugin_registry_init(&reg);
    kvh_plugin *p;
    kvh_err err = {{0}};
    if (kvh_plugin_registry_load(&reg, ref, plugin_path, &p, &err) != 0) {
        fprintf(stderr, "kvhost: %s\n", err.msg);
        kvh_plugin_registry_free(&reg);
        return 1;
    }
    const kvp_descriptor *d = &p->desc;
    char caps[200];
    caps_text(d->caps, caps, sizeof caps);
    printf("%s %s (%s): %s\n", d->name, d->version, role_name(d->role), d->summary);
    printf("file:         %s\n", p->path);
    printf("built for:    ABI %u.%u (host speaks %u.%u)\n", (unsigned)d->abi_major, (unsigned)d->abi_minor,
           (unsigned)KVP_ABI_MAJOR, (unsigned)KVP_ABI_MINOR);
    printf("capabilities: %s\n", caps);
    /* the hooks this plugin really provides, in descriptor order */
    const struct {
        const char *name;
        int present;
    } hooks[] = {{"create", d->create != NULL},   {"destroy", d->destroy != NULL}, {"reset", d->reset != NULL},
                 {"head_budgets", d->head_budgets != NULL}, {"evict", d->evict != NULL},
                 {"encode", d->encode != NULL},   {"decode", d->decode != NULL},   {"attend", d->attend != NULL},
                 {"append", d->append != NULL},   {"release", d->release != NULL},
                 {"packed_size", d->packed_size != NULL}, {"pack", d->pack != NULL}, {"unpack", d->unpack != NULL},
                 {"matmul", d->matmul != NULL}};
    printf("hooks:       ");
    for (size_t i = 0, first = 1; i < sizeof hooks / sizeof hooks[0]; i++)
        if (hooks[i].present) {
            printf("%s %s", first ? "" : ",", hooks[i].name);
            first = 0;
        }
    printf("\n");
    if (d->n_params == 0) {
        printf("parameters:   none\n");
    } else {
        printf("parameters (INI keys of a [%s] section, or --set %s.NAME=VALUE):\n", d->name, d->name);
        printf("  %-16s %-6s %-10s %-26s %s\n", "NAME", "TYPE", "DEFAULT", "RANGE", "HELP");
        for (uint32_t i = 0; i < d->n_params; i++) {
            const kvp_param *q = &d->params[i];
            char def[40], lo[40], hi[40], range[90];
            kvh_plugin_param_format(q->type, q->default_value, def, sizeof def);
            kvh_plugin_param_format(q->type, q->min_value, lo, sizeof lo);
            kvh_plugin_param_format(q->type, q->max_value, hi, sizeof hi);
            if (q->type == KVP_PARAM_BOOL) snprintf(range, sizeof range, "true|false");
            else snprintf(range, sizeof range, "[%s, %s]", lo, hi);
            printf("  %-16s %-6s %-10s %-26s %s\n", q->name, kvh_plugin_param_type_name(q->type), def, range, q->help);
        }
    }
    kvh_plugin_registry_free(&reg);
    return 0;
}

int kvh_cmd_plugins(int argc, char **argv) {
    const char *plugin_path = NULL, *sub = NULL, *target = NULL;
    kvh_plugin_check_options co = kvh_plugin_check_default_options();
    const char **sets = calloc((size_t)argc + 1, sizeof *sets); /* --set values of `check` */
    if (!sets) {
        fprintf(stderr, "kvhost plugins: out of memory\n");
        return 1;
    }
    co.sets = sets;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--seed") == 0 || strcmp(a, "--runs") == 0 || strcmp(a, "--steps") == 0 || strcmp(a, "--set") == 0 ||
            strcmp(a, "--budget") == 0) {
            char *end = NULL;
            if (i + 1 >= argc) {
                fprintf(stderr, "kvhost plugins: %s needs a value\n", a);
                free(sets);
                return 2;
            }
            const char *v = argv[++i];
            if (strcmp(a, "--set") == 0) {
                sets[co.n_sets++] = v;
                continue;
            }
            unsigned long long n = strtoull(v, &end, 10);
            if (!*v || *v == '-' || *end || n > 1000000000ull || (n == 0 && strcmp(a, "--seed") != 0)) {
                fprintf(stderr, "kvhost plugins: %s %s: expected an integer%s\n", a, v,
                        strcmp(a, "--seed") ? " in 1..1000000000" : " in 0..1000000000");
                free(sets);
                return 2;
            }
            if (strcmp(a, "--seed") == 0) co.seed = n;
            else if (strcmp(a, "--runs") == 0) co.runs = (int)n;
            else if (strcmp(a, "--budget") == 0) co.budget = (uint32_t)n;
            else co.steps = (int)n;
        } else if (strcmp(a, "--tol") == 0) {
            char *end = NULL;
            const char *v = i + 1 < argc ? argv[++i] : "";
            double t = strtod(v, &end);
            if (!*v || *end || !(t > 0) || t > 1e6) {
                fprintf(stderr, "kvhost plugins: --tol %s: expected a number > 0\n", v);
                free(sets);
                return 2;
            }
            co.tol = t;
        } else if (strcmp(a, "--plugin-path") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kvhost plugins: --plugin-path needs a value\n");
                free(sets);
                return 2;
            }
            plugin_path = argv[++i];
        } else if (strncmp(a, "--plugin-path=", 14) == 0) {
            plugin_path = a + 14;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            free(sets);
            return 0;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "kvhost plugins: unknown option %s\n", a);
            usage(stderr);
            free(sets);
            return 2;
        } else if (!sub) {
            sub = a;
        } else if (!target) {
            target = a;
        } else {
            fprintf(stderr, "kvhost plugins: unexpected argument %s\n", a);
            free(sets);
            return 2;
        }
    }
    if (!sub) {
        usage(stderr);
        free(sets);
        return 2;
    }
    int rc = 2;
    if (strcmp(sub, "list") == 0 && !target) rc = cmd_list(plugin_path);
    else if (strcmp(sub, "info") == 0 && target) rc = cmd_info(target, plugin_path);
    else if (strcmp(sub, "check") == 0 && target) {
        kvh_err err = {{0}};
        rc = kvh_plugin_check(target, plugin_path, &co, stdout, &err) == 0 ? 0 : 1;
        if (rc) fprintf(stderr, "kvhost plugins check: FAILED: %s\n", err.msg);
    } else usage(stderr);
    free(sets);
    return rc;
}
