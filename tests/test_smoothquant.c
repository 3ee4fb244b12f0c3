/* test_smoothquant.c — smoothquant.so (SmoothQuant W8A8, plugins/weights/smoothquant.c), the calibration
 * statistics and their file (host/runtime/calibration.c), through the real plugin and session:
 *   - the product against the exact fp32 product, within the error int8 weights and int8 activations allow;
 *   - the VNNI and portable kernels agree bit for bit (both are integer sums);
 *   - prefill: many rows through matmul give each row's decode result bit for bit (KVP_CAP_MATMUL_PREFILL);
 *   - the paper's claim on a synthetic case: with an outlier input channel, smoothing by the calibration
 *     statistics beats no smoothing (statistics that make s = 1);
 *   - refusals: no statistics (with the HINT), a bad calibration file (wrong magic, shape, size, values);
 *   - `calibrate`'s collection: maxima equal the largest |x| of each channel; the file round-trips;
 *   - end to end: a session with statistics from the model itself stays close to fp32. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "runtime/calibration.h"
#include "runtime/config.h"
#include "backend/cpu_features.h"
#include "helpers/test_util.h"
#include "kvp/kvp.h"
#include "runtime/session.h"
#include "runtime/weights.h"

#define PDIR KVH_BUILD_DIR "/plugins"

typedef struct fake_host {
    kvp_host host;
    double alpha;
    char error[512];
} fake_host;

static void *f_alloc(void *ctx, size_t bytes) { (void)ctx; return calloc(1, bytes ? bytes : 1); }
static void f_free(void *ctx, void *p) { (void)ctx; free(p); }
static double f_param(void *ctx, const char *name) { return strcmp(name, "alpha") == 0 ? ((fake_host *)ctx)->alpha : 0; }
static void f_set_error(void *ctx, const char *msg) { snprintf(((fake_host *)ctx)->error, 512, "%s", msg); }
static void f_log(void *ctx, int level, const char *msg) { (void)ctx, (void)level, (void)msg; }

static const kvp_descriptor *load_sq(void **dl) {
    *dl = dlopen(PDIR "/smoothquant.so", RTLD_NOW | RTLD_LOCAL);
    cr_assert_not_null(*dl, "dlopen: %s", dlerror());
    void *sym = dlsym(*dl, KVP_ENTRY_SYMBOL);
    kvp_entry_fn fn;
    memcpy(&fn, &sym, sizeof fn);
    const kvp_descriptor *d = fn();
    cr_assert_eq(d->role, KVP_ROLE_WEIGHTS);
    return d;
}

static void *make(const kvp_descriptor *d, fake_host *f, uint32_t level, double alpha) {
    memset(f, 0, sizeof *f);
    f->host = (kvp_host){.struct_size = sizeof(kvp_host), .abi_major = KVP_ABI_MAJOR, .abi_minor = KVP_ABI_MINOR,
                         .ctx = f, .log = f_log, .set_error = f_set_error, .alloc = f_alloc, .free = f_free,
                         .param = f_param, .cpu_level = level};
    f->alpha = alpha;
    kvp_layer_info li = {.struct_size = sizeof li, .layer = 0, .n_layer = 1};
    kvp_instance inst = {.struct_size = sizeof inst};
    cr_assert_eq(d->create(&f->host, &li, &inst), KVP_OK);
    return inst.state;
}

static float frand(uint64_t *s) { return (float)((double)(kvh_test_xorshift(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0); }

/* Packs W (k x n input-major) with statistics act and runs x (rows x k); returns y (caller frees). */
static float *run(const kvp_descriptor *d, void *st, uint32_t k, uint32_t n, const float *W, const float *act,
                  const float *x, uint32_t rows) {
    kvp_weight_info info = {.struct_size = sizeof info, .layer = 0, .which = KVP_MAT_MLP_FC, .k = k, .n = n,
                            .act_absmax = act};
    const size_t bytes = d->packed_size(st, &info);
    cr_assert_gt(bytes, 0);
    void *packed = calloc(1, bytes);
    cr_assert_eq(d->pack(st, &info, W, KVP_LAYOUT_IN_MAJOR, packed), KVP_OK);
    info.act_absmax = NULL;
    float *y = calloc((size_t)rows * n, sizeof(float));
    kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = rows, .n0 = 0,
                         .n1 = n, .y = y, .ldy = n};
    d->matmul(st, &a);
    free(packed);
    return y;
}

/* Sum over outputs of |y - exact| / sum_i |x_i W_ij|: the product's relative error. */
static double rel_error(const float *y, const float *W, const float *x, uint32_t k, uint32_t n, uint32_t rows) {
    double err = 0, mag = 0;
    for (uint32_t r = 0; r < rows; r++)
        for (uint32_t j = 0; j < n; j++) {
            double exact = 0, m = 0;
            for (uint32_t i = 0; i < k; i++) {
                exact += (double)x[r * k + i] * W[(size_t)i * n + j];
                m += fabs((double)x[r * k + i] * W[(size_t)i * n + j]);
            }
            err += fabs(y[r * n + j] - exact);
            mag += m;
        }
    return err / mag;
}

Test(smoothquant, product_within_w8a8_error_and_kernels_agree) {
    void *dl;
    const kvp_descriptor *d = load_sq(&dl);
    const uint32_t k = 96, n = 37, rows = 3; /* k = 64 + a 32 tail for the VNNI kernel */
    uint64_t seed = 42;
    float *W = malloc((size_t)k * n * sizeof(float)), *x = malloc((size_t)rows * k * sizeof(float)), act[96];
    for (size_t i = 0; i < (size_t)k * n; i++) W[i] = 0.1f * frand(&seed);
    for (uint32_t i = 0; i < k; i++) act[i] = 0.0f;
    for (uint32_t r = 0; r < rows; r++)
        for (uint32_t i = 0; i < k; i++) {
            x[r * k + i] = frand(&seed);
            if (fabsf(x[r * k + i]) > act[i]) act[i] = fabsf(x[r * k + i]);
        }
    fake_host f;
    void *st = make(d, &f, KVP_CPU_PORTABLE, 0.5);
    float *y = run(d, st, k, n, W, act, x, rows);
    /* each product carries at most half a step of both operands: about 2 x 0.5 / 127 relative, far less on average */
    const double e = rel_error(y, W, x, k, n, rows);
    cr_log_info("W8A8 relative error %.3g", e);
    cr_expect_lt(e, 0.5 / 127, "relative error %g", e);
    d->destroy(st);
    if (kvh_cpu_isa_detected() >= KVH_ISA_AVX512 && __builtin_cpu_supports("avx512vnni")) {
        fake_host g;
        void *st2 = make(d, &g, KVP_CPU_AVX512, 0.5);
        float *y2 = run(d, st2, k, n, W, act, x, rows);
        cr_expect(memcmp(y, y2, (size_t)rows * n * sizeof(float)) == 0, "VNNI and portable results differ");
        free(y2);
        d->destroy(st2);
    } else {
        cr_log_warn("no AVX-512 VNNI here: only the portable kernel ran");
    }
    free(y);
    free(W);
    free(x);
    dlclose(dl);
}

/* The host calls matmul for prefill pieces too (KVP_CAP_MATMUL_PREFILL, no KVP_CAP_ACT_QUANT): many rows,
 * quantized a chunk at a time and multiplied in tiles, give each row's one-row (decode) result bit for
 * bit, with both kernels, whatever the output range; an all-zero row adds nothing. */
Test(smoothquant, prefill_rows_equal_decode_rows_bit_for_bit) {
    void *dl;
    const kvp_descriptor *d = load_sq(&dl);
    cr_assert(d->caps & KVP_CAP_MATMUL_PREFILL);
    cr_assert(!(d->caps & KVP_CAP_ACT_QUANT));
    const uint32_t shapes[][3] = {{96, 37, 23}, {1024, 21, 600}}; /* k % 64 = 32; 600 rows: two chunks */
    const int vnni = kvh_cpu_isa_detected() >= KVH_ISA_AVX512 && __builtin_cpu_supports("avx512vnni");
    for (size_t si = 0; si < 2; si++) {
        const uint32_t k = shapes[si][0], n = shapes[si][1], rows = shapes[si][2];
        uint64_t seed = 9 + k;
        float *W = malloc((size_t)k * n * sizeof(float)), *x = malloc((size_t)rows * k * sizeof(float));
        float *act = malloc(k * sizeof(float));
        for (size_t i = 0; i < (size_t)k * n; i++) W[i] = 0.1f * frand(&seed);
        for (uint32_t i = 0; i < k; i++) act[i] = 0.0f;
        for (uint32_t r = 0; r < rows; r++)
            for (uint32_t i = 0; i < k; i++) {
                x[(size_t)r * k + i] = r == 3 ? 0.0f : frand(&seed);
                if (fabsf(x[(size_t)r * k + i]) > act[i]) act[i] = fabsf(x[(size_t)r * k + i]);
            }
        float *first = NULL;
        for (int level = 0; level < (vnni ? 2 : 1); level++) {
            fake_host f;
            void *st = make(d, &f, level ? KVP_CPU_AVX512 : KVP_CPU_PORTABLE, 0.5);
            kvp_weight_info info = {.struct_size = sizeof info, .layer = 0, .which = KVP_MAT_MLP_FC, .k = k, .n = n,
                                    .act_absmax = act};
            void *packed = calloc(1, d->packed_size(st, &info));
            cr_assert_eq(d->pack(st, &info, W, KVP_LAYOUT_IN_MAJOR, packed), KVP_OK);
            info.act_absmax = NULL;
            float *y = calloc((size_t)rows * n, sizeof(float)), *y1 = malloc(n * sizeof(float));
            const uint32_t split = n / 2; /* two threads' ranges */
            for (int t = 0; t < 2; t++) {
                kvp_matmul_args a = {.struct_size = sizeof a, .w = &info, .packed = packed, .x = x, .rows = rows,
                                     .n0 = t ? split : 0, .n1 = t ? n : split, .y = y, .ldy = n};
                d->matmul(st, &a);
            }
            for (uint32_t r = 0; r < rows; r++) {
                memset(y1, 0, n * sizeof(float));
                kvp_matmul_args b = {.struct_size = sizeof b, .w = &info, .packed = packed, .x = x + (size_t)r * k,
                                     .rows = 1, .n0 = 0, .n1 = n, .y = y1, .ldy = n};
                d->matmul(st, &b);
                cr_assert(memcmp(y1, y + (size_t)r * n, n * sizeof(float)) == 0, "%s k %u: row %u of %u differs from its decode product",
                          level ? "VNNI" : "portable", k, r, rows);
                if (r == 3)
                    for (uint32_t j = 0; j < n; j++) cr_assert_eq(y1[j], 0.0f);
            }
            if (!first) first = y;
            else {
                cr_assert(memcmp(first, y, (size_t)rows * n * sizeof(float)) == 0, "k %u: VNNI and portable differ", k);
                free(y);
            }
            free(y1);
            free(packed);
            d->destroy(st);
        }
        free(first);
        free(W);
        free(x);
        free(act);
    }
    dlclose(dl);
}

Test(smoothquant, smoothing_beats_none_with_an_outlier_channel) {
    void *dl;
    const kvp_descriptor *d = load_sq(&dl);
    const uint32_t k = 64, n = 32, rows = 8;
    uint64_t seed = 7;
    float *W = malloc((size_t)k * n * sizeof(float)), *x = malloc((size_t)rows * k * sizeof(float));
    float act[64] = {0}, wmax[64] = {0};
    for (uint32_t i = 0; i < k; i++)
        for (uint32_t j = 0; j < n; j++) {
            W[(size_t)i * n + j] = 0.05f * frand(&seed);
            if (fabsf(W[(size_t)i * n + j]) > wmax[i]) wmax[i] = fabsf(W[(size_t)i * n + j]);
        }
    for (uint32_t r = 0; r < rows; r++)
        for (uint32_t i = 0; i < k; i++) {
            x[r * k + i] = (i == 5 ? 60.0f : 1.0f) * frand(&seed); /* channel 5: an LLM-style outlier */
            if (fabsf(x[r * k + i]) > act[i]) act[i] = fabsf(x[r * k + i]);
        }
    fake_host f;
    void *st = make(d, &f, KVP_CPU_PORTABLE, 0.5);
    float *smooth = run(d, st, k, n, W, act, x, rows);
    float *none = run(d, st, k, n, W, wmax, x, rows); /* statistics equal to max|W_i|: s_i = 1 at alpha 0.5 */
    const double es = rel_error(smooth, W, x, k, n, rows), en = rel_error(none, W, x, k, n, rows);
    cr_log_info("relative error: smoothed %.3g, unsmoothed %.3g", es, en);
    cr_expect_lt(es, 0.5 * en, "smoothing did not help: %g vs %g", es, en);
    d->destroy(st);
    free(smooth);
    free(none);
    free(W);
    free(x);
    dlclose(dl);
}

Test(smoothquant, refuses_without_statistics_with_a_hint) {
    void *dl;
    const kvp_descriptor *d = load_sq(&dl);
    fake_host f;
    void *st = make(d, &f, KVP_CPU_PORTABLE, 0.5);
    kvp_weight_info info = {.struct_size = sizeof info, .layer = 2, .which = KVP_MAT_ATTN_PROJ, .k = 64, .n = 64};
    cr_expect_eq(d->packed_size(st, &info), 0);
    cr_expect(strstr(f.error, "attn.c_proj of layer 2: no calibration statistics") && strstr(f.error, "kvhost calibrate"),
              "'%s'", f.error);
    d->destroy(st);
    dlclose(dl);
}

static kvh_model_config small_config(void) {
    kvh_model_config c = {.n_vocab = 97, .n_positions = 128, .n_embd = 64, .n_head = 4, .n_layer = 2,
                          .n_inner = 256, .ln_eps = 1e-5f, .bos_id = 0};
    return c;
}

Test(smoothquant, calibration_collects_maxima_and_round_trips) {
    kvh_model_config c = small_config();
    kvh_calibration cal;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_calibration_init(&cal, &c, &err), 0);
    float x[2 * 256];
    for (int i = 0; i < 2 * 256; i++) x[i] = (float)((i * 37) % 101) - 50.0f;
    kvh_calibration_observe(&cal, 1, KVP_MAT_MLP_PROJ, x, 2, 256);
    const float *m = kvh_calibration_input(&cal, 1, KVP_MAT_MLP_PROJ);
    for (int i = 0; i < 256; i++)
        cr_assert_eq(m[i], fmaxf(fabsf(x[i]), fabsf(x[256 + i])), "channel %d", i);
    cr_expect_eq(kvh_calibration_input(&cal, 0, KVP_MAT_ATTN_QKV)[3], 0.0f, "another matrix changed");
    char path[512];
    snprintf(path, sizeof path, "%s/t.kvcal", kvh_test_tmpdir());
    cr_assert_eq(kvh_calibration_save(&cal, path, &err), 0, "%s", err.msg);
    kvh_calibration back;
    cr_assert_eq(kvh_calibration_load(&back, path, &c, &err), 0, "%s", err.msg);
    cr_expect(memcmp(back.absmax, cal.absmax, cal.n_floats * sizeof(float)) == 0);
    /* a model of another shape is refused, naming both shapes */
    kvh_model_config other = c;
    other.n_layer = 3;
    cr_expect_neq(kvh_calibration_load(&back, path, &other, &err), 0);
    cr_expect(strstr(err.msg, "made for a model of 2 layers") && strstr(err.msg, "this model has 3"), "%s", err.msg);
    kvh_calibration_free(&cal);
    kvh_calibration_free(&back);
}

Test(smoothquant, bad_calibration_files_are_refused_by_field) {
    kvh_model_config c = small_config();
    kvh_calibration cal;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_calibration_init(&cal, &c, &err), 0);
    char path[512];
    snprintf(path, sizeof path, "%s/bad.kvcal", kvh_test_tmpdir());
    cr_assert_eq(kvh_calibration_save(&cal, path, &err), 0);
    FILE *f = fopen(path, "r+b");
    cr_assert_not_null(f);
    const float bad = -1.0f;
    fseek(f, 8 + 16 + 8 + 4 * 10, SEEK_SET); /* statistic 10 */
    fwrite(&bad, 4, 1, f);
    fclose(f);
    kvh_calibration back;
    cr_expect_neq(kvh_calibration_load(&back, path, &c, &err), 0);
    cr_expect(strstr(err.msg, "statistic 10 is -1"), "%s", err.msg);
    const char *junk = kvh_test_write_file("junk.kvcal", "GGUF....", 8);
    cr_expect_neq(kvh_calibration_load(&back, junk, &c, &err), 0);
    cr_expect(strstr(err.msg, "not a kvhost calibration file") && strstr(err.msg, "kvhost calibrate"), "%s", err.msg);
    kvh_calibration_free(&cal);
}

Test(smoothquant, session_with_own_statistics_stays_close_to_fp32) {
    kvh_model_config c = small_config();
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&m, &c, 9, "random:small", &err), 0, "%s", err.msg);
    /* statistics: the fp32 model over a few token sequences */
    kvh_session_options o = kvh_session_default_options();
    o.threads = 2;
    kvh_session *fp = NULL;
    cr_assert_eq(kvh_session_create(&fp, &m, NULL, &o, &err), 0, "%s", err.msg);
    kvh_calibration cal;
    cr_assert_eq(kvh_calibration_init(&cal, &c, &err), 0);
    fp->backend->calibration = &cal;
    int32_t toks[40];
    for (int i = 0; i < 40; i++) toks[i] = (int32_t)((i * 13 + 5) % c.n_vocab);
    float *logits = malloc((size_t)40 * c.n_vocab * sizeof(float)), *ref = malloc((size_t)c.n_vocab * sizeof(float));
    int seq = 0, n = 40;
    const int32_t *tp = toks;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &tp, .n_tokens = &n, .all_logits = true};
    cr_assert_eq(kvh_session_forward(fp, &b, logits, &err), 0, "%s", err.msg);
    fp->backend->calibration = NULL;
    char path[512];
    snprintf(path, sizeof path, "%s/own.kvcal", kvh_test_tmpdir());
    cr_assert_eq(kvh_calibration_save(&cal, path, &err), 0, "%s", err.msg);
    /* without the file: refused with the hint; with it: decode logits near the fp32 ones */
    kvh_session *sq = NULL;
    cr_expect_neq(kvh_test_session(&sq, &m, "smoothquant.so", NULL, 0, &o, &err), 0);
    cr_expect(strstr(err.msg, "no calibration statistics"), "%s", err.msg);
    o.calibration = path;
    cr_assert_eq(kvh_test_session(&sq, &m, "smoothquant.so", NULL, 0, &o, &err), 0, "%s", err.msg);
    cr_assert_not_null(sq->weights);
    kvh_session_reset_seq(fp, 0, &err);
    double worst = 0;
    for (int t = 0; t < 20; t++) {
        const int32_t *one = &toks[t];
        int n1 = 1;
        kvh_batch d = {.n = 1, .seq = &seq, .tokens = &one, .n_tokens = &n1, .all_logits = false};
        cr_assert_eq(kvh_session_forward(fp, &d, ref, &err), 0, "%s", err.msg);
        cr_assert_eq(kvh_session_forward(sq, &d, logits, &err), 0, "%s", err.msg);
        double span = 0;
        for (int v = 0; v < c.n_vocab; v++) span = fmax(span, fabs(ref[v]));
        for (int v = 0; v < c.n_vocab; v++) worst = fmax(worst, fabs(logits[v] - ref[v]) / span);
    }
    cr_log_info("smoothquant vs fp32: largest logit difference %.3g of the logit range", worst);
    cr_expect_lt(worst, 0.05, "W8A8 logits drift %.3g of their range from fp32", worst);
    kvh_session_free(sq);
    kvh_session_free(fp);
    kvh_calibration_free(&cal);
    free(logits);
    free(ref);
    kvh_model_free(&m);
}

Test(smoothquant, run_file_calibration_key_is_relative_to_the_run_file) {
    char dir[512], ini[600];
    snprintf(dir, sizeof dir, "%s/runs", kvh_test_tmpdir());
    mkdir(dir, 0700);
    snprintf(ini, sizeof ini, "%s/sq.ini", dir);
    FILE *f = fopen(ini, "w");
    cr_assert_not_null(f);
    fputs("[model]\ncalibration = stats/tiny.kvcal\n\n[smoothquant]\nalpha = 0.7\n", f);
    fclose(f);
    kvh_run_config cfg;
    kvh_config_defaults(&cfg);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_config_load_ini(&cfg, ini, &err), 0, "%s", err.msg);
    char want[700];
    snprintf(want, sizeof want, "%s/stats/tiny.kvcal", dir);
    cr_expect_str_eq(cfg.calibration, want);
    /* written back, and an empty value or a repeated key refused with the line */
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    cr_assert_eq(kvh_config_write_ini(&cfg, m), 0);
    fclose(m);
    cr_expect(strstr(text, "calibration = ") != NULL, "%s", text);
    free(text);
    kvh_config_free(&cfg);
    kvh_config_defaults(&cfg);
    cr_expect_neq(kvh_config_load_string(&cfg, "[model]\ncalibration =\n", "e.ini", &err), 0);
    cr_expect(strstr(err.msg, "e.ini:2") && strstr(err.msg, "calibration is empty"), "%s", err.msg);
    kvh_config_free(&cfg);
    kvh_config_defaults(&cfg);
    cr_expect_neq(kvh_config_load_string(&cfg, "[model]\ncalibration = a\ncalibration = b\n", "d.ini", &err), 0);
    cr_expect(strstr(err.msg, "d.ini:3") && strstr(err.msg, "duplicate key 'calibration'"), "%s", err.msg);
    kvh_config_free(&cfg);
}
