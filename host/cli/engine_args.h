/* engine_args.h — the engine options `kvhost replay` and `kvhost serve` share (--max-seqs, --max-tokens,
 * --step-tokens, --block-size, --no-prefix-sharing) and creating the engine from them, the run file and
 * the common options. Owns: parsing those options and their precedence (option over run file over the
 * engine's defaults, paged memory with blocks of 16 unless the run file or --block-size says otherwise).
 * Does not own: the commands' other options, or what they do with the engine. */
#ifndef KVH_CLI_ENGINE_ARGS_H
#define KVH_CLI_ENGINE_ARGS_H

#include <stdbool.h>

#include "cli/cli.h"
#include "engine/engine.h"

typedef struct kvh_cli_engine_args {
    long max_seqs, max_tokens, step_tokens, block_size; /* -1: not given */
    bool no_sharing;
} kvh_cli_engine_args;

void kvh_cli_engine_args_init(kvh_cli_engine_args *a);

/* Tries to consume argv[*i] (and its value) as an engine option: 1 consumed (*i advanced), 0 not one,
 * -1 on a bad or missing value (err names the option). */
int kvh_cli_engine_args_parse(kvh_cli_engine_args *a, int argc, char **argv, int *i, kvh_err *err);

/* The engine over a session built from the common options and cfg (whose block_size the option
 * overrides); *eo_out receives the engine options used. */
int kvh_cli_engine_create(kvh_engine **out, const kvh_model *model, const kvh_cli_common *common, kvh_run_config *cfg,
                          const kvh_cli_engine_args *a, kvh_engine_options *eo_out, kvh_err *err);

#endif
