/* cmd_eval.c — `kvhost eval`: perplexity of a text file, teacher-forced and/or streaming through the
 * cache under the active plugins, with KL and top-1 agreement against the full cache; and (--task) the
 * retrieval tasks passkey / copy / kvlookup, scored by exact match or top-1 under the plugins.
 * Owns: the command's options, reading and tokenizing the file, creating the sessions, the printed table
 * and the JSON Lines records (one per mode run). The arithmetic is evaluate.c and tasks.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/evaluate.h"
#include "cli/tasks.h"
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
    "\n"
    "Retrieval tasks (docs/fidelity.md): --task passkey|copy|kvlookup generates samples from --seed\n"
    "(the --text-file is the filler text; kvlookup needs none) and scores them under the plugins beside a\n"
    "plugin-free run of the same samples: exact match of each answer (passkey, kvlookup) or top-1 of each\n"
    "token of the repeated span (copy), the NLL of the scored tokens (the distant-context slice), KL and\n"
    "top-1 agreement with the full cache on them.\n"
    "  --task T           passkey, copy or kvlookup\n"
    "  --mode M           prefill (default for tasks): the context is one prefill (the policy compresses\n"
    "                     it, as the papers do), the question and answer are decoded token by token;\n"
    "                     stream: every token is one decode step; both: one record each\n"
    "  --seed N           generator seed (default 1)\n"
    "  --samples N        samples per cell (default 2; kvlookup 4)\n"
    "  --lengths A,B,..   passkey/copy: sample lengths in tokens (default 256,512,768,1024 / 256,512,1024);\n"
    "                     kvlookup: numbers of key-value pairs (default 8,16,32,64)\n"
    "  --depths A,B,..    passkey/copy: percent of the filler before the needle / first copy (0,25,50,75,100)\n"
    "  --span N           copy: passage length (default 64)\n"
    "  --queries N        kvlookup: queries per sample (default 4)\n"
    "  --show-samples N   print the first N samples' text (the prompt, then [the scored answers]) and stop\n"
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
    int task;        /* -1: perplexity of the text; else KVH_TASK_* */
    bool prefill;    /* task mode prefill */
    bool mode_set;
    long seed, samples, span, queries; /* 0 = default */
    long show;       /* --show-samples */
    int lengths[KVH_TASK_MAX_CELLS], n_lengths;
    int depths[KVH_TASK_MAX_CELLS], n_depths;
} eval_args;

/* "A,B,C" -> ints in lo..hi (no empty items) */
static int parse_list(const char *opt, const char *v, long lo, long hi, int *out, int *n_out, kvh_err *err) {
    char buf[256];
    if (strlen(v) >= sizeof buf) return kvh_fail(err, "%s '%s': too long", opt, v);
    int n = 0;
    for (const char *p = v;;) {
        const char *c = strchr(p, ',');
        size_t l = c ? (size_t)(c - p) : strlen(p);
        long x;
        memcpy(buf, p, l);
        buf[l] = '\0';
        if (n >= KVH_TASK_MAX_CELLS) return kvh_fail(err, "%s '%s': at most %d values", opt, v, KVH_TASK_MAX_CELLS);
        if (kvh_cli_parse_int(buf, lo, hi, &x))
            return kvh_fail(err, "%s '%s': '%s' is not a whole number in %ld..%ld", opt, v, buf, lo, hi);
        out[n++] = (int)x;
        if (!c) break;
        p = c + 1;
    }
    *n_out = n;
    return 0;
}

static int parse_args(int argc, char **argv, eval_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->teacher = true;
    a->task = -1;
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
            a->mode_set = true;
            a->prefill = false;
            if (strcmp(v, "teacher") == 0) { a->teacher = true; a->stream = false; }
            else if (strcmp(v, "stream") == 0) { a->teacher = false; a->stream = true; }
            else if (strcmp(v, "both") == 0) { a->teacher = true; a->stream = true; }
            else if (strcmp(v, "prefill") == 0) { a->teacher = false; a->stream = false; a->prefill = true; }
            else return kvh_fail(err, "--mode '%s': expected teacher, stream or both (tasks: prefill, stream or both)", v);
        } else if (strcmp(o, "--task") == 0) {
            a->task = kvh_task_kind_parse(v);
            if (a->task < 0) return kvh_fail(err, "--task '%s': expected passkey, copy or kvlookup", v);
        } else if (strcmp(o, "--seed") == 0) {
            if (kvh_cli_parse_int(v, 0, 1L << 40, &n)) return kvh_fail(err, "--seed '%s': expected a whole number >= 0", v);
            a->seed = n + 1; /* stored +1: 0 means unset */
        } else if (strcmp(o, "--samples") == 0) {
            if (kvh_cli_parse_int(v, 1, 100000, &n)) return kvh_fail(err, "--samples '%s': expected 1..100000", v);
            a->samples = n;
        } else if (strcmp(o, "--span") == 0) {
            if (kvh_cli_parse_int(v, 2, 1 << 20, &n)) return kvh_fail(err, "--span '%s': expected a whole number >= 2", v);
            a->span = n;
        } else if (strcmp(o, "--queries") == 0) {
            if (kvh_cli_parse_int(v, 1, KVH_TASK_MAX_SPANS, &n))
                return kvh_fail(err, "--queries '%s': expected 1..%d", v, KVH_TASK_MAX_SPANS);
            a->queries = n;
        } else if (strcmp(o, "--show-samples") == 0) {
            if (kvh_cli_parse_int(v, 1, 1 << 20, &n)) return kvh_fail(err, "--show-samples '%s': expected a whole number >= 1", v);
            a->show = n;
        } else if (strcmp(o, "--lengths") == 0) {
            if (parse_list(o, v, 1, 1 << 20, a->lengths, &a->n_lengths, err)) return -1;
        } else if (strcmp(o, "--depths") == 0) {
            if (parse_list(o, v, 0, 100, a->depths, &a->n_depths, err)) return -1;
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
    if (a->task < 0) {
        if (a->prefill) return kvh_fail(err, "--mode prefill is for --task (a perplexity run: teacher, stream or both)");
        if (a->seed || a->samples || a->span || a->queries || a->n_lengths || a->n_depths || a->show)
            return kvh_fail(err, "--seed, --samples, --lengths, --depths, --span, --queries and --show-samples need --task");
        if (!a->text_file) return kvh_fail(err, "no text: give --text-file FILE");
        return 0;
    }
    if (!a->mode_set) a->prefill = true;
    if (a->teacher && a->mode_set) {
        if (!a->stream) return kvh_fail(err, "--task: --mode teacher has no meaning (plugins cannot act inside one prefill): "
                                        "prefill, stream or both");
        a->teacher = false;
        a->prefill = true; /* both = prefill + stream */
    }
    a->teacher = false;
    if (!a->text_file && a->task != KVH_TASK_KVLOOKUP)
        return kvh_fail(err, "--task %s needs filler text: give --text-file FILE (e.g. a book the model was not "
                        "trained on)", kvh_task_kind_name(a->task));
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

/* ---- retrieval tasks ------------------------------------------------------------------------------ */

static void print_task_table(const eval_args *a, const char *mode, const kvh_task_score *sc, size_t n_samples,
                             size_t fed, double ms) {
    const char *unit = a->task == KVH_TASK_COPY ? "tokens" : "answers";
    printf("%-22s %s, mode %s\n", "task", kvh_task_kind_name(a->task), mode);
    printf("%-22s %zu (%zu tokens fed, %zu scored)\n", "samples", n_samples, fed, sc->tokens);
    printf("%-22s %.2f %% of %zu %s (full cache %.2f %%)\n", "accuracy",
           sc->answers ? 100.0 * (double)sc->correct / (double)sc->answers : 0.0, sc->answers, unit,
           sc->answers ? 100.0 * (double)sc->full_correct / (double)sc->answers : 0.0);
    double nll = sc->tokens ? sc->nll_sum / (double)sc->tokens : 0.0;
    double fnll = sc->tokens ? sc->full_nll_sum / (double)sc->tokens : 0.0;
    printf("%-22s %.4f (ppl %.3f; full cache %.4f)\n", "scored-token NLL", nll, exp(nll), fnll);
    printf("%-22s %.6f (max %.4f)\n", "mean KL(full||policy)", sc->tokens ? sc->kl_sum / (double)sc->tokens : 0.0,
           sc->kl_max);
    printf("%-22s %.2f %%\n", "top-1 agreement", sc->tokens ? 100.0 * (double)sc->top1_agree / (double)sc->tokens : 0.0);
    printf("%-22s %u\n", "max live tokens/head", sc->max_live_per_head);
    printf("%-22s %.1f ms\n", "time", ms);
    printf("  %-8s %-6s %9s %9s %9s\n", a->task == KVH_TASK_KVLOOKUP ? "pairs" : "length",
           a->task == KVH_TASK_KVLOOKUP ? "" : "depth", unit, "accuracy", "full");
    for (int c = 0; c < sc->n_cells; c++) {
        char depth[16] = "";
        if (sc->cell_depth[c] >= 0) snprintf(depth, sizeof depth, "%d%%", sc->cell_depth[c]);
        double n = (double)sc->cell_answers[c];
        printf("  %-8d %-6s %9zu %8.1f%% %8.1f%%\n", sc->cell_length[c], depth, sc->cell_answers[c],
               n > 0 ? 100.0 * (double)sc->cell_correct[c] / n : 0.0,
               n > 0 ? 100.0 * (double)sc->cell_full_correct[c] / n : 0.0);
    }
    printf("\n");
}

static int write_task_record(const eval_args *a, const char *mode, const kvh_task_options *to,
                             const kvh_task_score *sc, size_t n_samples, size_t fed, double ms,
                             const kvh_model *model, const kvh_session *s, const kvh_run_config *cfg,
                             const char *backend, int threads, size_t file_tokens, kvh_err *err) {
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
    double tok = (double)sc->tokens;
    cJSON_AddStringToObject(rec, "mode", mode);
    cJSON_AddStringToObject(rec, "task", kvh_task_kind_name(a->task));
    cJSON_AddNumberToObject(rec, "seed", (double)to->seed);
    cJSON_AddNumberToObject(rec, "samples", (double)n_samples);
    cJSON_AddNumberToObject(rec, "samples_per_cell", to->samples);
    if (a->task == KVH_TASK_COPY) cJSON_AddNumberToObject(rec, "span", to->span);
    if (a->task == KVH_TASK_KVLOOKUP) cJSON_AddNumberToObject(rec, "queries", to->queries);
    if (a->text_file) cJSON_AddStringToObject(rec, "text_file", a->text_file);
    else cJSON_AddNullToObject(rec, "text_file");
    cJSON_AddNumberToObject(rec, "file_tokens", (double)file_tokens);
    cJSON_AddNumberToObject(rec, "tokens", (double)fed);
    cJSON_AddNumberToObject(rec, "predicted_tokens", tok);
    cJSON_AddNumberToObject(rec, "answers", (double)sc->answers);
    cJSON_AddNumberToObject(rec, "correct", (double)sc->correct);
    cJSON_AddNumberToObject(rec, "accuracy", sc->answers ? (double)sc->correct / (double)sc->answers : 0.0);
    cJSON_AddNumberToObject(rec, "full_accuracy", sc->answers ? (double)sc->full_correct / (double)sc->answers : 0.0);
    double nll = tok > 0 ? sc->nll_sum / tok : 0.0, fnll = tok > 0 ? sc->full_nll_sum / tok : 0.0;
    cJSON_AddNumberToObject(rec, "nll", nll);
    cJSON_AddNumberToObject(rec, "ppl", exp(nll));
    cJSON_AddNumberToObject(rec, "full_nll", fnll);
    cJSON_AddNumberToObject(rec, "full_ppl", exp(fnll));
    cJSON_AddNumberToObject(rec, "kl_mean", tok > 0 ? sc->kl_sum / tok : 0.0);
    cJSON_AddNumberToObject(rec, "kl_max", sc->kl_max);
    cJSON_AddNumberToObject(rec, "top1_agreement", tok > 0 ? (double)sc->top1_agree / tok : 0.0);
    cJSON *cells = cJSON_AddArrayToObject(rec, "cells");
    for (int c = 0; c < sc->n_cells; c++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, a->task == KVH_TASK_KVLOOKUP ? "pairs" : "length", sc->cell_length[c]);
        if (sc->cell_depth[c] >= 0) cJSON_AddNumberToObject(o, "depth_pct", sc->cell_depth[c]);
        double n = (double)sc->cell_answers[c];
        cJSON_AddNumberToObject(o, "answers", n);
        cJSON_AddNumberToObject(o, "accuracy", n > 0 ? (double)sc->cell_correct[c] / n : 0.0);
        cJSON_AddNumberToObject(o, "full_accuracy", n > 0 ? (double)sc->cell_full_correct[c] / n : 0.0);
        cJSON_AddItemToArray(cells, o);
    }
    cJSON_AddNumberToObject(rec, "max_live_per_head", sc->max_live_per_head);
    cJSON_AddNumberToObject(rec, "time_ms", ms);
    cJSON_AddNumberToObject(rec, "tokens_per_s", ms > 0 ? (double)fed / (ms / 1e3) : 0.0);
    cJSON_AddNumberToObject(rec, "policy_forward_ms", sc->policy_forward_ms);
    cJSON_AddNumberToObject(rec, "policy_tokens_per_s",
                            sc->policy_forward_ms > 0 ? (double)fed / (sc->policy_forward_ms / 1e3) : 0.0);
    cJSON_AddNumberToObject(rec, "full_forward_ms", sc->full_forward_ms);
    cJSON_AddNumberToObject(rec, "peak_rss_bytes", (double)kvh_peak_rss_bytes());
    int rc = kvh_jsonl_append(a->common.json_path, rec, err);
    cJSON_Delete(rec);
    return rc;
}

/* Returns 0 ok, 2 bad usage (message printed), -1 failure (err). */
static int run_task(const eval_args *a, const kvh_run_config *cfg, const kvh_model *model, const kvh_tokenizer *tok,
                    const char *text, size_t text_len, const char *backend, int threads, kvh_err *err) {
    int rc = -1;
    int32_t *filler = NULL;
    size_t n_filler = 0;
    kvh_task_set set = {0};
    kvh_session *sess = NULL, *full = NULL;
    if (text && kvh_tokenizer_encode(tok, text, text_len, a->eot_token ? 1 : 0, &filler, &n_filler, err) != 0) {
        kvh_fail_prefix(err, "%s", a->text_file);
        return -1;
    }
    kvh_task_options to = kvh_task_default_options(a->task, model->cfg.n_positions);
    if (a->seed) to.seed = (uint64_t)(a->seed - 1);
    if (a->samples) to.samples = (int)a->samples;
    if (a->span) to.span = (int)a->span;
    if (a->queries) to.queries = (int)a->queries;
    if (a->n_lengths) {
        memcpy(to.lengths, a->lengths, sizeof a->lengths);
        to.n_lengths = a->n_lengths;
    }
    if (a->n_depths) {
        memcpy(to.depths, a->depths, sizeof a->depths);
        to.n_depths = a->n_depths;
    }
    if (to.n_lengths == 0) {
        fprintf(stderr, "kvhost eval: the model's %d positions hold none of the default lengths: give --lengths\n",
                model->cfg.n_positions);
        free(filler);
        return 2;
    }
    if (kvh_task_generate(&to, tok, filler, n_filler, &set, err) != 0) goto out;
    size_t fed = 0;
    for (int i = 0; i < set.n; i++) fed += (size_t)set.s[i].n;
    if (a->show > 0) {
        for (int i = 0; i < set.n && i < a->show; i++) {
            const kvh_task_sample *x = &set.s[i];
            printf("--- sample %d: %d tokens, prompt %d, %s %d, depth %d%%\n", i, x->n, x->prompt_len,
                   a->task == KVH_TASK_KVLOOKUP ? "pairs" : "length", x->length, x->depth_pct);
            int at = 0;
            for (int k = 0; k <= x->n_spans; k++) {
                int b = k < x->n_spans ? x->spans[k].begin : x->n;
                char *t = NULL;
                size_t tl = 0;
                if (b > at && kvh_tokenizer_decode(tok, x->ids + at, (size_t)(b - at), &t, &tl, err) != 0) goto out;
                if (t) fwrite(t, 1, tl, stdout);
                free(t);
                t = NULL;
                if (k == x->n_spans) break;
                if (kvh_tokenizer_decode(tok, x->ids + b, (size_t)(x->spans[k].end - b), &t, &tl, err) != 0) goto out;
                printf("[%.*s]", (int)tl, t);
                free(t);
                at = x->spans[k].end;
            }
            printf("\n");
        }
        rc = 0;
        goto out;
    }

    kvh_session_options so = kvh_cli_session_options(&a->common, cfg, 1);
    if (kvh_session_create(&sess, model, cfg, &so, err) != 0) goto out;
    kvh_session_options fo = so;
    fo.no_cache = false;
    fo.kv_mem_limit = 0;
    if (kvh_session_create(&full, model, NULL, &fo, err) != 0) {
        kvh_fail_prefix(err, "full-cache reference session");
        goto out;
    }
    printf("kvhost eval: %s, task %s, seed %llu, %d samples (%zu tokens), filler %s, plugins: %s\n\n", model->name,
           kvh_task_kind_name(a->task), (unsigned long long)to.seed, set.n, fed, a->text_file ? a->text_file : "none",
           cfg->n_sections > 0 ? "configured" : "none (full cache)");
    for (int pass = 0; pass < 2; pass++) {
        bool stream = pass == 1;
        if (stream ? !a->stream : !a->prefill) continue;
        const char *mode = stream ? "stream" : "prefill";
        kvh_task_score sc;
        memset(&sc, 0, sizeof sc);
        double t0 = kvh_now_ms();
        for (int i = 0; i < set.n; i++) {
            if (kvh_task_run_sample(sess, full, &set.s[i], stream, &sc, err) != 0) {
                kvh_fail_prefix(err, "sample %d (length %d)", i, set.s[i].length);
                goto out;
            }
            if (a->progress) {
                fprintf(stderr, "kvhost eval: %s %d/%d samples\r", mode, i + 1, set.n);
                if (i + 1 == set.n) fputc('\n', stderr);
            }
        }
        double ms = kvh_now_ms() - t0;
        print_task_table(a, mode, &sc, (size_t)set.n, fed, ms);
        if (a->common.json_path && write_task_record(a, mode, &to, &sc, (size_t)set.n, fed, ms, model, sess, cfg,
                                                     backend, threads, n_filler, err) != 0)
            goto out;
    }
    rc = 0;
out:
    kvh_session_free(full);
    kvh_session_free(sess);
    kvh_task_set_free(&set);
    free(filler);
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

    if (kvh_cli_start_config("eval", &a.common, &cfg) != 0) return 2;
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    int threads = kvh_cli_threads(&a.common, &cfg);
    if (a.text_file && kvh_read_text(a.text_file, MAX_TEXT_FILE_BYTES, &text, &text_len, &err) != 0) goto fail;
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: its perplexity is meaningless (timings are real).\n",
                model.name);
    if (a.task >= 0) {
        int r = run_task(&a, &cfg, &model, tok, text, text_len, backend, threads, &err);
        if (r < 0) goto fail;
        status = r;
        goto done;
    }
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

    kvh_session_options so = kvh_cli_session_options(&a.common, &cfg, 1);
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
