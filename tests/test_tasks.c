/* test_tasks.c — the retrieval tasks of `kvhost eval --task` (host/cli/tasks.c, host/cli/cmd_eval.c).
 * Checks: the generator is deterministic (same seed, same ids; another seed, other ids) and builds what the
 * docs say (passkey: the needle's key is the answer, at the asked depth, the sample has the asked length;
 * copy: the second copy equals the first, at the asked distance; kvlookup: each answer is the value listed
 * for the asked key); scoring against hand-computed cases (exact match per span, top-1 per token, NLL
 * sums, cells); a run without plugins equals its reference (KL 0, agreement 100 %), prefill and stream
 * modes agree without plugins, a window smaller than the copy distance moves the distribution while live
 * <= budget + slack; command errors and the record. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "cli/tasks.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "runtime/session.h"

static kvh_tokenizer *tokenizer(void) {
    kvh_tokenizer *t = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_tokenizer_load_embedded(&t, &err), 0, "%s", err.msg);
    return t;
}

/* Filler: the ids of a made-up text, repeated with a counter so no two windows are equal. */
static int32_t *filler(const kvh_tokenizer *tok, size_t *n) {
    size_t cap = 64 * 1024, len = 0;
    char *text = malloc(cap);
    for (int i = 0; len + 200 < cap; i++)
        len += (size_t)snprintf(text + len, cap - len, "The %d-th lamp in the street was lit by a man in a grey coat. ", i);
    int32_t *ids = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_tokenizer_encode(tok, text, len, 0, &ids, n, &err), 0, "%s", err.msg);
    free(text);
    return ids;
}

static char *decode(const kvh_tokenizer *tok, const int32_t *ids, int n) {
    char *t = NULL;
    size_t l = 0;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_tokenizer_decode(tok, ids, (size_t)n, &t, &l, &err), 0, "%s", err.msg);
    return t;
}

static void generate(const kvh_task_options *o, const kvh_tokenizer *tok, const int32_t *f, size_t nf,
                     kvh_task_set *set) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_task_generate(o, tok, f, nf, set, &err), 0, "%s", err.msg);
}

Test(tasks, generator_is_deterministic) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    for (int kind = 0; kind < 3; kind++) {
        kvh_task_options o = kvh_task_default_options(kind, 1024);
        o.seed = 7;
        kvh_task_set a, b, c;
        generate(&o, tok, f, nf, &a);
        generate(&o, tok, f, nf, &b);
        o.seed = 8;
        generate(&o, tok, f, nf, &c);
        cr_assert_eq(a.n, b.n);
        cr_assert_eq(a.n, kind == KVH_TASK_PASSKEY ? 4 * 5 * 2 : kind == KVH_TASK_COPY ? 3 * 5 * 2 : 4 * 4);
        int differ = 0;
        for (int i = 0; i < a.n; i++) {
            cr_assert_eq(a.s[i].n, b.s[i].n);
            cr_assert_eq(memcmp(a.s[i].ids, b.s[i].ids, (size_t)a.s[i].n * sizeof(int32_t)), 0, "%s sample %d",
                         kvh_task_kind_name(kind), i);
            cr_assert_eq(a.s[i].prompt_len, b.s[i].prompt_len);
            cr_assert_eq(a.s[i].n_spans, b.s[i].n_spans);
            differ |= a.s[i].n != c.s[i].n || memcmp(a.s[i].ids, c.s[i].ids, (size_t)a.s[i].n * sizeof(int32_t));
        }
        cr_assert(differ, "%s: another seed must give other samples", kvh_task_kind_name(kind));
        /* samples of one cell differ from each other */
        cr_assert(a.s[0].n != a.s[1].n || memcmp(a.s[0].ids, a.s[1].ids, (size_t)a.s[0].n * sizeof(int32_t)));
        kvh_task_set_free(&a);
        kvh_task_set_free(&b);
        kvh_task_set_free(&c);
    }
    free(f);
    kvh_tokenizer_free(tok);
}

Test(tasks, passkey_structure) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    kvh_task_options o = kvh_task_default_options(KVH_TASK_PASSKEY, 1024);
    kvh_task_set set;
    generate(&o, tok, f, nf, &set);
    for (int i = 0; i < set.n; i++) {
        const kvh_task_sample *s = &set.s[i];
        cr_assert_eq(s->n, s->length, "a passkey sample has exactly the asked length");
        cr_assert_eq(s->n_spans, 1);
        cr_assert_eq(s->exact_spans, 1);
        cr_assert_eq(s->spans[0].end, s->n, "the answer ends the sample");
        char *ans = decode(tok, s->ids + s->spans[0].begin, s->spans[0].end - s->spans[0].begin);
        cr_assert_eq(strlen(ans), 6, "answer ' NNNNN', got '%s'", ans);
        char *all = decode(tok, s->ids, s->n);
        char needle[64], tail[64];
        snprintf(needle, sizeof needle, " The pass key is %s. Remember it. %s is the pass key.", ans + 1, ans + 1);
        snprintf(tail, sizeof tail, " What is the pass key? The pass key is %s", ans + 1);
        char *at = strstr(all, needle);
        cr_assert(at, "sample %d: needle with the answer's key: %s", i, all);
        cr_assert(strncmp(all, "There is an important info hidden", 33) == 0);
        size_t tl = strlen(tail), al = strlen(all);
        cr_assert(al > tl && strcmp(all + al - tl, tail) == 0, "ends with the question and answer");
        /* depth: 0 % right after the intro, 100 % right before the question */
        if (s->depth_pct == 0) cr_assert(strstr(all, "information there. The pass key is") == at - 18, "0%%: needle first");
        if (s->depth_pct == 100) cr_assert(strcmp(at + strlen(needle), tail) == 0, "100%%: needle then question");
        /* the prompt stops before the question */
        char *q = decode(tok, s->ids + s->prompt_len, s->n - s->prompt_len);
        cr_assert_str_eq(q, tail);
        free(q);
        free(all);
        free(ans);
    }
    kvh_task_set_free(&set);
    free(f);
    kvh_tokenizer_free(tok);
}

Test(tasks, copy_structure) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    kvh_task_options o = kvh_task_default_options(KVH_TASK_COPY, 1024);
    o.span = 40;
    kvh_task_set set;
    generate(&o, tok, f, nf, &set);
    for (int i = 0; i < set.n; i++) {
        const kvh_task_sample *s = &set.s[i];
        int L = 40, F = s->length - 2 * L;
        cr_assert_eq(s->n, s->length);
        int s2 = s->n - L;
        cr_assert_eq(s->spans[0].begin, s2 + 1);
        cr_assert_eq(s->spans[0].end, s->n);
        cr_assert_eq(s->prompt_len, s2 + 1);
        cr_assert_eq(s->exact_spans, 0);
        int s1 = (F * s->depth_pct + 50) / 100; /* the first copy follows depth% of the filler */
        cr_assert_eq(memcmp(s->ids + s1, s->ids + s2, (size_t)L * sizeof(int32_t)), 0, "sample %d: copies differ", i);
    }
    kvh_task_set_free(&set);
    free(f);
    kvh_tokenizer_free(tok);
}

Test(tasks, kvlookup_structure) {
    kvh_tokenizer *tok = tokenizer();
    kvh_task_options o = kvh_task_default_options(KVH_TASK_KVLOOKUP, 1024);
    kvh_task_set set;
    generate(&o, tok, NULL, 0, &set);
    for (int i = 0; i < set.n; i++) {
        const kvh_task_sample *s = &set.s[i];
        cr_assert_eq(s->n_spans, 4);
        char *list = decode(tok, s->ids, s->prompt_len);
        cr_assert(strncmp(list, "Here is a list of keys and their values. Remember them.", 55) == 0);
        int lines = 0;
        for (char *p = list; (p = strstr(p, " The value of key ")); p++) lines++;
        cr_assert_eq(lines, s->length, "one line per pair");
        for (int k = 0; k < s->n_spans; k++) {
            /* the query just before the answer names the key */
            char *q = decode(tok, s->ids + s->prompt_len, s->spans[k].begin - s->prompt_len);
            char *last = q, *p = q;
            while ((p = strstr(p, " The value of key "))) last = p++;
            int key;
            cr_assert_eq(sscanf(last, " The value of key %d is", &key), 1, "%s", last);
            char *ans = decode(tok, s->ids + s->spans[k].begin, s->spans[k].end - s->spans[k].begin);
            char want[64];
            snprintf(want, sizeof want, " The value of key %d is%s.", key, ans);
            cr_assert(strstr(list, want), "sample %d query %d: '%s' is not in the list", i, k, want);
            free(ans);
            free(q);
        }
        free(list);
    }
    kvh_task_set_free(&set);
    kvh_tokenizer_free(tok);
}

Test(tasks, scoring_by_hand) {
    /* ids 0..9; exact spans [3,5) and [7,10) */
    int32_t ids[10] = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
    kvh_task_sample s = {.ids = ids, .n = 10, .prompt_len = 3, .n_spans = 2, .exact_spans = 1, .length = 10,
                         .depth_pct = 50};
    s.spans[0] = (kvh_task_span){3, 5};
    s.spans[1] = (kvh_task_span){7, 10};
    int32_t pred[10] = {0, 0, 0, 13, 14, 0, 0, 17, 99, 19}; /* span 0 right, span 1 wrong at 8 */
    double nll[10] = {9, 9, 9, 0.5, 0.25, 9, 9, 1.0, 2.0, 0.125};
    kvh_task_score sc;
    memset(&sc, 0, sizeof sc);
    kvh_task_score_add(&sc, &s, pred, nll);
    cr_assert_eq(sc.answers, 2);
    cr_assert_eq(sc.correct, 1);
    cr_assert_eq(sc.tokens, 5);
    cr_assert_eq(sc.nll_sum, 0.5 + 0.25 + 1.0 + 2.0 + 0.125, "NLL over the scored tokens only");
    /* the same sample scored token by token: 4 of 5 */
    s.exact_spans = 0;
    kvh_task_score_add(&sc, &s, pred, nll);
    cr_assert_eq(sc.answers, 2 + 5);
    cr_assert_eq(sc.correct, 1 + 4);
    cr_assert_eq(sc.n_cells, 1, "same length and depth: one cell");
    cr_assert_eq(sc.cell_answers[0], 7);
    cr_assert_eq(sc.cell_correct[0], 5);
    s.depth_pct = 0;
    kvh_task_score_add(&sc, &s, pred, nll);
    cr_assert_eq(sc.n_cells, 2);
    cr_assert_eq(sc.cell_length[1], 10);
    cr_assert_eq(sc.cell_depth[1], 0);
    cr_assert_eq(sc.cell_correct[1], 4);
}

/* A small random model with the GPT-2 vocabulary, so generated ids fit. */
static void small_model(kvh_model *m) {
    kvh_model_config c = {.n_vocab = 50257, .n_positions = 256, .n_embd = 32, .n_head = 4, .n_layer = 2,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 50256};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(m, &c, 42, "test-tasks", &err), 0, "%s", err.msg);
}

static kvh_session *session_with(const kvh_model *m, const char *plugins, const char *const *sets, int n_sets) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 1;
    o.threads = 1;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n_sets, &o, &err), 0, "session: %s", err.msg);
    return s;
}

Test(tasks, runs_without_plugins_equal_their_reference_in_both_modes) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    kvh_model m;
    small_model(&m);
    kvh_session *pol = session_with(&m, NULL, NULL, 0), *full = session_with(&m, NULL, NULL, 0);
    for (int kind = 0; kind < 3; kind++) {
        kvh_task_options o = kvh_task_default_options(kind, 256);
        o.samples = 1;
        if (kind == KVH_TASK_KVLOOKUP) {
            o.lengths[0] = 6;
            o.n_lengths = 1;
        } else {
            o.lengths[0] = 160;
            o.n_lengths = 1;
            o.depths[0] = 30;
            o.n_depths = 1;
            o.span = 24;
        }
        kvh_task_set set;
        generate(&o, tok, f, nf, &set);
        kvh_task_score pre, str;
        memset(&pre, 0, sizeof pre);
        memset(&str, 0, sizeof str);
        kvh_err err = {{0}};
        cr_assert_eq(kvh_task_run_sample(pol, full, &set.s[0], 0, &pre, &err), 0, "%s", err.msg);
        cr_assert_eq(kvh_task_run_sample(pol, full, &set.s[0], 1, &str, &err), 0, "%s", err.msg);
        cr_assert_eq(pre.kl_sum, 0.0, "no plugins: the policy session is the reference");
        cr_assert_eq(pre.top1_agree, pre.tokens);
        cr_assert_eq(pre.correct, pre.full_correct);
        cr_assert_eq(pre.nll_sum, pre.full_nll_sum);
        cr_assert(pre.tokens > 0);
        cr_assert_eq(str.tokens, pre.tokens);
        cr_assert(fabs(str.nll_sum - pre.nll_sum) < 1e-4 * (double)pre.tokens, "stream %.8f vs prefill %.8f",
                  str.nll_sum, pre.nll_sum);
        cr_assert_eq(str.max_live_per_head, (uint32_t)(set.s[0].n - 1), "the full cache holds every fed token");
        kvh_task_set_free(&set);
    }
    kvh_session_free(full);
    kvh_session_free(pol);
    kvh_model_free(&m);
    free(f);
    kvh_tokenizer_free(tok);
}

Test(tasks, window_shorter_than_the_copy_distance_moves_the_prediction) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    kvh_model m;
    small_model(&m);
    const char *sets[] = {"cache.budget=16", "cache.slack=4"};
    kvh_session *pol = session_with(&m, "window.so", sets, 2), *full = session_with(&m, NULL, NULL, 0);
    kvh_task_options o = kvh_task_default_options(KVH_TASK_COPY, 256);
    o.samples = 1;
    o.lengths[0] = 200;
    o.n_lengths = 1;
    o.depths[0] = 0;
    o.n_depths = 1;
    o.span = 32;
    kvh_task_set set;
    generate(&o, tok, f, nf, &set);
    for (int stream = 0; stream < 2; stream++) {
        kvh_task_score sc;
        memset(&sc, 0, sizeof sc);
        kvh_err err = {{0}};
        cr_assert_eq(kvh_task_run_sample(pol, full, &set.s[0], stream, &sc, &err), 0, "%s", err.msg);
        cr_assert(sc.kl_sum > 0.0, "mode %d: a window of 16 cannot see the first copy", stream);
        cr_assert(sc.max_live_per_head <= 16 + 4 + 1 || !stream, "live %u", sc.max_live_per_head);
        cr_assert_eq(sc.tokens, 31);
    }
    kvh_task_set_free(&set);
    kvh_session_free(full);
    kvh_session_free(pol);
    kvh_model_free(&m);
    free(f);
    kvh_tokenizer_free(tok);
}

Test(tasks, generator_errors) {
    kvh_tokenizer *tok = tokenizer();
    size_t nf;
    int32_t *f = filler(tok, &nf);
    kvh_task_set set;
    kvh_err err = {{0}};
    kvh_task_options o = kvh_task_default_options(KVH_TASK_PASSKEY, 1024);
    o.lengths[0] = 20;
    o.n_lengths = 1;
    cr_assert_eq(kvh_task_generate(&o, tok, f, nf, &set, &err), -1);
    cr_assert(strstr(err.msg, "shorter than the prompt"), "%s", err.msg);
    o = kvh_task_default_options(KVH_TASK_COPY, 1024);
    cr_assert_eq(kvh_task_generate(&o, tok, f, 100, &set, &err), -1);
    cr_assert(strstr(err.msg, "filler text has 100 tokens"), "%s", err.msg);
    o = kvh_task_default_options(KVH_TASK_COPY, 128);
    cr_assert_eq(o.n_lengths, 0, "no default length fits 128 positions");
    o.lengths[0] = 200;
    o.n_lengths = 1;
    cr_assert_eq(kvh_task_generate(&o, tok, f, nf, &set, &err), -1);
    cr_assert(strstr(err.msg, "length 200 outside 2..128"), "%s", err.msg);
    o = kvh_task_default_options(KVH_TASK_KVLOOKUP, 256);
    o.lengths[0] = 64; /* ~700 tokens */
    o.n_lengths = 1;
    cr_assert_eq(kvh_task_generate(&o, tok, NULL, 0, &set, &err), -1);
    cr_assert(strstr(err.msg, "more than the model's 256 positions"), "%s", err.msg);
    free(f);
    kvh_tokenizer_free(tok);
}

/* ---- the command ---------------------------------------------------------------------------------- */

static int run_cmd(const char *const *args, int n) {
    char *argv[40];
    for (int i = 0; i < n; i++) argv[i] = (char *)args[i];
    argv[n] = NULL;
    return kvh_cmd_eval(n, argv);
}

Test(tasks_cmd, usage_errors) {
    const char *a1[] = {"eval", "--task", "needle"};
    cr_assert_eq(run_cmd(a1, 3), 2, "unknown task");
    const char *a2[] = {"eval", "--task", "copy"};
    cr_assert_eq(run_cmd(a2, 3), 2, "copy without filler");
    const char *a3[] = {"eval", "--task", "kvlookup", "--mode", "teacher"};
    cr_assert_eq(run_cmd(a3, 5), 2, "teacher mode for a task");
    const char *a4[] = {"eval", "--text-file", "x.txt", "--seed", "3"};
    cr_assert_eq(run_cmd(a4, 5), 2, "--seed without --task");
    const char *a5[] = {"eval", "--text-file", "x.txt", "--mode", "prefill"};
    cr_assert_eq(run_cmd(a5, 5), 2, "--mode prefill without --task");
    const char *a6[] = {"eval", "--task", "passkey", "--text-file", "x.txt", "--depths", "0,101"};
    cr_assert_eq(run_cmd(a6, 7), 2, "depth above 100");
    const char *a7[] = {"eval", "--task", "passkey", "--text-file", "x.txt", "--lengths", "256,,"};
    cr_assert_eq(run_cmd(a7, 7), 2, "empty list item");
}

Test(tasks_cmd, record_on_a_random_model) {
    char json[1024];
    snprintf(json, sizeof json, "%s/tasks.jsonl", kvh_test_tmpdir());
    remove(json);
    const char *a[] = {"eval", "--model", "random:gpt2", "--task", "kvlookup", "--lengths", "4", "--samples", "1",
                       "--queries", "2", "--mode", "both", "--threads", "1", "--json", json, "--tag", "policy=none",
                       "--plugins", "window.so", "--set", "cache.budget=16", "--set", "cache.slack=0"};
    cr_assert_eq(run_cmd(a, 25), 0);
    cJSON *rec[2];
    kvh_test_read_json(json, rec, 2); /* two records: prefill, stream */
    cJSON *p = rec[0], *s = rec[1];
    cr_assert_str_eq(cJSON_GetObjectItem(p, "record")->valuestring, "eval");
    cr_assert_str_eq(cJSON_GetObjectItem(p, "mode")->valuestring, "prefill");
    cr_assert_str_eq(cJSON_GetObjectItem(s, "mode")->valuestring, "stream");
    cr_assert_str_eq(cJSON_GetObjectItem(p, "task")->valuestring, "kvlookup");
    cr_assert_eq(cJSON_GetObjectItem(p, "answers")->valuedouble, 2);
    cr_assert_eq(cJSON_GetObjectItem(p, "queries")->valuedouble, 2);
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(p, "text_file")));
    cJSON *cells = cJSON_GetObjectItem(p, "cells");
    cr_assert_eq(cJSON_GetArraySize(cells), 1);
    cr_assert_eq(cJSON_GetObjectItem(cJSON_GetArrayItem(cells, 0), "pairs")->valuedouble, 4);
    cr_assert(cJSON_GetObjectItem(s, "max_live_per_head")->valuedouble <= 17, "budget 16, slack 0: 16 + 1 at a step");
    cr_assert(cJSON_GetObjectItem(p, "kl_mean") && cJSON_GetObjectItem(p, "top1_agreement"));
    cr_assert_str_eq(cJSON_GetObjectItem(cJSON_GetObjectItem(p, "tags"), "policy")->valuestring, "none");
    cr_assert(cJSON_GetObjectItem(p, "plugins"), "run fields present");
    cJSON_Delete(p);
    cJSON_Delete(s);
}
