/* cpu_features.h — which vector instruction set kvhost's CPU kernels run, decided by kvhost itself.
 * Owns: reading the processor's features (cpuid, through the compiler's __builtin_cpu_supports), the
 * KVH_ISA cap a user (or valgrind, which cannot run AVX-512) may put on them, and the level's name for
 * records. Does not own: the kernels (gelu.c, matmul_small.c) or the BLAS library (blas.c), which ask it.
 *
 * Why our own: Debian's OpenBLAS 0.3.21 names CPUs by model number and takes recent Xeons (AVX2 +
 * AVX-512 + AVX-VNNI) for a 2004 Prescott, running SSE3 kernels at half the decode speed and a third of
 * the prefill speed (issue #22). Features, unlike model numbers, do not go stale. */
#ifndef KVH_CPU_FEATURES_H
#define KVH_CPU_FEATURES_H

/* Kernel levels, lowest first. Each level implies the ones below it. */
typedef enum kvh_isa {
    KVH_ISA_PORTABLE = 0, /* plain C, whatever the compiler makes of it */
    KVH_ISA_AVX2 = 1,     /* AVX2 + FMA (Haswell and later, Zen) */
    KVH_ISA_AVX512 = 2,   /* AVX-512 F + BW + DQ + VL (Skylake-SP and later, Zen 4) */
} kvh_isa;

/* The level the processor supports, lowered to the KVH_ISA environment variable when that is set
 * ("portable", "avx2" or "avx512"; a level above what the CPU has is lowered to what it has). Read once;
 * thread-safe. An unrecognised KVH_ISA value is ignored here and reported by kvh_isa_env_error(). */
kvh_isa kvh_cpu_isa(void);

/* What the processor supports, ignoring KVH_ISA. */
kvh_isa kvh_cpu_isa_detected(void);

/* "portable", "avx2", "avx512". */
const char *kvh_isa_name(kvh_isa isa);

/* NULL when KVH_ISA is unset or valid; otherwise a static message naming the bad value. */
const char *kvh_isa_env_error(void);

#endif
