/* membw.c — measures this machine's sustainable memory read bandwidth (the roofline for batch-1
 * decode, which streams every weight once per token). Reads a 1 GiB array with all threads,
 * repeats, reports the best GB/s (1e9 bytes). Build: gcc -O3 -march=native -fopenmp membw.c */
#include <omp.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t n = (size_t)1 << 28; /* 2^28 x 4 bytes = 1 GiB */
    int reps = argc > 1 ? atoi(argv[1]) : 8;
    /* Unsigned integers, not floats: an integer sum may be reordered, so the compiler vectorises it with
     * as many accumulators as it likes and the loop is bound by memory, not by an add's latency (a
     * float sum with four ordered accumulators measured 9-18 GB/s here while the decoder itself read
     * weights at 26 GB/s). */
    uint32_t *a = malloc(n * sizeof(uint32_t));
    if (!a) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = (uint32_t)(i & 1023);
    double best = 0;
    uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        uint32_t s = 0;
#pragma omp parallel for reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double dt = now() - t0;
        sink += s;
        double gbs = (double)n * sizeof(uint32_t) / dt / 1e9;
        if (gbs > best) best = gbs;
    }
    printf("{\"record\":\"membw\",\"threads\":%d,\"read_gb_per_s\":%.2f,\"checksum\":%.0f}\n", omp_get_max_threads(), best,
           sink > 0 ? 1.0 : 0.0);
    free(a);
    return 0;
}
