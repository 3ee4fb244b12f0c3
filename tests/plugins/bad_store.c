/* bad_store.c — test stores, one per KIND_* define (tests/plugins/CMakeLists.txt): a plain fp32 store
 * (tp_store, valid) and stores whose per-token hooks crash or end the process, for the crash messages
 * of tests/plugin_crash.sh: encode or attend faulting, attend overflowing its stack on an OpenMP worker
 * thread (not the process's main thread), attend calling exit(). And quiet bugs `kvhost plugins check`
 * must catch (tests/test_plugin_check.c): encode writing one float past its slot (overrun), encode
 * keeping half of every value (lossy), attend not masking later positions (nomask). */
#define _GNU_SOURCE /* syscall, SYS_gettid */
#include <kvp/kvp.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "tp_store"
#endif

typedef struct sstate {
    uint32_t head_dim;
} sstate;

static int s_create(const kvp_host *host, const kvp_layer_info *layer, kvp_instance *out) {
    sstate *s = host->alloc(host->ctx, sizeof *s);
    if (!s) return KVP_ERROR;
    s->head_dim = layer->head_dim;
    out->state = s;
    out->budget = 1;
    out->k_slot_bytes = out->v_slot_bytes = layer->head_dim * (uint32_t)sizeof(float);
    return KVP_OK;
}

static void s_destroy(void *state) { (void)state; }

static void s_encode(void *state, uint32_t which, const float *row, void *slot) {
    sstate *s = state;
    (void)which;
#ifdef KIND_ENCODESEGV
    {
        volatile float *volatile nowhere = NULL;
        *nowhere = row[0];
    }
#endif
    memcpy(slot, row, s->head_dim * sizeof(float));
#if defined(KIND_OVERRUN)
    memcpy((char *)slot + s->head_dim * sizeof(float), row, sizeof(float)); /* one float too many */
#elif defined(KIND_LOSSY)
    for (uint32_t i = 0; i < s->head_dim; i++) ((float *)slot)[i] = row[i] * 0.5f;
#endif
}

static void s_decode(void *state, uint32_t which, const void *slot, float *row) {
    sstate *s = state;
    (void)which;
    memcpy(row, slot, s->head_dim * sizeof(float));
}

#ifdef KIND_ATTENDSTACK
/* Recursion that overflows any thread stack (the bound is never reached) and is not a tail call (the
 * result is used after the call). */
__attribute__((noinline)) static int deep(volatile char *prev, int depth) {
    volatile char buf[4096];
    if (depth > (1 << 30)) return 0;
    buf[0] = (char)depth;
    buf[1] = prev ? prev[0] : 0;
    return deep(buf, depth + 1) + buf[1];
}
#endif

static void s_attend(void *state, const kvp_attend_args *a) {
    sstate *s = state;
#if defined(KIND_ATTENDSEGV)
    {
        volatile float *volatile nowhere = NULL;
        *nowhere = a->q[0];
    }
#elif defined(KIND_ATTENDEXIT)
    exit(0);
#elif defined(KIND_ATTENDSTACK)
    if (syscall(SYS_gettid) != getpid()) {
        (void)deep(NULL, 0);
    } else {
        /* The main thread waits a little on each call, so a worker thread takes attention work items
         * and overflows there (kvhost runs this with --threads 2). */
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
#endif
    const float *K = a->k_slots, *V = a->v_slots;
    const uint32_t D = s->head_dim;
    float mx = -INFINITY;
    for (uint32_t j = 0; j < a->n; j++) {
        float d = 0.0f;
        for (uint32_t i = 0; i < D; i++) d += a->q[i] * K[(size_t)j * D + i];
#ifdef KIND_NOMASK
        a->probs[j] = d * a->scale; /* forgets that later positions are masked */
#else
        a->probs[j] = a->pos[j] > a->q_pos ? -INFINITY : d * a->scale;
#endif
        if (a->probs[j] > mx) mx = a->probs[j];
    }
    float sum = 0.0f;
    for (uint32_t j = 0; j < a->n; j++) {
        a->probs[j] = a->probs[j] == -INFINITY ? 0.0f : expf(a->probs[j] - mx);
        sum += a->probs[j];
    }
    for (uint32_t i = 0; i < D; i++) a->out[i] = 0.0f;
    for (uint32_t j = 0; j < a->n; j++) {
        a->probs[j] /= sum;
        for (uint32_t i = 0; i < D; i++) a->out[i] += a->probs[j] * V[(size_t)j * D + i];
    }
}

static const kvp_descriptor descriptor = {
    KVP_DESCRIPTOR_HEADER,
    .role = KVP_ROLE_STORE,
    .name = PLUGIN_NAME,
    .version = "0.0.1",
    .summary = "test store " PLUGIN_NAME ": fp32 slots",
    .create = s_create,
    .destroy = s_destroy,
    .encode = s_encode,
    .decode = s_decode,
    .attend = s_attend,
};

KVP_PLUGIN(descriptor)
