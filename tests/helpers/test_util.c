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

#include <cjson/cJSON.h>

#include "cli/commands.h"
#include "runtime/config.h"
#include "util/util.h"

cJSON *kvh_test_generate_record(const char *const *argv, const char *json_path) {
    int argc = 0;
    while (argv[argc]) argc++;
    unlink(json_path);
    FILE *saved = stdout;
    stdout = fopen("/dev/null", "w");
    int rc = kvh_cmd_generate(argc, (char **)argv);
    fclose(stdout);
    stdout = saved;
    cr_assert_eq(rc, 0, "kvhost generate exited %d", rc);
    cJSON *rec;
    kvh_test_read_json(json_path, &rec, 1);
    return rec;
}

void kvh_test_read_json(const char *path, cJSON **recs, int n) {
    char *text = NULL;
    size_t len = 0;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_read_file(path, (size_t)64 << 20, &text, &len, &err), 0, "%s", err.msg);
    const char *at = text;
    for (int i = 0; i < n; i++) {
        const char *end = NULL;
        recs[i] = cJSON_ParseWithOpts(at, &end, 0);
        cr_assert(recs[i], "%s: value %d of %d is missing or not JSON", path, i + 1, n);
        at = end;
    }
    free(text);
}

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

/* One step's logits of both sessions: within tol, and the same bits when tol is 0. */
static double check_step(const char *label, const float *la, const float *lb, size_t n, double tol) {
    const double d = kvh_test_compare(label, la, lb, n, tol);
    cr_assert_leq(d, tol, "%s", label);
    if (tol == 0) cr_assert(memcmp(la, lb, n * sizeof(float)) == 0, "%s: not bit for bit", label);
    return d;
}

double kvh_test_compare_sessions(kvh_session *a, kvh_session *b, int V, double tol_prefill, double tol_decode, int steps,
                                 const char *what) {
    const int32_t p0[] = {1, 5, 9, 33, 2, 96, 40, 11, 12, 13, 70, 3, 44}, p1[] = {8, 6, 7, 5, 3, 0, 9, 90, 91, 92};
    const int32_t *toks[2] = {p0, p1};
    int seqs[2] = {0, 1}, ns[2] = {13, 10};
    float *la = malloc((size_t)2 * V * sizeof(float)), *lb = malloc((size_t)2 * V * sizeof(float));
    cr_assert(la && lb, "out of memory");
    kvh_err err = {{0}};
    kvh_batch batch = {.n = 2, .seq = seqs, .tokens = toks, .n_tokens = ns, .all_logits = false};
    cr_assert_eq(kvh_session_forward(a, &batch, la, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_session_forward(b, &batch, lb, &err), 0, "%s", err.msg);
    char label[160];
    snprintf(label, sizeof label, "%s prefill", what);
    double worst = check_step(label, la, lb, (size_t)2 * V, tol_prefill);
    for (int step = 0; step < steps; step++) {
        int32_t next[2] = {(int32_t)((step * 31 + 7) % V), (int32_t)((step * 17 + 3) % V)};
        const int32_t *nt[2] = {&next[0], &next[1]};
        int one[2] = {1, 1};
        kvh_batch dec = {.n = step < 3 ? 2 : 1, .seq = seqs, .tokens = nt, .n_tokens = one, .all_logits = false};
        cr_assert_eq(kvh_session_forward(a, &dec, la, &err), 0, "%s", err.msg);
        cr_assert_eq(kvh_session_forward(b, &dec, lb, &err), 0, "%s", err.msg);
        snprintf(label, sizeof label, "%s decode step %d (batch %d)", what, step, dec.n);
        const double d = check_step(label, la, lb, (size_t)dec.n * V, tol_decode);
        if (d > worst) worst = d;
    }
    free(la);
    free(lb);
    return worst;
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

int kvh_test_session_ini(kvh_session **out, const kvh_model *m, const char *ini, const kvh_session_options *o,
                         kvh_err *err) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    cr_assert_eq(kvh_config_load_string(&cfg, ini, "test.ini", err), 0, "%s", err->msg);
    *out = NULL;
    int rc = kvh_session_create(out, m, &cfg, o, err);
    kvh_config_free(&cfg);
    return rc;
}

kvh_session *kvh_test_open_session(const kvh_model *m, const char *plugins, const char *ini, int n_seq, int threads) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = n_seq;
    o.threads = threads;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    const int rc = ini ? kvh_test_session_ini(&s, m, ini, &o, &err) : kvh_test_session(&s, m, plugins, NULL, 0, &o, &err);
    cr_assert_eq(rc, 0, "session: %s", err.msg);
    return s;
}
