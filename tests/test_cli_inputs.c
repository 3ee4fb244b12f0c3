/* test_cli_inputs.c — Criterion suite for the small input rules of issue 14 (defects 13 and 14): repeated
 * config.json keys, integer options beyond their type (--seed), one thread limit for the INI and the
 * CLI, --json checked before the run, relative plugin paths in run files, plan's exit codes, and the
 * int8/int4 group message. Each rule is probed with its edge cases on both sides. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../plugins/quant/kvq_format.h"
#include "cli/cli.h"
#include "runtime/config.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "plan/plan.h"

int kvh_cmd_plan(int argc, char **argv);

static const char *GOOD = "\"model_type\": \"gpt2\", \"vocab_size\": 50257, \"n_positions\": 64, \"n_embd\": 64, "
                          "\"n_head\": 4, \"n_layer\": 2";

static int parse_cfg(const char *extra_before, const char *extra_after, kvh_err *err) {
    char text[2048];
    snprintf(text, sizeof text, "{%s%s%s}", extra_before, GOOD, extra_after);
    kvh_model_config c;
    return kvh_model_config_parse(text, strlen(text), "dir/config.json", &c, err);
}

Test(cli_inputs, config_json_duplicate_keys_refused) {
    kvh_err err = {{0}};
    cr_assert_eq(parse_cfg("", "", &err), 0, "%s", err.msg);
    /* every kind of key: required, optional, a string, one the loader ignores */
    const char *dups[] = {"\"n_layer\": 3, ", "\"n_embd\": 64, ", "\"model_type\": \"gpt2\", ",
                          "\"vocab_size\": 50257, "};
    const char *keys[] = {"n_layer", "n_embd", "model_type", "vocab_size"};
    for (size_t i = 0; i < 4; i++) {
        cr_assert_eq(parse_cfg(dups[i], "", &err), -1, "duplicate %s accepted", keys[i]);
        char want[64];
        snprintf(want, sizeof want, "key '%s' appears more than once", keys[i]);
        cr_assert(strstr(err.msg, want) && strstr(err.msg, "dir/config.json"), "%s", err.msg);
    }
    cr_assert_eq(parse_cfg("", ", \"layer_norm_epsilon\": 1e-5, \"layer_norm_epsilon\": 1e-5", &err), -1);
    cr_assert_eq(parse_cfg("", ", \"architectures\": [\"a\"], \"architectures\": [\"b\"]", &err), -1);
    /* nested objects are not read by the loader: their repeats are not its business */
    cr_assert_eq(parse_cfg("", ", \"task_specific_params\": {\"a\": 1, \"a\": 2}", &err), 0, "%s", err.msg);

    /* kvhost plan reads config.json with its own parser: same rule */
    kvh_plan_model m;
    const char *plan_dup = "{\"n_embd\": 64, \"n_head\": 4, \"n_layer\": 2, \"n_layer\": 20, \"vocab_size\": 100}";
    cr_assert_eq(kvh_plan_model_from_json(plan_dup, "p/config.json", &m, &err), -1);
    cr_assert(strstr(err.msg, "'n_layer' appears more than once"), "%s", err.msg);
}

Test(cli_inputs, u64_options_refuse_out_of_range) {
    uint64_t v = 0;
    cr_assert_eq(kvh_cli_parse_u64("0", &v), 0);
    cr_assert_eq(v, 0);
    cr_assert_eq(kvh_cli_parse_u64("18446744073709551615", &v), 0);
    cr_assert_eq(v, UINT64_MAX);
    const char *bad[] = {"18446744073709551616", "99999999999999999999999", "-1", " 1", "+1", "1x", "", "0x10",
                         "1e3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(kvh_cli_parse_u64(bad[i], &v), -1, "'%s' accepted as %llu", bad[i], (unsigned long long)v);
}

Test(cli_inputs, one_thread_limit) {
    cr_assert_eq(KVH_MAX_THREADS, 1024);
    char ini[64];
    for (int t = 1023; t <= 1025; t++) {
        kvh_run_config cfg;
        kvh_config_defaults(&cfg);
        kvh_err err = {{0}};
        snprintf(ini, sizeof ini, "[model]\nthreads = %d\n", t);
        int rc_ini = kvh_config_load_string(&cfg, ini, "run.ini", &err);
        kvh_config_free(&cfg);
        kvh_cli_common c;
        memset(&c, 0, sizeof c);
        char val[16];
        snprintf(val, sizeof val, "%d", t);
        char *argv[] = {"x", "--threads", val};
        int i = 1;
        int rc_cli = kvh_cli_common_parse(&c, 3, argv, &i, &err);
        cr_assert_eq(rc_ini == 0, rc_cli == 1, "threads %d: INI %s but CLI %s", t, rc_ini == 0 ? "accepts" : "refuses",
                     rc_cli == 1 ? "accepts" : "refuses");
        cr_assert_eq(rc_ini == 0, t <= KVH_MAX_THREADS, "threads %d", t);
    }
}

Test(cli_inputs, json_output_checked_without_creating) {
    char dir[600], path[700];
    snprintf(dir, sizeof dir, "%s/out", kvh_test_tmpdir());
    mkdir(dir, 0755);
    kvh_err err = {{0}};
    snprintf(path, sizeof path, "%s/new.jsonl", dir);
    cr_assert_eq(kvh_cli_check_output("--json", path, false, &err), 0, "%s", err.msg);
    cr_assert_neq(access(path, F_OK), 0, "the check created %s", path);
    cr_assert_eq(kvh_cli_check_output("--json", "/dev/null", false, &err), 0, "%s", err.msg);
    snprintf(path, sizeof path, "%s/missing/x.jsonl", dir);
    cr_assert_eq(kvh_cli_check_output("--json", path, false, &err), -1);
    cr_assert(strstr(err.msg, path) && strstr(err.msg, "No such file"), "%s", err.msg);
    cr_assert_eq(kvh_cli_check_output("--json", dir, false, &err), -1);
    cr_assert(strstr(err.msg, "is a directory"), "%s", err.msg);
    snprintf(path, sizeof path, "%s/fifo.jsonl", dir);
    unlink(path);
    cr_assert_eq(mkfifo(path, 0644), 0);
    cr_assert_eq(kvh_cli_check_output("--json", path, false, &err), -1);
    cr_assert(strstr(err.msg, "not a regular file"), "%s", err.msg);
    snprintf(path, sizeof path, "%s/file.txt/x.jsonl", dir);
    FILE *f = fopen(path, "w"); /* parent "directory" is a file */
    cr_assert_null(f);
    char file[700];
    snprintf(file, sizeof file, "%s/file.txt", dir);
    f = fopen(file, "w");
    fclose(f);
    cr_assert_eq(kvh_cli_check_output("--json", path, false, &err), -1);
    /* the common options run it before anything else */
    kvh_cli_common c;
    memset(&c, 0, sizeof c);
    snprintf(path, sizeof path, "%s/missing/y.jsonl", dir);
    c.json_path = path;
    kvh_run_config cfg;
    cr_assert_eq(kvh_cli_build_config(&c, &cfg, &err), -1);
    cr_assert(strstr(err.msg, "--json"), "%s", err.msg);
    kvh_config_free(&cfg);
    if (geteuid() == 0) {
        printf("cli_inputs: running as root, so unwritable files and directories cannot be tested\n");
    } else {
        snprintf(path, sizeof path, "%s/ro.jsonl", dir);
        f = fopen(path, "w");
        fclose(f);
        chmod(path, 0444);
        cr_assert_eq(kvh_cli_check_output("--json", path, false, &err), -1);
        cr_assert(strstr(err.msg, "not writable"), "%s", err.msg);
    }
}

Test(cli_inputs, run_file_plugin_paths_resolve_next_to_the_file) {
    char sub[600], ini[700], real[PATH_MAX];
    snprintf(sub, sizeof sub, "%s/runs", kvh_test_tmpdir());
    mkdir(sub, 0755);
    cr_assert_not_null(realpath(sub, real));
    snprintf(ini, sizeof ini, "%s/run.ini", sub);
    FILE *f = fopen(ini, "w");
    fputs("[a]\nplugin = ../plugins/x.so\n[b]\nplugin = sink.so\n[c]\nplugin = /abs/y.so\n[d]\nplugin = ./z.so\n", f);
    fclose(f);
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, ini, &err), 0, "%s", err.msg);
    char want[PATH_MAX + 32];
    snprintf(want, sizeof want, "%s/../plugins/x.so", real);
    cr_assert_str_eq(kvh_config_find_section(&cfg, "a")->plugin, want);
    cr_assert_str_eq(kvh_config_find_section(&cfg, "b")->plugin, "sink.so", "a bare name is searched, not joined");
    cr_assert_str_eq(kvh_config_find_section(&cfg, "c")->plugin, "/abs/y.so");
    snprintf(want, sizeof want, "%s/./z.so", real);
    cr_assert_str_eq(kvh_config_find_section(&cfg, "d")->plugin, want);
    /* --set is typed at the shell: relative to the working directory, as any command-line path */
    cr_assert_eq(kvh_config_set(&cfg, "a.plugin=../w.so", &err), 0, "%s", err.msg);
    cr_assert_str_eq(kvh_config_find_section(&cfg, "a")->plugin, "../w.so");
    kvh_config_free(&cfg);
}

static int plan(const char *const *args) {
    int argc = 0;
    while (args[argc]) argc++;
    return kvh_cmd_plan(argc, (char **)args);
}

Test(cli_inputs, plan_exit_codes) {
    /* usage: 2 */
    const char *const usage[][8] = {
        {"plan", "gpt2", "--bogus", NULL},           {"plan", "gpt2", "--kv-dtype", "int8", NULL},
        {"plan", "gpt2", "--context", "-3", NULL},   {"plan", "gpt2", "--context", NULL},
        {"plan", "gpt2", "--kv-prec", "fp8", NULL},  {"plan", "gpt2", "--sweep", NULL},
        {"plan", "gpt5", NULL},                      {"plan", NULL},
        {"plan", "gpt2", "--tp", "5", NULL},         {"plan", "gpt2", "gpt2-large", NULL},
    };
    for (size_t i = 0; i < sizeof usage / sizeof usage[0]; i++)
        cr_assert_eq(plan(usage[i]), 2, "usage case %zu (%s %s) did not exit 2", i, usage[i][1] ? usage[i][1] : "",
                     usage[i][1] && usage[i][2] ? usage[i][2] : "");
    /* an input file that cannot be read, and an infeasible plan: 1 */
    const char *const runtime[][8] = {
        {"plan", "/nonexistent/config.json", NULL},
        {"plan", "llama-3-8b", "--gpu-mem", "10", NULL},
    };
    for (size_t i = 0; i < 2; i++) cr_assert_eq(plan(runtime[i]), 1, "runtime case %zu", i);
    const char *const ok[] = {"plan", "--model", "gpt2-large", "--gpu-mem", "80", "--context", "1024", "--kv-prec",
                              "int8", NULL};
    cr_assert_eq(plan(ok), 0, "the README's plan line");
    /* --json that cannot be written: refused before the table, nothing created */
    char path[700];
    snprintf(path, sizeof path, "%s/nodir/plan.json", kvh_test_tmpdir());
    const char *const bad_json[] = {"plan", "gpt2", "--json", path, NULL};
    cr_assert_eq(plan(bad_json), 2);
}

Test(cli_inputs, quant_group_message_names_real_divisors) {
    kvq_format f;
    char err[512];
    cr_assert_eq(kvq_format_init(&f, 8, 32, 0, 8, err, sizeof err), -1);
    cr_assert(strstr(err, "group = 32 does not divide head_dim 8"), "%s", err);
    cr_assert(strstr(err, "such as 8") && strstr(err, "(possible: 1, 2, 4, 8)"), "%s", err);
    cr_assert_null(strstr(err, "such as 32"), "suggests a group that does not divide: %s", err);
    cr_assert_eq(kvq_format_init(&f, 4, 24, 0, 64, err, sizeof err), -1);
    cr_assert(strstr(err, "such as 16") && strstr(err, "2, 4, 8, 16, 32, 64"), "%s", err);
    cr_assert_null(strstr(err, "1, "), "bits 4 needs an even group: %s", err);
    cr_assert_eq(kvq_format_init(&f, 4, 2, 0, 9, err, sizeof err), -1);
    cr_assert(strstr(err, "no even group"), "%s", err);
    cr_assert_eq(kvq_format_init(&f, 8, 16, 0, 64, err, sizeof err), 0, "%s", err);
}

Test(cli_inputs, config_json_syntax_errors_named) {
    kvh_model_config c;
    kvh_err err = {{0}};
    /* what cJSON refuses is named by the scanner, with the byte */
    const char *bad[][2] = {{"{\"n_embd\": }", "at byte 11"}, {"{\"a\": \"\\x\"}", "invalid escape"},
                            {"[1, 2", "at byte 5"}};
    for (size_t i = 0; i < 3; i++) {
        cr_assert_eq(kvh_model_config_parse(bad[i][0], strlen(bad[i][0]), "d/config.json", &c, &err), -1);
        cr_assert(strstr(err.msg, "d/config.json: not valid JSON") && strstr(err.msg, bad[i][1]), "%s: %s", bad[i][0],
                  err.msg);
    }
}
