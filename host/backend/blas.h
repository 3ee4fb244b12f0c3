/* blas.h — the BLAS library kvhost calls (OpenBLAS, loaded at run time) and which kernels it runs.
 * Owns: loading libopenblas after choosing its kernels from kvhost's own CPU-feature reading
 * (cpu_features.h), the table of the few routines the CPU backend uses, and a description of the
 * kernels for records and `kvhost --version`. Does not own: threading (the backend splits the work and
 * keeps OpenBLAS single-threaded) or kernels of our own (matmul_small.c, gelu.c).
 *
 * Why loaded at run time: OpenBLAS picks its kernels in a library constructor, before main(), from the
 * CPU's model number; 0.3.21 does not know recent Xeons and runs its SSE3 "Prescott" kernels on them
 * (half the decode speed, a third of the prefill speed: issue #22). Its only knob is the
 * OPENBLAS_CORETYPE environment variable, read by that constructor. kvhost therefore does not link
 * OpenBLAS: it sets OPENBLAS_CORETYPE from the CPU's features (SkylakeX for AVX-512, Haswell for AVX2,
 * nothing below that) unless the user has set it, then dlopen()s the library. A user's own
 * OPENBLAS_CORETYPE always wins, and the record says whose choice ran. */
#ifndef KVH_BLAS_H
#define KVH_BLAS_H

#include <cblas.h>

#include "util/util.h"

typedef struct kvh_blas {
    void (*sgemm)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE, blasint m, blasint n, blasint k,
                  float alpha, const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c,
                  blasint ldc);
    void (*sgemv)(enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, blasint m, blasint n, float alpha, const float *a,
                  blasint lda, const float *x, blasint incx, float beta, float *y, blasint incy);
    void (*set_num_threads)(int);
    char corename[32];     /* the kernels OpenBLAS runs (openblas_get_corename), e.g. "SkylakeX" */
    char config[128];      /* its build (openblas_get_config), e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." */
    char chosen_by[16];    /* "kvhost" (OPENBLAS_CORETYPE set from cpuid), "user" (already set), "library" */
} kvh_blas;

/* Loads OpenBLAS once per process (thread-safe) and returns its table, or NULL with err filled (library
 * missing or lacking a routine). Later calls return the same table or the same failure. */
const kvh_blas *kvh_blas_load(kvh_err *err);

/* One line for records and --version: "OpenBLAS 0.3.21 SkylakeX kernels (chosen by kvhost), kvhost
 * avx512 kernels". Loads the library if needed; says why when it cannot. */
void kvh_blas_describe(char *buf, size_t size);

#endif
