/* gelu.h — GPT-2's GELU (tanh approximation, "gelu_new") over float arrays, vectorised.
 * Owns: the activation kernel in three builds (portable C, AVX2 + FMA, AVX-512) and the choice among them
 * by kvhost's CPU-feature reading (cpu_features.h). Does not own: threading (the caller splits arrays).
 *
 * Why vectorised: the portable loop calls libm's tanhf per element; with proper BLAS kernels that was a
 * quarter of a GPT-2 Medium prefill (issue #22). The vector builds use the identity
 *     0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)),   u = sqrt(2/pi) (v + 0.044715 v^3)
 * with an exp of their own (range reduction by ln 2, degree-6 polynomial, exponent built in the integer
 * unit). Both vector builds run the same operations per element in the same order, so they give the same
 * bits as each other, and every element is computed the same way whatever its place in the array (the
 * tail is masked, not done by a scalar loop). Error against a double-precision reference: tested in
 * tests/test_gelu.c (bound stated there). */
#ifndef KVH_GELU_H
#define KVH_GELU_H

#include <stddef.h>

#include "backend/cpu_features.h"

/* x[i] = gelu(x[i]) for i < n, with the kernels of kvh_cpu_isa(). */
void kvh_gelu(float *x, size_t n);

/* The same with the kernels of one level; a level above the CPU's must not be asked for (tests check
 * kvh_cpu_isa_detected() first). */
void kvh_gelu_isa(kvh_isa isa, float *x, size_t n);

#endif
