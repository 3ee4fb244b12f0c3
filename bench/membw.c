/* membw.c — measures this machine's sustainable memory read bandwidth (the roofline for batch-1
 * decode, which streams every weight once per token). Reads a 1 GiB float array with all threads,
 * repeats, reports the best GB/s (1e9 bytes). Build: gcc -O3 -march=native -fopenmp membw.c */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t n = (size_t)1 << 28; /* 2^28 floats = 1 GiB */
    int reps = argc > 1 ? atoi(argv[1]) : 8;
    float *a = malloc(n * sizeof(float));
    if (!a) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    double best = 0, sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp parallel for reduction(+ : s0, s1, s2, s3)
        for (size_t i = 0; i < n; i += 4) {
            s0 += a[i];
            s1 += a[i + 1];
            s2 += a[i + 2];
            s3 += a[i + 3];
        }
        double dt = now() - t0;
        sink += s0 + s1 + s2 + s3;
        double gbs = (double)n * sizeof(float) / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("{\"record\":\"membw\",\"threads\":%d,\"read_gb_per_s\":%.2f,\"checksum\":%.0f}\n", omp_get_max_threads(), best,
           sink > 0 ? 1.0 : 0.0);
    free(a);
    return 0;
}
