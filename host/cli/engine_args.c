/* engine_args.c — implementation of the shared engine options declared in engine_args.h. */
#include "cli/engine_args.h"

#include <stdio.h>
#include <string.h>

void kvh_cli_engine_args_init(kvh_cli_engine_args *a) {
    a->max_seqs = a->max_tokens = a->step_tokens = a->block_size = -1;
    a->no_sharing = false;
}

int kvh_cli_engine_args_parse(kvh_cli_engine_args *a, int argc, char **argv, int *i, kvh_err *err) {
    const char *o = argv[*i];
    if (strcmp(o, "--no-prefix-sharing") == 0) {
        a->no_sharing = true;
        (*i)++;
        return 1;
    }
    if (strcmp(o, "--max-seqs") != 0 && strcmp(o, "--max-tokens") != 0 && strcmp(o, "--step-tokens") != 0 &&
        strcmp(o, "--block-size") != 0)
        return 0;
    const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    if (!v) return kvh_fail(err, "%s: missing value", o);
    if (strcmp(o, "--max-seqs") == 0) {
        if (kvh_cli_parse_int(v, 1, 4096, &a->max_seqs)) return kvh_fail(err, "--max-seqs '%s': expected 1..4096", v);
    } else if (strcmp(o, "--max-tokens") == 0) {
        if (kvh_cli_parse_int(v, 0, 1l << 31, &a->max_tokens))
            return kvh_fail(err, "--max-tokens '%s': expected a whole number >= 0 (0 = no limit)", v);
    } else if (strcmp(o, "--step-tokens") == 0) {
        if (kvh_cli_parse_int(v, 1, 1 << 20, &a->step_tokens))
            return kvh_fail(err, "--step-tokens '%s': expected 1..1048576", v);
    } else {
        if (kvh_cli_parse_int(v, 0, 4096, &a->block_size) || (a->block_size & (a->block_size - 1)))
            return kvh_fail(err, "--block-size '%s': expected 0 or a power of two up to 4096", v);
    }
    *i += 2;
    return 1;
}

int kvh_cli_engine_create(kvh_engine **out, const kvh_model *model, const kvh_cli_common *common, kvh_run_config *cfg,
                          const kvh_cli_engine_args *a, kvh_engine_options *eo_out, kvh_err *err) {
    kvh_session_options so = kvh_cli_session_options(common, cfg, 1); /* the engine sets n_seq */
    so.block_slots = 16; /* the engine's default: paged memory is what sharing and fragmentation need */
    if (a->block_size >= 0) { /* the option overrides the run file */
        cfg->block_size = (uint32_t)a->block_size;
        snprintf(cfg->block_size_origin.file, sizeof cfg->block_size_origin.file, "--block-size");
    }
    kvh_engine_options eo = {.max_tokens = cfg->max_tokens,
                             .max_seqs = cfg->max_seqs,
                             .step_tokens = cfg->step_tokens,
                             .prefix_sharing = cfg->prefix_sharing != 0,
                             .check_invariants = true};
    if (a->max_seqs > 0) eo.max_seqs = (uint32_t)a->max_seqs;
    if (a->max_tokens >= 0) eo.max_tokens = (uint32_t)a->max_tokens;
    if (a->step_tokens > 0) eo.step_tokens = (uint32_t)a->step_tokens;
    if (a->no_sharing) eo.prefix_sharing = false;
    *eo_out = eo;
    return kvh_engine_create(out, model, cfg, &so, &eo, err);
}
