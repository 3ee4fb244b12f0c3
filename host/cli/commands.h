/* commands.h — the sub-commands main.c dispatches to. Each takes argv with argv[0] = the command name
 * and returns the process exit status (0 ok, 1 run failed, 2 bad usage). Commands print; the library
 * below them only returns errors. */
#ifndef KVH_COMMANDS_H
#define KVH_COMMANDS_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "runtime/config.h"
#include "model/model.h"
#include "runtime/session.h"

int kvh_cmd_generate(int argc, char **argv);
int kvh_cmd_eval(int argc, char **argv);
int kvh_cmd_calibrate(int argc, char **argv);
int kvh_cmd_tokenize(int argc, char **argv); /* cmd_tokenize.c */
int kvh_cmd_logits(int argc, char **argv);   /* cmd_logits.c */
int kvh_cmd_trace(int argc, char **argv);    /* cmd_trace.c */
int kvh_cmd_replay(int argc, char **argv);   /* cmd_replay.c */
int kvh_cmd_serve(int argc, char **argv);    /* cmd_serve.c */
/* The quick comparison (cmd_compare.c): `kvhost --plugins ...` with no command, or `kvhost compare`. */
int kvh_cmd_compare(int argc, char **argv);

/* Agreement of a run's greedy tokens with the baseline's: identical ids position by position over the
 * longer of the two outputs; first_divergence is the first differing index (or where the shorter one
 * ends), -1 when the outputs are identical. */
typedef struct kvh_agreement {
    int n_compared, n_identical, first_divergence;
} kvh_agreement;
void kvh_compare_agreement(const int32_t *base, int n_base, const int32_t *other, int n_other, kvh_agreement *out);

/* Record fields every run command shares: model, backend, device, threads, cache, exact plugin stack.
 * Returns -1 (when out of memory) rather than leave a record without its plugin stack. */
int kvh_add_run_fields(cJSON *rec, const kvh_model *model, const kvh_session *s, const kvh_run_config *cfg,
                       const char *backend, int threads);

#endif
