/* wformat_kernels.h — products over the packed weight formats of wformat.h.
 * Owns: y += x · W for a few input rows over a range of outputs, in a portable C build, an AVX2 build and
 * AVX-512 builds (chosen by the caller: WF_LEVEL_*). Does not own: the formats (wformat.h), the activation
 * quantization of w8/w4 (wformat_act.h), threading (the host splits output ranges), or many-row products
 * (the host unpacks panels and runs its GEMM).
 *
 * f16, bf16: per 32 inputs the weights are decoded to fp32 (the values wf_unpack_row gives) and multiplied
 * with x into that (row, output)'s own fp32 accumulator, summed at the end.
 * w8, w4: each row is quantized per 32 inputs to int8 with an fp32 scale (wformat_act.h); each 32-input
 * block's product is an exact int32 sum of weight codes times activation codes, scaled by the weight
 * scale times the activation scale and added into the (row, output)'s fp32 accumulator (W8A8 / W4A8, the
 * arithmetic of GGML's Q8_0 / Q4_0 dot products).
 * Either way a row's result does not depend on the rows or outputs that share the call (bit for bit). */
#ifndef WFORMAT_KERNELS_H
#define WFORMAT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "wformat.h"

#define WF_LEVEL_PORTABLE 0u    /* plain C */
#define WF_LEVEL_AVX2 1u        /* AVX2 + FMA + F16C */
#define WF_LEVEL_AVX512 2u      /* AVX-512 F/BW/DQ/VL: f16/bf16 kernels; w8/w4 run the AVX2 build */
#define WF_LEVEL_AVX512_VNNI 3u /* and AVX512-VNNI: w8/w4's vpdpbusd build */

/* y[r * ldy + j] += sum_i x[r * k + i] * W(i, j), r < rows, n0 <= j < n1; packed: the whole matrix.
 * level: at most what the CPU runs. w8/w4 need k <= WF_MAX_K (wformat_act.h). */
void wf_matmul(wf_spec s, uint32_t level, uint32_t k, const uint8_t *packed, const float *x, uint32_t rows, uint32_t n0,
               uint32_t n1, float *y, size_t ldy);

/* 1 when the CPU has AVX512-VNNI (x86-64 only). */
int wf_cpu_has_vnni(void);

#endif
