/* cpu_features.c — the kernel level from cpuid features and the KVH_ISA cap (see cpu_features.h). */
#include "backend/cpu_features.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static kvh_isa detected = KVH_ISA_PORTABLE;
static kvh_isa chosen = KVH_ISA_PORTABLE;
static char env_error[160];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static kvh_isa detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
        return KVH_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return KVH_ISA_AVX2;
#endif
    return KVH_ISA_PORTABLE;
}

static void init(void) {
    detected = detect();
    chosen = detected;
    const char *cap = getenv("KVH_ISA");
    if (!cap || !*cap) return;
    kvh_isa want;
    if (strcmp(cap, "portable") == 0) want = KVH_ISA_PORTABLE;
    else if (strcmp(cap, "avx2") == 0) want = KVH_ISA_AVX2;
    else if (strcmp(cap, "avx512") == 0) want = KVH_ISA_AVX512;
    else {
        snprintf(env_error, sizeof env_error, "KVH_ISA='%.40s' is not one of portable, avx2, avx512", cap);
        return;
    }
    if (want < chosen) chosen = want;
}

kvh_isa kvh_cpu_isa(void) {
    pthread_once(&once, init);
    return chosen;
}

kvh_isa kvh_cpu_isa_detected(void) {
    pthread_once(&once, init);
    return detected;
}

const char *kvh_isa_env_error(void) {
    pthread_once(&once, init);
    return env_error[0] ? env_error : NULL;
}

const char *kvh_isa_name(kvh_isa isa) {
    switch (isa) {
    case KVH_ISA_AVX512: return "avx512";
    case KVH_ISA_AVX2: return "avx2";
    default: return "portable";
    }
}
