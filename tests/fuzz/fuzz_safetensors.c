/* fuzz_safetensors.c — fuzz target for the safetensors container parser (host/model/safetensors.c).
 * Owns: feeding arbitrary bytes to kvh_st_parse and checking what a successful parse promises: every
 * tensor's bytes lie inside the buffer, byte counts match shape x dtype, lookups find every name, and
 * converting a (small) tensor to fp32 reads only its own bytes. Does not own: the parser itself.
 * Built two ways (tests/fuzz/CMakeLists.txt, run_fuzzers.sh): with libFuzzer, or with replay_main.c. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/safetensors.h"

#define CHECK(cond)                                                                              \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            fprintf(stderr, "fuzz_safetensors: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                             \
        }                                                                                        \
    } while (0)

static size_t dtype_size(const kvh_st_tensor *t) {
    switch (t->dtype) {
    case KVH_ST_F32: return 4;
    case KVH_ST_F16:
    case KVH_ST_BF16: return 2;
    default: return 0; /* other dtypes: size not exposed by the API */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* A private copy of exactly `size` bytes, so ASan sees any read past the end. */
    unsigned char *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    kvh_safetensors st;
    kvh_err err;
    err.msg[0] = '\0';
    if (kvh_st_parse(&st, buf, size, "fuzz.safetensors", &err) != 0) {
        CHECK(err.msg[0] != '\0'); /* every failure says why */
        CHECK(st.tensors == NULL && st.n_tensors == 0);
        free(buf);
        return 0;
    }
    CHECK(st.map_base == NULL);
    CHECK(st.n_tensors >= 0);
    for (int i = 0; i < st.n_tensors; i++) {
        const kvh_st_tensor *t = &st.tensors[i];
        const unsigned char *p = t->data;
        CHECK(t->name != NULL);
        CHECK(t->n_dims >= 0 && t->n_dims <= KVH_ST_MAX_DIMS);
        CHECK(p >= buf && p <= buf + size);
        CHECK(t->n_bytes <= (size_t)(buf + size - p));
        size_t n = 1;
        for (int d = 0; d < t->n_dims; d++) {
            CHECK(t->shape[d] >= 0);
            CHECK(kvh_size_mul(n, (size_t)t->shape[d], &n) == 0);
        }
        CHECK(n == t->n_elems);
        size_t es = dtype_size(t);
        if (es) {
            size_t nb = 0;
            CHECK(kvh_size_mul(t->n_elems, es, &nb) == 0 && nb == t->n_bytes);
            if (t->n_elems <= (1u << 16)) {
                float *out = malloc(t->n_elems ? t->n_elems * sizeof(float) : 1);
                if (out) {
                    kvh_st_to_f32(t, out);
                    free(out);
                }
            }
        }
        CHECK(kvh_st_find(&st, t->name) != NULL);
    }
    kvh_st_close(&st);
    free(buf);
    return 0;
}
