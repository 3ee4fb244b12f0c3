/* cli.c — implementation of the common options (cli.h). */
#define _XOPEN_SOURCE 700 /* access, PATH_MAX (strict C11 otherwise hides them) */
#include "cli/cli.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *const kvh_cli_common_help =
    "Model and backend:\n"
    "  --model SPEC          checkpoint directory (config.json, model.safetensors or the shards of\n"
    "                        model.safetensors.index.json, vocab.json, merges.txt), a hub id already in the\n"
    "                        Hugging Face cache (openai-community/gpt2-medium), or\n"
    "                        random:gpt2|gpt2-medium|gpt2-large|gpt2-xl[:SEED] (seeded random weights at the\n"
    "                        real shapes; their text is meaningless). Default: " KVH_DEFAULT_MODEL "\n"
    "  --backend NAME        cpu | cuda | auto (default: cpu, or [model] backend of --config)\n"
    "  --threads N           CPU threads (default: all cores)\n"
    "Cache and plugins:\n"
    "  --config FILE         INI run file (see docs/ini-reference.md)\n"
    "  --plugins A.so,B.so   apply plugins with their defaults to every layer\n"
    "  --set SEC.KEY=VALUE   override one value, e.g. --set cache.budget=256 --set sink.sinks=4\n"
    "  --plugin-path DIRS    extra plugin directories, ':'-separated\n"
    "  --no-cache            baseline: recompute the whole prefix every step (no KV cache)\n"
    "  --mem-limit BYTES     cap on KV-cache bytes (e.g. 512M); growth beyond it is an error\n"
    "Output:\n"
    "  --json FILE           append one JSON Lines record per run to FILE\n";

int kvh_cli_parse_int(const char *text, long lo, long hi, long *out) {
    if (!text || !*text) return -1;
    errno = 0;
    char *end = NULL;
    long v = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int kvh_cli_parse_u64(const char *text, uint64_t *out) {
    if (!text || *text < '0' || *text > '9') return -1; /* strtoull would accept "-1" and " 1" */
    errno = 0;
    char *end = NULL;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0') return -1;
    *out = (uint64_t)v;
    return 0;
}

int kvh_cli_check_output(const char *option, const char *path, bool dir_too, kvh_err *err) {
    if (!path || !*path) return kvh_fail(err, "%s: empty file name", option);
    struct stat st;
    bool exists = stat(path, &st) == 0;
    if (!exists && errno != ENOENT) return kvh_fail(err, "%s %s: cannot use: %s", option, path, strerror(errno));
    if (exists) {
        if (S_ISDIR(st.st_mode)) return kvh_fail(err, "%s %s: is a directory", option, path);
        if (!S_ISREG(st.st_mode) && !S_ISCHR(st.st_mode))
            return kvh_fail(err, "%s %s: not a regular file (a FIFO or socket would block or fail at the end "
                            "of the run)", option, path);
        if (access(path, W_OK) != 0) return kvh_fail(err, "%s %s: not writable: %s", option, path, strerror(errno));
        if (!dir_too) return 0;
    }
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else if ((size_t)(slash - path) >= sizeof dir) return kvh_fail(err, "%s %s: path too long", option, path);
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    struct stat ds;
    if (stat(dir, &ds) != 0) return kvh_fail(err, "%s %s: directory %s: %s", option, path, dir, strerror(errno));
    if (!S_ISDIR(ds.st_mode)) return kvh_fail(err, "%s %s: %s is not a directory", option, path, dir);
    if (access(dir, W_OK | X_OK) != 0)
        return kvh_fail(err, "%s %s: cannot create files in %s: %s", option, path, dir, strerror(errno));
    return 0;
}

int kvh_cli_parse_bytes(const char *text, size_t *out) {
    if (!text || !*text || *text == '-') return -1;
    errno = 0;
    char *end = NULL;
    double v = strtod(text, &end);
    if (errno != 0 || end == text || !(v >= 0)) return -1;
    double mul = 1.0;
    if (*end) {
        switch (*end) {
        case 'k': case 'K': mul = 1024.0; break;
        case 'm': case 'M': mul = 1024.0 * 1024.0; break;
        case 'g': case 'G': mul = 1024.0 * 1024.0 * 1024.0; break;
        default: return -1;
        }
        end++;
        if (*end == 'i') end++;
        if (*end == 'B' || *end == 'b') end++;
        if (*end) return -1;
    }
    double bytes = v * mul;
    if (bytes >= 9.0e18) return -1;
    *out = (size_t)bytes;
    return 0;
}

static int need_value(int argc, char **argv, int *i, const char **value, kvh_err *err) {
    if (*i + 1 >= argc) return kvh_fail(err, "option %s needs a value", argv[*i]);
    *value = argv[*i + 1];
    *i += 2;
    return 0;
}

int kvh_cli_parse_outcome(int parse_rc, const char *command, const char *usage, const kvh_err *err) {
    if (parse_rc == 1) {
        fputs(usage, stdout);
        fputs(kvh_cli_common_help, stdout);
        return 0;
    }
    if (parse_rc != 0) {
        fprintf(stderr, "kvhost %s: %s\n", command, err->msg);
        return 2;
    }
    return -1;
}

int kvh_cli_common_parse(kvh_cli_common *c, int argc, char **argv, int *i, kvh_err *err) {
    const char *a = argv[*i];
    const char *v = NULL;
    if (strcmp(a, "--model") == 0) {
        if (need_value(argc, argv, i, &c->model, err)) return -1;
    } else if (strcmp(a, "--backend") == 0) {
        if (need_value(argc, argv, i, &c->backend, err)) return -1;
    } else if (strcmp(a, "--threads") == 0) {
        if (need_value(argc, argv, i, &v, err)) return -1;
        long t;
        if (kvh_cli_parse_int(v, 1, KVH_MAX_THREADS, &t) != 0)
            return kvh_fail(err, "--threads '%s': expected a whole number from 1 to %d", v, KVH_MAX_THREADS);
        c->threads = (int)t;
    } else if (strcmp(a, "--config") == 0) {
        if (need_value(argc, argv, i, &c->config_path, err)) return -1;
    } else if (strcmp(a, "--plugins") == 0) {
        if (need_value(argc, argv, i, &v, err)) return -1;
        if (c->plugins) return kvh_fail(err, "--plugins given twice; list all plugins in one comma-separated value");
        c->plugins = v;
    } else if (strcmp(a, "--set") == 0) {
        if (need_value(argc, argv, i, &v, err)) return -1;
        if (c->n_sets >= KVH_MAX_SETS) return kvh_fail(err, "more than %d --set options", KVH_MAX_SETS);
        c->sets[c->n_sets++] = v;
    } else if (strcmp(a, "--plugin-path") == 0) {
        if (need_value(argc, argv, i, &c->plugin_path, err)) return -1;
    } else if (strcmp(a, "--json") == 0) {
        if (need_value(argc, argv, i, &c->json_path, err)) return -1;
    } else if (strcmp(a, "--no-cache") == 0) {
        c->no_cache = true;
        *i += 1;
    } else if (strcmp(a, "--mem-limit") == 0) {
        if (need_value(argc, argv, i, &v, err)) return -1;
        if (kvh_cli_parse_bytes(v, &c->mem_limit) != 0 || c->mem_limit == 0)
            return kvh_fail(err, "--mem-limit '%s': expected a positive size such as 512M or 2G", v);
    } else {
        return 0;
    }
    return 1;
}

int kvh_cli_start_config(const char *command, const kvh_cli_common *c, kvh_run_config *cfg) {
    kvh_err err = {{0}};
    if (kvh_cli_build_config(c, cfg, &err) == 0) return 0;
    fprintf(stderr, "kvhost %s: %s\n", command, err.msg);
    kvh_config_free(cfg);
    return 2;
}

int kvh_cli_build_config(const kvh_cli_common *c, kvh_run_config *cfg, kvh_err *err) {
    kvh_config_defaults(cfg);
    if (c->json_path && kvh_cli_check_output("--json", c->json_path, false, err) != 0) return -1;
    if (c->config_path && kvh_config_load_ini(cfg, c->config_path, err) != 0) return -1;
    if (c->plugins && kvh_config_add_plugins_list(cfg, c->plugins, err) != 0) return -1;
    for (int i = 0; i < c->n_sets; i++)
        if (kvh_config_set(cfg, c->sets[i], err) != 0) return -1;
    return 0;
}

const char *kvh_cli_model_spec(const kvh_cli_common *c, const kvh_run_config *cfg) {
    if (c->model) return c->model;
    if (cfg && cfg->model) return cfg->model;
    return KVH_DEFAULT_MODEL;
}

const char *kvh_cli_backend(const kvh_cli_common *c, const kvh_run_config *cfg) {
    if (c->backend) return c->backend;
    if (cfg && cfg->backend_origin.line > 0) return cfg->backend;
    return "cpu";
}

kvh_session_options kvh_cli_session_options(const kvh_cli_common *c, const kvh_run_config *cfg, int n_seq) {
    /* Every field set here (no call into session.c: the option parsers link without the runtime). */
    kvh_session_options so = {0};
    so.backend = kvh_cli_backend(c, cfg);
    so.threads = kvh_cli_threads(c, cfg);
    so.n_seq = n_seq;
    so.no_cache = c->no_cache;
    so.kv_mem_limit = c->mem_limit;
    so.plugin_path = c->plugin_path;
    so.calibration = cfg ? cfg->calibration : NULL;
    return so;
}

int kvh_cli_threads(const kvh_cli_common *c, const kvh_run_config *cfg) {
    if (c->threads > 0) return c->threads;
    if (cfg && cfg->threads > 0) return cfg->threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

void kvh_cli_synthetic_prompt(int32_t *ids, int n, int vocab) {
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(((int64_t)i * 7919 + 13) % vocab);
}

/* Present at all (any file type): a FIFO or directory named vocab.json is then refused by the tokenizer's
 * loader with a message, instead of being skipped in favour of the embedded files. */
static bool file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int kvh_cli_load_model(const char *spec, kvh_model *model, kvh_tokenizer **tok, kvh_err *err) {
    *tok = NULL;
    if (kvh_model_load(model, spec, err) != 0) return -1;
    int rc;
    if (strncmp(spec, "random:", 7) != 0) {
        /* model->source: the directory the weights came from (a hub id's cache snapshot, hub.c) */
        char vocab[PATH_MAX], merges[PATH_MAX];
        snprintf(vocab, sizeof vocab, "%s/vocab.json", model->source);
        snprintf(merges, sizeof merges, "%s/merges.txt", model->source);
        if (file_exists(vocab) && file_exists(merges)) {
            rc = kvh_tokenizer_load(tok, vocab, merges, err);
        } else {
            fprintf(stderr, "kvhost: %s has no vocab.json/merges.txt; using the built-in GPT-2 tokenizer\n", spec);
            rc = kvh_tokenizer_load_embedded(tok, err);
        }
    } else {
        rc = kvh_tokenizer_load_embedded(tok, err);
    }
    if (rc != 0) {
        kvh_model_free(model);
        return -1;
    }
    if (kvh_tokenizer_vocab_size(*tok) < model->cfg.n_vocab)
        fprintf(stderr, "kvhost: the model's vocabulary (%d ids) is larger than the tokenizer's (%d): ids %d..%d have "
                "no text, so generation never samples them (their logits are masked); perplexity still normalizes "
                "over all %d, as Hugging Face does\n", model->cfg.n_vocab, kvh_tokenizer_vocab_size(*tok),
                kvh_tokenizer_vocab_size(*tok), model->cfg.n_vocab - 1, model->cfg.n_vocab);
    if (kvh_tokenizer_vocab_size(*tok) > model->cfg.n_vocab) {
        kvh_fail(err, "tokenizer has %d tokens but the model's vocabulary is %d", kvh_tokenizer_vocab_size(*tok),
                 model->cfg.n_vocab);
        kvh_tokenizer_free(*tok);
        *tok = NULL;
        kvh_model_free(model);
        return -1;
    }
    return 0;
}
