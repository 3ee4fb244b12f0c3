/* cmd_logits.c — `kvhost logits`: the logits (or log-probabilities) of every position of a prompt, from
 * one prefill, written as a NumPy .npy file [T, V] float32, so kvhost's numbers can be compared with any
 * framework (numpy.load, torch.from_numpy) without linking the core library.
 * Owns: the command's options, the .npy writer (format 1.0, little-endian '<f4', C order), the log-softmax.
 * Does not own: the forward pass (session.c), tokenization (tokenizer.c). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "runtime/session.h"
#include "model/tokenizer.h"

#define MAX_PROMPT_FILE_BYTES (64u << 20)

static const char *const logits_usage =
    "usage: kvhost logits [--model SPEC] (--prompt TEXT | --prompt-file FILE | --ids \"464 2106 ...\")\n"
    "                     --out FILE.npy [--log-probs] [--eot-text] [common options]\n"
    "\n"
    "Runs the prompt as one prefill and writes the logits of every position, a [T, V] float32 array in\n"
    "NumPy's .npy format (row t is the distribution of token t+1). Prints the prompt's token ids.\n"
    "Compare with transformers: GPT2LMHeadModel(...)(torch.tensor([ids])).logits[0].\n"
    "\n"
    "  --prompt TEXT      the text (<|endoftext|> in it is the token 50256, as in generate)\n"
    "  --prompt-file FILE read it from FILE (at most 64 MiB)\n"
    "  --ids LIST         token ids instead of text (spaces or commas)\n"
    "  --out FILE         where the .npy goes (written to FILE.tmp, then renamed)\n"
    "  --log-probs        write log-softmax(logits) instead (in double, then stored as float32)\n"
    "  --eot-text         encode <|endoftext|> as ordinary text\n"
    "\n";

typedef struct logits_args {
    kvh_cli_common common;
    const char *prompt, *prompt_file, *ids, *out;
    bool log_probs, eot_text;
} logits_args;

static int parse_args(int argc, char **argv, logits_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (strcmp(o, "--log-probs") == 0) { a->log_probs = true; i++; continue; }
        if (strcmp(o, "--eot-text") == 0) { a->eot_text = true; i++; continue; }
        if (o[0] != '-' || !v) return kvh_fail(err, "logits: unknown argument '%s' (see kvhost logits --help)", o);
        if (strcmp(o, "--prompt") == 0) a->prompt = v;
        else if (strcmp(o, "--prompt-file") == 0) a->prompt_file = v;
        else if (strcmp(o, "--ids") == 0) a->ids = v;
        else if (strcmp(o, "--out") == 0) a->out = v;
        else return kvh_fail(err, "logits: unknown option '%s' (see kvhost logits --help)", o);
        i += 2;
    }
    if ((a->prompt != NULL) + (a->prompt_file != NULL) + (a->ids != NULL) != 1)
        return kvh_fail(err, "give one of --prompt, --prompt-file or --ids");
    if (!a->out) return kvh_fail(err, "give --out FILE.npy");
    if (a->common.json_path) return kvh_fail(err, "logits writes no record: --json is not taken here");
    return kvh_cli_check_output("--out", a->out, true, err);
}

static int parse_id_list(const char *s, int vocab, int32_t **out, size_t *n, kvh_err *err) {
    size_t cap = 0;
    *out = NULL;
    *n = 0;
    for (size_t i = 0; s[i];) {
        if (s[i] == ' ' || s[i] == ',' || s[i] == '\t' || s[i] == '\n') {
            i++;
            continue;
        }
        char *end;
        errno = 0;
        long v = strtol(s + i, &end, 10);
        if (end == s + i || s[i] == '-' || s[i] == '+' || errno || v >= vocab)
            return kvh_fail(err, "--ids: '%.20s' at byte %zu is not an id in 0..%d", s + i, i, vocab - 1);
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            int32_t *g = realloc(*out, cap * sizeof **out);
            if (!g) return kvh_fail(err, "--ids: out of memory");
            *out = g;
        }
        (*out)[(*n)++] = (int32_t)v;
        i = (size_t)(end - s);
    }
    if (*n == 0) return kvh_fail(err, "--ids: no ids");
    return 0;
}

/* NumPy .npy 1.0: magic, version, header length (u16 LE), a Python dict literal padded with spaces and
 * ending in '\n' so that the data starts on a multiple of 64 bytes, then the data (little-endian). */
static int write_npy(const char *path, const float *x, size_t rows, size_t cols, kvh_err *err) {
    char dict[128];
    int dl = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%zu, %zu), }", rows, cols);
    size_t total = 10 + (size_t)dl + 1;
    size_t pad = (64 - total % 64) % 64;
    size_t hlen = (size_t)dl + pad + 1;
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) return kvh_fail(err, "%s: path too long", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return kvh_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    unsigned char head[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hlen & 0xff),
                              (unsigned char)(hlen >> 8)};
    bool ok = fwrite(head, 1, 10, f) == 10 && fwrite(dict, 1, (size_t)dl, f) == (size_t)dl;
    for (size_t i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF;
    /* x86-64 and aarch64 Linux are little-endian, as '<f4' says */
    ok = ok && fwrite(x, sizeof(float), rows * cols, f) == rows * cols;
    int e = errno;
    if (fclose(f) != 0 && ok) {
        ok = false;
        e = errno;
    }
    if (!ok || rename(tmp, path) != 0) {
        if (ok) e = errno;
        remove(tmp);
        return kvh_fail(err, "%s: writing failed: %s", path, strerror(e));
    }
    return 0;
}

int kvh_cmd_logits(int argc, char **argv) {
    kvh_err err = {{0}};
    logits_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "logits", logits_usage, &err);
    if (outcome >= 0) return outcome;
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_session *sess = NULL;
    char *text = NULL;
    size_t text_len = 0, n = 0;
    int32_t *ids = NULL;
    float *logits = NULL;
    if (kvh_cli_start_config("logits", &a.common, &cfg) != 0) return 2;
    if (a.prompt_file && kvh_read_text(a.prompt_file, MAX_PROMPT_FILE_BYTES, &text, &text_len, &err) != 0) goto fail;
    if (kvh_cli_load_model(kvh_cli_model_spec(&a.common, &cfg), &model, &tok, &err) != 0) goto fail;
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: its logits are meaningless.\n", model.name);
    const int V = model.cfg.n_vocab;
    if (a.ids) {
        if (parse_id_list(a.ids, V, &ids, &n, &err) != 0) goto fail;
    } else {
        const char *t = a.prompt_file ? text : a.prompt;
        size_t len = a.prompt_file ? text_len : strlen(t);
        if (kvh_tokenizer_encode(tok, t, len, a.eot_text ? 0 : 1, &ids, &n, &err) != 0) goto fail;
        if (n == 0) {
            kvh_fail(&err, "the prompt is empty: give at least one token (\"<|endoftext|>\" is id 50256)");
            goto fail;
        }
    }
    if (n > (size_t)model.cfg.n_positions) {
        kvh_fail(&err, "the prompt has %zu tokens, more than n_positions %d", n, model.cfg.n_positions);
        goto fail;
    }
    logits = malloc(n * (size_t)V * sizeof(float)); /* [T, V]; T <= 65536 and V <= 1e6 (model_config.c) */
    if (!logits) {
        kvh_fail(&err, "out of memory for %zu x %d logits", n, V);
        goto fail;
    }
    kvh_session_options so = kvh_cli_session_options(&a.common, &cfg, 1);
    if (kvh_session_create(&sess, &model, &cfg, &so, &err) != 0) goto fail;
    int seq = 0, T = (int)n;
    const int32_t *tp = ids;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &T, .all_logits = true};
    if (kvh_session_forward(sess, &b, logits, &err) != 0) goto fail;
    if (a.log_probs)
        for (size_t t = 0; t < n; t++) {
            float *row = logits + t * (size_t)V;
            double mx = row[0], s = 0.0;
            for (int i = 1; i < V; i++) mx = row[i] > mx ? row[i] : mx;
            for (int i = 0; i < V; i++) s += exp((double)row[i] - mx);
            double lse = mx + log(s);
            for (int i = 0; i < V; i++) row[i] = (float)((double)row[i] - lse);
        }
    if (write_npy(a.out, logits, n, (size_t)V, &err) != 0) goto fail;
    printf("ids:");
    for (size_t i = 0; i < n; i++) printf(" %d", (int)ids[i]);
    printf("\nwrote %s [%zu, %d] float32 %s (%s)\n", a.out, n, V, a.log_probs ? "log-probs" : "logits", model.name);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost logits: %s\n", err.msg);
done:
    kvh_session_free(sess);
    free(logits);
    free(ids);
    free(text);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
}
