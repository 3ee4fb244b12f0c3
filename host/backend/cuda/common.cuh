/* common.cuh — CUDA error checking for the CUDA backend: every runtime / cuBLAS call is wrapped so a
 * failure returns -1 with the failing statement, file and line in a kvh_err (never exit()).
 * Owns: KVH_CUDA_CHECK, KVH_CUBLAS_CHECK, cublas_status_name. Does not own any state. */
#ifndef KVH_CUDA_COMMON_CUH
#define KVH_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

extern "C" {
#include "util/util.h"
}

static inline const char *cublas_status_name(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_(unknown)";
    }
}

/* `return`s -1 from the enclosing function with "cuda backend: <call> failed at file:line: <reason>". The
 * runtime's last error is cleared (a sticky error stays), so that a caller who goes on after a handled
 * failure (an allocation too large) does not see it again under the name of the next kernel launched. */
#define KVH_CUDA_CHECK(err, call)                                                                          \
    do {                                                                                                   \
        cudaError_t kvh_cuda_rc_ = (call);                                                                 \
        if (kvh_cuda_rc_ != cudaSuccess) {                                                                 \
            (void)cudaGetLastError();                                                                      \
            return kvh_fail((err), "cuda backend: %s failed at %s:%d: %s (%s)", #call, __FILE__, __LINE__, \
                            cudaGetErrorString(kvh_cuda_rc_), cudaGetErrorName(kvh_cuda_rc_));             \
        }                                                                                                  \
    } while (0)

#define KVH_CUBLAS_CHECK(err, call)                                                                        \
    do {                                                                                                   \
        cublasStatus_t kvh_cublas_rc_ = (call);                                                            \
        if (kvh_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                                       \
            return kvh_fail((err), "cuda backend: %s failed at %s:%d: %s", #call, __FILE__, __LINE__,      \
                            cublas_status_name(kvh_cublas_rc_));                                           \
    } while (0)

/* After a kernel launch: reports a bad launch at once, naming the kernel (execution errors surface at the
 * next synchronizing call, which is checked too). */
#define KVH_CUDA_LAUNCHED(err, kernel_name)                                                                \
    do {                                                                                                   \
        cudaError_t kvh_cuda_rc_ = cudaGetLastError();                                                     \
        if (kvh_cuda_rc_ != cudaSuccess)                                                                   \
            return kvh_fail((err), "cuda backend: launch of %s failed at %s:%d: %s", kernel_name, __FILE__, \
                            __LINE__, cudaGetErrorString(kvh_cuda_rc_));                                   \
    } while (0)

#endif
