/* blas.c — OpenBLAS loaded at run time with kernels kvhost chose (see blas.h for why). */
#define _GNU_SOURCE /* setenv/unsetenv, dlopen flags */
#include "backend/blas.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu_features.h"

static kvh_blas table;
static kvh_err load_error;
static int loaded; /* 1 ok, -1 failed */
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* The OpenBLAS core whose single-precision kernels fit a kvhost ISA level; NULL leaves the choice to
 * OpenBLAS (below AVX2 there is nothing it could get wrong by much). */
static const char *coretype_for(kvh_isa isa) {
    switch (isa) {
    case KVH_ISA_AVX512: return "SkylakeX";
    case KVH_ISA_AVX2: return "Haswell";
    default: return NULL;
    }
}

static void *must_sym(void *lib, const char *name, const char *file) {
    void *p = dlsym(lib, name);
    if (!p) kvh_fail(&load_error, "OpenBLAS (%s) has no '%s': not an OpenBLAS library?", file, name);
    return p;
}

static void load(void) {
    static const char *const names[] = {"libopenblas.so.0", "libopenblas.so"};
    const char *user = getenv("OPENBLAS_CORETYPE");
    const char *ours = NULL;
    if (user && *user) {
        snprintf(table.chosen_by, sizeof table.chosen_by, "user");
    } else {
        ours = coretype_for(kvh_cpu_isa());
        snprintf(table.chosen_by, sizeof table.chosen_by, ours ? "kvhost" : "library");
        /* Read by OpenBLAS's constructor during dlopen below; removed again afterwards so the
         * environment kvhost hands to anything else is the user's. */
        if (ours) setenv("OPENBLAS_CORETYPE", ours, 1);
    }
    void *lib = NULL;
    const char *file = names[0];
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !lib; i++) {
        file = names[i];
        lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    }
    if (ours) unsetenv("OPENBLAS_CORETYPE");
    if (!lib) {
        const char *why = dlerror();
        kvh_fail(&load_error,
                 "cannot load OpenBLAS (libopenblas.so.0): %s. HINT: install it (Debian/Ubuntu: apt-get install "
                 "libopenblas0)",
                 why ? why : "not found");
        loaded = -1;
        return;
    }
    /* dlsym returns void*; the C standard leaves function-pointer conversion to POSIX, which allows it. */
    void *gemm = must_sym(lib, "cblas_sgemm", file);
    void *gemv = gemm ? must_sym(lib, "cblas_sgemv", file) : NULL;
    void *threads = gemv ? must_sym(lib, "openblas_set_num_threads", file) : NULL;
    if (!threads) {
        loaded = -1;
        return; /* the library stays loaded: unloading OpenBLAS with live thread pools is unsafe */
    }
    memcpy(&table.sgemm, &gemm, sizeof gemm);
    memcpy(&table.sgemv, &gemv, sizeof gemv);
    memcpy(&table.set_num_threads, &threads, sizeof threads);
    char *(*get_str)(void) = NULL;
    void *p = dlsym(lib, "openblas_get_corename");
    memcpy(&get_str, &p, sizeof p);
    snprintf(table.corename, sizeof table.corename, "%s", p ? get_str() : "unknown");
    p = dlsym(lib, "openblas_get_config");
    memcpy(&get_str, &p, sizeof p);
    snprintf(table.config, sizeof table.config, "%s", p ? get_str() : "OpenBLAS (version unknown)");
    loaded = 1;
}

const kvh_blas *kvh_blas_load(kvh_err *err) {
    pthread_once(&once, load);
    if (loaded == 1) return &table;
    if (err) *err = load_error;
    return NULL;
}

void kvh_blas_describe(char *buf, size_t size) {
    kvh_err err = {0};
    const kvh_blas *b = kvh_blas_load(&err);
    const char *isa = kvh_isa_name(kvh_cpu_isa());
    if (!b) {
        snprintf(buf, size, "OpenBLAS not loaded (%s); kvhost %s kernels", err.msg, isa);
        return;
    }
    /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ..." -> "OpenBLAS 0.3.21" */
    char version[48];
    snprintf(version, sizeof version, "%.47s", b->config);
    char *sp = strchr(version, ' ');
    if (sp) sp = strchr(sp + 1, ' ');
    if (sp) *sp = '\0';
    snprintf(buf, size, "%s %s kernels (chosen by %s), kvhost %s kernels", version, b->corename, b->chosen_by, isa);
}
