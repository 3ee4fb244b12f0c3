/* test_plugin_loader.c — host/plugin.c: each purpose-built bad plugin (tests/plugins) fails with an
 * error naming the file and the problem; good plugins load; lookup by name and path; one load per file;
 * parameter value parsing; window.so and sink.so export only kvp_plugin_entry. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

#define TPDIR KVH_BUILD_DIR "/tests/plugins"
#define PDIR KVH_BUILD_DIR "/plugins"

static void expect_fail(const char *file, const char *s1, const char *s2) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", TPDIR, file);
    kvh_plugin *p = NULL;
    kvh_err err = {{0}};
    int rc = kvh_plugin_open(path, &p, &err);
    cr_assert_eq(rc, -1, "%s loaded but should fail", file);
    cr_assert_null(p);
    cr_assert(strstr(err.msg, file), "error does not name the file %s: %s", file, err.msg);
    cr_assert(strstr(err.msg, s1), "error for %s lacks '%s': %s", file, s1, err.msg);
    if (s2) cr_assert(strstr(err.msg, s2), "error for %s lacks '%s': %s", file, s2, err.msg);
}

Test(loader, missing_entry_symbol) { expect_fail("bad_noentry.so", "no kvp_plugin_entry() entry symbol", NULL); }
Test(loader, entry_returns_null) { expect_fail("bad_nullentry.so", "returned NULL", NULL); }
Test(loader, wrong_abi_major) { expect_fail("bad_abi.so", "built for ABI 2, host speaks 1", NULL); }
Test(loader, struct_too_small) { expect_fail("bad_small.so", "struct_size 16", "smaller"); }
Test(loader, unresolved_symbol) {
    expect_fail("bad_undef.so", "cannot load", "kvh_test_symbol_that_does_not_exist");
}
Test(loader, bad_name) { expect_fail("bad_name.so", "invalid name 'Bad-Name!'", NULL); }
Test(loader, null_name) { expect_fail("bad_nullname.so", "invalid name '(null)'", NULL); }
Test(loader, missing_evict) { expect_fail("bad_noevict.so", "'bad_noevict'", "required hook evict is NULL"); }
Test(loader, default_out_of_range) { expect_fail("bad_default.so", "parameter 'level'", "default 50 outside its range [1, 10]"); }
Test(loader, duplicate_param) { expect_fail("bad_dupparam.so", "duplicate parameter name 'count'", NULL); }
Test(loader, unknown_param_type) { expect_fail("bad_badtype.so", "parameter 'odd' has unknown type 77", NULL); }

Test(loader, missing_file) {
    kvh_plugin *p = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_open(TPDIR "/no_such_plugin.so", &p, &err), -1);
    cr_assert(strstr(err.msg, "no_such_plugin.so"), "%s", err.msg);
    char out[1024];
    cr_assert_eq(kvh_plugin_find("no_such_plugin", TPDIR, out, sizeof out, &err), -1);
    cr_assert(strstr(err.msg, "plugin 'no_such_plugin' not found"), "%s", err.msg);
    cr_assert(strstr(err.msg, TPDIR), "lists the searched dirs: %s", err.msg);
    cr_assert_eq(kvh_plugin_find("./nope/x.so", NULL, out, sizeof out, &err), -1);
    cr_assert(strstr(err.msg, "./nope/x.so"), "%s", err.msg);
}

Test(loader, good_plugins_load_with_their_tables) {
    kvh_plugin *p = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_open(PDIR "/window.so", &p, &err), 0, "%s", err.msg);
    cr_assert_str_eq(p->desc.name, "window");
    cr_assert_str_eq(p->file_name, "window.so");
    cr_assert_eq(p->desc.n_params, 1);
    cr_assert_str_eq(p->desc.params[0].name, "window");
    cr_assert_not_null(p->desc.evict);
    kvh_plugin_close(p);
    cr_assert_eq(kvh_plugin_open(PDIR "/sink.so", &p, &err), 0, "%s", err.msg);
    cr_assert_str_eq(p->desc.name, "sink");
    const kvp_param *s = kvh_plugin_param(&p->desc, "sinks");
    cr_assert_not_null(s);
    cr_assert_eq(s->default_value, 4.0);
    cr_assert_null(kvh_plugin_param(&p->desc, "nope"));
    kvh_plugin_close(p);
    cr_assert_eq(kvh_plugin_open(TPDIR "/tp_params.so", &p, &err), 0, "%s", err.msg);
    cr_assert_eq(p->desc.caps, KVP_CAP_DECODE_SCORES | KVP_CAP_PREFILL_SCORES);
    kvh_plugin_close(p);
}

Test(loader, find_by_name_and_search_order) {
    char out[1024];
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_find("window", NULL, out, sizeof out, &err), 0, "%s", err.msg);
    cr_assert(strstr(out, "/window.so"), "%s", out);
    cr_assert_eq(kvh_plugin_find("window.so", NULL, out, sizeof out, &err), 0, "%s", err.msg);
    /* --plugin-path comes first: tp_params is found only through it */
    cr_assert_eq(kvh_plugin_find("tp_params", NULL, out, sizeof out, &err), -1);
    cr_assert_eq(kvh_plugin_find("tp_params", "/nonexistent:" TPDIR, out, sizeof out, &err), 0, "%s", err.msg);
    cr_assert_str_eq(out, TPDIR "/tp_params.so");
    /* the plugin dir holds build subdirectories named like plugins: those are not files */
    cr_assert_eq(kvh_plugin_find("window", PDIR, out, sizeof out, &err), 0);
    cr_assert_str_eq(out, PDIR "/window.so");
    char **dirs = kvh_plugin_dirs("/a:/b::/a");
    cr_assert_not_null(dirs);
    cr_assert_str_eq(dirs[0], "/a");
    cr_assert_str_eq(dirs[1], "/b");
    cr_assert_str_eq(dirs[2], KVH_PLUGIN_BUILD_DIR, "then the build dir (duplicates and empties dropped)");
    kvh_plugin_dirs_free(dirs);
}

Test(loader, registry_loads_each_file_once) {
    kvh_plugin_registry reg;
    kvh_plugin_registry_init(&reg);
    kvh_plugin *a, *b, *c;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_registry_load(&reg, "window", NULL, &a, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_plugin_registry_load(&reg, PDIR "/window.so", NULL, &b, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_plugin_registry_load(&reg, PDIR "/../plugins/window.so", NULL, &c, &err), 0, "%s", err.msg);
    cr_assert_eq(a, b);
    cr_assert_eq(a, c);
    cr_assert_eq(reg.n, 1);
    cr_assert_eq(kvh_plugin_registry_load(&reg, "sink", NULL, &b, &err), 0, "%s", err.msg);
    cr_assert_neq(a, b);
    cr_assert_eq(reg.n, 2);
    cr_assert_eq(kvh_plugin_registry_load(&reg, TPDIR "/bad_abi.so", NULL, &c, &err), -1);
    cr_assert_eq(reg.n, 2, "a failed load leaves nothing behind");
    kvh_plugin_registry_free(&reg);
}

Test(loader, param_parsing) {
    kvp_param pi = {.name = "recent", .type = KVP_PARAM_INT, .default_value = 8, .min_value = 1, .max_value = 100, .help = "h"};
    kvp_param pf = {.name = "ratio", .type = KVP_PARAM_FLOAT, .default_value = 0.5, .min_value = 0, .max_value = 1, .help = "h"};
    kvp_param pb = {.name = "on", .type = KVP_PARAM_BOOL, .default_value = 0, .min_value = 0, .max_value = 1, .help = "h"};
    double v = -1;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_param_parse(&pi, "64", &v, &err), 0);
    cr_assert_eq(v, 64.0);
    cr_assert_eq(kvh_plugin_param_parse(&pi, "-3", &v, &err), -1);
    cr_assert_str_eq(err.msg, "must be >= 1");
    cr_assert_eq(kvh_plugin_param_parse(&pi, "101", &v, &err), -1);
    cr_assert_str_eq(err.msg, "must be <= 100");
    const char *bad_ints[] = {"", "1.5", "12abc", "0x10", "ten", "1e3", "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad_ints / sizeof bad_ints[0]; i++)
        cr_assert_eq(kvh_plugin_param_parse(&pi, bad_ints[i], &v, &err), -1, "int '%s' accepted", bad_ints[i]);
    cr_assert_eq(kvh_plugin_param_parse(&pf, "0.25", &v, &err), 0);
    cr_assert_eq(v, 0.25);
    cr_assert_eq(kvh_plugin_param_parse(&pf, "1e-1", &v, &err), 0);
    cr_assert_eq(kvh_plugin_param_parse(&pf, "1.5", &v, &err), -1);
    cr_assert_eq(kvh_plugin_param_parse(&pf, "nan", &v, &err), -1);
    cr_assert_eq(kvh_plugin_param_parse(&pf, "0.5x", &v, &err), -1);
    const char *yes[] = {"true", "1", "yes", "on", "TRUE"}, *no[] = {"false", "0", "no", "off"};
    for (size_t i = 0; i < 5; i++) {
        cr_assert_eq(kvh_plugin_param_parse(&pb, yes[i], &v, &err), 0, "%s", yes[i]);
        cr_assert_eq(v, 1.0);
    }
    for (size_t i = 0; i < 4; i++) {
        cr_assert_eq(kvh_plugin_param_parse(&pb, no[i], &v, &err), 0, "%s", no[i]);
        cr_assert_eq(v, 0.0);
    }
    cr_assert_eq(kvh_plugin_param_parse(&pb, "maybe", &v, &err), -1);
    cr_assert_eq(kvh_plugin_param_parse(&pb, "2", &v, &err), -1);
}

static void check_exports(const char *so) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "nm -D --defined-only %s 2>/dev/null", so);
    FILE *f = popen(cmd, "r");
    if (!f) cr_skip_test("cannot run nm");
    char line[512];
    int n_entry = 0, n_other = 0;
    char other[512] = "";
    while (fgets(line, sizeof line, f)) {
        char addr[64], type[8], name[256];
        if (sscanf(line, "%63s %7s %255s", addr, type, name) != 3) continue;
        if (strcmp(name, "kvp_plugin_entry") == 0) n_entry++;
        else {
            n_other++;
            snprintf(other, sizeof other, "%s", line);
        }
    }
    int rc = pclose(f);
    if (rc != 0 && n_entry == 0) cr_skip_test("nm unavailable (exit %d)", rc);
    cr_assert_eq(n_entry, 1, "%s must export kvp_plugin_entry", so);
    cr_assert_eq(n_other, 0, "%s exports more than kvp_plugin_entry, e.g. %s", so, other);
}

Test(loader, plugins_export_only_the_entry) {
    check_exports(PDIR "/window.so");
    check_exports(PDIR "/sink.so");
}
