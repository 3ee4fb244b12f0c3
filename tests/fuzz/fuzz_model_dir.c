/* fuzz_model_dir.c — fuzz target for model binding: kvh_model_load over a crafted Hugging Face directory
 * (host/model/model.c, model_config.c, safetensors.c, json_scan.c). The input is split at its first NUL byte:
 * config.json before, model.safetensors after; both are written into one scratch directory (made once
 * per process) and the directory is loaded. Invariants when it loads: every weight pointer is set, the
 * parameter count matches the config, every weight is finite (the loader's promise), and the first and
 * last element of each matrix can be read. When it does not load, the message names a file. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/model.h"

#define CHECK(cond)                                                                               \
    do {                                                                                          \
        if (!(cond)) {                                                                            \
            fprintf(stderr, "fuzz_model_dir: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                              \
        }                                                                                         \
    } while (0)

static char g_dir[256];

static void write_file(const char *name, const void *p, size_t n) {
    char path[320];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    CHECK(n == 0 || fwrite(p, 1, n, f) == n);
    CHECK(fclose(f) == 0);
}

static void check_finite(const float *p, size_t n) {
    CHECK(p != NULL);
    for (size_t i = 0; i < n; i++) CHECK(isfinite(p[i]));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_dir[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(g_dir, sizeof g_dir, "%s/kvh_fuzz_model_XXXXXX", tmp && *tmp ? tmp : "/tmp");
        CHECK(mkdtemp(g_dir) != NULL);
    }
    const uint8_t *nul = memchr(data, '\0', size);
    size_t clen = nul ? (size_t)(nul - data) : size;
    write_file("config.json", data, clen);
    write_file("model.safetensors", nul ? nul + 1 : data, nul ? size - clen - 1 : 0);
    kvh_model m;
    kvh_err err = {{0}};
    if (kvh_model_load(&m, g_dir, &err) != 0) {
        CHECK(strstr(err.msg, "config.json") || strstr(err.msg, "model.safetensors"));
        return 0;
    }
    const kvh_model_config *c = &m.cfg;
    CHECK(m.n_params == kvh_model_config_param_count(c));
    CHECK(kvh_model_materialize_all(&m, &err) == 0); /* deferred F16/BF16 layer matrices (model.h) */
    size_t C = (size_t)c->n_embd, F = (size_t)c->n_inner;
    check_finite(m.wte, (size_t)c->n_vocab * C);
    check_finite(m.wpe, (size_t)c->n_positions * C);
    for (int l = 0; l < c->n_layer; l++) {
        const kvh_layer_weights *w = &m.layers[l];
        check_finite(w->attn_w, C * 3 * C);
        check_finite(w->fc_w, C * F);
        check_finite(w->fcproj_w, F * C);
        check_finite(w->ln1_w, C);
        check_finite(w->fcproj_b, C);
    }
    check_finite(m.lnf_b, C);
    kvh_model_free(&m);
    return 0;
}
