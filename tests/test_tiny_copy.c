/* test_tiny_copy.c — the stand-in that uses its context, models/gpt2-tiny-copy (`make model`,
 * docs/fidelity.md). Skips when the model has not been built (CI does not train it).
 * Checks: kvhost's last-position logits and greedy continuations equal golden.json's (transformers
 * float32, tools/fidelity/golden.py) when the file is there; the model copies: on repeated spans of a
 * held-out text (The War of the Worlds) the full cache predicts the second copy clearly better than a
 * window too small to see the first copy (which predicts it as well as a first copy: docs/fidelity.md
 * has the model's figures, 17 % top-1 on a first copy). */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/tasks.h"
#include "helpers/test_util.h"
#include "model/model.h"
#include "model/tokenizer.h"
#include "runtime/session.h"

static const char *model_dir(void) {
    static char path[1024];
    const char *env = getenv("KVH_TINY_COPY");
    snprintf(path, sizeof path, "%s", env ? env : KVH_SOURCE_DIR "/models/gpt2-tiny-copy");
    char st[1100];
    snprintf(st, sizeof st, "%s/model.safetensors", path);
    FILE *f = fopen(st, "rb");
    if (!f) return NULL;
    fclose(f);
    return path;
}

static kvh_session *session(const kvh_model *m, const char *plugins, const char *const *sets, int n) {
    kvh_session_options o = kvh_session_default_options();
    o.n_seq = 1;
    o.threads = 1;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_test_session(&s, m, plugins, sets, n, &o, &err), 0, "%s", err.msg);
    return s;
}

static void feed(kvh_session *s, const int32_t *ids, int n, float *logits) {
    int seq = 0;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &ids, .n_tokens = &n, .all_logits = false};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_session_forward(s, &b, logits, &err), 0, "%s", err.msg);
}

Test(tiny_copy, golden_logits_and_greedy) {
    const char *dir = model_dir();
    if (!dir) cr_skip_test("models/gpt2-tiny-copy absent (make model builds it)");
    char gp[1100];
    snprintf(gp, sizeof gp, "%s/golden.json", dir);
    char *text = NULL;
    kvh_err err = {{0}};
    if (kvh_read_file(gp, 1 << 20, &text, NULL, &err) != 0) cr_skip_test("%s absent (tools/fidelity/golden.py)", gp);
    cJSON *g = cJSON_Parse(text);
    free(text);
    cr_assert(g, "golden.json does not parse");
    kvh_model m;
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    const int V = m.cfg.n_vocab;
    float *lg = malloc((size_t)V * sizeof *lg);
    const cJSON *prompts = cJSON_GetObjectItem(g, "prompts");
    int checked = 0;
    for (int pi = 0; pi < cJSON_GetArraySize(prompts); pi++) {
        const cJSON *p = cJSON_GetArrayItem(prompts, pi), *ida = cJSON_GetObjectItem(p, "ids");
        int n = cJSON_GetArraySize(ida);
        int32_t ids[256];
        cr_assert(n > 0 && n <= 256);
        for (int i = 0; i < n; i++) ids[i] = (int32_t)cJSON_GetArrayItem(ida, i)->valuedouble;
        kvh_session *s = session(&m, NULL, NULL, 0);
        feed(s, ids, n, lg);
        const cJSON *lp = cJSON_GetObjectItem(p, "last_position_logits"), *top = cJSON_GetObjectItem(lp, "top10");
        for (int k = 0; k < cJSON_GetArraySize(top); k++) {
            const cJSON *e = cJSON_GetArrayItem(top, k);
            int id = (int)cJSON_GetObjectItem(e, "id")->valuedouble;
            double want = cJSON_GetObjectItem(e, "logit")->valuedouble;
            cr_expect(fabs(lg[id] - want) < 1e-3, "prompt %d id %d: %f vs golden %f", pi, id, lg[id], want);
            checked++;
        }
        const cJSON *pids = cJSON_GetObjectItem(lp, "probe_ids"), *plg = cJSON_GetObjectItem(lp, "probe_logits");
        for (int k = 0; k < cJSON_GetArraySize(pids); k++) {
            int id = (int)cJSON_GetArrayItem(pids, k)->valuedouble;
            double want = cJSON_GetArrayItem(plg, k)->valuedouble;
            cr_expect(fabs(lg[id] - want) < 1e-3, "prompt %d probe %d: %f vs golden %f", pi, id, lg[id], want);
            checked++;
        }
        const cJSON *gr = cJSON_GetObjectItem(cJSON_GetObjectItem(p, "greedy_20"), "ids");
        for (int t = 0; t < cJSON_GetArraySize(gr); t++) {
            int32_t next = 0;
            for (int i = 1; i < V; i++)
                if (lg[i] > lg[next]) next = i;
            int32_t want = (int32_t)cJSON_GetArrayItem(gr, t)->valuedouble;
            cr_expect_eq(next, want, "prompt %d greedy step %d: %d vs golden %d", pi, t, next, want);
            if (next != want) break;
            feed(s, &next, 1, lg);
        }
        kvh_session_free(s);
    }
    cr_assert_gt(checked, 50);
    free(lg);
    kvh_model_free(&m);
    cJSON_Delete(g);
}

Test(tiny_copy, copies_and_a_small_window_cannot) {
    const char *dir = model_dir();
    if (!dir) cr_skip_test("models/gpt2-tiny-copy absent (make model builds it)");
    const char *book = kvh_test_shared_path("data/books/war-of-the-worlds.txt");
    if (!book) cr_skip_test("../shared/data/books absent");
    kvh_err err = {{0}};
    kvh_model m;
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    kvh_tokenizer *tok = NULL;
    cr_assert_eq(kvh_tokenizer_load_embedded(&tok, &err), 0, "%s", err.msg);
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(kvh_read_file(book, 64u << 20, &text, &len, &err), 0, "%s", err.msg);
    int32_t *ids = NULL;
    size_t n = 0;
    cr_assert_eq(kvh_tokenizer_encode(tok, text, len < 200000 ? len : 200000, 0, &ids, &n, &err), 0, "%s", err.msg);
    kvh_task_options o = kvh_task_default_options(KVH_TASK_COPY, m.cfg.n_positions);
    o.lengths[0] = 256;
    o.n_lengths = 1;
    o.depths[0] = 0;
    o.n_depths = 1;
    o.samples = 8;
    o.span = 48;
    kvh_task_set set;
    cr_assert_eq(kvh_task_generate(&o, tok, ids, n, &set, &err), 0, "%s", err.msg);
    const char *sets[] = {"cache.budget=32", "cache.slack=0"};
    kvh_session *win = session(&m, "window.so", sets, 2), *full = session(&m, NULL, NULL, 0);
    kvh_task_score sc;
    memset(&sc, 0, sizeof sc);
    for (int i = 0; i < set.n; i++) cr_assert_eq(kvh_task_run_sample(win, full, &set.s[i], 0, &sc, &err), 0, "%s", err.msg);
    double full_acc = (double)sc.full_correct / (double)sc.answers, win_acc = (double)sc.correct / (double)sc.answers;
    fprintf(stderr, "gpt2-tiny-copy: copy accuracy full %.3f, window 32 %.3f (%zu tokens)\n", full_acc, win_acc, sc.answers);
    /* 8 spans of 48: 376 scored tokens. The built model (docs/fidelity.md): full 0.332, window 0.176 (the
     * fifth attempt's: 0.229 and 0.173); the thresholds leave room for a rebuild on another machine kind,
     * not for a model that copies weakly or not at all (gpt2-tiny-wt: full and window within a point) */
    cr_assert(full_acc > 0.28, "the full cache copies: %.3f", full_acc);
    cr_assert(win_acc < full_acc - 0.10, "a window of 32 cannot see a copy 208 tokens back: %.3f vs %.3f", win_acc,
              full_acc);
    kvh_session_free(win);
    kvh_session_free(full);
    kvh_task_set_free(&set);
    free(ids);
    free(text);
    kvh_tokenizer_free(tok);
    kvh_model_free(&m);
}
