/* cmd_generate.c — `kvhost generate`: text in, text out, with timing and an optional JSON Lines record.
 * Owns: the command's options, prompt handling (empty prompt -> <|endoftext|> start, --truncate), the
 * printed summary and the record's fields. The decode loop itself is generate.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "cli/generate.h"
#include "util/metrics.h"
#include "runtime/router.h"
#include "runtime/session.h"
#include "runtime/weights.h"

#define MAX_PROMPTS 256
#define MAX_PROMPT_FILE_BYTES (64u << 20)

static const char *const generate_usage =
    "usage: kvhost generate [--model SPEC] (--prompt TEXT | --prompt-file FILE) [options]\n"
    "\n"
    "Generates text and prints it as it is produced (sequence 0), then a timing summary on stderr.\n"
    "\n"
    "Prompt and generation:\n"
    "  --prompt TEXT         prompt text; repeat for a batch of different prompts (one sequence each)\n"
    "  --prompt-file FILE    read the prompt from FILE (at most 64 MiB; a pipe or /dev/stdin is read to EOF)\n"
    "  --batch N             run N copies of the prompt as a batch (default 1)\n"
    "  --max-new N           tokens to generate per sequence (default 64)\n"
    "  --truncate            keep the most recent prompt tokens when prompt + max-new exceeds n_positions\n"
    "  --stop-eos            stop a sequence at <|endoftext|> (default: generate exactly --max-new tokens)\n"
    "  --temperature T       0 = greedy (default 0)\n"
    "  --top-k K             sample among the K most likely tokens (0 = off; needs --temperature)\n"
    "  --top-p P             nucleus sampling: smallest set with probability >= P, renormalized over the\n"
    "                        top-k set when --top-k is on, as transformers does (1 = off)\n"
    "  --seed S              sampling seed (default 1234); same seed, same output\n"
    "  --quiet               do not print the generated text\n"
    "  --prompt-tokens N     synthetic prompt of N ids ((i*7919+13) %% vocab), for benchmarks\n"
    "  --warmup N            untimed runs first (default 0)\n"
    "  --repeats N           timed runs in this process (default 1); the record pools their decode steps\n"
    "  --tag KEY=VALUE       add KEY: VALUE to the record's \"tags\" object (repeatable; for sweeps)\n"
    "An empty prompt starts from <|endoftext|>, as GPT-2 was trained to start documents.\n"
    "\n";

typedef struct generate_args {
    kvh_cli_common common;
    const char *prompts[MAX_PROMPTS];
    int n_prompts;
    const char *prompt_file;
    int batch;
    int max_new;
    bool truncate;
    bool stop_eos;
    bool quiet;
    kvh_sampler_params sampling;
    int prompt_tokens;
    int warmup;
    int repeats;
    const char *tags[64];
    int n_tags;
} generate_args;

static int parse_args(int argc, char **argv, generate_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->batch = 1;
    a->max_new = 64;
    a->repeats = 1;
    a->sampling = kvh_sampler_default_params();
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n;
        if (strcmp(o, "--truncate") == 0) { a->truncate = true; i++; continue; }
        if (strcmp(o, "--stop-eos") == 0) { a->stop_eos = true; i++; continue; }
        if (strcmp(o, "--quiet") == 0) { a->quiet = true; i++; continue; }
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (o[0] != '-' || !v) return kvh_fail(err, "generate: unknown argument '%s' (see kvhost generate --help)", o);
        if (strcmp(o, "--prompt") == 0) {
            if (a->n_prompts >= MAX_PROMPTS) return kvh_fail(err, "more than %d --prompt options", MAX_PROMPTS);
            a->prompts[a->n_prompts++] = v;
        } else if (strcmp(o, "--prompt-tokens") == 0) {
            if (kvh_cli_parse_int(v, 1, 1 << 20, &n)) return kvh_fail(err, "--prompt-tokens '%s': expected a whole number >= 1", v);
            a->prompt_tokens = (int)n;
        } else if (strcmp(o, "--tag") == 0) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v) return kvh_fail(err, "--tag '%s': expected KEY=VALUE", v);
            if (a->n_tags >= 64) return kvh_fail(err, "more than 64 --tag options");
            a->tags[a->n_tags++] = v;
        } else if (strcmp(o, "--warmup") == 0) {
            if (kvh_cli_parse_int(v, 0, 1000, &n)) return kvh_fail(err, "--warmup '%s': expected 0..1000", v);
            a->warmup = (int)n;
        } else if (strcmp(o, "--repeats") == 0) {
            if (kvh_cli_parse_int(v, 1, 1000, &n)) return kvh_fail(err, "--repeats '%s': expected 1..1000", v);
            a->repeats = (int)n;
        } else if (strcmp(o, "--prompt-file") == 0) {
            a->prompt_file = v;
        } else if (strcmp(o, "--batch") == 0) {
            if (kvh_cli_parse_int(v, 1, 4096, &n)) return kvh_fail(err, "--batch '%s': expected 1..4096", v);
            a->batch = (int)n;
        } else if (strcmp(o, "--max-new") == 0) {
            if (kvh_cli_parse_int(v, 0, 1 << 20, &n)) return kvh_fail(err, "--max-new '%s': expected a whole number >= 0", v);
            a->max_new = (int)n;
        } else if (strcmp(o, "--temperature") == 0) {
            char *end;
            a->sampling.temperature = strtof(v, &end);
            if (*end || end == v) return kvh_fail(err, "--temperature '%s': expected a number", v);
        } else if (strcmp(o, "--top-k") == 0) {
            if (kvh_cli_parse_int(v, 0, 1 << 30, &n)) return kvh_fail(err, "--top-k '%s': expected a whole number >= 0", v);
            a->sampling.top_k = (int)n;
        } else if (strcmp(o, "--top-p") == 0) {
            char *end;
            a->sampling.top_p = strtof(v, &end);
            if (*end || end == v) return kvh_fail(err, "--top-p '%s': expected a number in (0, 1]", v);
        } else if (strcmp(o, "--seed") == 0) {
            if (kvh_cli_parse_u64(v, &a->sampling.seed) != 0)
                return kvh_fail(err, "--seed '%s': expected a whole number from 0 to 18446744073709551615", v);
        } else {
            return kvh_fail(err, "generate: unknown option '%s' (see kvhost generate --help)", o);
        }
        i += 2;
    }
    if ((a->prompt_file != NULL) + (a->n_prompts > 0) + (a->prompt_tokens > 0) > 1)
        return kvh_fail(err, "give one of --prompt, --prompt-file or --prompt-tokens");
    if (a->batch > 1 && a->n_prompts > 1)
        return kvh_fail(err, "--batch N copies one prompt; with several --prompt options the batch is the prompts");
    return 0;
}

/* Tokenizes one prompt; empty -> [<|endoftext|>]; too long -> error or keep the most recent tokens. */
static int prepare_prompt(const kvh_tokenizer *tok, const kvh_model *m, const char *text, size_t len, int max_new,
                          bool truncate, int32_t **ids, int *n_ids, kvh_err *err) {
    size_t n = 0;
    if (kvh_tokenizer_encode(tok, text, len, 1, ids, &n, err) != 0) return -1;
    if (n == 0) {
        free(*ids);
        *ids = malloc(sizeof(int32_t));
        if (!*ids) return kvh_fail(err, "out of memory");
        (*ids)[0] = kvh_tokenizer_eot(tok) >= 0 ? kvh_tokenizer_eot(tok) : m->cfg.bos_id;
        n = 1;
    }
    size_t room = (size_t)m->cfg.n_positions > (size_t)max_new ? (size_t)(m->cfg.n_positions - max_new) : 0;
    if (n > room) {
        if (!truncate || room == 0) {
            free(*ids);
            *ids = NULL;
            if (room == 0)
                return kvh_fail(err, "--max-new %d leaves no room for a prompt within n_positions %d", max_new,
                                m->cfg.n_positions);
            return kvh_fail(err,
                            "the prompt has %zu tokens; with --max-new %d the sequence would pass n_positions %d. "
                            "HINT: --truncate keeps the most recent %zu prompt tokens",
                            n, max_new, m->cfg.n_positions, room);
        }
        memmove(*ids, *ids + (n - room), room * sizeof(int32_t));
        n = room;
    }
    *n_ids = (int)n;
    return 0;
}

static void print_summary(FILE *f, const char *label, const kvh_generate_result *r, int batch) {
    fprintf(f,
            "%s: prefill %.1f ms | decode %.2f ms/step median (p10 %.2f, p90 %.2f) | %.1f tokens/s at batch %d | "
            "KV held %.2f MiB (peak %.2f MiB) | peak RSS %.0f MiB\n",
            label, r->prefill_ms, r->decode.median, r->decode.p10, r->decode.p90, r->decode_tokens_per_s, batch,
            (double)r->kv_bytes_held / 1048576.0, (double)r->kv_bytes_peak / 1048576.0,
            (double)r->peak_rss / 1048576.0);
}

int kvh_add_run_fields(cJSON *rec, const kvh_model *model, const kvh_session *s, const kvh_run_config *cfg,
                       const char *backend, int threads) {
    cJSON *m = cJSON_AddObjectToObject(rec, "model");
    cJSON_AddStringToObject(m, "name", model->name);
    cJSON_AddStringToObject(m, "source", model->source);
    cJSON_AddBoolToObject(m, "random_weights", model->is_random);
    if (model->is_random)
        cJSON_AddStringToObject(m, "note", "seeded random weights: speed and memory are real, text and quality are meaningless");
    cJSON_AddNumberToObject(m, "n_layer", model->cfg.n_layer);
    cJSON_AddNumberToObject(m, "n_head", model->cfg.n_head);
    cJSON_AddNumberToObject(m, "n_embd", model->cfg.n_embd);
    cJSON_AddNumberToObject(m, "n_params", (double)model->n_params);
    /* the backend that ran: "auto" resolves to cpu or cuda, and a record must say which (a backend without
     * ops is a test's stand-in: the requested name is all there is) */
    const kvh_backend_ops *ops = s->backend->ops;
    const char *ran = ops ? ops->name : backend;
    cJSON_AddStringToObject(rec, "backend", ran);
    if (strcmp(backend, ran) != 0) cJSON_AddStringToObject(rec, "backend_requested", backend);
    cJSON_AddStringToObject(rec, "device", s->backend->device);
    if (ops && ops->kv_memory_reserved) /* slots in device memory: what they take there */
        cJSON_AddNumberToObject(rec, "kv_device_reserved_bytes", (double)ops->kv_memory_reserved(s->backend));
    cJSON_AddStringToObject(rec, "kernels", s->backend->kernels);
    /* every weight tensor as held: fp32, or packed by the layer's weight format (plugins.weights says which) */
    cJSON_AddNumberToObject(rec, "weights_bytes_held", (double)kvh_weights_bytes_held(model, s->weights));
    cJSON_AddNumberToObject(rec, "weights_fp32_released_bytes", s->weights ? (double)s->weights->released_bytes : 0);
    cJSON_AddNumberToObject(rec, "threads", threads);
    cJSON_AddBoolToObject(rec, "no_cache", s->opt.no_cache);
    cJSON_AddNumberToObject(rec, "cache_budget", cfg && cfg->budget ? (double)cfg->budget : 0);
    cJSON_AddNumberToObject(rec, "cache_slack", cfg ? (double)cfg->slack : 0);
    cJSON_AddNumberToObject(rec, "cache_prefill_chunk", (double)s->prefill_chunk);
    cJSON_AddNumberToObject(rec, "cache_block_size", (double)s->cache.block_slots); /* 0: contiguous slots */
    /* policy state and scratch (host->alloc), apart from kv_bytes_*: see kvh_router_policy_bytes */
    size_t policy_peak = 0, policy_now = kvh_router_policy_bytes(s->router, &policy_peak);
    cJSON_AddNumberToObject(rec, "policy_bytes", (double)policy_now);
    cJSON_AddNumberToObject(rec, "policy_bytes_peak", (double)policy_peak);
    /* sized by its content (any number of layers and sections); a record never goes out without it */
    cJSON *stack = s->router ? kvh_router_describe(s->router) : cJSON_CreateArray();
    if (!stack) return -1;
    cJSON_AddItemToObject(rec, "plugins", stack);
    return 0;
}

int kvh_cmd_generate(int argc, char **argv) {
    kvh_err err = {{0}};
    generate_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "generate", generate_usage, &err);
    if (outcome >= 0) return outcome;
    if (a.sampling.temperature == 0.0f && (a.sampling.top_k > 0 || a.sampling.top_p < 1.0f))
        fprintf(stderr, "kvhost generate: warning: --top-k / --top-p have no effect without --temperature > 0: "
                "decoding is greedy (transformers warns the same when do_sample is off)\n");
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_session *sess = NULL;
    char *file_text = NULL;
    size_t file_len = 0;
    int32_t *ids[MAX_PROMPTS] = {0};
    int lens[MAX_PROMPTS] = {0};
    int n_seq = 0;
    kvh_generate_result res;
    memset(&res, 0, sizeof res);
    double repeat_tps[1001];
    int n_repeat_tps = 0;
    bool have_res = false;

    if (kvh_cli_build_config(&a.common, &cfg, &err) != 0) goto fail_cfg;
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    const char *backend = kvh_cli_backend(&a.common, &cfg);
    int threads = kvh_cli_threads(&a.common, &cfg);
    if (a.prompt_file && kvh_read_text(a.prompt_file, MAX_PROMPT_FILE_BYTES, &file_text, &file_len, &err) != 0)
        goto fail;
    if (!a.prompt_file && a.n_prompts == 0 && a.prompt_tokens == 0) {
        kvh_fail(&err, "no prompt: give --prompt TEXT or --prompt-file FILE (an empty --prompt \"\" starts from "
                       "<|endoftext|>)");
        goto fail;
    }
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: timings and memory are real, the text is not.\n",
                model.name);

    int n_texts = a.prompt_file || a.prompt_tokens ? 1 : a.n_prompts;
    if (a.prompt_tokens) {
        if (a.prompt_tokens + a.max_new > model.cfg.n_positions) {
            kvh_fail(&err, "--prompt-tokens %d + --max-new %d exceeds n_positions %d", a.prompt_tokens, a.max_new,
                     model.cfg.n_positions);
            goto fail;
        }
        ids[0] = malloc((size_t)a.prompt_tokens * sizeof(int32_t));
        if (!ids[0]) {
            kvh_fail(&err, "out of memory");
            goto fail;
        }
        kvh_cli_synthetic_prompt(ids[0], a.prompt_tokens, model.cfg.n_vocab);
        lens[0] = a.prompt_tokens;
    }
    for (int p = 0; p < n_texts && !a.prompt_tokens; p++) {
        const char *text = a.prompt_file ? file_text : a.prompts[p];
        size_t len = a.prompt_file ? file_len : strlen(text);
        if (prepare_prompt(tok, &model, text, len, a.max_new, a.truncate, &ids[p], &lens[p], &err) != 0) {
            kvh_fail_prefix(&err, "prompt %d", p);
            goto fail;
        }
    }
    n_seq = n_texts;
    if (a.batch > 1) {
        if (a.batch > MAX_PROMPTS) {
            kvh_fail(&err, "--batch %d: at most %d", a.batch, MAX_PROMPTS);
            goto fail;
        }
        for (int b = 1; b < a.batch; b++) {
            ids[b] = malloc((size_t)lens[0] * sizeof(int32_t));
            if (!ids[b]) {
                kvh_fail(&err, "out of memory");
                goto fail;
            }
            memcpy(ids[b], ids[0], (size_t)lens[0] * sizeof(int32_t));
            lens[b] = lens[0];
        }
        n_seq = a.batch;
    }

    kvh_session_options so = kvh_cli_session_options(&a.common, &cfg, n_seq);
    if (kvh_session_create(&sess, &model, &cfg, &so, &err) != 0) goto fail;

    kvh_generate_request req = {
        .n_prompts = n_seq,
        .prompts = (const int32_t *const *)ids,
        .prompt_len = lens,
        .max_new = a.max_new,
        .sampling = a.sampling,
        .stop_at_eot = a.stop_eos,
        .eot_id = kvh_tokenizer_eot(tok),
        .stream = a.quiet ? NULL : stdout,
        .tok = tok,
    };
    /* Warm-up runs (untimed) then timed repeats, all in this process so no configuration is compared
     * cold against warm. Decode steps of the timed repeats are pooled into one distribution. */
    int total_runs = a.warmup + a.repeats;
    for (int r = 0; r < total_runs; r++) {
        bool last = r == total_runs - 1;
        for (int b = 0; b < n_seq; b++)
            if (kvh_session_reset_seq(sess, b, &err) != 0) goto fail;
        req.stream = (!a.quiet && last) ? stdout : NULL;
        if (req.stream && a.n_prompts > 0) fputs(a.prompts[0], stdout);
        kvh_generate_result one;
        if (kvh_generate(sess, &req, &one, &err) != 0) {
            if (req.stream) fputc('\n', stdout);
            goto fail;
        }
        if (r < a.warmup) {
            kvh_generate_result_free(&one);
            continue;
        }
        if (!have_res) {
            res = one;
            have_res = true;
            repeat_tps[n_repeat_tps++] = one.decode_tokens_per_s;
            continue;
        }
        /* pool this repeat's steps and timings into res */
        double *steps = realloc(res.step_ms, (size_t)(res.n_steps + one.n_steps + 1) * sizeof(double));
        if (!steps) {
            kvh_generate_result_free(&one);
            kvh_fail(&err, "out of memory");
            goto fail;
        }
        res.step_ms = steps;
        memcpy(res.step_ms + res.n_steps, one.step_ms, (size_t)one.n_steps * sizeof(double));
        res.n_steps += one.n_steps;
        res.prefill_ms += one.prefill_ms;
        res.total_ms += one.total_ms;
        res.hooks_ms += one.hooks_ms;
        res.times.embed += one.times.embed;
        res.times.attn_proj += one.times.attn_proj;
        res.times.attn_core += one.times.attn_core;
        res.times.mlp += one.times.mlp;
        res.times.lm_head += one.times.lm_head;
        repeat_tps[n_repeat_tps++] = one.decode_tokens_per_s;
        res.kv_bytes_held = one.kv_bytes_held;
        if (one.kv_bytes_peak > res.kv_bytes_peak) res.kv_bytes_peak = one.kv_bytes_peak;
        res.peak_rss = one.peak_rss;
        kvh_generate_result_free(&one);
    }
    if (a.repeats > 1) {
        /* averages per repeat; the decode distribution is pooled */
        int R = a.repeats;
        res.prefill_ms /= R;
        res.total_ms /= R;
        res.hooks_ms /= R;
        res.times.embed /= (uint64_t)R;
        res.times.attn_proj /= (uint64_t)R;
        res.times.attn_core /= (uint64_t)R;
        res.times.mlp /= (uint64_t)R;
        res.times.lm_head /= (uint64_t)R;
        kvh_latency_stats_compute(res.step_ms, res.n_steps, &res.decode);
        double sum = 0;
        for (int i = 0; i < res.n_steps; i++) sum += res.step_ms[i];
        res.decode_tokens_per_s = sum > 0 ? (double)res.n_steps * n_seq / (sum / 1e3) : 0;
    }
    if (!a.quiet) {
        fputc('\n', stdout);
        for (int b = 1; b < n_seq; b++) {
            char *text = NULL;
            size_t tl = 0;
            if (kvh_tokenizer_decode(tok, res.out[b], (size_t)res.n_out[b], &text, &tl, &err) != 0) {
                kvh_fail_prefix(&err, "sequence %d", b); /* never print a batch with a sequence missing */
                goto fail;
            }
            printf("--- sequence %d ---\n%s\n", b, text);
            free(text);
        }
    }
    fflush(stdout); /* the text ends before the summary starts, also when both go to a terminal */
    print_summary(stderr, "kvhost", &res, n_seq);

    if (a.common.json_path) {
        cJSON *rec = kvh_record_new("generate");
        if (!rec || kvh_add_run_fields(rec, &model, sess, &cfg, backend, threads) != 0) {
            cJSON_Delete(rec);
            kvh_fail(&err, "%s: out of memory building the record (nothing written)", a.common.json_path);
            goto fail;
        }
        cJSON_AddNumberToObject(rec, "batch", n_seq);
        cJSON *tags = cJSON_AddObjectToObject(rec, "tags");
        for (int t = 0; t < a.n_tags; t++) {
            const char *eq = strchr(a.tags[t], '=');
            char key[128];
            size_t kl = (size_t)(eq - a.tags[t]) < sizeof key - 1 ? (size_t)(eq - a.tags[t]) : sizeof key - 1;
            memcpy(key, a.tags[t], kl);
            key[kl] = '\0';
            cJSON_DeleteItemFromObject(tags, key);
            cJSON_AddStringToObject(tags, key, eq + 1);
        }
        cJSON *pl = cJSON_AddArrayToObject(rec, "prompt_tokens");
        for (int b = 0; b < n_seq; b++) cJSON_AddItemToArray(pl, cJSON_CreateNumber(lens[b]));
        cJSON *gl = cJSON_AddArrayToObject(rec, "generated_tokens");
        for (int b = 0; b < n_seq; b++) cJSON_AddItemToArray(gl, cJSON_CreateNumber(res.n_out[b]));
        /* the first generated ids of sequence 0, so runs of different engines can be cross-checked */
        cJSON *first = cJSON_AddArrayToObject(rec, "first_tokens");
        for (int i = 0; i < res.n_out[0] && i < 16; i++) cJSON_AddItemToArray(first, cJSON_CreateNumber(res.out[0][i]));
        cJSON_AddNumberToObject(rec, "prefill_ms", res.prefill_ms);
        kvh_record_add_latency(rec, "decode_step", &res.decode);
        cJSON_AddNumberToObject(rec, "decode_tokens_per_s", res.decode_tokens_per_s);
        cJSON_AddNumberToObject(rec, "warmup_runs", a.warmup);
        cJSON_AddNumberToObject(rec, "repeats", a.repeats);
        cJSON *rt = cJSON_AddArrayToObject(rec, "repeat_tokens_per_s");
        for (int i = 0; i < n_repeat_tps; i++) cJSON_AddItemToArray(rt, cJSON_CreateNumber(repeat_tps[i]));
        /* every matrix is read once per decode step: the fp32 ones at 4 bytes, packed ones at their size */
        cJSON_AddNumberToObject(rec, "weight_bytes_per_token", (double)kvh_weights_bytes_per_token(&model, sess->weights));
        cJSON_AddNumberToObject(rec, "kv_bytes_held", (double)res.kv_bytes_held);
        cJSON_AddNumberToObject(rec, "kv_bytes_peak", (double)res.kv_bytes_peak);
        cJSON_AddNumberToObject(rec, "kv_live_bytes", (double)res.kv_live_bytes);
        cJSON_AddNumberToObject(rec, "kv_live_tokens", (double)res.live_tokens);
        cJSON_AddNumberToObject(rec, "max_live_per_head", res.max_live_per_head);
        cJSON_AddNumberToObject(rec, "peak_rss_bytes", (double)res.peak_rss);
        kvh_record_add_phases(rec, &res.times, res.hooks_ms, res.total_ms);
        cJSON_AddNumberToObject(rec, "total_ms", res.total_ms);
        cJSON *samp = cJSON_AddObjectToObject(rec, "sampling");
        cJSON_AddNumberToObject(samp, "temperature", a.sampling.temperature);
        cJSON_AddNumberToObject(samp, "top_k", a.sampling.top_k);
        cJSON_AddNumberToObject(samp, "top_p", a.sampling.top_p);
        cJSON_AddNumberToObject(samp, "seed", (double)a.sampling.seed);
        int rc = kvh_jsonl_append(a.common.json_path, rec, &err);
        cJSON_Delete(rec);
        if (rc != 0) goto fail;
    }
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost generate: %s\n", err.msg);
    status = 1;
done:
    if (have_res) kvh_generate_result_free(&res);
    kvh_session_free(sess);
    for (int p = 0; p < MAX_PROMPTS; p++) free(ids[p]);
    free(file_text);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
fail_cfg:
    fprintf(stderr, "kvhost generate: %s\n", err.msg);
    kvh_config_free(&cfg);
    return 2;
}
