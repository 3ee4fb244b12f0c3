/* softmax.h — the exponentials of an attention row's softmax, vectorised.
 * Owns: x[j] = exp(x[j] - mx) over a row with masked (-inf) entries, and their sum, at the kernel levels of
 * cpu_features.h. Does not own: the maximum (the caller finds it while it writes the scores), the
 * division by the sum, or threading.
 *
 * Why: with BLAS products at memory speed, libm's scalar expf per score was 5% of a GPT-2 Medium decode
 * step and a fifth of a 512-token prefill (issue #22). The vector levels use vexp.h's exp; each element
 * gets the same bits at AVX2 and AVX-512 whatever its place in the row (tails are masked or padded, not
 * left to a scalar loop). The sums are taken in vector lanes, so they differ between levels in the last
 * bits. Error against double precision: tests/test_softmax.c. */
#ifndef KVH_SOFTMAX_H
#define KVH_SOFTMAX_H

#include <stdint.h>

#include "backend/cpu_features.h"

/* x[j] = exp(x[j] - mx) for j < n; entries equal to -inf (masked slots) and those whose exponent is
 * below -86 (under 5e-38, against the row maximum's exp(0) = 1) become exactly 0. mx must be the row's
 * maximum over unmasked entries (finite). Returns the sum of the new x[j]. */
float kvh_softmax_exp_sum(float *x, uint32_t n, float mx);

/* The same with the kernels of one level (tests; a level above the CPU's must not be asked for). */
float kvh_softmax_exp_sum_isa(kvh_isa isa, float *x, uint32_t n, float mx);

#endif
