/* test_mmap_guard.c — Criterion suite: a memory-mapped checkpoint that changes under a run is reported by
 * name (issue 14, defect 12). A child loads a model (F32 weights used in place from the mapping),
 * truncates model.safetensors, and runs a forward pass: reading the vanished pages raises SIGBUS, and
 * the process must end with status 1 and a message naming the file — on the main thread or an OpenMP
 * worker. A SIGBUS at an address outside every mapping still reaches the handler installed before
 * (here plugin_guard.c's, which then dies of the signal), so the two guards cooperate. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "runtime/plugin_guard.h"
#include "runtime/session.h"

/* Runs body() in a child with stderr captured; returns the wait status, stderr text in buf. */
static int in_child(void (*body)(const char *dir), const char *dir, char *buf, size_t cap) {
    char errpath[600];
    snprintf(errpath, sizeof errpath, "%s/child_stderr.txt", kvh_test_tmpdir());
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        if (!freopen(errpath, "w", stderr)) _exit(97);
        body(dir);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    FILE *f = fopen(errpath, "r");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = '\0';
    if (f) fclose(f);
    return status;
}

static void load_truncate_forward(const char *dir, int threads) {
    kvh_plugin_guard_install(); /* as kvhost's main does: the mapping guard must chain with it */
    kvh_model m;
    kvh_err err = {{0}};
    if (kvh_model_load(&m, dir, &err) != 0) {
        fprintf(stderr, "load failed: %s\n", err.msg);
        _exit(90);
    }
    if (!m.map_base) _exit(91); /* the fixture must exercise the zero-copy path */
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (truncate(path, 4096) != 0) _exit(92); /* keep the header page, drop the weights */
    kvh_session_options o = kvh_session_default_options();
    o.threads = threads;
    kvh_session *s = NULL;
    if (kvh_test_session(&s, &m, NULL, NULL, 0, &o, &err) != 0) _exit(93);
    int32_t toks[] = {1, 2, 3, 4};
    const int32_t *tp = toks;
    int seq = 0, n = 4;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = false};
    float *logits = malloc((size_t)m.cfg.n_vocab * sizeof *logits);
    kvh_session_forward(s, &b, logits, &err);
    _exit(94); /* reached only if the weights were still readable */
}

static void body_one_thread(const char *dir) { load_truncate_forward(dir, 1); }
static void body_two_threads(const char *dir) { load_truncate_forward(dir, 2); }

static const char *fresh_model(const char *name) {
    static char dir[600];
    snprintf(dir, sizeof dir, "%s/%s", kvh_test_tmpdir(), name);
    /* wide enough that the weights span many pages past the first 4 KiB */
    kvh_fx_shape s = {.V = 2048, .P = 64, .C = 64, .NH = 4, .L = 2};
    kvh_fx_write_model(dir, s, "F32", NULL, NULL, NULL);
    return dir;
}

Test(mmap_guard, truncated_checkpoint_named) {
    void (*bodies[])(const char *) = {body_one_thread, body_two_threads};
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "trunc_%d", i);
        const char *dir = fresh_model(name);
        char err[4096];
        int status = in_child(bodies[i], dir, err, sizeof err);
        cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1, "threads %d: status 0x%x (exit %d, signal %d), "
                  "stderr: %s", i + 1, status, WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                  WIFSIGNALED(status) ? WTERMSIG(status) : 0, err);
        char want[700];
        snprintf(want, sizeof want, "%s/model.safetensors changed while this run had it mapped", dir);
        cr_assert(strstr(err, want), "stderr lacks \"%s\": %s", want, err);
    }
}

static void body_foreign_sigbus(const char *dir) {
    kvh_plugin_guard_install();
    kvh_model m;
    kvh_err err = {{0}};
    if (kvh_model_load(&m, dir, &err) != 0) _exit(90);
    raise(SIGBUS); /* not a fault inside the mapping: the previous handler's business */
    _exit(95);
}

Test(mmap_guard, other_sigbus_chains_to_previous_handler) {
    const char *dir = fresh_model("foreign");
    char err[4096];
    int status = in_child(body_foreign_sigbus, dir, err, sizeof err);
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGBUS, "status 0x%x, stderr: %s", status, err);
    cr_assert_null(strstr(err, "changed while this run had it mapped"), "blamed the checkpoint: %s", err);
}
