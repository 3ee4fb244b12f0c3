/* plugin_check.h — `kvhost plugins check FILE.so`: drives one policy plugin through randomized
 * create / insert / score report / evict / reset sequences at small shapes, through the real loader,
 * router and cache, and validates every answer; or one store plugin through randomized insert / read
 * (decode, attend) / release / reset sequences, checking its answers against the fp32 values and its
 * writes against guard bytes. Owns the drivers and their synthetic data; the validation of a policy's
 * answers is the router's and the cache's (the same code a real run uses). */
#ifndef KVH_PLUGIN_CHECK_H
#define KVH_PLUGIN_CHECK_H

#include <stdint.h>
#include <stdio.h>

#include "util/util.h"

typedef struct kvh_plugin_check_options {
    uint64_t seed;        /* first seed; run r uses seed + r */
    int runs;             /* independent runs (fresh router and cache, random shape and budget) */
    int steps;            /* forward steps per run (each: every sequence gets a block or one token) */
    uint32_t budget;      /* [cache] budget of every run; 0 = random in 12..39 */
    const char *const *sets; /* "key=value" parameters of the plugin, n_sets of them */
    int n_sets;
    double tol;           /* stores: largest relative RMS error of a decoded row against its fp32 row (the
                           * store's declared error; the SDK has no field for it) */
} kvh_plugin_check_options;

kvh_plugin_check_options kvh_plugin_check_default_options(void);

/* Checks the plugin `ref` (a name or a path, looked up like --plugins with plugin_path). Prints one
 * line per run to out. Returns 0 when every answer was valid, else -1 with err naming the plugin, run,
 * seed, step, layer, sequence, head and hook. Policies: every victim list and hook result validated.
 * Stores: every decoded slot within o->tol of its fp32 row, attend() equal to fp32 attention over the
 * decoded rows, no write past a slot, row or probs buffer. A weight format is refused with a message
 * pointing at the tests that cover them. */
int kvh_plugin_check(const char *ref, const char *plugin_path, const kvh_plugin_check_options *o, FILE *out,
                     kvh_err *err);

#endif
