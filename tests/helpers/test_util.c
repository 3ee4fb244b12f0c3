/* test_util.c — implementation of test_util.h. */
#define _GNU_SOURCE
#include "test_util.h"

#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "runtime/config.h"

double kvh_test_compare(const char *what, const float *a, const float *b, size_t n, double tol) {
    double max_diff = 0.0;
    size_t worst = 0;
    int printed = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (isnan(a[i]) != isnan(b[i])) d = INFINITY;
        if (d > max_diff) {
            max_diff = d;
            worst = i;
        }
        if (d > tol && printed < 5) {
            fprintf(stderr, "%s: mismatch at %zu: %.8g vs %.8g (diff %.3g)\n", what, i, (double)a[i], (double)b[i], d);
            printed++;
        }
    }
    if (max_diff > tol)
        fprintf(stderr, "%s: max |diff| %.3g at %zu exceeds tolerance %.3g\n", what, max_diff, worst, tol);
    return max_diff;
}

const char *kvh_test_shared_path(const char *rel) {
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", KVH_SHARED_DIR, rel);
    struct stat st;
    if (stat(buf, &st) != 0) return NULL;
    return buf;
}

const char *kvh_test_tiny_model_dir(void) {
    static char buf[4096];
    const char *p = kvh_test_shared_path("models/gpt2-tiny-wt/model.safetensors");
    if (!p) {
        fprintf(stderr, "skipping: %s/models/gpt2-tiny-wt is absent (../shared not checked out beside the repo)\n",
                KVH_SHARED_DIR);
        return NULL;
    }
    snprintf(buf, sizeof buf, "%s/models/gpt2-tiny-wt", KVH_SHARED_DIR);
    return buf;
}

const char *kvh_test_tmpdir(void) {
    static char dir[256];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/kvh-test-XXXXXX");
        if (!mkdtemp(dir)) {
            perror("mkdtemp");
            dir[0] = '\0';
            return "/tmp";
        }
    }
    return dir;
}

const char *kvh_test_write_file(const char *name, const void *data, size_t len) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", kvh_test_tmpdir(), name);
    FILE *f = fopen(path, "wb");
    if (!f) return NULL;
    if (len && fwrite(data, 1, len, f) != len) {
        fclose(f);
        return NULL;
    }
    fclose(f);
    return path;
}

int kvh_test_session(kvh_session **out, const kvh_model *m, const char *plugins, const char *const *sets, int n_sets,
                     const kvh_session_options *o, kvh_err *err) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    if (plugins) cr_assert_eq(kvh_config_add_plugins_list(&cfg, plugins, err), 0, "--plugins %s: %s", plugins, err->msg);
    for (int i = 0; i < n_sets; i++) cr_assert_eq(kvh_config_set(&cfg, sets[i], err), 0, "%s: %s", sets[i], err->msg);
    *out = NULL;
    int rc = kvh_session_create(out, m, &cfg, o, err);
    kvh_config_free(&cfg);
    return rc;
}
