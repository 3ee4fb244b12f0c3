/* test_model.c — Criterion suite for host/model/model.c and host/model/model_config.c.
 * Owns: presets and parameter counts, config.json parsing and its errors, loading the shared tiny model
 * (spot values read independently with Python), tiny Hugging Face directories written by the tests
 * (F16 / BF16 / F32, with and without the "transformer." prefix, plus broken variants), random weights
 * (determinism, thread-count independence, init statistics). */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "model/model.h"

#ifndef KVH_SHARED_DIR
#define KVH_SHARED_DIR "/work/shared"
#endif

static char g_dir[256];

static void make_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/kvh_model_test_XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir), "mkdtemp failed");
}

static void remove_dir(void) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
}

TestSuite(model, .init = make_dir, .fini = remove_dir);

static bool all_zero(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i]) return false;
    return true;
}

/* ---- presets and config ----------------------------------------------------------------------- */

Test(model, presets_and_param_counts) {
    /* Published GPT-2 parameter counts (tied LM head counted once). */
    struct {
        const char *name;
        int L, C, NH;
        size_t params;
    } want[] = {
        {"gpt2", 12, 768, 12, 124439808u},
        {"gpt2-medium", 24, 1024, 16, 354823168u},
        {"gpt2-large", 36, 1280, 20, 774030080u},
        {"gpt2-xl", 48, 1600, 25, 1557611200u},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        kvh_model_config c;
        kvh_err err;
        cr_assert_eq(kvh_model_preset(want[i].name, &c, &err), 0, "%s", err.msg);
        cr_assert_eq(c.n_layer, want[i].L, "%s", want[i].name);
        cr_assert_eq(c.n_embd, want[i].C, "%s", want[i].name);
        cr_assert_eq(c.n_head, want[i].NH, "%s", want[i].name);
        cr_assert_eq(c.n_vocab, 50257);
        cr_assert_eq(c.n_positions, 1024);
        cr_assert_eq(c.n_inner, 4 * want[i].C);
        cr_assert_float_eq(c.ln_eps, 1e-5f, 1e-12f);
        cr_assert_eq(c.bos_id, 50256);
        cr_assert_eq(kvh_model_config_param_count(&c), want[i].params, "%s: %zu", want[i].name,
                     kvh_model_config_param_count(&c));
        cr_assert_eq(kvh_model_config_check(&c, want[i].name, &err), 0, "%s", err.msg);
    }
    kvh_model_config c;
    kvh_err err;
    cr_assert_eq(kvh_model_preset("gpt3", &c, &err), -1);
    cr_assert_not_null(strstr(err.msg, "'gpt3'"), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "gpt2-medium"), "message should list the known names: %s", err.msg);
}

static int parse(const char *json, kvh_model_config *c, kvh_err *err) {
    return kvh_model_config_parse(json, strlen(json), "dir/config.json", c, err);
}

static void expect_config_error(const char *json, const char *needle) {
    kvh_model_config c;
    kvh_err err = {{0}};
    cr_assert_eq(parse(json, &c, &err), -1, "expected rejection of %s", json);
    cr_assert_not_null(strstr(err.msg, "dir/config.json"), "message lacks the path: %s", err.msg);
    cr_assert_not_null(strstr(err.msg, needle), "message lacks '%s': %s", needle, err.msg);
    cr_assert(all_zero(&c, sizeof c), "cfg must be zeroed on failure");
}

Test(model, config_parse_hf) {
    /* The fields of openai-community/gpt2's config.json (no n_inner: defaults to 4 * n_embd). */
    const char *gpt2 = "{\"activation_function\": \"gelu_new\", \"architectures\": [\"GPT2LMHeadModel\"],"
                       " \"attn_pdrop\": 0.1, \"bos_token_id\": 50256, \"embd_pdrop\": 0.1, \"eos_token_id\": 50256,"
                       " \"initializer_range\": 0.02, \"layer_norm_epsilon\": 1e-05, \"model_type\": \"gpt2\","
                       " \"n_ctx\": 1024, \"n_embd\": 768, \"n_head\": 12, \"n_layer\": 12, \"n_positions\": 1024,"
                       " \"resid_pdrop\": 0.1, \"summary_activation\": null, \"task_specific_params\":"
                       " {\"text-generation\": {\"do_sample\": true, \"max_length\": 50}}, \"vocab_size\": 50257}";
    kvh_model_config c;
    kvh_err err;
    cr_assert_eq(parse(gpt2, &c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.n_vocab, 50257);
    cr_assert_eq(c.n_positions, 1024);
    cr_assert_eq(c.n_embd, 768);
    cr_assert_eq(c.n_head, 12);
    cr_assert_eq(c.n_layer, 12);
    cr_assert_eq(c.n_inner, 3072);
    cr_assert_float_eq(c.ln_eps, 1e-5f, 1e-12f);
    cr_assert_eq(c.bos_id, 50256);

    /* n_ctx alone, explicit n_inner, gelu_pytorch_tanh, other eps and bos */
    const char *alt = "{\"n_ctx\": 64, \"n_embd\": 32, \"n_head\": 4, \"n_layer\": 3, \"vocab_size\": 100,"
                      " \"n_inner\": 48, \"activation_function\": \"gelu_pytorch_tanh\", \"layer_norm_epsilon\": 1e-6,"
                      " \"bos_token_id\": 7}";
    cr_assert_eq(parse(alt, &c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.n_positions, 64);
    cr_assert_eq(c.n_inner, 48);
    cr_assert_eq(c.bos_id, 7);
    cr_assert_float_eq(c.ln_eps, 1e-6f, 1e-13f);
    /* n_inner null behaves like absent */
    const char *nul = "{\"n_positions\": 64, \"n_embd\": 32, \"n_head\": 4, \"n_layer\": 3, \"vocab_size\": 100,"
                      " \"n_inner\": null, \"bos_token_id\": 0}";
    cr_assert_eq(parse(nul, &c, &err), 0, "%s", err.msg);
    cr_assert_eq(c.n_inner, 128);
}

#define BASE "\"n_positions\": 64, \"n_head\": 4, \"n_layer\": 3, \"vocab_size\": 100, \"bos_token_id\": 0"

Test(model, config_parse_errors) {
    expect_config_error("{\"n_positions\": 64, \"n_head\": 4, \"n_layer\": 3, \"vocab_size\": 100}",
                        "missing required key 'n_embd'");
    expect_config_error("{\"n_embd\": 32, \"n_head\": 4, \"n_layer\": 3, \"vocab_size\": 100}", "'n_positions'");
    expect_config_error("{\"n_embd\": 32, " BASE ", \"model_type\": \"llama\"}", "'model_type'");
    expect_config_error("{\"n_embd\": 32, " BASE ", \"activation_function\": \"relu\"}", "'activation_function'");
    expect_config_error("{\"n_embd\": 30, " BASE "}", "'n_head' = 4 does not divide n_embd = 30");
    expect_config_error("{\"n_embd\": 32.5, " BASE "}", "'n_embd'");
    expect_config_error("{\"n_embd\": \"32\", " BASE "}", "'n_embd' must be an integer");
    expect_config_error("{\"n_embd\": 1000000, " BASE "}", "'n_embd' = 1000000 is outside");
    expect_config_error("{\"n_embd\": 1e12, " BASE "}", "'n_embd'");
    expect_config_error("{\"n_embd\": 32, \"n_positions\": 64, \"n_head\": 4, \"n_layer\": 100000,"
                        " \"vocab_size\": 100, \"bos_token_id\": 0}", "'n_layer' = 100000");
    expect_config_error("{\"n_embd\": 32, \"n_positions\": 64, \"n_head\": 4, \"n_layer\": 3,"
                        " \"vocab_size\": 2000000000, \"bos_token_id\": 0}", "'vocab_size'");
    expect_config_error("{\"n_embd\": 32, \"n_positions\": 1000000, \"n_head\": 4, \"n_layer\": 3,"
                        " \"vocab_size\": 100, \"bos_token_id\": 0}", "'n_positions'");
    expect_config_error("{\"n_embd\": 32, \"n_positions\": 64, \"n_head\": 4, \"n_layer\": 0,"
                        " \"vocab_size\": 100, \"bos_token_id\": 0}", "'n_layer' = 0");
    expect_config_error("{\"n_embd\": 32, \"n_positions\": 64, \"n_head\": 4, \"n_layer\": 3,"
                        " \"vocab_size\": 100}", "'bos_token_id' = 50256 is outside"); /* HF default bos */
    expect_config_error("{\"n_embd\": 32, " BASE ", \"n_inner\": -5}", "'n_inner'");
    expect_config_error("{\"n_embd\": 32, " BASE ", \"layer_norm_epsilon\": 0}", "'layer_norm_epsilon'");
    expect_config_error("{\"n_embd\": 32, " BASE ", \"scale_attn_by_inverse_layer_idx\": true}",
                        "'scale_attn_by_inverse_layer_idx'");
    expect_config_error("{\"n_embd\": 32, " BASE ", \"tie_word_embeddings\": false}", "'tie_word_embeddings'");
    expect_config_error("[1, 2]", "not a JSON object");
    expect_config_error("{\"n_embd\": ", "not valid JSON");
}

/* ---- the shared tiny model ---------------------------------------------------------------------- */

static void assert_bits(float got, uint32_t want_bits, const char *what) {
    uint32_t b;
    memcpy(&b, &got, 4);
    float want;
    memcpy(&want, &want_bits, 4);
    cr_assert_eq(b, want_bits, "%s: got %.9g, expected %.9g", what, (double)got, (double)want);
}

Test(model, tiny_model_loads) {
    const char *dir = KVH_SHARED_DIR "/models/gpt2-tiny-wt";
    char st_path[512];
    snprintf(st_path, sizeof st_path, "%s/model.safetensors", dir);
    if (access(st_path, R_OK) != 0) cr_skip_test("%s not found: shared tiny model absent", st_path);
    kvh_model m;
    kvh_err err;
    cr_assert_eq(kvh_model_load(&m, dir, &err), 0, "%s", err.msg);
    cr_assert_eq(m.cfg.n_vocab, 50257);
    cr_assert_eq(m.cfg.n_positions, 1024);
    cr_assert_eq(m.cfg.n_embd, 256);
    cr_assert_eq(m.cfg.n_head, 8);
    cr_assert_eq(m.cfg.n_layer, 6);
    cr_assert_eq(m.cfg.n_inner, 1024);
    cr_assert_float_eq(m.cfg.ln_eps, 1e-5f, 1e-12f);
    cr_assert_eq(m.cfg.bos_id, 50256);
    cr_assert_eq(m.n_params, 17867008u);
    cr_assert_str_eq(m.name, "gpt2-tiny-wt");
    cr_assert_not(m.is_random);
    cr_assert_eq(m.seed, 0);
    /* all-F32 file with a header length that keeps the data 4-byte aligned: zero-copy, no arena */
    cr_assert_not_null(m.map_base);
    cr_assert_null(m.arena);
    cr_assert(m.wte >= (const float *)m.map_base &&
              m.wte < (const float *)((const char *)m.map_base + m.map_len));

    /* Values read independently with Python: json header + numpy.frombuffer('<f4') over
     * data_offsets (no safetensors package), printed as float and uint32 bits:
     *   wte[0,0] -0.0396902896 (3173159497)      wte[50256,255] 0.0771749169 (1033768418)
     *   wte[1000,17] 0.00632305304 (1003434397)   wpe[1023,0] 0.00601887656 (1002781183)
     *   wpe[5,100] -0.0199058298 (3164803469)    h.0.attn.c_attn.bias[767] -0.00404883688 (3146034203)
     *   h.5.mlp.c_proj.weight[1023,255] 0.0122975064 (1011448699)
     *   h.3.ln_2.bias[10] 0.0230012648 (1018981670)
     *   h.2.attn.c_attn.weight[100,600] 0.0367301404 (1024881240)
     *   ln_f.weight[0] 1.31484163 (1067994299)    ln_f.bias[255] -0.0488666706 (3175622763)
     *   h.4.mlp.c_fc.bias[512] 0.00861377548 (1007493323) */
    const int C = 256, F = 1024;
    assert_bits(m.wte[0], 3173159497u, "wte[0,0]");
    assert_bits(m.wte[(size_t)50256 * C + 255], 1033768418u, "wte[50256,255]");
    assert_bits(m.wte[(size_t)1000 * C + 17], 1003434397u, "wte[1000,17]");
    assert_bits(m.wpe[(size_t)1023 * C + 0], 1002781183u, "wpe[1023,0]");
    assert_bits(m.wpe[(size_t)5 * C + 100], 3164803469u, "wpe[5,100]");
    assert_bits(m.layers[0].attn_b[767], 3146034203u, "h.0.attn.c_attn.bias[767]");
    assert_bits(m.layers[5].fcproj_w[(size_t)1023 * C + 255], 1011448699u, "h.5.mlp.c_proj.weight[1023,255]");
    assert_bits(m.layers[3].ln2_b[10], 1018981670u, "h.3.ln_2.bias[10]");
    assert_bits(m.layers[2].attn_w[(size_t)100 * 3 * C + 600], 1024881240u, "h.2.attn.c_attn.weight[100,600]");
    assert_bits(m.lnf_w[0], 1067994299u, "ln_f.weight[0]");
    assert_bits(m.lnf_b[255], 3175622763u, "ln_f.bias[255]");
    assert_bits(m.layers[4].fc_b[512], 1007493323u, "h.4.mlp.c_fc.bias[512]");
    (void)F;

    /* bytes per decode step: every parameter except the P-1 wpe rows a step does not read */
    size_t want_bytes = (17867008u - (size_t)1023 * C) * 4;
    cr_assert_eq(kvh_model_weight_bytes_per_token(&m), want_bytes);
    kvh_model_free(&m);
    cr_assert(all_zero(&m, sizeof m), "free must zero the model");
}

/* ---- tiny Hugging Face directories built by the tests ------------------------------------------ */

/* dims of the fixture: V 11, P 8, C 8, NH 2, L 2, F 32 (n_inner null -> 4C) */
enum { TV = 11, TP = 8, TC = 8, TL = 2, TF = 32 };

typedef struct fx_tensor {
    char name[96];
    const char *dtype;
    int nd;
    int64_t shape[4];
} fx_tensor;

/* Value of element i of the fixture tensor with tag t: k/64 with |k| <= 32, exact in F16 and BF16. */
static float fx_val(int tag, size_t i) { return (float)((int)((i * 7 + (size_t)tag * 13) % 65) - 32) / 64.0f; }

static uint16_t to_f16(float v) { /* exact for the normal numbers and zeros fx_val produces */
    if (v == 0.0f) return signbit(v) ? 0x8000 : 0;
    int e;
    float mfr = frexpf(fabsf(v), &e); /* |v| = mfr * 2^e, mfr in [0.5, 1) */
    uint16_t mant = (uint16_t)((2.0f * mfr - 1.0f) * 1024.0f);
    return (uint16_t)((v < 0 ? 0x8000 : 0) | ((e - 1 + 15) << 10) | mant);
}

static uint16_t to_bf16(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return (uint16_t)(b >> 16);
}

static void fx_add(fx_tensor *ts, int *n, const char *prefix, const char *name, int64_t d0, int64_t d1) {
    fx_tensor *t = &ts[(*n)++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s%s", prefix, name);
    t->dtype = "F16";
    t->nd = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
}

/* The GPT-2 tensors of the fixture in file order (written independently of model.c's table). */
static int fx_list(fx_tensor *ts, const char *prefix) {
    int n = 0;
    fx_add(ts, &n, prefix, "wte.weight", TV, TC);
    fx_add(ts, &n, prefix, "wpe.weight", TP, TC);
    static const struct {
        const char *suffix;
        int64_t d0, d1;
    } per_layer[12] = {
        {"ln_1.weight", TC, 0},         {"ln_1.bias", TC, 0},       {"attn.c_attn.weight", TC, 3 * TC},
        {"attn.c_attn.bias", 3 * TC, 0}, {"attn.c_proj.weight", TC, TC}, {"attn.c_proj.bias", TC, 0},
        {"ln_2.weight", TC, 0},         {"ln_2.bias", TC, 0},       {"mlp.c_fc.weight", TC, TF},
        {"mlp.c_fc.bias", TF, 0},       {"mlp.c_proj.weight", TF, TC}, {"mlp.c_proj.bias", TC, 0},
    };
    for (int l = 0; l < TL; l++) {
        for (int k = 0; k < 12; k++) {
            char b[64];
            snprintf(b, sizeof b, "h.%d.%s", l, per_layer[k].suffix);
            fx_add(ts, &n, prefix, b, per_layer[k].d0, per_layer[k].d1);
        }
    }
    fx_add(ts, &n, prefix, "ln_f.weight", TC, 0);
    fx_add(ts, &n, prefix, "ln_f.bias", TC, 0);
    return n;
}

static size_t fx_elems(const fx_tensor *t) {
    size_t n = 1;
    for (int d = 0; d < t->nd; d++) n *= (size_t)t->shape[d];
    return n;
}

static size_t dtype_size(const char *dt) {
    if (strcmp(dt, "F32") == 0 || strcmp(dt, "I32") == 0) return 4;
    if (strcmp(dt, "F64") == 0) return 8;
    if (strcmp(dt, "I8") == 0) return 1;
    return 2;
}

/* Writes g_dir/<sub>/model.safetensors from the tensor list (tensor k gets tag k), with a padded header
 * of header_pad extra spaces (to control data alignment). */
static void fx_write_st(const char *sub, const fx_tensor *ts, int n, int header_pad) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, sub);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/model.safetensors", g_dir, sub);
    size_t hcap = 256 + (size_t)n * 200 + (size_t)header_pad;
    char *h = malloc(hcap);
    size_t hl = 0, off = 0;
    hl += (size_t)snprintf(h + hl, hcap - hl, "{\"__metadata__\": {\"format\": \"pt\"}");
    for (int k = 0; k < n; k++) {
        size_t bytes = fx_elems(&ts[k]) * dtype_size(ts[k].dtype);
        hl += (size_t)snprintf(h + hl, hcap - hl, ", \"%s\": {\"dtype\": \"%s\", \"shape\": [", ts[k].name, ts[k].dtype);
        for (int d = 0; d < ts[k].nd; d++)
            hl += (size_t)snprintf(h + hl, hcap - hl, "%s%lld", d ? ", " : "", (long long)ts[k].shape[d]);
        hl += (size_t)snprintf(h + hl, hcap - hl, "], \"data_offsets\": [%zu, %zu]}", off, off + bytes);
        off += bytes;
    }
    hl += (size_t)snprintf(h + hl, hcap - hl, "}");
    for (int i = 0; i < header_pad; i++) h[hl++] = ' ';
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(h, 1, hl, f);
    for (int k = 0; k < n; k++) {
        size_t ne = fx_elems(&ts[k]);
        for (size_t i = 0; i < ne; i++) {
            float v = fx_val(k, i);
            unsigned char b[8] = {0};
            size_t sz = dtype_size(ts[k].dtype);
            if (strcmp(ts[k].dtype, "F32") == 0) {
                uint32_t u;
                memcpy(&u, &v, 4);
                for (int j = 0; j < 4; j++) b[j] = (unsigned char)(u >> (8 * j));
            } else if (strcmp(ts[k].dtype, "F16") == 0 || strcmp(ts[k].dtype, "BF16") == 0) {
                uint16_t u = strcmp(ts[k].dtype, "F16") == 0 ? to_f16(v) : to_bf16(v);
                b[0] = (unsigned char)u;
                b[1] = (unsigned char)(u >> 8);
            }
            fwrite(b, 1, sz, f);
        }
    }
    fclose(f);
    free(h);
}

static void fx_write_config(const char *sub, const char *json) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, sub);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/config.json", g_dir, sub);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(json, f);
    fclose(f);
}

static const char *FX_CONFIG = "{\"model_type\": \"gpt2\", \"activation_function\": \"gelu_new\", \"vocab_size\": 11,"
                               " \"n_positions\": 8, \"n_ctx\": 8, \"n_embd\": 8, \"n_head\": 2, \"n_layer\": 2,"
                               " \"n_inner\": null, \"layer_norm_epsilon\": 1e-05, \"bos_token_id\": 10}";

static const char *fx_dir(const char *sub) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, sub);
    return path;
}

/* Checks every loaded value against fx_val: tensor order in fx_list is the tag. */
static void fx_check_values(const kvh_model *m) {
    const float *ptrs[4 + 12 * TL];
    int n = 0;
    ptrs[n++] = m->wte;
    ptrs[n++] = m->wpe;
    for (int l = 0; l < TL; l++) {
        const kvh_layer_weights *w = &m->layers[l];
        const float *lp[12] = {w->ln1_w, w->ln1_b, w->attn_w, w->attn_b, w->proj_w, w->proj_b,
                               w->ln2_w, w->ln2_b, w->fc_w,   w->fc_b,   w->fcproj_w, w->fcproj_b};
        for (int k = 0; k < 12; k++) ptrs[n++] = lp[k];
    }
    ptrs[n++] = m->lnf_w;
    ptrs[n++] = m->lnf_b;
    fx_tensor ts[4 + 12 * TL];
    cr_assert_eq(fx_list(ts, ""), n);
    for (int k = 0; k < n; k++) {
        size_t ne = fx_elems(&ts[k]);
        for (size_t i = 0; i < ne; i++)
            cr_assert_eq(ptrs[k][i], fx_val(k, i), "%s[%zu] = %g, expected %g", ts[k].name, i,
                         (double)ptrs[k][i], (double)fx_val(k, i));
    }
}

static size_t fx_param_count(void) {
    return (size_t)TV * TC + (size_t)TP * TC + TL * ((size_t)12 * TC * TC + 13 * TC) + 2 * TC;
}

Test(model, hf_dir_f16_no_prefix) {
    fx_tensor ts[64];
    int n = fx_list(ts, "");
    fx_write_config("a", FX_CONFIG);
    fx_write_st("a", ts, n, 0);
    kvh_model m;
    kvh_err err;
    cr_assert_eq(kvh_model_load(&m, fx_dir("a"), &err), 0, "%s", err.msg);
    cr_assert_eq(m.cfg.n_inner, 32);
    cr_assert_eq(m.cfg.bos_id, 10);
    cr_assert_eq(m.n_params, fx_param_count());
    cr_assert_str_eq(m.name, "a");
    cr_assert_not_null(m.arena, "F16 embeddings, biases and LayerNorms are converted into the arena");
    /* the layer matrices are deferred (model.h): read from the kept mapping when needed */
    cr_assert_not_null(m.map_base, "deferred matrices stay in the file mapping");
    cr_assert_eq(m.n_deferred, 4 * TL);
    cr_assert_eq(m.deferred_floats, (size_t)TL * 12 * TC * TC);
    cr_assert_eq(m.arena_floats >= m.n_params - m.deferred_floats, 1);
    for (int l = 0; l < TL; l++)
        cr_assert(!m.layers[l].attn_w && !m.layers[l].proj_w && !m.layers[l].fc_w && !m.layers[l].fcproj_w,
                  "layer %d: deferred matrices are NULL after load", l);
    cr_assert_eq(m.materialized_floats, 0);
    cr_assert_eq(kvh_model_materialize_all(&m, &err), 0, "%s", err.msg);
    cr_assert_eq(m.materialized_floats, m.deferred_floats);
    fx_check_values(&m);
    kvh_model_free(&m);
}

Test(model, hf_dir_prefix_buffers_lm_head_mixed_dtypes) {
    fx_tensor ts[64];
    int n = fx_list(ts, "transformer.");
    /* mixed dtypes: F32 (zero-copy), BF16 and F16 (converted) */
    for (int k = 0; k < n; k++) ts[k].dtype = k % 3 == 0 ? "F32" : k % 3 == 1 ? "BF16" : "F16";
    /* buffers and the tied head that real checkpoints carry */
    for (int l = 0; l < TL; l++) {
        snprintf(ts[n].name, sizeof ts[n].name, "transformer.h.%d.attn.bias", l);
        ts[n].dtype = "F32";
        ts[n].nd = 4;
        ts[n].shape[0] = 1, ts[n].shape[1] = 1, ts[n].shape[2] = TP, ts[n].shape[3] = TP;
        n++;
        snprintf(ts[n].name, sizeof ts[n].name, "transformer.h.%d.attn.masked_bias", l);
        ts[n].dtype = "F32";
        ts[n].nd = 0;
        n++;
    }
    snprintf(ts[n].name, sizeof ts[n].name, "lm_head.weight");
    ts[n].dtype = "F32";
    ts[n].nd = 2;
    ts[n].shape[0] = TV, ts[n].shape[1] = TC;
    n++;
    fx_write_config("b", FX_CONFIG);
    /* choose the padding so the data section starts 4-byte aligned: F32 tensors are then zero-copy */
    fx_write_st("b", ts, n, 0);
    char path[512];
    snprintf(path, sizeof path, "%s/b/model.safetensors", g_dir);
    FILE *f = fopen(path, "rb");
    unsigned char l8[8];
    cr_assert_eq(fread(l8, 1, 8, f), 8);
    fclose(f);
    int pad = (int)((4 - (l8[0] % 4)) % 4);
    fx_write_st("b", ts, n, pad);

    kvh_model m;
    kvh_err err;
    cr_assert_eq(kvh_model_load(&m, fx_dir("b"), &err), 0, "%s", err.msg);
    cr_assert_eq(m.n_params, fx_param_count(), "buffers and the tied head are not parameters");
    cr_assert_not_null(m.arena);
    cr_assert_not_null(m.map_base, "aligned F32 tensors point into the mapping");
    /* wte is tag 0 -> F32 -> zero-copy; wpe is tag 1 -> BF16 -> arena */
    cr_assert(m.wte >= (const float *)m.map_base && m.wte < (const float *)((char *)m.map_base + m.map_len));
    cr_assert(m.wpe >= m.arena && m.wpe < m.arena + m.arena_floats);
    cr_assert_gt(m.n_deferred, 0, "the F16/BF16 layer matrices are deferred");
    cr_assert_eq(kvh_model_materialize_all(&m, &err), 0, "%s", err.msg);
    fx_check_values(&m);
    kvh_model_free(&m);

    /* the same file with the data misaligned: F32 tensors are copied instead */
    fx_write_st("b", ts, n, pad + 1);
    cr_assert_eq(kvh_model_load(&m, fx_dir("b"), &err), 0, "%s", err.msg);
    cr_assert(m.wte >= m.arena && m.wte < m.arena + m.arena_floats, "unaligned F32 is copied into the arena");
    cr_assert_eq(kvh_model_materialize_all(&m, &err), 0, "%s", err.msg);
    fx_check_values(&m);
    kvh_model_free(&m);
}

/* Loads a directory expected to fail; checks the message and that *m is zeroed. */
static void expect_load_error(const char *sub, const char *needle1, const char *needle2) {
    kvh_model m;
    memset(&m, 0x5a, sizeof m);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, fx_dir(sub), &err), -1, "expected %s to fail", sub);
    cr_assert_not_null(strstr(err.msg, needle1), "message lacks '%s': %s", needle1, err.msg);
    if (needle2) cr_assert_not_null(strstr(err.msg, needle2), "message lacks '%s': %s", needle2, err.msg);
    cr_assert(all_zero(&m, sizeof m), "*m must be zeroed on failure");
}

Test(model, hf_dir_errors) {
    fx_tensor ts[64];
    int n;

    n = fx_list(ts, "");
    memmove(&ts[5], &ts[6], (size_t)(n - 6) * sizeof ts[0]); /* drop h.0.attn.c_attn.bias */
    fx_write_config("missing", FX_CONFIG);
    fx_write_st("missing", ts, n - 1, 0);
    expect_load_error("missing", "missing tensor 'h.0.attn.c_attn.bias'", "[24]");

    n = fx_list(ts, "transformer.");
    ts[4].shape[1] = 3 * TC + 1; /* h.0.attn.c_attn.weight [8, 25] */
    fx_write_config("shape", FX_CONFIG);
    fx_write_st("shape", ts, n, 0);
    expect_load_error("shape", "tensor 'transformer.h.0.attn.c_attn.weight' has shape [8, 25], expected [8, 24]",
                      NULL);

    n = fx_list(ts, "");
    ts[n - 1].dtype = "F64"; /* ln_f.bias */
    fx_write_config("dtype", FX_CONFIG);
    fx_write_st("dtype", ts, n, 0);
    expect_load_error("dtype", "tensor 'ln_f.bias' has dtype F64", "not usable");

    n = fx_list(ts, "");
    snprintf(ts[n].name, sizeof ts[n].name, "h.2.ln_1.weight"); /* a third layer, config says 2 */
    ts[n].dtype = "F16";
    ts[n].nd = 1;
    ts[n].shape[0] = TC;
    fx_write_config("extra", FX_CONFIG);
    fx_write_st("extra", ts, n + 1, 0);
    expect_load_error("extra", "unexpected tensor 'h.2.ln_1.weight'", "n_layer = 2");
    /* a mask buffer is ignorable only for layers the config has */
    snprintf(ts[n].name, sizeof ts[n].name, "h.2.attn.bias");
    fx_write_st("extra", ts, n + 1, 0);
    expect_load_error("extra", "unexpected tensor 'h.2.attn.bias'", NULL);

    n = fx_list(ts, "");
    fx_write_config("cfg", "{\"model_type\": \"gpt2\", \"vocab_size\": 11, \"n_positions\": 8, \"n_embd\": 8,"
                           " \"n_head\": 2, \"bos_token_id\": 10}");
    fx_write_st("cfg", ts, n, 0);
    expect_load_error("cfg", "cfg/config.json", "missing required key 'n_layer'");

    fx_write_config("nost", FX_CONFIG);
    expect_load_error("nost", "nost/model.safetensors", "cannot open");

    char sub[64];
    snprintf(sub, sizeof sub, "noconfig");
    fx_write_st(sub, ts, n, 0);
    expect_load_error(sub, "noconfig/config.json", NULL);

    expect_load_error("does-not-exist", "not a directory", "random:");

    /* a broken safetensors file: the error comes from the container parser, naming the file */
    fx_write_config("trunc", FX_CONFIG);
    char path[512];
    snprintf(path, sizeof path, "%s/trunc/model.safetensors", g_dir);
    FILE *f = fopen(path, "wb");
    fputs("abc", f);
    fclose(f);
    expect_load_error("trunc", "trunc/model.safetensors", "too short");
}

/* ---- random weights ---------------------------------------------------------------------------- */

/* Arena comparison for two random models of the same config. */
static bool same_weights(const kvh_model *a, const kvh_model *b) {
    return a->arena_floats == b->arena_floats &&
           memcmp(a->arena, b->arena, a->arena_floats * sizeof(float)) == 0;
}

static void stats(const float *x, size_t n, double *mean, double *std) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        s += x[i];
        s2 += (double)x[i] * x[i];
    }
    *mean = s / (double)n;
    *std = sqrt(s2 / (double)n - *mean * *mean);
}

Test(model, random_gpt2) {
    kvh_model a, b, c;
    kvh_err err;
    cr_assert_eq(kvh_model_load(&a, "random:gpt2", &err), 0, "%s", err.msg);
    cr_assert_eq(a.n_params, 124439808u);
    cr_assert(a.is_random);
    cr_assert_eq(a.seed, KVH_MODEL_DEFAULT_SEED);
    cr_assert_str_eq(a.name, "random:gpt2");
    cr_assert_null(a.map_base);
    cr_assert_eq(a.cfg.n_layer, 12);
    cr_assert_eq(a.cfg.n_embd, 768);

    /* (P - 1) wpe rows are not read per decode step */
    cr_assert_eq(kvh_model_weight_bytes_per_token(&a), (124439808u - (size_t)1023 * 768) * 4);

    char spec[64];
    snprintf(spec, sizeof spec, "random:gpt2:%u", (unsigned)KVH_MODEL_DEFAULT_SEED);
    cr_assert_eq(kvh_model_load(&b, spec, &err), 0, "%s", err.msg);
    cr_assert_str_eq(b.name, "random:gpt2");
    cr_assert_str_eq(b.source, spec);
    cr_assert(same_weights(&a, &b), "same seed must give identical weights");
    kvh_model_free(&b);
    cr_assert_eq(kvh_model_load(&c, "random:gpt2:7", &err), 0, "%s", err.msg);
    cr_assert_eq(c.seed, 7);
    cr_assert_not(same_weights(&a, &c), "different seeds must differ");
    size_t differ = 0;
    for (size_t i = 0; i < 1000; i++) differ += a.wte[i] != c.wte[i];
    cr_assert_gt(differ, 990, "only %zu of 1000 wte values differ between seeds", differ);
    kvh_model_free(&c);

    /* init statistics: N(0, 0.02) for wte / wpe / c_attn / c_fc, 0.02/sqrt(2L) for the c_proj matrices,
     * LayerNorm weights 1, biases 0 */
    const int C = 768, L = 12, V = 50257, P = 1024;
    double mean, sd;
    stats(a.wte, (size_t)V * C, &mean, &sd);
    cr_assert_lt(fabs(mean), 1e-4, "wte mean %g", mean);
    cr_assert_lt(fabs(sd - 0.02), 2e-4, "wte std %g", sd);
    stats(a.wpe, (size_t)P * C, &mean, &sd);
    cr_assert_lt(fabs(mean), 2e-4, "wpe mean %g", mean);
    cr_assert_lt(fabs(sd - 0.02), 2e-4, "wpe std %g", sd);
    const double std_proj = 0.02 / sqrt(2.0 * L);
    for (int l = 0; l < L; l++) {
        const kvh_layer_weights *w = &a.layers[l];
        stats(w->attn_w, (size_t)C * 3 * C, &mean, &sd);
        cr_assert_lt(fabs(mean), 2e-4, "layer %d c_attn mean %g", l, mean);
        cr_assert_lt(fabs(sd - 0.02), 2e-4, "layer %d c_attn std %g", l, sd);
        stats(w->fc_w, (size_t)C * 4 * C, &mean, &sd);
        cr_assert_lt(fabs(sd - 0.02), 2e-4, "layer %d c_fc std %g", l, sd);
        stats(w->proj_w, (size_t)C * C, &mean, &sd);
        cr_assert_lt(fabs(sd - std_proj), 1e-4, "layer %d attn c_proj std %g, want %g", l, sd, std_proj);
        stats(w->fcproj_w, (size_t)4 * C * C, &mean, &sd);
        cr_assert_lt(fabs(sd - std_proj), 1e-4, "layer %d mlp c_proj std %g, want %g", l, sd, std_proj);
        for (int i = 0; i < C; i++) {
            cr_assert_eq(w->ln1_w[i], 1.0f);
            cr_assert_eq(w->ln2_w[i], 1.0f);
            cr_assert_eq(w->ln1_b[i], 0.0f);
            cr_assert_eq(w->ln2_b[i], 0.0f);
            cr_assert_eq(w->proj_b[i], 0.0f);
            cr_assert_eq(w->fcproj_b[i], 0.0f);
        }
        for (int i = 0; i < 3 * C; i++) cr_assert_eq(w->attn_b[i], 0.0f);
        for (int i = 0; i < 4 * C; i++) cr_assert_eq(w->fc_b[i], 0.0f);
    }
    for (int i = 0; i < C; i++) {
        cr_assert_eq(a.lnf_w[i], 1.0f);
        cr_assert_eq(a.lnf_b[i], 0.0f);
    }
    /* distinct tensors get distinct streams (not the same numbers scaled) */
    cr_assert_neq(a.layers[0].attn_w[0], a.layers[1].attn_w[0]);
    cr_assert_neq(a.wte[0], a.wpe[0]);
    /* roughly normal: about 68.3% within one std (Irwin-Hall(4) gives 0.666), nothing beyond 3.5 std */
    size_t in1 = 0, beyond = 0, n = (size_t)V * C;
    for (size_t i = 0; i < n; i++) {
        double z = fabs(a.wte[i]) / 0.02;
        in1 += z < 1.0;
        beyond += z > 3.5;
    }
    double frac1 = (double)in1 / (double)n;
    cr_assert(frac1 > 0.65 && frac1 < 0.70, "fraction within 1 std = %g", frac1);
    cr_assert_eq(beyond, 0);
    kvh_model_free(&a);
    cr_assert(all_zero(&a, sizeof a));
}

Test(model, random_independent_of_thread_count) {
    kvh_model_config cfg = {.n_vocab = 1000, .n_positions = 64, .n_embd = 64, .n_head = 4, .n_layer = 3,
                            .n_inner = 256, .ln_eps = 1e-5f, .bos_id = 0};
    kvh_model a, b;
    kvh_err err;
#ifdef _OPENMP
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    cr_assert_eq(kvh_model_init_random(&a, &cfg, 42, "small", &err), 0, "%s", err.msg);
#ifdef _OPENMP
    omp_set_num_threads(saved > 1 ? saved : 4);
#endif
    cr_assert_eq(kvh_model_init_random(&b, &cfg, 42, "small", &err), 0, "%s", err.msg);
    cr_assert_eq(a.n_params, kvh_model_config_param_count(&cfg));
    cr_assert(same_weights(&a, &b), "weights must not depend on the thread count");
    cr_assert_str_eq(a.name, "small");
    kvh_model_free(&a);
    kvh_model_free(&b);

    kvh_model_config bad = cfg;
    bad.n_head = 5;
    memset(&a, 0x5a, sizeof a);
    cr_assert_eq(kvh_model_init_random(&a, &bad, 1, "bad", &err), -1);
    cr_assert_not_null(strstr(err.msg, "n_head"), "%s", err.msg);
    cr_assert(all_zero(&a, sizeof a));
}

Test(model, random_spec_errors) {
    kvh_model m;
    kvh_err err;
    memset(&m, 0x5a, sizeof m);
    cr_assert_eq(kvh_model_load(&m, "random:gpt3", &err), -1);
    cr_assert_not_null(strstr(err.msg, "'gpt3'"), "%s", err.msg);
    cr_assert_not_null(strstr(err.msg, "gpt2-large"), "%s", err.msg);
    cr_assert(all_zero(&m, sizeof m));
    cr_assert_eq(kvh_model_load(&m, "random:gpt2:12x", &err), -1);
    cr_assert_not_null(strstr(err.msg, "seed '12x'"), "%s", err.msg);
    cr_assert_eq(kvh_model_load(&m, "random:gpt2:-1", &err), -1);
    cr_assert_not_null(strstr(err.msg, "seed"), "%s", err.msg);
    cr_assert_eq(kvh_model_load(&m, "random:", &err), -1);
    cr_assert_not_null(strstr(err.msg, "random:NAME"), "%s", err.msg);
}
