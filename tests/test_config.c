/* test_config.c — host/runtime/config.c: INI run files (written to a temp dir) and CLI overrides: defaults,
 * every [model]/[cache] key, plugin sections, layer lists, unknown keys, bad numbers, duplicates,
 * line numbers in messages, --plugins and --set, and the normalized write-back. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/config.h"

static char tmpdir[256];

static void setup(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kvh_test_config_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}
static void teardown(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    cr_assert_eq(system(cmd), 0);
}
TestSuite(config, .init = setup, .fini = teardown);

/* Writes text to tmpdir/run.ini and returns the path. */
static const char *write_ini(const char *text) {
    static char path[300];
    snprintf(path, sizeof path, "%s/run.ini", tmpdir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

/* Loads text; expects failure whose message contains each of the needles (NULL-terminated). */
static void expect_error(const char *text, const char *n1, const char *n2) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    const char *path = write_ini(text);
    cr_assert_eq(kvh_config_load_ini(&cfg, path, &err), -1, "accepted:\n%s", text);
    cr_assert(strstr(err.msg, n1), "message lacks '%s': %s", n1, err.msg);
    if (n2) cr_assert(strstr(err.msg, n2), "message lacks '%s': %s", n2, err.msg);
    cr_assert(strstr(err.msg, path), "message lacks the file name: %s", err.msg);
    kvh_config_free(&cfg);
}

Test(config, defaults) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    cr_assert_null(cfg.model);
    cr_assert_str_eq(cfg.backend, "auto");
    cr_assert_eq(cfg.budget, 0);
    cr_assert_eq(cfg.slack, 32);
    cr_assert_eq(cfg.n_sections, 0);
    kvh_config_free(&cfg);
}

Test(config, full_file) {
    const char *path = write_ini("; a run\n"
                                 "[model]\n"
                                 "spec = random:gpt2-medium\n"
                                 "backend = cpu\n"
                                 "threads = 4\n"
                                 "\n"
                                 "[cache]\n"
                                 "budget = 256   ; tokens per head\n"
                                 "slack = 0\n"
                                 "[h2o]\n"
                                 "plugin = h2o.so\n"
                                 "  layers = 0-5, 8\n"
                                 "recent = 64\n"
                                 "[window]\n"
                                 "[low]\n"
                                 "plugin : /abs/sink.so\n"
                                 "layers = 9-11\n");
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, path, &err), 0, "%s", err.msg);
    cr_assert_str_eq(cfg.model, "random:gpt2-medium");
    cr_assert_str_eq(cfg.backend, "cpu");
    cr_assert_eq(cfg.threads, 4);
    cr_assert_eq(cfg.budget, 256);
    cr_assert_eq(cfg.slack, 0);
    cr_assert_eq(cfg.budget_origin.line, 8);
    cr_assert_eq(cfg.n_sections, 3);
    kvh_config_section *h = kvh_config_find_section(&cfg, "h2o");
    cr_assert_not_null(h);
    cr_assert_str_eq(h->plugin, "h2o.so");
    cr_assert_str_eq(h->layers, "0-5, 8");
    cr_assert_eq(h->layers_origin.line, 12);
    cr_assert_eq(h->origin.line, 10);
    cr_assert_eq(h->n_params, 1);
    cr_assert_str_eq(h->params[0].key, "recent");
    cr_assert_str_eq(h->params[0].value, "64");
    cr_assert_eq(h->params[0].origin.line, 13);
    cr_assert_str_eq(h->params[0].origin.file, path);
    kvh_config_section *w = kvh_config_find_section(&cfg, "window");
    cr_assert_not_null(w, "an empty section is still an instance");
    cr_assert_str_eq(w->plugin, "window", "plugin defaults to the section name");
    cr_assert_str_eq(w->layers, "all");
    cr_assert_eq(w->origin.line, 14);
    kvh_config_section *l = kvh_config_find_section(&cfg, "low");
    cr_assert_str_eq(l->plugin, "/abs/sink.so");
    cr_assert_str_eq(l->layers, "9-11");
    cr_assert_null(kvh_config_find_section(&cfg, "model"));
    kvh_config_free(&cfg);
}

Test(config, cache_errors) {
    expect_error("[cache]\nbudget = 0\n", "run.ini:2: [cache] budget = 0: budget must be >= 1; omit it to keep every token", NULL);
    expect_error("[cache]\nbudget = -5\n", ":2:", "budget must be >= 1");
    expect_error("[cache]\nbudget = 12x\n", ":2: [cache] budget = 12x: expected an integer", NULL);
    expect_error("[cache]\nbudget = \n", ":2:", "expected an integer");
    expect_error("[cache]\n\nslack = -1\n", ":3: [cache] slack = -1: must be >= 0", NULL);
    expect_error("[cache]\nslack = 1.5\n", ":2:", "expected an integer");
    expect_error("[cache]\nbudget = 99999999999999999999999\n", ":2:", "budget");
    expect_error("[cache]\nbudgett = 5\n", ":2: [cache] unknown key 'budgett'", "budget, slack, prefill_chunk");
    expect_error("[cache]\nprefill_chunk = -2\n", ":2: [cache] prefill_chunk = -2: must be >= 1 (or 0 for the whole prompt",
                 NULL);
    expect_error("[cache]\nprefill_chunk = 64k\n", ":2: [cache] prefill_chunk = 64k: expected an integer", NULL);
    expect_error("[cache]\nprefill_chunk = 2000000\n", ":2: [cache] prefill_chunk = 2000000: must be <= 1048576", NULL);
    expect_error("[cache]\nprefill_chunk = 8\nprefill_chunk = 16\n", ":3: [cache] duplicate key 'prefill_chunk'", NULL);
}

Test(config, prefill_chunk_parsed_set_and_written_back) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(cfg.prefill_chunk, 0, "default: the whole prompt in one forward");
    cr_assert_eq(kvh_config_load_string(&cfg, "[cache]\nbudget = 64\nprefill_chunk = 128\n", "r.ini", &err), 0, "%s",
                 err.msg);
    cr_assert_eq(cfg.prefill_chunk, 128);
    cr_assert_eq(cfg.prefill_chunk_origin.line, 3);
    cr_assert_eq(kvh_config_set(&cfg, "cache.prefill_chunk=32", &err), 0, "%s", err.msg);
    cr_assert_eq(cfg.prefill_chunk, 32);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    cr_assert_eq(kvh_config_write_ini(&cfg, f), 0);
    fclose(f);
    cr_assert(strstr(text, "\nprefill_chunk = 32\n"), "written back: %s", text);
    kvh_run_config again;
    kvh_config_defaults(&again);
    cr_assert_eq(kvh_config_load_string(&again, text, "normalized", &err), 0, "%s", err.msg);
    cr_assert_eq(again.prefill_chunk, 32);
    free(text);
    kvh_config_free(&again);
    kvh_config_free(&cfg);
}

Test(config, model_errors) {
    expect_error("[model]\nbackend = gpu\n", ":2: [model] backend = gpu: expected cpu, cuda or auto", NULL);
    expect_error("[model]\nthreads = -1\n", ":2:", "threads");
    expect_error("[model]\nthreads = many\n", ":2:", "threads");
    expect_error("[model]\nspec = x\npath = y\n", ":3: [model] unknown key 'path'", "spec, backend, threads");
}

Test(config, structure_errors) {
    expect_error("[cache]\nbudget = 5\nbudget = 6\n", ":3: [cache] duplicate key 'budget'", "line 2");
    expect_error("[cache]\nbudget = 5\n[cache]\n", ":3: duplicate section [cache]", "line 1");
    expect_error("[h2o]\nrecent = 1\n\n[h2o]\n", ":4: duplicate section [h2o]", "run.ini:1");
    expect_error("[h2o]\nrecent = 1\nrecent = 2\n", ":3: [h2o] duplicate key 'recent'", NULL);
    expect_error("[h2o]\nlayers = 1\nlayers = 2\n", ":3: [h2o] duplicate key 'layers'", NULL);
    expect_error("[h2o]\nplugin = a\nplugin = b\n", ":3: [h2o] duplicate key 'plugin'", NULL);
    expect_error("budget = 5\n", ":1: key 'budget' outside any section", NULL);
    expect_error("[cache]\nthis line has no equals sign\n", ":2: malformed line", NULL);
    expect_error("[cache\nbudget = 1\n", ":1: malformed line", NULL);
    expect_error("[h 2o]\n", ":1: invalid section name", NULL);
    expect_error("[h2o] junk\n", ":1: unexpected text after the section header", NULL);
    expect_error("[h2o]\nRecent = 3\n", ":2: [h2o] invalid key 'Recent'", NULL);
    char longline[400];
    memset(longline, 'a', sizeof longline);
    memcpy(longline, "[cache]\nx = ", 12);
    longline[sizeof longline - 2] = '\n';
    longline[sizeof longline - 1] = '\0';
    expect_error(longline, ":2: line longer than", NULL);
}

Test(config, layer_lists) {
    expect_error("[h2o]\nlayers = 5-2\n", ":2: [h2o] layers = 5-2: expected all", NULL);
    expect_error("[h2o]\n\nlayers = 1,,2\n", ":3:", "layers = 1,,2");
    expect_error("[h2o]\nlayers = some\n", ":2:", "layers");
    expect_error("[h2o]\nlayers =\n", ":2: [h2o] layers is empty", NULL);
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, write_ini("[a]\nlayers = 0-3,8-11\n[b]\nlayers=12,14,16\n"), &err), 0, "%s", err.msg);
    kvh_config_free(&cfg);
}

Test(config, missing_file) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, "/nonexistent/run.ini", &err), -1);
    cr_assert(strstr(err.msg, "/nonexistent/run.ini"), "%s", err.msg);
    kvh_config_free(&cfg);
}

Test(config, plugins_list) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_add_plugins_list(&cfg, "window.so, /x/y/sink.so,h2o", &err), 0, "%s", err.msg);
    cr_assert_eq(cfg.n_sections, 3);
    cr_assert_str_eq(cfg.sections[0].name, "window");
    cr_assert_str_eq(cfg.sections[0].plugin, "window.so");
    cr_assert_str_eq(cfg.sections[1].name, "sink");
    cr_assert_str_eq(cfg.sections[1].plugin, "/x/y/sink.so");
    cr_assert_str_eq(cfg.sections[2].name, "h2o");
    cr_assert_str_eq(cfg.sections[2].layers, "all");
    cr_assert_eq(kvh_config_add_plugins_list(&cfg, "window.so", &err), -1);
    cr_assert(strstr(err.msg, "duplicate section [window]"), "%s", err.msg);
    cr_assert(strstr(err.msg, "--plugins"), "%s", err.msg);
    cr_assert_eq(kvh_config_add_plugins_list(&cfg, "a.so,,b.so", &err), -1);
    cr_assert(strstr(err.msg, "empty entry"), "%s", err.msg);
    kvh_config_free(&cfg);
}

Test(config, plugins_list_after_file_conflict) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, write_ini("[sink]\nwindow = 3\n"), &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_add_plugins_list(&cfg, "sink.so", &err), -1);
    cr_assert(strstr(err.msg, "run.ini:1"), "names where the first one was: %s", err.msg);
    kvh_config_free(&cfg);
}

Test(config, set_overrides) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, write_ini("[cache]\nbudget = 100\n[sink]\nwindow = 3\n"), &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "sink.window=256", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "sink.sinks = 2", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "sink.window=300", &err), 0, "--set twice overrides: %s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "cache.budget=64", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "cache.slack=8", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "model.spec=random:gpt2", &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "sink.layers=0-3", &err), 0, "%s", err.msg);
    kvh_config_section *s = kvh_config_find_section(&cfg, "sink");
    const kvh_config_kv *w = kvh_config_section_param(s, "window");
    cr_assert_str_eq(w->value, "300");
    cr_assert_str_eq(w->origin.file, "--set");
    cr_assert_eq(w->origin.line, 0);
    cr_assert_str_eq(kvh_config_section_param(s, "sinks")->value, "2");
    cr_assert_str_eq(s->layers, "0-3");
    cr_assert_eq(cfg.budget, 64);
    cr_assert_eq(cfg.slack, 8);
    cr_assert_str_eq(cfg.model, "random:gpt2");
    /* errors */
    cr_assert_eq(kvh_config_set(&cfg, "cache.budget=0", &err), -1);
    cr_assert(strstr(err.msg, "--set: [cache] budget = 0: budget must be >= 1"), "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "h2o.recent=64", &err), -1);
    cr_assert(strstr(err.msg, "no section [h2o]"), "%s", err.msg);
    cr_assert(strstr(err.msg, "sink"), "lists the sections: %s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "budget=3", &err), -1);
    cr_assert(strstr(err.msg, "SECTION.KEY=VALUE"), "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "cache.budget", &err), -1);
    cr_assert_eq(kvh_config_set(&cfg, ".x=1", &err), -1);
    cr_assert_eq(kvh_config_set(&cfg, "cache.=1", &err), -1);
    cr_assert_eq(kvh_config_set(&cfg, "cache.colour=1", &err), -1);
    cr_assert(strstr(err.msg, "unknown key 'colour'"), "%s", err.msg);
    cr_assert_eq(kvh_config_set(&cfg, "sink.layers=9-2", &err), -1);
    cr_assert_eq(cfg.budget, 64, "a failed --set changes nothing");
    kvh_config_free(&cfg);
}

Test(config, write_back_round_trips) {
    kvh_run_config a, b;
    kvh_config_defaults(&a);
    kvh_config_defaults(&b);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&a, write_ini("[model]\nspec=m\n[cache]\nbudget=7\n[x]\nplugin=w.so\nlayers=1-2\nk=v\n"),
                                     &err), 0, "%s", err.msg);
    char path[300];
    snprintf(path, sizeof path, "%s/out.ini", tmpdir);
    FILE *f = fopen(path, "w");
    cr_assert_eq(kvh_config_write_ini(&a, f), 0);
    fclose(f);
    cr_assert_eq(kvh_config_load_ini(&b, path, &err), 0, "%s", err.msg);
    cr_assert_str_eq(b.model, "m");
    cr_assert_eq(b.budget, 7);
    cr_assert_eq(b.slack, 32);
    cr_assert_eq(b.n_sections, 1);
    cr_assert_str_eq(b.sections[0].plugin, "w.so");
    cr_assert_str_eq(b.sections[0].layers, "1-2");
    cr_assert_str_eq(b.sections[0].params[0].value, "v");
    kvh_config_free(&a);
    kvh_config_free(&b);
}

Test(config, load_string_names_source) {
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_string(&cfg, "[cache]\nslack = x\n", "inline.ini", &err), -1);
    cr_assert(strstr(err.msg, "inline.ini:2:"), "%s", err.msg);
    kvh_config_free(&cfg);
}

/* ---- regressions found by tests/fuzz/fuzz_ini.c (inputs also in tests/fuzz/corpus/ini/regress-*) -- */

/* Loads text, writes it back normalized into a memory buffer and loads that again into *b. */
static void round_trip(const char *text, kvh_run_config *a, kvh_run_config *b) {
    kvh_config_defaults(a);
    kvh_config_defaults(b);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_string(a, text, "in.ini", &err), 0, "%s", err.msg);
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_not_null(f);
    cr_assert_eq(kvh_config_write_ini(a, f), 0);
    fclose(f);
    cr_assert_eq(kvh_config_load_string(b, buf, "out.ini", &err), 0, "%s\n--- normalized ---\n%s", err.msg, buf);
    free(buf);
}

Test(config, write_back_value_starting_with_semicolon) {
    /* "k =;v" is the value ";v" (no space before ';'), "k = ;v" would be a comment */
    kvh_run_config a, b;
    round_trip("[model]\nspec =;m\n[x]\nk =;v\n", &a, &b);
    cr_assert_str_eq(a.model, ";m");
    cr_assert_str_eq(b.model, ";m");
    cr_assert_str_eq(b.sections[0].params[0].value, ";v");
    kvh_config_free(&a);
    kvh_config_free(&b);
}

Test(config, write_back_value_filling_the_line) {
    /* a 198-character line "k=vvvv...": "k = vvvv..." would exceed the line limit */
    char text[300] = "[x]\nk=";
    size_t at = strlen(text);
    memset(text + at, 'v', 196);
    text[at + 196] = '\n';
    text[at + 197] = '\0';
    kvh_run_config a, b;
    round_trip(text, &a, &b);
    cr_assert_eq(strlen(b.sections[0].params[0].value), 196);
    kvh_config_free(&a);
    kvh_config_free(&b);
}

Test(config, last_line_limit_same_as_other_lines) {
    char text[300] = "[x]\nk=";
    size_t at = strlen(text);
    memset(text + at, 'v', 197); /* 199 characters, no newline at the end of the file */
    text[at + 197] = '\0';
    expect_error(text, ":2: line longer than 198 characters", NULL);
}

Test(config, section_name_longer_than_inih_keeps) {
    char text[300] = "[";
    memset(text + 1, 's', 50);
    strcpy(text + 51, "]\nk = 1\n");
    expect_error(text, "longer than 49 characters", NULL);
    text[50] = ']'; /* 49 characters: accepted, and its keys land in it */
    strcpy(text + 51, "\nk = 1\n");
    kvh_run_config a, b;
    round_trip(text, &a, &b);
    cr_assert_eq(b.n_sections, 1);
    cr_assert_eq(b.sections[0].n_params, 1);
    kvh_config_free(&a);
    kvh_config_free(&b);
}
