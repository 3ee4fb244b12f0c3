/* cli.h — options shared by the commands (model, backend, plugins, output) and turning them into a
 * loaded model, tokenizer and run configuration.
 * Owns: parsing of the common options, precedence (CLI over --config file over built-in defaults),
 * the embedded default model spec. Does not own: command-specific options or output. */
#ifndef KVH_CLI_H
#define KVH_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "runtime/config.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "runtime/session.h"
#include "util/util.h"

#define KVH_DEFAULT_MODEL "random:gpt2-medium"
#define KVH_MAX_SETS 64

typedef struct kvh_cli_common {
    const char *model;       /* --model */
    const char *backend;     /* --backend */
    int threads;             /* --threads (0 = not given) */
    const char *config_path; /* --config */
    const char *plugins;     /* --plugins a.so,b.so */
    const char *sets[KVH_MAX_SETS]; /* --set sec.key=value */
    int n_sets;
    const char *plugin_path; /* --plugin-path DIR[:DIR] */
    const char *json_path;   /* --json FILE */
    bool no_cache;           /* --no-cache */
    size_t mem_limit;        /* --mem-limit BYTES (K/M/G suffixes): cap on KV cache bytes */
} kvh_cli_common;

/* The help text of the common options (for the commands' --help). */
extern const char *const kvh_cli_common_help;

/* What a command does with its argument parser's result (0 ok, 1 --help, -1 error in err): returns -1
 * when the command goes on, else the exit status to return at once: 0 after printing usage and the
 * common options' help for --help, 2 after printing "kvhost <command>: <error>". */
int kvh_cli_parse_outcome(int parse_rc, const char *command, const char *usage, const kvh_err *err);

/* Tries to consume argv[*i] (and its value) as a common option. Returns 1 if consumed (*i advanced past
 * the value), 0 if not a common option, -1 on a bad value (err says which option and why). */
int kvh_cli_common_parse(kvh_cli_common *c, int argc, char **argv, int *i, kvh_err *err);

/* Checks, before any work is done, that an output file can be written: an existing regular file (or a
 * character device such as /dev/null) that is writable, or a name in an existing writable directory.
 * Creates nothing. With dir_too, the directory must be writable even when the file exists (outputs
 * written to FILE.tmp and renamed). A FIFO, directory or missing directory is refused, naming the option
 * (e.g. "--json", "--out") and the path. */
int kvh_cli_check_output(const char *option, const char *path, bool dir_too, kvh_err *err);

/* Parses a whole-string unsigned decimal below 2^64 ("--seed 99999999999999999999" is refused, not
 * clamped). */
int kvh_cli_parse_u64(const char *text, uint64_t *out);

/* Parses "512M", "2G", "1048576" into bytes. */
int kvh_cli_parse_bytes(const char *text, size_t *out);
/* Parses a whole-string integer in [lo, hi]. */
int kvh_cli_parse_int(const char *text, long lo, long hi, long *out);

/* Builds the run configuration: --config, then --plugins, then each --set; then CLI --model/--backend/
 * --threads override the file. Also checks that --json's file can be written (kvh_cli_check_output), so a
 * bad path is reported before the run, not after it. */
int kvh_cli_build_config(const kvh_cli_common *c, kvh_run_config *cfg, kvh_err *err);
/* kvh_cli_build_config for a command's first step: 0, or, on an error, prints "kvhost COMMAND: <why>" to
 * stderr, frees cfg and returns 2 (the command's exit status for a bad option or run file). */
int kvh_cli_start_config(const char *command, const kvh_cli_common *c, kvh_run_config *cfg);

/* Resolved settings after build_config. */
const char *kvh_cli_model_spec(const kvh_cli_common *c, const kvh_run_config *cfg);
const char *kvh_cli_backend(const kvh_cli_common *c, const kvh_run_config *cfg);
/* The session options every run command derives from the common options and the run file: backend,
 * threads, --no-cache, --mem-limit, --plugin-path, [model] calibration; n_seq sequences. */
kvh_session_options kvh_cli_session_options(const kvh_cli_common *c, const kvh_run_config *cfg, int n_seq);
int kvh_cli_threads(const kvh_cli_common *c, const kvh_run_config *cfg);

/* Fills ids[0..n-1] with the synthetic benchmark prompt: id i = (i * 7919 + 13) % vocab. One definition,
 * because peers (bench/torch_gpt2.py) reproduce the same ids to run the same prompt. */
void kvh_cli_synthetic_prompt(int32_t *ids, int n, int vocab);

/* Loads the model and its tokenizer (vocab.json/merges.txt beside a checkpoint, else the embedded GPT-2
 * files). */
int kvh_cli_load_model(const char *spec, kvh_model *model, kvh_tokenizer **tok, kvh_err *err);

#endif
