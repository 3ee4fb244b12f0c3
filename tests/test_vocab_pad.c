/* test_vocab_pad.c — Criterion suite: a model whose vocabulary is larger than its tokenizer's (a padded
 * vocab_size such as 50304 for GPT-2's 50257 tokens) never produces an id the tokenizer cannot print
 * (issue 14, defect 9). The padded rows of wte are made to dominate the logits, so an unmasked sampler
 * would pick them every time; greedy and temperature sampling, one sequence and a batch, must all stay
 * below the tokenizer's size, and every sequence decodes. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/generate.h"
#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "runtime/session.h"
#include "model/tokenizer.h"

enum { TOK_V = 257, MODEL_V = 320 };

/* ln_f.bias = 50 makes the final hidden state ~ +50 in every channel; rows >= TOK_V of wte (the tied LM
 * head) of all ones then get a logit ~ 50 * C, far above every real token's. */
static void pad_edit_all(const char *name, float *data, size_t n, void *user) {
    (void)user;
    if (strcmp(name, "ln_f.bias") == 0)
        for (size_t i = 0; i < n; i++) data[i] = 50.0f;
    if (strcmp(name, "wte.weight") == 0) {
        size_t C = n / MODEL_V;
        for (size_t r = TOK_V; r < MODEL_V; r++)
            for (size_t c = 0; c < C; c++) data[r * C + c] = 1.0f;
    }
}

Test(vocab_pad, padded_ids_never_sampled) {
    char dir[600];
    snprintf(dir, sizeof dir, "%s/padded", kvh_test_tmpdir());
    kvh_fx_shape s = {.V = MODEL_V, .P = 64, .C = 8, .NH = 2, .L = 2};
    kvh_fx_write_model(dir, s, "F32", NULL, pad_edit_all, NULL);
    kvh_fx_write_byte_tokenizer(dir);
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    char vocab[700], merges[700];
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    snprintf(merges, sizeof merges, "%s/merges.txt", dir);
    kvh_tokenizer *tok = NULL;
    cr_assert_eq(kvh_tokenizer_load(&tok, vocab, merges, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_tokenizer_vocab_size(tok), TOK_V);

    kvh_session_options o = kvh_session_default_options();
    o.threads = 1;
    o.n_seq = 2;
    kvh_session *sess = NULL;
    cr_assert_eq(kvh_test_session(&sess, &m, NULL, NULL, 0, &o, &err), 0, "%s", err.msg);
    int32_t p0[] = {72, 105}, p1[] = {65};
    const int32_t *prompts[] = {p0, p1};
    int lens[] = {2, 1};
    for (int mode = 0; mode < 3; mode++) {
        kvh_sampler_params sp = kvh_sampler_default_params();
        if (mode == 1) sp.temperature = 1.0f;
        if (mode == 2) sp.temperature = 1.0f, sp.top_k = 5;
        /* without a tokenizer nothing is masked: the padded ids win (shows the fixture really favours them) */
        kvh_generate_request req = {.n_prompts = 2, .prompts = prompts, .prompt_len = lens, .max_new = 24,
                                    .sampling = sp, .eot_id = 256, .tok = NULL};
        kvh_generate_result res;
        for (int b = 0; b < 2; b++) cr_assert_eq(kvh_session_reset_seq(sess, b, &err), 0);
        cr_assert_eq(kvh_generate(sess, &req, &res, &err), 0, "%s", err.msg);
        if (mode == 0) cr_assert_geq(res.out[0][0], TOK_V, "fixture does not favour the padded ids");
        kvh_generate_result_free(&res);

        req.tok = tok;
        for (int b = 0; b < 2; b++) cr_assert_eq(kvh_session_reset_seq(sess, b, &err), 0);
        cr_assert_eq(kvh_generate(sess, &req, &res, &err), 0, "%s", err.msg);
        for (int b = 0; b < 2; b++) {
            cr_assert_eq(res.n_out[b], 24);
            for (int i = 0; i < res.n_out[b]; i++)
                cr_assert_lt(res.out[b][i], TOK_V, "mode %d seq %d step %d sampled padded id %d", mode, b, i,
                             res.out[b][i]);
            char *text = NULL;
            size_t tl = 0;
            cr_assert_eq(kvh_tokenizer_decode(tok, res.out[b], (size_t)res.n_out[b], &text, &tl, &err), 0, "%s",
                         err.msg);
            free(text);
        }
        kvh_generate_result_free(&res);
    }
    kvh_session_free(sess);
    kvh_tokenizer_free(tok);
    kvh_model_free(&m);
}
