/* report.h — what the CUDA backend's score-report path (ABI 1.3, KVP_CAP_SCORE_REPORT) moved, readable
 * from C (tests/test_cuda.c). Plain C: included from .c and .cu files.
 * Owns: kvh_cuda_report_stats and its getter. Does not own the report itself (attention.cuh writes it on
 * the device, backend_cuda.cu copies it into the cache's report buffers: kvcache.h kvh_report_col / _row). */
#ifndef KVH_CUDA_REPORT_H
#define KVH_CUDA_REPORT_H

#include <stdint.h>

struct kvh_backend; /* backend/backend.h (not included here: this header is also read outside extern "C") */

/* Counters since the backend was created. A layer whose policy did not ask adds nothing to any of them. */
typedef struct kvh_cuda_report_stats {
    uint64_t layer_steps; /* (forward, layer) pairs whose reports were computed on the device and delivered */
    uint64_t copies;      /* device-to-host transfers of report data (one per forward that has any) */
    uint64_t bytes;       /* bytes those transfers moved */
} kvh_cuda_report_stats;

#ifdef __cplusplus
extern "C" {
#endif

/* Fills *out for a backend made by kvh_backend_cuda_create; -1 (out zeroed) for any other backend. */
int kvh_cuda_report_stats_get(const struct kvh_backend *be, kvh_cuda_report_stats *out);

#ifdef __cplusplus
}
#endif

#endif
