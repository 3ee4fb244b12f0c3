/* cmd_eval.c — `kvhost eval`: perplexity of a text file, teacher-forced and/or streaming through the
 * cache under the active plugins, with KL and top-1 agreement against the full cache.
 * Owns: the command's options, reading and tokenizing the file, creating the sessions, the printed table
 * and the JSON Lines records (one per mode run). The arithmetic is evaluate.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/evaluate.h"
#include "util/metrics.h"
#include "runtime/session.h"
#include "model/tokenizer.h"

#define MAX_TEXT_FILE_BYTES (512u << 20)
#define MAX_TAGS 64

static const char *const eval_usage =
    "usage: kvhost eval [--model SPEC] --text-file FILE [options]\n"
    "\n"
    "Perplexity of a text file. The whole file is tokenized (<|endoftext|> as plain text, unless\n"
    "--eot-token) and cut into non-overlapping chunks of --ctx tokens; each chunk starts a fresh sequence\n"
    "and predicts its tokens after the first.\n"
    "\n"
    "  --text-file FILE   the text (at most 512 MiB)\n"
    "  --max-tokens N     evaluate only the first N tokens (default: all)\n"
    "  --ctx N            chunk length, 2..n_positions (default n_positions)\n"
    "  --mode M           teacher (default): one all-logits prefill per chunk, full attention inside it\n"
    "                     (plugins cannot change these logits);\n"
    "                     stream: every token decoded one by one through the cache under the plugins,\n"
    "                     beside a plugin-free full-cache run on the same tokens: NLL of both, mean\n"
    "                     KL(P_full || P_policy) and top-1 agreement;\n"
    "                     both: teacher then stream (one record each)\n"
    "  --eot-token        read a literal <|endoftext|> in the text as the token 50256, as transformers'\n"
    "                     GPT-2 tokenizer does by default (default: as the 7 tokens of its text)\n"
    "  --tag KEY=VALUE    add KEY: VALUE to the record's \"tags\" object (repeatable)\n"
    "  --progress         print progress per chunk on stderr\n"
    "\n";

typedef struct eval_args {
    kvh_cli_common common;
    const char *text_file;
    long max_tokens; /* 0 = all */
    int ctx;         /* 0 = n_positions */
    bool teacher, stream;
    bool progress;
    bool eot_token; /* --eot-token: "<|endoftext|>" in the text is id 50256 */
    const char *tags[MAX_TAGS];
    int n_tags;
} eval_args;

static int parse_args(int argc, char **argv, eval_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->teacher = true;
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (strcmp(o, "--progress") == 0) { a->progress = true; i++; continue; }
        if (strcmp(o, "--eot-token") == 0) { a->eot_token = true; i++; continue; }
        if (o[0] != '-' || !v) return kvh_fail(err, "eval: unknown argument '%s' (see kvhost eval --help)", o);
        if (strcmp(o, "--text-file") == 0) {
            a->text_file = v;
        } else if (strcmp(o, "--max-tokens") == 0) {
            if (kvh_cli_parse_int(v, 1, 1L << 40, &n))
                return kvh_fail(err, "--max-tokens '%s': expected a whole number >= 1 (omit it to use the whole file)", v);
            a->max_tokens = n;
        } else if (strcmp(o, "--ctx") == 0) {
            if (kvh_cli_parse_int(v, 2, 1 << 24, &n))
                return kvh_fail(err, "--ctx '%s': expected a whole number >= 2 (a chunk must predict a token)", v);
            a->ctx = (int)n;
        } else if (strcmp(o, "--mode") == 0) {
            if (strcmp(v, "teacher") == 0) { a->teacher = true; a->stream = false; }
            else if (strcmp(v, "stream") == 0) { a->teacher = false; a->stream = true; }
            else if (strcmp(v, "both") == 0) { a->teacher = true; a->stream = true; }
            else return kvh_fail(err, "--mode '%s': expected teacher, stream or both", v);
        } else if (strcmp(o, "--tag") == 0) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) return kvh_fail(err, "--tag '%s': expected KEY=VALUE", v);
            if (a->n_tags >= MAX_TAGS) return kvh_fail(err, "more than %d --tag options", MAX_TAGS);
            a->tags[a->n_tags++] = v;
        } else {
            return kvh_fail(err, "eval: unknown option '%s' (see kvhost eval --help)", o);
        }
        i += 2;
    }
    if (!a->text_file) return kvh_fail(err, "no text: give --text-file FILE");
    return 0;
}

static void progress_cb(void *user, size_t done, size_t total) {
    fprintf(stderr, "kvhost eval: %s %zu/%zu tokens\r", (const char *)user, done, total);
    if (done >= total) fputc('\n', stderr);
    fflush(stderr);
}

static void print_table(const char *mode, const kvh_eval_result *r, int ctx, bool plugins) {
    printf("%-22s %s\n", "mode", mode);
    printf("%-22s %zu (%zu predicted, %d chunks of <= %d)\n", "tokens", r->n_tokens, r->n_predicted, r->n_chunks, ctx);
    printf("%-22s %.4f\n", "mean NLL (nats)", r->nll_mean);
    printf("%-22s %.3f\n", "perplexity", r->ppl);
    if (strcmp(mode, "stream") == 0) {
        printf("%-22s %.4f%s\n", "full-cache mean NLL", r->full_nll_mean, plugins ? "" : " (no plugins: same run)");
        printf("%-22s %.3f\n", "full-cache perplexity", r->full_ppl);
        printf("%-22s %.6f (max %.4f)\n", "mean KL(full||policy)", r->kl_mean, r->kl_max);
        printf("%-22s %.2f %%\n", "top-1 agreement", 100.0 * r->top1_agreement);
    }
    printf("%-22s %u\n", "max live tokens/head", r->max_live_per_head);
    printf("%-22s %.1f ms (%.1f tokens/s)\n", "time", r->ms, r->ms > 0 ? (double)r->n_predicted / (r->ms / 1e3) : 0.0);
    printf("\n");
}

static int write_record(const eval_args *a, const char *mode, const kvh_eval_result *r, int ctx,
                        const kvh_model *model, const kvh_session *s, const kvh_run_config *cfg, const char *backend,
                        int threads, size_t file_tokens, kvh_err *err) {
    cJSON *rec = kvh_record_new("eval");
    if (!rec || kvh_add_run_fields(rec, model, s, cfg, backend, threads) != 0) {
        cJSON_Delete(rec);
        return kvh_fail(err, "%s: out of memory building the record (nothing written)", a->common.json_path);
    }
    cJSON *tags = cJSON_AddObjectToObject(rec, "tags");
    for (int t = 0; t < a->n_tags; t++) {
        const char *eq = strchr(a->tags[t], '=');
        char key[128];
        size_t kl = (size_t)(eq - a->tags[t]) < sizeof key - 1 ? (size_t)(eq - a->tags[t]) : sizeof key - 1;
        memcpy(key, a->tags[t], kl);
        key[kl] = '\0';
        cJSON_DeleteItemFromObject(tags, key);
        cJSON_AddStringToObject(tags, key, eq + 1);
    }
    cJSON_AddStringToObject(rec, "mode", mode);
    cJSON_AddStringToObject(rec, "text_file", a->text_file);
    cJSON_AddBoolToObject(rec, "eot_token", a->eot_token);
    cJSON_AddNumberToObject(rec, "file_tokens", (double)file_tokens);
    cJSON_AddNumberToObject(rec, "tokens", (double)r->n_tokens);
    cJSON_AddNumberToObject(rec, "predicted_tokens", (double)r->n_predicted);
    cJSON_AddNumberToObject(rec, "chunks", r->n_chunks);
    cJSON_AddNumberToObject(rec, "ctx", ctx);
    cJSON_AddNumberToObject(rec, "nll", r->nll_mean);
    cJSON_AddNumberToObject(rec, "ppl", r->ppl);
    bool stream = strcmp(mode, "stream") == 0;
    if (stream) {
        cJSON_AddNumberToObject(rec, "full_nll", r->full_nll_mean);
        cJSON_AddNumberToObject(rec, "full_ppl", r->full_ppl);
        cJSON_AddNumberToObject(rec, "kl_mean", r->kl_mean);
        cJSON_AddNumberToObject(rec, "kl_max", r->kl_max);
        cJSON_AddNumberToObject(rec, "top1_agreement", r->top1_agreement);
    } else {
        cJSON_AddNullToObject(rec, "full_nll");
        cJSON_AddNullToObject(rec, "full_ppl");
        cJSON_AddNullToObject(rec, "kl_mean");
        cJSON_AddNullToObject(rec, "kl_max");
        cJSON_AddNullToObject(rec, "top1_agreement");
    }
    cJSON_AddNumberToObject(rec, "max_live_per_head", r->max_live_per_head);
    cJSON_AddNumberToObject(rec, "time_ms", r->ms);
    cJSON_AddNumberToObject(rec, "tokens_per_s", r->ms > 0 ? (double)r->n_predicted / (r->ms / 1e3) : 0.0);
    /* per-token cost of the evaluated session alone (forward calls + its plugin hooks) */
    cJSON_AddNumberToObject(rec, "policy_forward_ms", r->policy_forward_ms);
    cJSON_AddNumberToObject(rec, "policy_tokens_per_s",
                            r->policy_forward_ms > 0 ? (double)r->n_predicted / (r->policy_forward_ms / 1e3) : 0.0);
    if (stream) cJSON_AddNumberToObject(rec, "full_forward_ms", r->full_forward_ms);
    cJSON_AddNumberToObject(rec, "peak_rss_bytes", (double)kvh_peak_rss_bytes());
    int rc = kvh_jsonl_append(a->common.json_path, rec, err);
    cJSON_Delete(rec);
    return rc;
}

int kvh_cmd_eval(int argc, char **argv) {
    kvh_err err = {{0}};
    eval_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "eval", eval_usage, &err);
    if (outcome >= 0) return outcome;
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_session *sess = NULL, *full = NULL;
    char *text = NULL;
    size_t text_len = 0;
    int32_t *ids = NULL;
    size_t n_ids = 0;

    if (kvh_cli_build_config(&a.common, &cfg, &err) != 0) {
        fprintf(stderr, "kvhost eval: %s\n", err.msg);
        kvh_config_free(&cfg);
        return 2;
    }
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    int threads = kvh_cli_threads(&a.common, &cfg);
    if (kvh_read_text(a.text_file, MAX_TEXT_FILE_BYTES, &text, &text_len, &err) != 0) goto fail;
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: its perplexity is meaningless (timings are real).\n",
                model.name);
    int ctx = a.ctx ? a.ctx : model.cfg.n_positions;
    if (ctx > model.cfg.n_positions) {
        fprintf(stderr, "kvhost eval: --ctx %d exceeds the model's n_positions %d\n", ctx, model.cfg.n_positions);
        status = 2;
        goto done;
    }
    if (kvh_tokenizer_encode(tok, text, text_len, a.eot_token ? 1 : 0, &ids, &n_ids, &err) != 0) {
        kvh_fail_prefix(&err, "%s", a.text_file);
        goto fail;
    }
    size_t file_tokens = n_ids;
    if (n_ids < 2) {
        kvh_fail(&err, "%s: the text has %zu token%s; at least 2 are needed to predict one", a.text_file, n_ids,
                 n_ids == 1 ? "" : "s");
        goto fail;
    }
    if (a.max_tokens > 0 && (size_t)a.max_tokens < n_ids) n_ids = (size_t)a.max_tokens;
    if (n_ids < 2) {
        kvh_fail(&err, "--max-tokens %ld: at least 2 tokens are needed to predict one", a.max_tokens);
        goto fail;
    }

    kvh_session_options so = kvh_session_default_options();
    so.backend = backend;
    so.threads = threads;
    so.n_seq = 1;
    so.no_cache = a.common.no_cache;
    so.kv_mem_limit = a.common.mem_limit;
    so.plugin_path = a.common.plugin_path;
    so.calibration = cfg.calibration;
    if (kvh_session_create(&sess, &model, &cfg, &so, &err) != 0) goto fail;

    printf("kvhost eval: %s on %s, %zu of %zu tokens, ctx %d, plugins: %s\n\n", model.name, a.text_file, n_ids,
           file_tokens, ctx, cfg.n_sections > 0 ? "configured" : "none (full cache)");
    kvh_eval_options eo = {.ctx = ctx, .progress = a.progress ? progress_cb : NULL};
    if (a.teacher) {
        kvh_eval_result r;
        eo.progress_user = (void *)"teacher";
        if (kvh_eval_teacher(sess, ids, n_ids, &eo, &r, &err) != 0) goto fail;
        print_table("teacher", &r, ctx, cfg.n_sections > 0);
        if (a.common.json_path &&
            write_record(&a, "teacher", &r, ctx, &model, sess, &cfg, backend, threads, file_tokens, &err) != 0)
            goto fail;
    }
    if (a.stream) {
        kvh_session_options fo = so;
        fo.no_cache = false;
        fo.kv_mem_limit = 0;
        if (kvh_session_create(&full, &model, NULL, &fo, &err) != 0) {
            kvh_fail_prefix(&err, "full-cache reference session");
            goto fail;
        }
        kvh_eval_result r;
        eo.progress_user = (void *)"stream";
        if (kvh_eval_stream(sess, full, ids, n_ids, &eo, &r, &err) != 0) goto fail;
        print_table("stream", &r, ctx, cfg.n_sections > 0);
        if (a.common.json_path &&
            write_record(&a, "stream", &r, ctx, &model, sess, &cfg, backend, threads, file_tokens, &err) != 0)
            goto fail;
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost eval: %s\n", err.msg);
    status = 1;
done:
    kvh_session_free(full);
    kvh_session_free(sess);
    free(ids);
    free(text);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
}
