/* calibration.h — activation statistics of a model's linear inputs, for weight formats that scale by them
 * (SmoothQuant): the largest |x_i| each input channel i of each matrix took over a calibration text.
 * Owns: collecting them (the CPU backend calls kvh_calibration_observe when a run collects), the .kvcal
 * file (write whole or not at all; read with every field checked against the model), and handing a
 * matrix's statistics to its weight format. Does not own: the forward pass, the command (cmd_calibrate.c).
 *
 * File (little-endian): "KVHCAL01", uint32 version 1, uint32 n_layer, n_embd, n_inner, uint64 tokens
 * observed, then float32 per layer: c_attn input [n_embd], attn c_proj input [n_embd], mlp c_fc input
 * [n_embd], mlp c_proj input [n_inner]; then the LM head input [n_embd]. Nothing after that. */
#ifndef KVH_CALIBRATION_H
#define KVH_CALIBRATION_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "util/util.h"

typedef struct kvh_calibration {
    int n_layer, n_embd, n_inner;
    uint64_t tokens;  /* tokens observed (rows passed through the model) */
    float *absmax;    /* the statistics, in file order */
    size_t n_floats;
} kvh_calibration;

/* An empty collection (all zero) for a model of this shape. */
int kvh_calibration_init(kvh_calibration *c, const kvh_model_config *cfg, kvh_err *err);
void kvh_calibration_free(kvh_calibration *c);

/* Statistics of matrix `which` (KVP_MAT_*) of `layer` (n_layer with KVP_MAT_LM_HEAD), or NULL. */
const float *kvh_calibration_input(const kvh_calibration *c, int layer, uint32_t which);

/* Folds T input rows x[T, K] of (layer, which) into the maxima. Not thread-safe: call from one thread. */
void kvh_calibration_observe(kvh_calibration *c, int layer, uint32_t which, const float *x, int T, int K);

/* Writes the file through a temporary name and a rename, so a failed write leaves no partial file. */
int kvh_calibration_save(const kvh_calibration *c, const char *path, kvh_err *err);

/* Reads a file and checks it against cfg (shape, size, values finite and >= 0): errors name the file and
 * the field. */
int kvh_calibration_load(kvh_calibration *c, const char *path, const kvh_model_config *cfg, kvh_err *err);

#endif
