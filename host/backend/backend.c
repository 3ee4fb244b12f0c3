/* backend.c — choosing a backend by name. Owns only the name → constructor mapping and the message
 * for a backend that is not available in this build or on this machine. */
#include <string.h>

#include "backend/backend.h"

#ifdef KVH_HAVE_CUDA
int kvh_backend_cuda_create(kvh_backend **out, const kvh_model *model, int threads, kvh_err *err);
int kvh_backend_cuda_available(char *why, size_t cap);
#endif

int kvh_backend_create(kvh_backend **out, const char *name, const kvh_model *model, int threads, kvh_err *err) {
    *out = NULL;
    if (!name || strcmp(name, "cpu") == 0) return kvh_backend_cpu_create(out, model, threads, err);
    if (strcmp(name, "cuda") == 0 || strcmp(name, "auto") == 0) {
#ifdef KVH_HAVE_CUDA
        char why[256] = "";
        if (kvh_backend_cuda_available(why, sizeof why)) return kvh_backend_cuda_create(out, model, threads, err);
        if (strcmp(name, "auto") == 0) return kvh_backend_cpu_create(out, model, threads, err);
        return kvh_fail(err, "backend 'cuda': no usable CUDA device (%s). HINT: use --backend cpu", why);
#else
        if (strcmp(name, "auto") == 0) return kvh_backend_cpu_create(out, model, threads, err);
        return kvh_fail(err,
                        "backend 'cuda': this kvhost was built without CUDA. HINT: rebuild with nvcc on PATH "
                        "(cmake -DKVH_CUDA=ON) or use --backend cpu");
#endif
    }
    return kvh_fail(err, "unknown backend '%s' (known: cpu, cuda, auto)", name);
}

void kvh_backend_destroy(kvh_backend *be) {
    if (be) be->ops->destroy(be);
}
