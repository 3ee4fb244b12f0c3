/* safetensors.h — reading the safetensors container format (header + raw tensor bytes).
 * Owns: memory-mapping the file, parsing and validating the JSON header (dtypes, shapes, offsets inside
 * the data section, no overlaps), looking tensors up by name. Does not own: what the tensors mean
 * (model.c maps names to GPT-2 weights and checks shapes against the config).
 * Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
 * optional "__metadata__", then the data section; offsets are relative to the start of the data. */
#ifndef KVH_SAFETENSORS_H
#define KVH_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "util/util.h"

enum { KVH_ST_MAX_DIMS = 8 };

typedef enum kvh_st_dtype {
    KVH_ST_F32 = 1,
    KVH_ST_F16 = 2,
    KVH_ST_BF16 = 3,
    KVH_ST_OTHER = 99, /* a valid safetensors dtype the host cannot use (I8, F64...) */
} kvh_st_dtype;

typedef struct kvh_st_tensor {
    char *name;
    kvh_st_dtype dtype;
    char dtype_name[16];
    int n_dims;
    int64_t shape[KVH_ST_MAX_DIMS];
    size_t n_elems;
    const void *data; /* points into the mapping */
    size_t n_bytes;
} kvh_st_tensor;

typedef struct kvh_safetensors {
    char path[1024];
    void *map_base;
    size_t map_len;
    kvh_st_tensor *tensors;
    int n_tensors;
} kvh_safetensors;

/* Opens and validates a file (mmap). */
int kvh_st_open(kvh_safetensors *st, const char *path, kvh_err *err);
/* Validates an in-memory buffer (used by open, tests and the fuzz target). The buffer must outlive st;
 * st->map_base stays NULL so kvh_st_close does not unmap it. */
int kvh_st_parse(kvh_safetensors *st, const void *buf, size_t len, const char *path, kvh_err *err);
void kvh_st_close(kvh_safetensors *st);
/* NULL when absent. */
const kvh_st_tensor *kvh_st_find(const kvh_safetensors *st, const char *name);

/* Converts one element run to fp32 (F32 copy, F16 and BF16 widening). */
void kvh_st_to_f32(const kvh_st_tensor *t, float *out);

#endif
