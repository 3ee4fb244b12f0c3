/* wformat_kernels.h — products over the packed weight formats of wformat.h.
 * Owns: y += x · W for a few input rows over a range of outputs, in a portable C build, an AVX2 build and
 * an AVX-512 build (chosen by the caller from the host's cpu_level). Does not own: the formats (wformat.h), threading
 * (the host splits output ranges), or many-row products (the host unpacks panels and runs its GEMM).
 *
 * Every output's sum is built the same way whatever the number of rows and wherever the range starts:
 * per 32 inputs, the weights are decoded to fp32 (the values wf_unpack_row gives) and multiplied with x
 * into that output's own accumulator, summed at the end. So a row's result does not depend on its batch. */
#ifndef WFORMAT_KERNELS_H
#define WFORMAT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "wformat.h"

/* y[r * ldy + j] += sum_i x[r * k + i] * W(i, j), r < rows, n0 <= j < n1; packed: the whole matrix. */
void wf_matmul_portable(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                        uint32_t n1, float *y, size_t ldy);

/* The same with AVX-512 (F, BW, DQ, VL) and F16C; only on CPUs that have them. Returns 0 when this build
 * has no AVX-512 kernels (not x86-64), 1 when it ran. */
int wf_matmul_avx512(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                     uint32_t n1, float *y, size_t ldy);

/* The same with AVX2, FMA and F16C (Haswell and later, Zen). Returns 0 when this build has none. */
int wf_matmul_avx2(wf_spec s, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
                   uint32_t n1, float *y, size_t ldy);

#endif
