/* matmul_bench.c — times the few-row products of host/backend/matmul_small.c against OpenBLAS (sgemv for one
 * row, sgemm otherwise) at GPT-2 shapes, one thread, and prints a Markdown table: best of R runs, the
 * weight bytes streamed per second, and the largest difference between the two results.
 * It is how KVH_MATMUL_SMALL_MAX was chosen (docs/results/matmul.md).
 * usage: build/matmul_bench [REPEATS]   (built by CMake beside kvhost) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/blas.h"
#include "backend/matmul_small.h"
#include "util/util.h"

typedef struct shape {
    const char *name;
    int K, N;
    int transposed; /* 1: W is [N, K] and y = x·Wᵀ (the tied LM head) */
} shape;

static double best_ms(int reps, void (*fn)(void *), void *arg) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        uint64_t t0 = kvh_now_ns();
        fn(arg);
        double ms = (double)(kvh_now_ns() - t0) / 1e6;
        if (ms < best) best = ms;
    }
    return best;
}

typedef struct job {
    const shape *s;
    int T;
    const float *x, *W;
    float *y;
} job;

static const kvh_blas *blas;

static void run_blas(void *p) {
    job *j = p;
    const int K = j->s->K, N = j->s->N, T = j->T;
    memset(j->y, 0, (size_t)T * N * sizeof(float));
    if (!j->s->transposed) {
        if (T == 1) blas->sgemv(CblasRowMajor, CblasTrans, K, N, 1.0f, j->W, N, j->x, 1, 1.0f, j->y, 1);
        else blas->sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, N, K, 1.0f, j->x, K, j->W, N, 1.0f, j->y, N);
    } else {
        if (T == 1) blas->sgemv(CblasRowMajor, CblasNoTrans, N, K, 1.0f, j->W, K, j->x, 1, 0.0f, j->y, 1);
        else blas->sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, N, K, 1.0f, j->x, K, j->W, K, 0.0f, j->y, N);
    }
}

static void run_small(void *p) {
    job *j = p;
    const int K = j->s->K, N = j->s->N, T = j->T;
    memset(j->y, 0, (size_t)T * N * sizeof(float));
    if (!j->s->transposed) kvh_matmul_small(j->y, (size_t)N, j->x, j->W, T, K, N, 0, N);
    else kvh_matmul_small_t(j->y, (size_t)N, j->x, j->W, T, K, 0, N);
}

int main(int argc, char **argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 7;
    kvh_err err = {0};
    blas = kvh_blas_load(&err);
    if (!blas) {
        fprintf(stderr, "matmul_bench: %s\n", err.msg);
        return 1;
    }
    blas->set_num_threads(1);
    const shape shapes[] = {
        {"Medium c_fc (1024 x 4096)", 1024, 4096, 0},
        {"Medium c_proj (4096 x 1024)", 4096, 1024, 0},
        {"Medium LM head (50257 x 1024)", 1024, 50257, 1},
        {"tiny LM head (50257 x 256)", 256, 50257, 1},
    };
    const int Ts[] = {1, 2, 4, 8, 12, 16, 24, 32};
    char kernels[160];
    kvh_blas_describe(kernels, sizeof kernels);
    printf("%s, 1 thread, best of %d\n\n", kernels, reps);
    printf("| shape | T | OpenBLAS ms | GB/s | matmul_small ms | GB/s | speed-up | max abs diff |\n");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape *s = &shapes[si];
        const size_t wn = (size_t)s->K * s->N;
        float *W = malloc(wn * sizeof(float)), *x = malloc((size_t)32 * s->K * sizeof(float));
        float *ya = malloc((size_t)32 * s->N * sizeof(float)), *yb = malloc((size_t)32 * s->N * sizeof(float));
        if (!W || !x || !ya || !yb) return 1;
        uint64_t r = 88172645463325252ull;
        for (size_t i = 0; i < wn; i++) {
            r ^= r << 13, r ^= r >> 7, r ^= r << 17;
            W[i] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) * 0.1f;
        }
        for (int i = 0; i < 32 * s->K; i++) x[i] = sinf((float)i * 0.37f);
        for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
            job a = {s, Ts[ti], x, W, ya}, b = {s, Ts[ti], x, W, yb};
            double ma = best_ms(reps, run_blas, &a), mb = best_ms(reps, run_small, &b);
            double md = 0;
            for (size_t i = 0; i < (size_t)Ts[ti] * s->N; i++) md = fmax(md, fabs((double)ya[i] - yb[i]));
            double gb = (double)wn * sizeof(float) / 1e6;
            printf("| %s | %d | %.3f | %.1f | %.3f | %.1f | %.2fx | %.1e |\n", s->name, Ts[ti], ma, gb / ma, mb,
                   gb / mb, ma / mb, md);
        }
        free(W), free(x), free(ya), free(yb);
    }
    return 0;
}
