/* cmd_calibrate.c — `kvhost calibrate`: activation statistics of every linear input over a text, for weight
 * formats that scale by them (smoothquant.so). Owns: the command's options, running the fp32 model over the
 * text in chunks with the backend collecting (calibration.h), the summary and the .kvcal file. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/calibration.h"
#include "cli/cli.h"
#include "cli/commands.h"
#include "kvp/kvp.h"
#include "runtime/session.h"
#include "model/tokenizer.h"

#define MAX_TEXT_FILE_BYTES (512u << 20)

static const char *const calibrate_usage =
    "usage: kvhost calibrate [--model SPEC] --text-file FILE --out FILE.kvcal [options]\n"
    "\n"
    "Runs the model (fp32 weights, no plugins) over the text in chunks of --ctx tokens and records, for every\n"
    "linear layer's input, the largest |x| of each channel. SmoothQuant (smoothquant.so) reads the file\n"
    "through [model] calibration = FILE.kvcal (or --set model.calibration=FILE.kvcal). Calibrate on text\n"
    "like what the model will see, never on the text you evaluate on.\n"
    "\n"
    "  --text-file FILE   the calibration text (at most 512 MiB)\n"
    "  --out FILE         the statistics file to write (written whole or not at all)\n"
    "  --max-tokens N     use only the first N tokens (default 8192)\n"
    "  --ctx N            chunk length, 2..n_positions (default 512)\n"
    "\n";

typedef struct calibrate_args {
    kvh_cli_common common;
    const char *text_file, *out;
    long max_tokens;
    int ctx;
} calibrate_args;

static int parse_args(int argc, char **argv, calibrate_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->max_tokens = 8192;
    a->ctx = 512;
    for (int i = 1; i < argc;) {
        int r = kvh_cli_common_parse(&a->common, argc, argv, &i, err);
        if (r < 0) return -1;
        if (r > 0) continue;
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        long n;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (o[0] != '-' || !v) return kvh_fail(err, "calibrate: unknown argument '%s' (see kvhost calibrate --help)", o);
        if (strcmp(o, "--text-file") == 0) {
            a->text_file = v;
        } else if (strcmp(o, "--out") == 0) {
            a->out = v;
        } else if (strcmp(o, "--max-tokens") == 0) {
            if (kvh_cli_parse_int(v, 2, 1L << 40, &n)) return kvh_fail(err, "--max-tokens '%s': expected a whole number >= 2", v);
            a->max_tokens = n;
        } else if (strcmp(o, "--ctx") == 0) {
            if (kvh_cli_parse_int(v, 2, 1 << 24, &n)) return kvh_fail(err, "--ctx '%s': expected a whole number >= 2", v);
            a->ctx = (int)n;
        } else {
            return kvh_fail(err, "calibrate: unknown option '%s' (see kvhost calibrate --help)", o);
        }
        i += 2;
    }
    if (!a->text_file) return kvh_fail(err, "no text: give --text-file FILE");
    if (!a->out) return kvh_fail(err, "no output: give --out FILE.kvcal");
    return 0;
}

static int cmp_float(const void *x, const void *y) {
    const float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* Outlier strength of one input: largest channel maximum over the median channel maximum. */
static double outlier_ratio(const float *m, int n, float *scratch) {
    memcpy(scratch, m, (size_t)n * sizeof(float));
    qsort(scratch, (size_t)n, sizeof(float), cmp_float);
    const double med = scratch[n / 2];
    return med > 0 ? scratch[n - 1] / med : 0.0;
}

int kvh_cmd_calibrate(int argc, char **argv) {
    kvh_err err = {{0}};
    calibrate_args a;
    int outcome = kvh_cli_parse_outcome(parse_args(argc, argv, &a, &err), "calibrate", calibrate_usage, &err);
    if (outcome >= 0) return outcome;
    int status = 1;
    kvh_run_config cfg;
    kvh_model model;
    memset(&model, 0, sizeof model);
    kvh_tokenizer *tok = NULL;
    kvh_session *sess = NULL;
    kvh_calibration cal;
    memset(&cal, 0, sizeof cal);
    char *text = NULL;
    size_t text_len = 0;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    float *logits = NULL, *scratch = NULL;

    if (kvh_cli_start_config("calibrate", &a.common, &cfg) != 0) return 2;
    if (kvh_cli_check_output("--out", a.out, true, &err) != 0) {
        fprintf(stderr, "kvhost calibrate: %s\n", err.msg);
        kvh_config_free(&cfg);
        return 2;
    }
    if (cfg.n_sections > 0)
        fprintf(stderr, "kvhost calibrate: the run's plugins are ignored: statistics come from the fp32 model\n");
    const char *spec = kvh_cli_model_spec(&a.common, &cfg);
    if (kvh_read_text(a.text_file, MAX_TEXT_FILE_BYTES, &text, &text_len, &err) != 0) goto fail;
    if (kvh_cli_load_model(spec, &model, &tok, &err) != 0) goto fail;
    if (model.is_random)
        fprintf(stderr, "kvhost: %s has seeded random weights: its statistics describe nothing real.\n", model.name);
    const int ctx = a.ctx < model.cfg.n_positions ? a.ctx : model.cfg.n_positions;
    if (kvh_tokenizer_encode(tok, text, text_len, 0, &ids, &n_ids, &err) != 0) {
        kvh_fail_prefix(&err, "%s", a.text_file);
        goto fail;
    }
    if ((size_t)a.max_tokens < n_ids) n_ids = (size_t)a.max_tokens;
    if (n_ids < 2) {
        kvh_fail(&err, "%s: %zu token(s); calibration needs at least 2", a.text_file, n_ids);
        goto fail;
    }
    /* the fp32 model over the whole text: no plugins, no calibration, no --no-cache or --mem-limit */
    kvh_session_options so = kvh_cli_session_options(&a.common, &cfg, 1);
    so.no_cache = false;
    so.kv_mem_limit = 0;
    so.calibration = NULL;
    if (kvh_session_create(&sess, &model, NULL, &so, &err) != 0) goto fail;
    if (strcmp(sess->backend->ops->name, "cpu") != 0) {
        kvh_fail(&err, "calibration runs on the cpu backend only (got %s). HINT: --backend cpu", sess->backend->ops->name);
        goto fail;
    }
    if (kvh_calibration_init(&cal, &model.cfg, &err) != 0) goto fail;
    sess->backend->calibration = &cal;
    logits = malloc((size_t)ctx * (size_t)model.cfg.n_vocab * sizeof(float));
    scratch = malloc((size_t)(model.cfg.n_inner > model.cfg.n_embd ? model.cfg.n_inner : model.cfg.n_embd) * sizeof(float));
    if (!logits || !scratch) {
        kvh_fail(&err, "out of memory for %d x %d logits", ctx, model.cfg.n_vocab);
        goto fail;
    }
    for (size_t at = 0; at < n_ids; at += (size_t)ctx) {
        int n = (int)(n_ids - at < (size_t)ctx ? n_ids - at : (size_t)ctx), seq = 0;
        const int32_t *chunk = ids + at;
        if (kvh_session_reset_seq(sess, 0, &err) != 0) goto fail;
        /* every row's logits, so the LM head's input statistics cover every token too */
        kvh_batch b = {.n = 1, .seq = &seq, .tokens = &chunk, .n_tokens = &n, .all_logits = true};
        if (kvh_session_forward(sess, &b, logits, &err) != 0) goto fail;
    }
    sess->backend->calibration = NULL;
    if (kvh_calibration_save(&cal, a.out, &err) != 0) goto fail;
    double worst = 0;
    int worst_layer = 0;
    for (int l = 0; l < cal.n_layer; l++) {
        const double r = outlier_ratio(kvh_calibration_input(&cal, l, KVP_MAT_ATTN_QKV), cal.n_embd, scratch);
        if (r > worst) worst = r, worst_layer = l;
    }
    printf("kvhost calibrate: %s over %llu tokens of %s (chunks of %d) -> %s\n", model.name,
           (unsigned long long)cal.tokens, a.text_file, ctx, a.out);
    printf("largest channel / median channel of the attention inputs: %.1f (layer %d)\n", worst, worst_layer);
    status = 0;
    goto done;
fail:
    fprintf(stderr, "kvhost calibrate: %s\n", err.msg);
    status = 1;
done:
    if (sess) sess->backend->calibration = NULL;
    kvh_calibration_free(&cal);
    free(logits);
    free(scratch);
    kvh_session_free(sess);
    free(ids);
    free(text);
    kvh_tokenizer_free(tok);
    kvh_model_free(&model);
    kvh_config_free(&cfg);
    return status;
}
