/* test_plugin_loader.c — host/runtime/plugin.c: each purpose-built bad plugin (tests/plugins) fails with an
 * error naming the file and the problem (also garbage pointers, over-long and non-UTF-8 strings: the
 * descriptor is read without trusting it); good plugins load, their strings copied into host memory;
 * lookup by name and path; one load per file; parameter value parsing; window.so and sink.so export
 * only kvp_plugin_entry. Crashes and exits while loading: tests/plugin_crash.sh. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/plugin.h"

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

/* ---- what a plugin hands over is not trusted (issue 14): pointers, lengths, bytes ---------------- */

Test(loader, entry_returning_unreadable_memory) {
    expect_fail("bad_entrygarbage.so", "kvp_plugin_entry() returned 0x10", "not readable memory");
}
Test(loader, unreadable_string) { expect_fail("bad_strgarbage.so", "version string", "unreadable memory (0x18)"); }
Test(loader, over_long_string) { expect_fail("bad_longversion.so", "version string", "longer than 64 bytes"); }
Test(loader, non_utf8_string) {
    expect_fail("bad_badutf8.so", "version string is not valid UTF-8", "byte 0xff at offset 4");
}

/* The loaded descriptor's strings and parameter table are host copies: valid after the plugin is gone
 * from the caller's view, and equal to what the plugin declared. */
Test(loader, descriptor_strings_are_host_copies) {
    kvh_plugin *p = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_plugin_open(TPDIR "/tp_params.so", &p, &err), 0, "%s", err.msg);
    cr_assert_str_eq(p->desc.version, "0.0.1");
    cr_assert_str_eq(p->desc.summary, "test plugin tp_params");
    cr_assert_eq(p->desc.n_params, 3);
    cr_assert_str_eq(p->desc.params[2].name, "flag");
    cr_assert_str_eq(p->desc.params[2].help, "a bool parameter");
    int owned = 0; /* every string and the table live in p->owned */
    const void *mine[] = {p->desc.name, p->desc.version, p->desc.summary, p->desc.params, p->desc.params[0].name,
                          p->desc.params[2].help};
    for (size_t k = 0; k < sizeof mine / sizeof mine[0]; k++)
        for (int i = 0; i < p->n_owned; i++) owned += p->owned[i] == mine[k];
    cr_assert_eq(owned, (int)(sizeof mine / sizeof mine[0]), "only %d of the descriptor's pointers are host copies",
                 owned);
    kvh_plugin_close(p);
}

/* Bounds and content rules of every plugin-supplied string, on a descriptor built here. */
static kvp_param one_param = {.name = "size", .type = KVP_PARAM_INT, .default_value = 1, .min_value = 1,
                              .max_value = 9, .help = "a parameter"};

static int noop_create(const kvp_host *h, const kvp_layer_info *l, kvp_instance *o) {
    (void)h, (void)l, (void)o;
    return KVP_OK;
}
static void noop_destroy(void *s) { (void)s; }
static int noop_evict(void *s, const kvp_evict_request *r, uint32_t *v, uint32_t *n) {
    (void)s, (void)r, (void)v, (void)n;
    return KVP_OK;
}

static kvp_descriptor base_descriptor(void) {
    return (kvp_descriptor){KVP_DESCRIPTOR_HEADER, .role = KVP_ROLE_POLICY, .name = "okay", .version = "1.0",
                            .summary = "a summary", .n_params = 1, .params = &one_param, .create = noop_create,
                            .destroy = noop_destroy, .evict = noop_evict};
}

Test(loader, plugin_strings_are_bounded_and_printable) {
    kvh_err err = {{0}};
    kvp_descriptor d = base_descriptor();
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), 0, "%s", err.msg);
    char big[2048];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    struct {
        const char **field;
        const char *value, *want;
    } cases[] = {
        {&d.name, big, "invalid name"},
        {&d.version, big, "version string is longer than 64 bytes"},
        {&d.version, "", "version string is empty"},
        {&d.version, "1.0\x1b[31m", "version string contains a control character (0x1b at offset 3)"},
        {&d.summary, big, "summary is longer than 512 bytes"},
        {&d.summary, "fine \xe2\x82", "summary is not valid UTF-8 (byte 0xe2 at offset 5)"},
        {&d.summary, "two\nlines", "summary contains a control character (0x0a at offset 3)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        d = base_descriptor();
        *cases[i].field = cases[i].value;
        cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1, "case %zu accepted", i);
        cr_assert(strstr(err.msg, "x.so") && strstr(err.msg, cases[i].want), "case %zu: %s", i, err.msg);
    }
    kvp_param p = one_param;
    d = base_descriptor();
    d.params = &p;
    p.help = big;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1);
    cr_assert(strstr(err.msg, "help of parameter 'size' is longer than 512 bytes"), "%s", err.msg);
    p = one_param;
    p.name = big;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1);
    cr_assert(strstr(err.msg, "parameter 0 has an invalid name"), "%s", err.msg);
    /* the longest accepted: exactly at each limit, multi-byte UTF-8 included */
    d = base_descriptor();
    char v64[65], s512[513];
    memset(v64, '7', 64);
    v64[64] = '\0';
    for (int i = 0; i < 512; i += 2) memcpy(s512 + i, "\xc3\xa9", 2);
    s512[512] = '\0';
    d.version = v64;
    d.summary = s512;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), 0, "%s", err.msg);
}

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
    /* then the executable's own prefix (an installed kvhost finds its own plugins first), then the build dir;
     * duplicates and empties dropped */
    const char *tail = "/lib/kvhost/plugins";
    cr_assert(strlen(dirs[2]) > strlen(tail) && strcmp(dirs[2] + strlen(dirs[2]) - strlen(tail), tail) == 0, "%s", dirs[2]);
    cr_assert_str_eq(dirs[3], KVH_PLUGIN_BUILD_DIR);
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

/* KVP_CAP_ACT_QUANT (ABI 1.4) belongs to weight formats; an older plugin cannot declare it. */
Test(loader, act_quant_capability_only_for_weight_formats_of_abi_1_4) {
    kvh_err err = {{0}};
    kvp_descriptor d = base_descriptor(); /* a policy */
    d.caps = KVP_CAP_ACT_QUANT;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1, "a policy declaring KVP_CAP_ACT_QUANT was accepted");
    cr_assert(strstr(err.msg, "KVP_CAP_ACT_QUANT but is not a weight format"), "%s", err.msg);
    d = base_descriptor();
    d.caps = KVP_CAP_ACT_QUANT;
    d.abi_minor = 3;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1, "an ABI 1.3 plugin declaring a 1.4 bit was accepted");
    cr_assert(strstr(err.msg, "unknown capability bits 0x20"), "%s", err.msg);
}

/* KVP_CAP_MATMUL_PREFILL (ABI 1.5) likewise: weight formats only, and not from an older plugin. */
Test(loader, matmul_prefill_capability_only_for_weight_formats_of_abi_1_5) {
    kvh_err err = {{0}};
    kvp_descriptor d = base_descriptor(); /* a policy */
    d.caps = KVP_CAP_MATMUL_PREFILL;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1, "a policy declaring KVP_CAP_MATMUL_PREFILL was accepted");
    cr_assert(strstr(err.msg, "KVP_CAP_MATMUL_PREFILL but is not a weight format"), "%s", err.msg);
    d = base_descriptor();
    d.caps = KVP_CAP_MATMUL_PREFILL;
    d.abi_minor = 4;
    cr_assert_eq(kvh_plugin_validate(&d, "x.so", &err), -1, "an ABI 1.4 plugin declaring a 1.5 bit was accepted");
    cr_assert(strstr(err.msg, "unknown capability bits 0x40"), "%s", err.msg);
}
