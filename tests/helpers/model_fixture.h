/* model_fixture.h — crafted Hugging Face GPT-2 directories for the robustness suites: config.json, a
 * model.safetensors of small seeded weights (F32, F16 or BF16) that a test may alter tensor by tensor
 * before it is written, and a byte-level tokenizer (256 byte tokens + <|endoftext|>, no merges). */
#ifndef KVH_MODEL_FIXTURE_H
#define KVH_MODEL_FIXTURE_H

#include <stddef.h>

typedef struct kvh_fx_shape {
    int V, P, C, NH, L; /* vocab, positions, embedding, heads, layers (MLP inner size 4C) */
} kvh_fx_shape;

/* Called for each tensor (GPT-2 name without prefix, fp32 values in row-major order) before it is
 * written, so a test can plant a NaN or scale a row. */
typedef void (*kvh_fx_edit)(const char *name, float *data, size_t n, void *user);

/* One value to plant: element `index` of tensor `tensor` (GPT-2 name without prefix) becomes `value`. */
typedef struct kvh_fx_plant {
    const char *tensor;
    size_t index;
    float value;
} kvh_fx_plant;

/* A kvh_fx_edit whose user is an array of plants ended by one with tensor NULL (an index past a tensor's
 * end plants nothing). */
void kvh_fx_plant_edit(const char *name, float *data, size_t n, void *user);

/* Writes dir/config.json and dir/model.safetensors (dtype "F32", "F16" or "BF16"); creates dir. Values
 * are seeded, small (|w| < 0.05, LayerNorm weights 1). extra_config is inserted into config.json's
 * object (e.g. "\"n_layer\": 3, " to repeat a key) or NULL. Aborts the test on I/O errors. */
void kvh_fx_write_model(const char *dir, kvh_fx_shape s, const char *dtype, const char *extra_config,
                        kvh_fx_edit edit, void *user);

/* Writes dir/vocab.json and dir/merges.txt: the 256 GPT-2 byte tokens (ids 0..255 in byte order) and
 * <|endoftext|> = 256, no merges. */
void kvh_fx_write_byte_tokenizer(const char *dir);

#endif
