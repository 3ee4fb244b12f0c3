/* test_input_files.c — Criterion suite for how every file input is opened (issue 14, defects 5 and 11).
 * Class 1, non-regular files: each structured input (config.json, model.safetensors, vocab.json,
 * merges.txt, an INI run file, plan's config.json) given a FIFO with no writer, a directory, /dev/zero or
 * a socket is refused at once naming the path and the kind of file, never blocking (each test has a
 * timeout, which a hang would hit) and never reading forever.
 * Class 2, streams: text inputs (--prompt-file, --text-file) given a pipe, a FIFO with a writer or
 * /dev/stdin are read to EOF within the cap; an endless stream is refused at the cap. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/config.h"
#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "plan/plan.h"
#include "model/safetensors.h"
#include "model/tokenizer.h"
#include "util/util.h"

int kvh_cmd_plan(int argc, char **argv);

/* A special file of each kind at dir/name; returns its path (static buffer per kind). */
typedef enum { SP_FIFO, SP_DIR, SP_SOCKET, SP_DEVZERO, SP_N } special;
static const char *const SP_NAME[SP_N] = {"FIFO", "directory", "socket", "/dev/zero"};
static const char *const SP_KIND[SP_N] = {"FIFO", "directory", "socket", "character device"};

static int g_sock_fd = -1;

static void make_special(const char *path, special k) {
    unlink(path);
    rmdir(path);
    switch (k) {
    case SP_FIFO: cr_assert_eq(mkfifo(path, 0644), 0, "mkfifo %s", path); break;
    case SP_DIR: cr_assert_eq(mkdir(path, 0755), 0, "mkdir %s", path); break;
    case SP_SOCKET: {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        cr_assert_lt(strlen(path), sizeof a.sun_path, "socket path too long");
        strcpy(a.sun_path, path);
        g_sock_fd = socket(AF_UNIX, SOCK_STREAM, 0);
        cr_assert_geq(g_sock_fd, 0);
        cr_assert_eq(bind(g_sock_fd, (struct sockaddr *)&a, sizeof a), 0, "bind %s", path);
        break;
    }
    case SP_DEVZERO: cr_assert_eq(symlink("/dev/zero", path), 0, "symlink %s", path); break;
    default: break;
    }
}

static void expect_refused(int rc, const kvh_err *err, const char *path, special k, const char *what) {
    cr_assert_eq(rc, -1, "%s: a %s was accepted", what, SP_NAME[k]);
    cr_assert(strstr(err->msg, path), "%s (%s): message does not name %s: %s", what, SP_NAME[k], path, err->msg);
    cr_assert(strstr(err->msg, "not a regular file"), "%s (%s): message: %s", what, SP_NAME[k], err->msg);
    cr_assert(strstr(err->msg, SP_KIND[k]), "%s: message does not say it is a %s: %s", what, SP_KIND[k], err->msg);
}

/* A model directory whose `victim` file (config.json, model.safetensors, vocab.json or merges.txt) is
 * replaced by a special file of kind k. */
static const char *model_dir_with(const char *victim, special k) {
    static char dir[512];
    snprintf(dir, sizeof dir, "%s/m_%s_%d", kvh_test_tmpdir(), victim, (int)k);
    kvh_fx_shape s = {.V = 257, .P = 16, .C = 8, .NH = 2, .L = 1};
    kvh_fx_write_model(dir, s, "F32", NULL, NULL, NULL);
    kvh_fx_write_byte_tokenizer(dir);
    char path[600];
    snprintf(path, sizeof path, "%s/%s", dir, victim);
    make_special(path, k);
    return dir;
}

Test(input_files, read_file_refuses_special_files, .timeout = 30) {
    for (int k = 0; k < SP_N; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/special_%d", kvh_test_tmpdir(), k);
        make_special(path, (special)k);
        kvh_err err = {{0}};
        char *buf = NULL;
        size_t len = 0;
        expect_refused(kvh_read_file(path, 1 << 20, &buf, &len, &err), &err, path, (special)k, "kvh_read_file");
        cr_assert_null(buf);
    }
}

Test(input_files, model_dir_with_special_files, .timeout = 60) {
    const char *victims[] = {"config.json", "model.safetensors"};
    for (size_t v = 0; v < 2; v++) {
        for (int k = 0; k < SP_N; k++) {
            const char *dir = model_dir_with(victims[v], (special)k);
            char path[600];
            snprintf(path, sizeof path, "%s/%s", dir, victims[v]);
            kvh_model m;
            kvh_err err = {{0}};
            expect_refused(kvh_model_load(&m, dir, &err), &err, path, (special)k, victims[v]);
            kvh_safetensors st;
            if (v == 1) expect_refused(kvh_st_open(&st, path, &err), &err, path, (special)k, "kvh_st_open");
        }
    }
}

Test(input_files, tokenizer_files_special, .timeout = 60) {
    const char *victims[] = {"vocab.json", "merges.txt"};
    for (size_t v = 0; v < 2; v++) {
        for (int k = 0; k < SP_N; k++) {
            const char *dir = model_dir_with(victims[v], (special)k);
            char vocab[600], merges[600];
            snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
            snprintf(merges, sizeof merges, "%s/merges.txt", dir);
            kvh_tokenizer *tok = NULL;
            kvh_err err = {{0}};
            expect_refused(kvh_tokenizer_load(&tok, vocab, merges, &err), &err, v ? merges : vocab, (special)k,
                           victims[v]);
            cr_assert_null(tok);
        }
    }
}

Test(input_files, run_file_special, .timeout = 30) {
    for (int k = 0; k < SP_N; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/run_%d.ini", kvh_test_tmpdir(), k);
        make_special(path, (special)k);
        kvh_run_config cfg;
        kvh_config_defaults(&cfg);
        kvh_err err = {{0}};
        expect_refused(kvh_config_load_ini(&cfg, path, &err), &err, path, (special)k, "run file");
        kvh_config_free(&cfg);
    }
}

Test(input_files, plan_model_special, .timeout = 30) {
    /* plan reads config.json itself; a FIFO as the file or inside a directory must not block it */
    for (int k = 0; k < SP_N; k++) {
        if (k == SP_DIR) continue; /* a directory is plan's way to name dir/config.json */
        char path[512];
        snprintf(path, sizeof path, "%s/plan_%d.json", kvh_test_tmpdir(), k);
        make_special(path, (special)k);
        char *argv[] = {"plan", "--model", path, NULL};
        cr_assert_eq(kvh_cmd_plan(3, argv), 1, "plan --model %s (%s)", path, SP_NAME[k]);
        const char *dir = model_dir_with("config.json", (special)k);
        char *argv2[] = {"plan", "--model", (char *)dir, NULL};
        cr_assert_eq(kvh_cmd_plan(3, argv2), 1, "plan --model DIR with a %s config.json", SP_NAME[k]);
    }
}

/* ---- streams ----------------------------------------------------------------------------------- */

/* Forks a writer that writes `n` bytes of `fill` to fd_or_path, then returns its pid. */
static pid_t writer(int fd, const char *fifo, size_t n, char fill) {
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        /* keep only the write end: an inherited read end would keep the pipe open after the reader
         * gives up, and the writer would block forever instead of getting EPIPE */
        for (int other = 3; other < 256; other++)
            if (other != fd) close(other);
        if (fifo) fd = open(fifo, O_WRONLY);
        if (fd < 0) _exit(2);
        char buf[4096];
        memset(buf, fill, sizeof buf);
        while (n > 0) {
            size_t k = n < sizeof buf ? n : sizeof buf;
            ssize_t w = write(fd, buf, k);
            if (w <= 0) _exit(3);
            n -= (size_t)w;
        }
        _exit(0);
    }
    return pid;
}

static void reap(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
}

Test(input_files, text_from_pipe_reads_to_eof, .timeout = 30) {
    /* a pipe's st_size is 0: the reader must not take that as the length */
    size_t sizes[] = {0, 1, 4095, 4096, 70000, 300000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int p[2];
        cr_assert_eq(pipe(p), 0);
        pid_t pid = writer(p[1], NULL, sizes[i], 'a');
        close(p[1]);
        char path[64];
        snprintf(path, sizeof path, "/dev/fd/%d", p[0]);
        char *text = NULL;
        size_t len = 99;
        kvh_err err = {{0}};
        cr_assert_eq(kvh_read_text(path, 1 << 20, &text, &len, &err), 0, "%s", err.msg);
        cr_assert_eq(len, sizes[i], "pipe of %zu bytes read as %zu", sizes[i], len);
        for (size_t k = 0; k < len; k++) cr_assert_eq(text[k], 'a');
        cr_assert_eq(text[len], '\0');
        free(text);
        close(p[0]);
        reap(pid);
    }
}

Test(input_files, text_from_fifo_and_stdin, .timeout = 30) {
    char fifo[512];
    snprintf(fifo, sizeof fifo, "%s/prompt.fifo", kvh_test_tmpdir());
    unlink(fifo);
    cr_assert_eq(mkfifo(fifo, 0644), 0);
    pid_t pid = writer(-1, fifo, 12345, 'b');
    char *text = NULL;
    size_t len = 0;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_read_text(fifo, 1 << 20, &text, &len, &err), 0, "%s", err.msg);
    cr_assert_eq(len, 12345);
    free(text);
    reap(pid);

    /* /dev/stdin on a pipe, as `echo hi | kvhost generate --prompt-file /dev/stdin` */
    int p[2];
    cr_assert_eq(pipe(p), 0);
    pid = writer(p[1], NULL, 777, 'c');
    close(p[1]);
    int saved = dup(0);
    dup2(p[0], 0);
    close(p[0]);
    cr_assert_eq(kvh_read_text("/dev/stdin", 1 << 20, &text, &len, &err), 0, "%s", err.msg);
    dup2(saved, 0);
    close(saved);
    cr_assert_eq(len, 777);
    free(text);
    reap(pid);
}

Test(input_files, endless_stream_refused_at_cap, .timeout = 30) {
    char *text = NULL;
    size_t len = 0;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_read_text("/dev/zero", 100000, &text, &len, &err), -1);
    cr_assert_null(text);
    cr_assert(strstr(err.msg, "/dev/zero") && strstr(err.msg, "100000"), "%s", err.msg);
    /* a pipe with more than the cap: refused, and the reader stops at the cap (the writer gets SIGPIPE) */
    int p[2];
    cr_assert_eq(pipe(p), 0);
    signal(SIGPIPE, SIG_IGN);
    pid_t pid = writer(p[1], NULL, 1 << 20, 'd');
    close(p[1]);
    char path[64];
    snprintf(path, sizeof path, "/dev/fd/%d", p[0]);
    cr_assert_eq(kvh_read_text(path, 65536, &text, &len, &err), -1);
    cr_assert(strstr(err.msg, "limit of 65536"), "%s", err.msg);
    close(p[0]);
    reap(pid);
    /* exactly the cap is fine */
    cr_assert_eq(pipe(p), 0);
    pid = writer(p[1], NULL, 65536, 'e');
    close(p[1]);
    snprintf(path, sizeof path, "/dev/fd/%d", p[0]);
    cr_assert_eq(kvh_read_text(path, 65536, &text, &len, &err), 0, "%s", err.msg);
    cr_assert_eq(len, 65536);
    free(text);
    close(p[0]);
    reap(pid);
}

Test(input_files, text_regular_and_refused_kinds, .timeout = 30) {
    const char *p = kvh_test_write_file("prompt.txt", "hello world", 11);
    char path[512];
    snprintf(path, sizeof path, "%s", p);
    char *text = NULL;
    size_t len = 0;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_read_text(path, 100, &text, &len, &err), 0, "%s", err.msg);
    cr_assert_eq(len, 11);
    cr_assert_str_eq(text, "hello world");
    free(text);
    cr_assert_eq(kvh_read_text(path, 10, &text, &len, &err), -1, "an 11-byte file passed a 10-byte cap");
    cr_assert(strstr(err.msg, "more than the limit of 10 bytes"), "%s", err.msg);
    cr_assert_eq(kvh_read_text(kvh_test_tmpdir(), 100, &text, &len, &err), -1);
    cr_assert(strstr(err.msg, "directory"), "%s", err.msg);
}
