/* commands.h — the sub-commands main.c dispatches to. Each takes argv with argv[0] = the command name
 * and returns the process exit status (0 ok, 1 run failed, 2 bad usage). Commands print; the library
 * below them only returns errors. */
#ifndef KVH_COMMANDS_H
#define KVH_COMMANDS_H

#include <cjson/cJSON.h>

#include "config.h"
#include "model.h"
#include "session.h"

int kvh_cmd_generate(int argc, char **argv);

/* Record fields every run command shares: model, backend, device, threads, cache, exact plugin stack. */
int kvh_add_run_fields(cJSON *rec, const kvh_model *model, const kvh_session *s, const kvh_run_config *cfg,
                       const char *backend, int threads);

#endif
