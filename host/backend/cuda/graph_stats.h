/* graph_stats.h — how the CUDA backend's decode steps ran: captured into a CUDA graph and replayed, or
 * launched kernel by kernel after a capture failed (graphs then stay off for that backend), readable from
 * C (tests/test_cuda.c). Plain C: included from .c and .cu files. Owns: kvh_cuda_graph_stats and its
 * getter; the graphs themselves are backend_cuda.cu's. A fallback is also printed to stderr once, so a
 * run that silently lost its graphs cannot pass for one that used them. */
#ifndef KVH_CUDA_GRAPH_STATS_H
#define KVH_CUDA_GRAPH_STATS_H

#include <stdint.h>

struct kvh_backend; /* backend/backend.h */

typedef struct kvh_cuda_graph_stats {
    uint64_t captures;    /* decode-step graphs captured and instantiated */
    uint64_t replays;     /* decode steps run by replaying one */
    uint64_t fallbacks;   /* captures that failed (graphs switched off afterwards) */
    char fallback_reason[160]; /* why the first one failed; "" if none did */
} kvh_cuda_graph_stats;

#ifdef __cplusplus
extern "C" {
#endif

/* Fills *out for a backend made by kvh_backend_cuda_create; -1 (out zeroed) for any other backend. */
int kvh_cuda_graph_stats_get(const struct kvh_backend *be, kvh_cuda_graph_stats *out);

#ifdef __cplusplus
}
#endif

#endif
