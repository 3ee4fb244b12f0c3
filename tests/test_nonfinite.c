/* test_nonfinite.c — Criterion suite: non-finite numbers never become a quiet result (issue 14, defect 8).
 * Class: a NaN, +inf or -inf planted in any kind of weight tensor (embeddings, a layer's matrix or bias,
 * a LayerNorm, ln_f), stored as F32 (used in place), F16 or BF16 (converted), is refused at load naming
 * the tensor and the element. Finite weights of huge magnitude overflow the activations instead: then
 * generate (prefill and decode), teacher-forced and streaming eval stop naming the non-finite logit,
 * rather than sampling token 0 forever or printing ppl nan. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/evaluate.h"
#include "cli/generate.h"
#include "helpers/model_fixture.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "runtime/session.h"

static const kvh_fx_shape SHAPE = {.V = 257, .P = 32, .C = 8, .NH = 2, .L = 3};

Test(nonfinite, weights_refused_at_load) {
    const char *tensors[] = {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.weight",
                             "h.1.attn.c_proj.bias", "h.2.mlp.c_fc.weight", "h.2.mlp.c_proj.weight", "ln_f.bias"};
    const float values[] = {NAN, INFINITY, -INFINITY};
    const char *names[] = {"nan", "inf", "-inf"};
    const char *dtypes[] = {"F32", "F16", "BF16"};
    int k = 0;
    for (size_t t = 0; t < sizeof tensors / sizeof tensors[0]; t++) {
        for (size_t v = 0; v < 3; v++) {
            const char *dt = dtypes[(t + v) % 3];
            kvh_fx_plant p[2] = {{tensors[t], 3 + t % 4, values[v]}, {NULL, 0, 0}}; /* < C: inside every tensor */
            char dir[600];
            snprintf(dir, sizeof dir, "%s/nf_%d", kvh_test_tmpdir(), k++);
            kvh_fx_write_model(dir, SHAPE, dt, NULL, kvh_fx_plant_edit, p);
            kvh_model m;
            kvh_err err = {{0}};
            cr_assert_eq(kvh_model_load(&m, dir, &err), -1, "%s %s in %s accepted", dt, names[v], tensors[t]);
            char want[128];
            snprintf(want, sizeof want, "tensor '%s' holds a non-finite value (%s) at element %zu", tensors[t], names[v],
                     p[0].index);
            cr_assert(strstr(err.msg, want), "%s: message lacks \"%s\": %s", dt, want, err.msg);
            cr_assert(strstr(err.msg, "model.safetensors"), "message does not name the file: %s", err.msg);
        }
    }
    /* the first bad value in file order is the one named */
    kvh_fx_plant two[3] = {{"h.2.mlp.c_fc.weight", 0, NAN}, {"h.0.attn.c_attn.weight", 50, INFINITY}, {NULL, 0, 0}};
    char dir[600];
    snprintf(dir, sizeof dir, "%s/nf_two", kvh_test_tmpdir());
    kvh_fx_write_model(dir, SHAPE, "F32", NULL, kvh_fx_plant_edit, two);
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), -1);
    cr_assert(strstr(err.msg, "'h.0.attn.c_attn.weight'") && strstr(err.msg, "row 2, column 2"), "%s", err.msg);
}

/* Finite but enormous MLP weights: the activations overflow to inf and the logits become NaN. */
static void huge_edit(const char *name, float *data, size_t n, void *user) {
    (void)user;
    if (strcmp(name, "h.1.mlp.c_fc.weight") == 0 || strcmp(name, "h.1.mlp.c_proj.weight") == 0)
        for (size_t i = 0; i < n; i++) data[i] = data[i] > 0 ? 3.0e38f : -3.0e38f;
}

static void load_huge(kvh_model *m) {
    char dir[600];
    snprintf(dir, sizeof dir, "%s/huge", kvh_test_tmpdir());
    kvh_fx_write_model(dir, SHAPE, "F32", NULL, huge_edit, NULL);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(m, dir, &err), 0, "finite weights refused: %s", err.msg);
}

Test(nonfinite, overflowing_activations_stop_generate) {
    kvh_model m;
    load_huge(&m);
    kvh_session_options o = kvh_session_default_options();
    o.threads = 1;
    o.n_seq = 2;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, &m, NULL, NULL, 0, &o, &err), 0, "%s", err.msg);
    int32_t p0[] = {1, 2, 3}, p1[] = {4, 5};
    const int32_t *prompts[] = {p0, p1};
    int lens[] = {3, 2};
    kvh_generate_request req = {.n_prompts = 2, .prompts = prompts, .prompt_len = lens, .max_new = 4,
                                .sampling = kvh_sampler_default_params(), .eot_id = 256};
    kvh_generate_result res;
    cr_assert_eq(kvh_generate(s, &req, &res, &err), -1, "generation from NaN logits succeeded");
    cr_assert(strstr(err.msg, "prefill: sequence 0: the logit of token 0 is"), "%s", err.msg);
    cr_assert(strstr(err.msg, "non-finite"), "%s", err.msg);
    kvh_session_free(s);
    kvh_model_free(&m);
}

Test(nonfinite, overflowing_activations_stop_eval) {
    kvh_model m;
    load_huge(&m);
    kvh_session_options o = kvh_session_default_options();
    o.threads = 1;
    kvh_session *s = NULL, *full = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, &m, NULL, NULL, 0, &o, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_test_session(&full, &m, NULL, NULL, 0, &o, &err), 0, "%s", err.msg);
    int32_t ids[20];
    for (int i = 0; i < 20; i++) ids[i] = (int32_t)(i * 7 % 256);
    kvh_eval_options eo = {.ctx = 8};
    kvh_eval_result r;
    cr_assert_eq(kvh_eval_teacher(s, ids, 20, &eo, &r, &err), -1, "teacher eval gave ppl %g", r.ppl);
    cr_assert(strstr(err.msg, "chunk, token 0") && strstr(err.msg, "non-finite"), "%s", err.msg);
    cr_assert_eq(kvh_eval_stream(s, full, ids, 20, &eo, &r, &err), -1, "stream eval gave ppl %g", r.ppl);
    cr_assert(strstr(err.msg, "policy session, token 0") && strstr(err.msg, "non-finite"), "%s", err.msg);
    kvh_session_free(s);
    kvh_session_free(full);
    kvh_model_free(&m);
}
