/* fuzz_model_config.c — fuzz target for the two config.json parsers: the loader's
 * kvh_model_config_parse (host/model/model_config.c) and `kvhost plan`'s kvh_plan_model_from_json
 * (host/plan/plan.c). Owns: feeding arbitrary text to both and checking that an accepted config passes its
 * check function and that its parameter count is computed without overflow (UBSan catches signed
 * overflow in the plan's int64 arithmetic). Does not own the parsers. Built with libFuzzer or with
 * replay_main.c (see tests/fuzz/CMakeLists.txt). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "plan/plan.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_model_config: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* Not NUL-terminated on purpose: the parser gets (text, len) and must not read past len. */
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    if (size) memcpy(text, data, size);
    kvh_model_config cfg;
    kvh_err err;
    err.msg[0] = '\0';
    if (kvh_model_config_parse(text, size, "fuzz/config.json", &cfg, &err) != 0) {
        CHECK(err.msg[0] != '\0');
    } else {
        kvh_err err2;
        CHECK(kvh_model_config_check(&cfg, "fuzz", &err2) == 0);
        CHECK(cfg.n_vocab > 0 && cfg.n_positions > 0 && cfg.n_embd > 0 && cfg.n_head > 0 && cfg.n_layer > 0);
        CHECK(cfg.n_inner > 0 && cfg.n_embd % cfg.n_head == 0);
        /* The limits keep the parameter count far below SIZE_MAX on 64-bit. */
        size_t V = (size_t)cfg.n_vocab, P = (size_t)cfg.n_positions, C = (size_t)cfg.n_embd;
        size_t L = (size_t)cfg.n_layer, F = (size_t)cfg.n_inner, t = 0, acc = 0;
        CHECK(kvh_size_mul(V + P, C, &acc) == 0);
        CHECK(kvh_size_mul(4 * C + 2 * F + 9, C, &t) == 0);
        CHECK(kvh_size_mul(L, t + F, &t) == 0);
        CHECK(kvh_size_add(acc, t, &acc) == 0);
        CHECK(kvh_model_config_param_count(&cfg) == acc + 2 * C);
    }
    /* kvhost plan reads the same files as a C string */
    char *cstr = malloc(size + 1);
    if (cstr) {
        if (size) memcpy(cstr, data, size);
        cstr[size] = '\0';
        kvh_plan_model pm;
        kvh_err perr;
        perr.msg[0] = '\0';
        if (kvh_plan_model_from_json(cstr, "fuzz/config.json", &pm, &perr) != 0) {
            CHECK(perr.msg[0] != '\0');
        } else if (kvh_plan_model_check(&pm, &perr) == 0) {
            kvh_plan_params p;
            kvh_plan_params_exact(&pm, &p);
            kvh_plan_params_simplified(&pm, &p);
        }
        free(cstr);
    }
    free(text);
    return 0;
}
