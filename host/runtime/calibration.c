/* calibration.c — activation statistics and the .kvcal file (see calibration.h). */
#include "runtime/calibration.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvp/kvp.h"

static const char MAGIC[8] = {'K', 'V', 'H', 'C', 'A', 'L', '0', '1'};
#define CAL_VERSION 1u
#define HEADER_BYTES (8 + 4 * 4 + 8)

static size_t floats_for(int L, int C, int F) { return (size_t)L * (3u * (size_t)C + (size_t)F) + (size_t)C; }

int kvh_calibration_init(kvh_calibration *c, const kvh_model_config *cfg, kvh_err *err) {
    memset(c, 0, sizeof *c);
    c->n_layer = cfg->n_layer;
    c->n_embd = cfg->n_embd;
    c->n_inner = cfg->n_inner;
    c->n_floats = floats_for(cfg->n_layer, cfg->n_embd, cfg->n_inner);
    c->absmax = calloc(c->n_floats, sizeof(float));
    if (!c->absmax) return kvh_fail(err, "calibration: out of memory (%zu statistics)", c->n_floats);
    return 0;
}

void kvh_calibration_free(kvh_calibration *c) {
    free(c->absmax);
    memset(c, 0, sizeof *c);
}

const float *kvh_calibration_input(const kvh_calibration *c, int layer, uint32_t which) {
    if (!c || !c->absmax) return NULL;
    const size_t C = (size_t)c->n_embd, per_layer = 3 * C + (size_t)c->n_inner;
    if (which == KVP_MAT_LM_HEAD) return layer == c->n_layer ? c->absmax + (size_t)c->n_layer * per_layer : NULL;
    if (layer < 0 || layer >= c->n_layer || which > KVP_MAT_MLP_PROJ) return NULL;
    return c->absmax + (size_t)layer * per_layer + which * C; /* the first three are C wide, MLP_PROJ comes last */
}

void kvh_calibration_observe(kvh_calibration *c, int layer, uint32_t which, const float *x, int T, int K) {
    float *m = (float *)kvh_calibration_input(c, layer, which);
    if (!m) return;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < K; i++) {
            const float v = fabsf(x[(size_t)t * K + i]);
            if (v > m[i]) m[i] = v;
        }
    if (which == KVP_MAT_ATTN_QKV && layer == 0) c->tokens += (uint64_t)T;
}

int kvh_calibration_save(const kvh_calibration *c, const char *path, kvh_err *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return kvh_fail(err, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return kvh_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    const uint32_t head[4] = {CAL_VERSION, (uint32_t)c->n_layer, (uint32_t)c->n_embd, (uint32_t)c->n_inner};
    int ok = fwrite(MAGIC, 1, 8, f) == 8 && fwrite(head, 4, 4, f) == 4 && fwrite(&c->tokens, 8, 1, f) == 1 &&
             fwrite(c->absmax, sizeof(float), c->n_floats, f) == c->n_floats;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        const int e = errno;
        unlink(tmp);
        return kvh_fail(err, "%s: cannot write the calibration file: %s (nothing written)", path, strerror(e));
    }
    return 0;
}

int kvh_calibration_load(kvh_calibration *c, const char *path, const kvh_model_config *cfg, kvh_err *err) {
    memset(c, 0, sizeof *c);
    char *data = NULL;
    size_t len = 0;
    const size_t want = HEADER_BYTES + floats_for(cfg->n_layer, cfg->n_embd, cfg->n_inner) * sizeof(float);
    if (kvh_read_file(path, want + 1, &data, &len, err) != 0) return kvh_fail_prefix(err, "calibration file");
    int rc = 0;
    uint32_t head[4];
    if (len < HEADER_BYTES || memcmp(data, MAGIC, 8) != 0) {
        rc = kvh_fail(err, "%s: not a kvhost calibration file (no KVHCAL01 header). HINT: make one with `kvhost "
                      "calibrate --model M --text-file F --out FILE`", path);
        goto out;
    }
    memcpy(head, data + 8, sizeof head);
    if (head[0] != CAL_VERSION) {
        rc = kvh_fail(err, "%s: calibration file version %u (this kvhost reads %u)", path, head[0], CAL_VERSION);
        goto out;
    }
    if (head[1] != (uint32_t)cfg->n_layer || head[2] != (uint32_t)cfg->n_embd || head[3] != (uint32_t)cfg->n_inner) {
        rc = kvh_fail(err, "%s: made for a model of %u layers, n_embd %u, n_inner %u; this model has %d, %d, %d", path,
                      head[1], head[2], head[3], cfg->n_layer, cfg->n_embd, cfg->n_inner);
        goto out;
    }
    if (len != want) {
        rc = kvh_fail(err, "%s: %zu bytes, expected %zu for this shape (truncated or padded)", path, len, want);
        goto out;
    }
    if ((rc = kvh_calibration_init(c, cfg, err)) != 0) goto out;
    memcpy(&c->tokens, data + 8 + sizeof head, 8);
    memcpy(c->absmax, data + HEADER_BYTES, c->n_floats * sizeof(float));
    for (size_t i = 0; i < c->n_floats; i++)
        if (!isfinite(c->absmax[i]) || c->absmax[i] < 0.0f) {
            rc = kvh_fail(err, "%s: statistic %zu is %g (must be finite and >= 0)", path, i, (double)c->absmax[i]);
            kvh_calibration_free(c);
            goto out;
        }
out:
    free(data);
    return rc;
}
