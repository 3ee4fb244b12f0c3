/* test_compare.c — the quick comparison (host/cli/cmd_compare.c): the token-agreement measure against
 * hand-made sequences, usage errors, and end-to-end runs on the tiny model (skipped without
 * ../shared): a policy whose budget exceeds the sequence agrees 100% with the baseline, a small
 * budget holds fewer KV bytes. Does not test timings. */
#define _POSIX_C_SOURCE 200809L /* mkstemp */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/commands.h"
#include "helpers/test_util.h"
#include "util/util.h"

static const char *tiny_model(void) {
    static char path[512];
    snprintf(path, sizeof path, "%s/models/gpt2-tiny-wt", KVH_SHARED_DIR);
    struct stat st;
    return stat(path, &st) == 0 ? path : NULL;
}

Test(compare, agreement_identical) {
    int32_t a[] = {5, 6, 7, 8};
    kvh_agreement g;
    kvh_compare_agreement(a, 4, a, 4, &g);
    cr_assert_eq(g.n_compared, 4);
    cr_assert_eq(g.n_identical, 4);
    cr_assert_eq(g.first_divergence, -1);
}

Test(compare, agreement_counts_positions_and_first_divergence) {
    int32_t a[] = {1, 2, 3, 4, 5, 6};
    int32_t b[] = {1, 2, 9, 4, 9, 6};
    kvh_agreement g;
    kvh_compare_agreement(a, 6, b, 6, &g);
    cr_assert_eq(g.n_compared, 6);
    cr_assert_eq(g.n_identical, 4);
    cr_assert_eq(g.first_divergence, 2);
}

Test(compare, agreement_shorter_output_diverges_where_it_ends) {
    int32_t a[] = {1, 2, 3, 4};
    int32_t b[] = {1, 2};
    kvh_agreement g;
    kvh_compare_agreement(a, 4, b, 2, &g);
    cr_assert_eq(g.n_compared, 4);
    cr_assert_eq(g.n_identical, 2);
    cr_assert_eq(g.first_divergence, 2);
    kvh_compare_agreement(b, 2, a, 4, &g);
    cr_assert_eq(g.first_divergence, 2);
    kvh_compare_agreement(a, 0, b, 0, &g);
    cr_assert_eq(g.n_compared, 0);
    cr_assert_eq(g.first_divergence, -1);
}

Test(compare, usage_errors_return_2) {
    char *none[] = {"compare", "--prompt-tokens", "16", NULL};
    cr_assert_eq(kvh_cmd_compare(3, none), 2, "nothing to compare");
    char *both[] = {"compare", "--plugins", "window.so", "--prompt", "x", "--prompt-tokens", "4", NULL};
    cr_assert_eq(kvh_cmd_compare(7, both), 2);
    char *nc[] = {"compare", "--no-cache", "--plugins", "window.so", NULL};
    cr_assert_eq(kvh_cmd_compare(4, nc), 2);
    char *bad[] = {"compare", "--plugins", "window.so", "--max-new", "0", NULL};
    cr_assert_eq(kvh_cmd_compare(5, bad), 2);
    char *unk[] = {"compare", "--plugins", "window.so", "--frobnicate", "1", NULL};
    cr_assert_eq(kvh_cmd_compare(5, unk), 2);
}

/* Runs a comparison writing records to a temporary file; returns the two parsed records. */
static void run_compare(const char *budget_set, int prompt, cJSON **base, cJSON **stack) {
    char json[] = "/tmp/kvh-test-compare-XXXXXX";
    int fd = mkstemp(json);
    cr_assert(fd >= 0);
    close(fd);
    unlink(json); /* the command creates it */
    char ptok[16];
    snprintf(ptok, sizeof ptok, "%d", prompt);
    char *argv[] = {"compare", "--model", (char *)tiny_model(), "--plugins", "window.so", "--set", (char *)budget_set,
                    "--prompt-tokens", ptok, "--max-new", "12", "--warmup", "0", "--repeats", "1",
                    "--threads", "1", "--json", json, NULL};
    cr_assert_eq(kvh_cmd_compare(19, argv), 0);
    cJSON *recs[2];
    kvh_test_read_json(json, recs, 2);
    unlink(json);
    *base = recs[0];
    *stack = recs[1];
}

static double num(const cJSON *o, const char *a, const char *b) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, a);
    if (b) x = cJSON_GetObjectItemCaseSensitive(x, b);
    cr_assert(cJSON_IsNumber(x), "field %s%s%s", a, b ? "." : "", b ? b : "");
    return x->valuedouble;
}

Test(compare, budget_above_sequence_agrees_fully) {
    if (!tiny_model()) cr_skip_test("no %s/models/gpt2-tiny-wt", KVH_SHARED_DIR);
    cJSON *base, *stack;
    run_compare("cache.budget=512", 40, &base, &stack);
    cr_assert_eq(num(stack, "agreement_with_baseline", "compared"), 12);
    cr_assert_eq(num(stack, "agreement_with_baseline", "identical"), 12);
    cr_assert_eq(num(stack, "agreement_with_baseline", "first_divergence"), -1);
    const cJSON *bt = cJSON_GetObjectItemCaseSensitive(base, "tags");
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(bt, "compare")->valuestring, "baseline");
    /* the baseline has no plugins; the stack names window.so */
    cr_assert_eq(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(base, "plugins")), 0);
    char *s = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(stack, "plugins"));
    cr_assert(strstr(s, "window.so"), "%s", s);
    free(s);
    cJSON_Delete(base);
    cJSON_Delete(stack);
}

Test(compare, small_budget_holds_fewer_kv_bytes) {
    if (!tiny_model()) cr_skip_test("no %s/models/gpt2-tiny-wt", KVH_SHARED_DIR);
    cJSON *base, *stack;
    run_compare("cache.budget=8", 96, &base, &stack);
    double kb = num(base, "kv_bytes_peak", NULL), ks = num(stack, "kv_bytes_peak", NULL);
    cr_assert(ks < kb, "stack peak KV %.0f should be below the baseline's %.0f", ks, kb);
    cr_assert(num(stack, "agreement_with_baseline", "compared") == 12);
    cJSON_Delete(base);
    cJSON_Delete(stack);
}
