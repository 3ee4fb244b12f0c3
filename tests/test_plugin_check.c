/* test_plugin_check.c — `kvhost plugins check` (host/runtime/plugin_check.c): every bundled policy passes it;
 * tests/plugins/tp_report.so, which fails on any broken promise of the score-report contract, passes it
 * (so the driver's synthetic attention keeps the contract a real backend keeps); plugins that break a
 * rule fail it with a message naming the plugin, the seed and the rule (victim out of range, duplicate,
 * too few, a failing score_report); stores and weight formats are refused with a pointer to their tests. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "runtime/plugin_check.h"

#define TPDIR KVH_BUILD_DIR "/tests/plugins"

static int check(const char *ref, const char *const *sets, int n_sets, kvh_err *err) {
    kvh_plugin_check_options o = kvh_plugin_check_default_options();
    o.runs = 4;
    o.steps = 60;
    o.sets = sets;
    o.n_sets = n_sets;
    FILE *out = fopen("/dev/null", "w");
    cr_assert(out);
    int rc = kvh_plugin_check(ref, TPDIR, &o, out, err);
    fclose(out);
    return rc;
}

Test(plugin_check, bundled_policies_pass) {
    static const char *const names[] = {"window", "sink", "h2o", "pyramid", "tova", "scissorhands"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        kvh_err err = {{0}};
        cr_assert_eq(check(names[i], NULL, 0, &err), 0, "%s: %s", names[i], err.msg);
    }
    kvh_err err = {{0}};
    const char *per_head[] = {"per_head=true"};
    cr_assert_eq(check("tova", per_head, 1, &err), 0, "tova per_head: %s", err.msg);
}

Test(plugin_check, contract_checker_plugin_passes) {
    static const char *const rows[][1] = {{"rows=1"}, {"rows=4"}, {"rows=64"}};
    for (size_t i = 0; i < 3; i++) {
        kvh_err err = {{0}};
        cr_assert_eq(check("tp_report.so", rows[i], 1, &err), 0, "%s: %s", rows[i][0], err.msg);
    }
}

Test(plugin_check, rule_breakers_fail_with_the_rule_named) {
    static const struct { const char *ref; const char *set; const char *needle; } cases[] = {
        {"bad_range.so", NULL, "out of range"},
        {"bad_dup.so", NULL, "listed twice"},
        {"bad_few.so", NULL, "at least"},
        {"tp_report.so", "fail_at=3", "score_report failed: asked to fail here"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kvh_err err = {{0}};
        const char *sets[1] = {cases[i].set};
        cr_assert_eq(check(cases[i].ref, sets, cases[i].set ? 1 : 0, &err), -1, "%s passed", cases[i].ref);
        cr_assert(strstr(err.msg, cases[i].needle), "%s: %s\n  wanted: %s", cases[i].ref, err.msg, cases[i].needle);
        cr_assert(strstr(err.msg, "plugins check") && strstr(err.msg, "seed"), "%s: no seed in: %s", cases[i].ref, err.msg);
    }
}

Test(plugin_check, stores_and_weight_formats_are_refused) {
    kvh_err err = {{0}};
    cr_assert_eq(check("int8", NULL, 0, &err), -1);
    cr_assert(strstr(err.msg, "is a store; the check drives policies only"), "%s", err.msg);
    cr_assert_eq(check("f16", NULL, 0, &err), -1);
    cr_assert(strstr(err.msg, "is a weight format"), "%s", err.msg);
}
