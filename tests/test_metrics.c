/* test_metrics.c — host/util/metrics.c's JSON Lines writer and the records built on it (issue 14):
 *   jsonl: concurrent appenders (separate processes) while one of them fails — every other writer's
 *          records survive whole; a failed append leaves the file exactly as it was; each failure names
 *          the file;
 *   record: whatever bytes go in (tags, names, keys), the line written is strict JSON in well-formed
 *          UTF-8 (ill-formed bytes become U+FFFD exactly as Python's decode(errors="replace") does);
 *          also through the real CLI (a --tag value, a plugin directory name); the plugin stack is
 *          complete however large (256 per-layer sections, > 64 KiB). */
#define _GNU_SOURCE /* setrlimit, fork */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli/commands.h"
#include "helpers/json_strict.h"
#include "helpers/test_util.h"
#include "util/metrics.h"
#include "runtime/router.h"

/* ---- helpers ------------------------------------------------------------------------------------ */

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, (cap *= 2) + 1);
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Every line of the file is whole: strict JSON, ends with '\n'. Calls fn on each parsed line. */
static int for_each_line(const char *text, size_t len, void (*fn)(const cJSON *, void *), void *ctx) {
    int lines = 0;
    size_t start = 0;
    while (start < len) {
        const char *nl = memchr(text + start, '\n', len - start);
        cr_assert_not_null(nl, "the file ends with a partial line at byte %zu: %.80s", start, text + start);
        size_t n = (size_t)(nl - (text + start)), bad = 0;
        cr_assert_eq(kvh_json_strict_check(text + start, n, &bad), 0, "line %d is not strict JSON (byte %zu): %.*s",
                     lines + 1, bad, (int)(n < 200 ? n : 200), text + start);
        cJSON *o = cJSON_ParseWithLength(text + start, n);
        cr_assert_not_null(o);
        if (fn) fn(o, ctx);
        cJSON_Delete(o);
        lines++;
        start += n + 1;
    }
    return lines;
}

static cJSON *small_record(const char *writer, int seq, int pad) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "writer", writer);
    cJSON_AddNumberToObject(o, "seq", seq);
    char *p = malloc((size_t)pad + 1);
    memset(p, 'x', (size_t)pad);
    p[pad] = '\0';
    cJSON_AddStringToObject(o, "pad", p);
    free(p);
    return o;
}

/* ---- jsonl: concurrent appenders with a failing one -------------------------------------------- */

#define GOOD_WRITERS 4
#define GOOD_RECORDS 400
#define FAILING_TRIES 3000
#define FAILING_LIMIT 4096 /* RLIMIT_FSIZE of the failing writer: the file passes it almost at once */

typedef struct tally {
    int seen[GOOD_WRITERS][GOOD_RECORDS];
    int failing_lines;
} tally;

static void count_line(const cJSON *o, void *ctx) {
    tally *t = ctx;
    const char *w = cJSON_GetStringValue(cJSON_GetObjectItem(o, "writer"));
    int seq = (int)cJSON_GetNumberValue(cJSON_GetObjectItem(o, "seq"));
    cr_assert_not_null(w);
    if (strcmp(w, "failing") == 0) {
        t->failing_lines++;
        return;
    }
    int wi = atoi(w + 1); /* "g0".."g3" */
    cr_assert(wi >= 0 && wi < GOOD_WRITERS && seq >= 0 && seq < GOOD_RECORDS, "unexpected record %s %d", w, seq);
    t->seen[wi][seq]++;
}

/* The failing writer: exit status = its successful appends (few), 255 when a failure's message did not
 * name the file. */
static void failing_writer(const char *path, int start_fd) {
    char go;
    if (read(start_fd, &go, 1) < 0) _exit(254);
    struct rlimit rl = {FAILING_LIMIT, FAILING_LIMIT};
    setrlimit(RLIMIT_FSIZE, &rl);
    signal(SIGXFSZ, SIG_IGN); /* a write past the limit then fails with EFBIG instead of killing */
    int ok = 0;
    for (int i = 0; i < FAILING_TRIES; i++) {
        cJSON *o = small_record("failing", i, 300);
        kvh_err err = {{0}};
        int rc = kvh_jsonl_append(path, o, &err);
        cJSON_Delete(o);
        if (rc == 0) ok++;
        else if (!strstr(err.msg, path)) _exit(255);
    }
    _exit(ok > 250 ? 250 : ok);
}

static void good_writer(const char *path, int w, int start_fd) {
    char go;
    if (read(start_fd, &go, 1) < 0) _exit(254);
    char name[8];
    snprintf(name, sizeof name, "g%d", w);
    for (int i = 0; i < GOOD_RECORDS; i++) {
        cJSON *o = small_record(name, i, 100 + (i * 37) % 400);
        kvh_err err = {{0}};
        if (kvh_jsonl_append(path, o, &err) != 0) _exit(1);
        cJSON_Delete(o);
    }
    _exit(0);
}

Test(jsonl, concurrent_appenders_survive_a_failing_one) {
    char path[512];
    snprintf(path, sizeof path, "%s/concurrent.jsonl", kvh_test_tmpdir());
    unlink(path);
    int gate[2];
    cr_assert_eq(pipe(gate), 0);
    pid_t pids[GOOD_WRITERS + 1];
    for (int w = 0; w <= GOOD_WRITERS; w++) {
        pids[w] = fork();
        cr_assert(pids[w] >= 0);
        if (pids[w] == 0) {
            close(gate[1]);
            if (w == GOOD_WRITERS) failing_writer(path, gate[0]);
            good_writer(path, w, gate[0]);
        }
    }
    close(gate[0]);
    close(gate[1]); /* every writer starts now (read() returns 0) */
    int failing_ok = -1;
    for (int w = 0; w <= GOOD_WRITERS; w++) {
        int st;
        cr_assert_eq(waitpid(pids[w], &st, 0), pids[w]);
        cr_assert(WIFEXITED(st), "writer %d died with signal %d", w, WIFSIGNALED(st) ? WTERMSIG(st) : 0);
        if (w < GOOD_WRITERS) cr_assert_eq(WEXITSTATUS(st), 0, "good writer %d failed an append", w);
        else failing_ok = WEXITSTATUS(st);
    }
    cr_assert_neq(failing_ok, 255, "a failed append's message does not name the file");
    cr_assert(failing_ok < FAILING_TRIES, "the failing writer never failed");
    size_t len;
    char *text = slurp(path, &len);
    tally *t = calloc(1, sizeof *t);
    int lines = for_each_line(text, len, count_line, t);
    for (int w = 0; w < GOOD_WRITERS; w++)
        for (int i = 0; i < GOOD_RECORDS; i++)
            cr_assert_eq(t->seen[w][i], 1, "writer g%d record %d appears %d times (lost to the failing writer?)", w, i,
                         t->seen[w][i]);
    cr_assert_eq(t->failing_lines, failing_ok, "the failing writer appended %d records but %d are in the file",
                 failing_ok, t->failing_lines);
    cr_assert_eq(lines, GOOD_WRITERS * GOOD_RECORDS + failing_ok);
    free(t);
    free(text);
}

/* A write cut short by the file-size limit (a partial line) is removed: the file is byte for byte
 * what it was, and the message names the file. */
Test(jsonl, partial_append_leaves_the_file_as_it_was) {
    char path[512];
    snprintf(path, sizeof path, "%s/partial.jsonl", kvh_test_tmpdir());
    unlink(path);
    kvh_err err = {{0}};
    for (int i = 0; i < 5; i++) {
        cJSON *o = small_record("before", i, 200);
        cr_assert_eq(kvh_jsonl_append(path, o, &err), 0, "%s", err.msg);
        cJSON_Delete(o);
    }
    size_t len0;
    char *before = slurp(path, &len0);
    int msg_pipe[2];
    cr_assert_eq(pipe(msg_pipe), 0);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        struct rlimit rl = {len0 + 100, len0 + 100}; /* room for 100 bytes of a 1 KB record */
        setrlimit(RLIMIT_FSIZE, &rl);
        signal(SIGXFSZ, SIG_IGN);
        cJSON *o = small_record("cut", 0, 1000);
        int rc = kvh_jsonl_append(path, o, &err);
        if (write(msg_pipe[1], err.msg, strlen(err.msg)) < 0) _exit(3);
        _exit(rc == 0 ? 1 : 0);
    }
    close(msg_pipe[1]);
    char msg[1024] = "";
    ssize_t got = read(msg_pipe[0], msg, sizeof msg - 1);
    msg[got > 0 ? got : 0] = '\0';
    close(msg_pipe[0]);
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the append past the limit did not fail (status %d)", st);
    cr_assert(strstr(msg, path), "the message does not name the file: %s", msg);
    cr_assert(strstr(msg, "removed"), "the message does not say the partial line was removed: %s", msg);
    size_t len1;
    char *after = slurp(path, &len1);
    cr_assert_eq(len1, len0, "the file is %zu bytes, was %zu", len1, len0);
    cr_assert_eq(memcmp(before, after, len0), 0, "the file changed");
    free(before);
    free(after);
}

Test(jsonl, unwritable_path_is_named) {
    cJSON *o = small_record("x", 0, 1);
    kvh_err err = {{0}};
    const char *path = "/nonexistent-dir-kvh/records.jsonl";
    cr_assert_eq(kvh_jsonl_append(path, o, &err), -1);
    cr_assert(strstr(err.msg, path), "%s", err.msg);
    cJSON_Delete(o);
}

/* ---- record: UTF-8 validity ------------------------------------------------------------------- */

/* Appends {"k": value} (and {key: "v"}) and returns the value / key read back from the line. */
static char *round_trip(const char *key, const char *value, int want_key) {
    char path[512];
    snprintf(path, sizeof path, "%s/utf8.jsonl", kvh_test_tmpdir());
    unlink(path);
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, key, value);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_jsonl_append(path, o, &err), 0, "%s", err.msg);
    cJSON_Delete(o);
    size_t len;
    char *text = slurp(path, &len);
    cr_assert_eq(for_each_line(text, len, NULL, NULL), 1);
    cJSON *back = cJSON_ParseWithLength(text, len);
    free(text);
    cr_assert_not_null(back);
    cJSON *item = back->child;
    cr_assert_not_null(item);
    char *out = strdup(want_key ? item->string : cJSON_GetStringValue(item));
    cJSON_Delete(back);
    return out;
}

/* Inputs and what Python's bytes.decode("utf-8", "replace") gives for them (checked with CPython). */
static const struct {
    const char *in, *want;
} utf8_cases[] = {
    {"plain", "plain"},
    {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"}, /* valid: unchanged */
    {"\xff", "\xef\xbf\xbd"},
    {"a\xc3", "a\xef\xbf\xbd"},                                         /* truncated 2-byte */
    {"\xe2\x82", "\xef\xbf\xbd"},                                       /* truncated 3-byte: one U+FFFD */
    {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},                           /* overlong: two */
    {"\xe0\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},           /* overlong 3-byte: three */
    {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},           /* surrogate: three */
    {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* > U+10FFFF */
    {"\xf0\x9f\x98", "\xef\xbf\xbd"},                                   /* truncated 4-byte: one */
    {"x\x80y\xbfz", "x\xef\xbf\xbdy\xef\xbf\xbdz"},                     /* lone continuation bytes */
    {"\xf5\xf8\xfe", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
    {"tab\there\x01\x1f", "tab\there\x01\x1f"},                         /* control characters: escaped */
};

Test(record, invalid_utf8_in_values_and_keys_becomes_u_fffd) {
    for (size_t i = 0; i < sizeof utf8_cases / sizeof utf8_cases[0]; i++) {
        char *v = round_trip("k", utf8_cases[i].in, 0);
        cr_assert_str_eq(v, utf8_cases[i].want, "case %zu: value read back differs", i);
        free(v);
        char *k = round_trip(utf8_cases[i].in, "v", 1);
        cr_assert_str_eq(k, utf8_cases[i].want, "case %zu: key read back differs", i);
        free(k);
    }
}

/* Random byte strings (every byte but NUL, weighted to the troublesome ranges) in nested values: the
 * line is always strict JSON in well-formed UTF-8, and well-formed input reads back unchanged. */
Test(record, random_bytes_always_give_strict_json) {
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    char path[512];
    snprintf(path, sizeof path, "%s/random.jsonl", kvh_test_tmpdir());
    unlink(path);
    cJSON *all = cJSON_CreateArray();
    for (int r = 0; r < 300; r++) {
        cJSON *o = cJSON_CreateObject();
        cJSON *inner = cJSON_AddObjectToObject(o, "tags");
        for (int f = 0; f < 4; f++) {
            char key[24], val[48];
            for (int pass = 0; pass < 2; pass++) {
                char *s = pass ? val : key;
                size_t n = kvh_test_xorshift(&rng) % (pass ? sizeof val : sizeof key);
                for (size_t i = 0; i < n; i++) {
                    uint64_t x = kvh_test_xorshift(&rng);
                    unsigned b = (x >> 8) % 4 == 0 ? 0x80 + (unsigned)(x % 128) /* high half */
                                 : (x >> 8) % 4 == 1 ? 1 + (unsigned)(x % 31)     /* controls */
                                                     : 1 + (unsigned)(x % 255);
                    s[i] = (char)b;
                }
                s[n] = '\0';
            }
            cJSON_AddStringToObject(inner, key, val);
        }
        kvh_err err = {{0}};
        cr_assert_eq(kvh_jsonl_append(path, o, &err), 0, "%s", err.msg);
        cJSON_AddItemToArray(all, o);
    }
    size_t len;
    char *text = slurp(path, &len);
    cr_assert_eq(for_each_line(text, len, NULL, NULL), 300);
    /* well-formed keys and values come back byte for byte */
    size_t start = 0;
    for (cJSON *o = all->child; o; o = o->next) {
        const char *nl = memchr(text + start, '\n', len - start);
        cJSON *back = cJSON_ParseWithLength(text + start, (size_t)(nl - (text + start)));
        cJSON *in_tags = cJSON_GetObjectItem(o, "tags"), *out_tags = cJSON_GetObjectItem(back, "tags");
        cJSON *b = out_tags->child;
        for (cJSON *a = in_tags->child; a; a = a->next, b = b ? b->next : NULL) {
            cr_assert_not_null(b);
            const char *av = cJSON_GetStringValue(a), *bv = cJSON_GetStringValue(b);
            int key_ok = 1, val_ok = 1;
            for (const char *p = a->string; *p; p++) key_ok &= (unsigned char)*p < 0x80;
            for (const char *p = av; *p; p++) val_ok &= (unsigned char)*p < 0x80;
            if (key_ok) cr_assert_str_eq(b->string, a->string);
            if (val_ok) cr_assert_str_eq(bv, av);
        }
        cJSON_Delete(back);
        start = (size_t)(nl - text) + 1;
    }
    cJSON_Delete(all);
    free(text);
}

/* The real CLI: a --tag value and a plugin directory name with raw bytes (no quoting by a shell:
 * execv) give a record that is strict JSON in well-formed UTF-8, the bytes read back as U+FFFD. */
Test(record, cli_record_with_invalid_utf8_tag_and_path) {
    char dir[600], so[700], path[600], cmd[1400];
    snprintf(dir, sizeof dir, "%s/pl\xffugins-\xc3(", kvh_test_tmpdir());
    cr_assert_eq(mkdir(dir, 0755), 0);
    snprintf(so, sizeof so, "%s/window.so", dir);
    snprintf(cmd, sizeof cmd, "cp '%s/plugins/window.so' '%s'", KVH_BUILD_DIR, so);
    cr_assert_eq(system(cmd), 0);
    snprintf(path, sizeof path, "%s/cli.jsonl", kvh_test_tmpdir());
    unlink(path);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        dup2(devnull, 1);
        dup2(devnull, 2);
        char *argv[] = {KVH_BUILD_DIR "/kvhost", "generate", "--model", "random:gpt2", "--prompt-tokens", "4",
                        "--max-new", "2", "--quiet", "--threads", "1", "--plugin-path", dir, "--plugins", "window.so",
                        "--set", "window.window=8", "--tag", "note=caf\xe9 \xff\xfe!", "--json", path, NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "kvhost generate failed (status %d)", st);
    size_t len;
    char *text = slurp(path, &len);
    cr_assert_eq(for_each_line(text, len, NULL, NULL), 1);
    cJSON *rec = cJSON_ParseWithLength(text, len);
    const char *note = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(rec, "tags"), "note"));
    cr_assert_str_eq(note, "caf\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd!");
    cJSON *inst = cJSON_GetArrayItem(cJSON_GetObjectItem(cJSON_GetObjectItem(rec, "plugins"), "instances"), 0);
    const char *p = cJSON_GetStringValue(cJSON_GetObjectItem(inst, "path"));
    cr_assert(p && strstr(p, "/pl\xef\xbf\xbdugins-\xef\xbf\xbd(/window.so"), "path in the record: %s", p);
    cJSON_Delete(rec);
    free(text);
}

/* Numbers next to DBL_MAX read back as themselves, not as infinity (cJSON's 15-digit form overflows;
 * found by tests/fuzz/fuzz_jsonl.c); non-finite numbers are written as null. */
Test(record, extreme_numbers_read_back_finite) {
    const double vals[] = {DBL_MAX, -DBL_MAX, 0x1.ffffffffffffep+1023, 1e308, DBL_MIN, 5e-324, -0.0};
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = cJSON_AddArrayToObject(o, "v");
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(vals[i]));
    cJSON_AddItemToArray(arr, cJSON_CreateNumber(NAN));
    cJSON_AddItemToArray(arr, cJSON_CreateNumber(-INFINITY));
    size_t n;
    char *line = kvh_jsonl_format(o, &n);
    cr_assert_not_null(line);
    cr_assert_eq(kvh_json_strict_check(line, n - 1, NULL), 0, "%.*s", (int)n, line);
    cJSON *back = cJSON_ParseWithLength(line, n - 1);
    cJSON *b = cJSON_GetObjectItem(back, "v");
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        double v = cJSON_GetNumberValue(cJSON_GetArrayItem(b, (int)i));
        cr_assert(isfinite(v) && v == vals[i], "value %zu: wrote %.17g, read %.17g (%s)", i, vals[i], v, line);
    }
    cr_assert(cJSON_IsNull(cJSON_GetArrayItem(b, 7)) && cJSON_IsNull(cJSON_GetArrayItem(b, 8)), "%s", line);
    cJSON_Delete(back);
    cJSON_Delete(o);
    free(line);
}

/* ---- record: the plugin stack, however large --------------------------------------------------- */

Test(record, plugin_stack_of_256_sections_is_complete) {
    enum { L = 256 };
    /* one window section per layer, each with a long name: a description far over 64 KiB */
    size_t cap = (size_t)L * 200 + 64, used = 0;
    char *ini = malloc(cap);
    for (int l = 0; l < L; l++)
        used += (size_t)snprintf(ini + used, cap - used,
                                 "[window_section_with_a_long_name_for_layer_%03d]\nplugin = window\nlayers = %d\nwindow = 4\n", l,
                                 l);
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_string(&cfg, ini, "big.ini", &err), 0, "%s", err.msg);
    free(ini);
    kvh_session s;
    memset(&s, 0, sizeof s);
    cr_assert_eq(kvh_router_create_ex(&s.router, &cfg, NULL, L, 2, 8, 64, 1, &err), 0, "%s", err.msg);
    kvh_backend be;
    memset(&be, 0, sizeof be);
    snprintf(be.device, sizeof be.device, "test");
    s.backend = &be;
    kvh_model m;
    memset(&m, 0, sizeof m);
    snprintf(m.name, sizeof m.name, "synthetic-256-layers");
    m.cfg.n_layer = L;
    cJSON *rec = kvh_record_new("generate");
    cr_assert_eq(kvh_add_run_fields(rec, &m, &s, &cfg, "cpu", 1), 0);
    char path[512];
    snprintf(path, sizeof path, "%s/stack.jsonl", kvh_test_tmpdir());
    unlink(path);
    cr_assert_eq(kvh_jsonl_append(path, rec, &err), 0, "%s", err.msg);
    cJSON_Delete(rec);
    size_t len;
    char *text = slurp(path, &len);
    cr_assert_gt(len, 65536, "the record is only %zu bytes: the test needs a stack over 64 KiB", len);
    cr_assert_eq(for_each_line(text, len, NULL, NULL), 1);
    cJSON *back = cJSON_ParseWithLength(text, len);
    cJSON *plugins = cJSON_GetObjectItem(back, "plugins");
    cr_assert_not_null(plugins, "the record has no plugins key");
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItem(plugins, "instances")), L);
    cJSON *layers = cJSON_GetObjectItem(plugins, "layers");
    cr_assert_eq(cJSON_GetArraySize(layers), L);
    for (int l = 0; l < L; l++) {
        char want[64];
        snprintf(want, sizeof want, "window_section_with_a_long_name_for_layer_%03d", l);
        cr_assert_str_eq(cJSON_GetStringValue(cJSON_GetArrayItem(layers, l)), want);
    }
    cJSON_Delete(back);
    free(text);
    kvh_router_free(s.router);
    kvh_config_free(&cfg);
}
