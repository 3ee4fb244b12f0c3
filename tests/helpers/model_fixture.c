/* model_fixture.c — implementation of model_fixture.h (tensor list in GPT-2's file order, the
 * safetensors writer, the byte-level tokenizer files). */
#define _POSIX_C_SOURCE 200809L
#include "helpers/model_fixture.h"

#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct fx_t {
    char name[64];
    int nd;
    long d0, d1;
    int init; /* 0 random, 1 ones, 2 zeros */
} fx_t;

static int fx_tensors(kvh_fx_shape s, fx_t *t) {
    int n = 0;
#define ADD(nm, a, b, nd_, in)                                                                                    \
    do {                                                                                                          \
        snprintf(t[n].name, sizeof t[n].name, "%s", nm);                                                          \
        t[n].d0 = a;                                                                                              \
        t[n].d1 = b;                                                                                              \
        t[n].nd = nd_;                                                                                            \
        t[n].init = in;                                                                                           \
        n++;                                                                                                      \
    } while (0)
    long C = s.C, F = 4L * s.C;
    ADD("wte.weight", s.V, C, 2, 0);
    ADD("wpe.weight", s.P, C, 2, 0);
    for (int l = 0; l < s.L; l++) {
        char b[64];
#define L_ADD(suffix, a, bb, nd_, in)                                                                             \
    do {                                                                                                          \
        snprintf(b, sizeof b, "h.%d.%s", l, suffix);                                                              \
        ADD(b, a, bb, nd_, in);                                                                                   \
    } while (0)
        L_ADD("ln_1.weight", C, 0, 1, 1);
        L_ADD("ln_1.bias", C, 0, 1, 2);
        L_ADD("attn.c_attn.weight", C, 3 * C, 2, 0);
        L_ADD("attn.c_attn.bias", 3 * C, 0, 1, 2);
        L_ADD("attn.c_proj.weight", C, C, 2, 0);
        L_ADD("attn.c_proj.bias", C, 0, 1, 2);
        L_ADD("ln_2.weight", C, 0, 1, 1);
        L_ADD("ln_2.bias", C, 0, 1, 2);
        L_ADD("mlp.c_fc.weight", C, F, 2, 0);
        L_ADD("mlp.c_fc.bias", F, 0, 1, 2);
        L_ADD("mlp.c_proj.weight", F, C, 2, 0);
        L_ADD("mlp.c_proj.bias", C, 0, 1, 2);
#undef L_ADD
    }
    ADD("ln_f.weight", C, 0, 1, 1);
    ADD("ln_f.bias", C, 0, 1, 2);
#undef ADD
    return n;
}

static uint16_t to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, mant = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) return (uint16_t)sign; /* the fixtures' small values never need subnormals */
    return (uint16_t)(sign | ((uint32_t)e << 10) | (mant >> 13));
}

void kvh_fx_plant_edit(const char *name, float *data, size_t n, void *user) {
    for (const kvh_fx_plant *p = user; p->tensor; p++)
        if (strcmp(name, p->tensor) == 0 && p->index < n) data[p->index] = p->value;
}

void kvh_fx_write_model(const char *dir, kvh_fx_shape s, const char *dtype, const char *extra_config,
                        kvh_fx_edit edit, void *user) {
    mkdir(dir, 0755);
    char path[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "cannot create %s", path);
    fprintf(f,
            "{%s\"model_type\": \"gpt2\", \"vocab_size\": %d, \"n_positions\": %d, \"n_embd\": %d, \"n_head\": %d, "
            "\"n_layer\": %d, \"bos_token_id\": %d}\n",
            extra_config ? extra_config : "", s.V, s.P, s.C, s.NH, s.L, s.V > 256 ? 256 : s.V - 1);
    fclose(f);

    fx_t *t = calloc(4 + 12 * (size_t)s.L, sizeof *t);
    int n = fx_tensors(s, t);
    size_t esz = strcmp(dtype, "F32") == 0 ? 4 : 2;
    size_t hcap = 256 + (size_t)n * 160, hl = 0, off = 0;
    char *h = malloc(hcap);
    hl += (size_t)snprintf(h, hcap, "{\"__metadata__\": {\"format\": \"pt\"}");
    for (int k = 0; k < n; k++) {
        size_t ne = (size_t)t[k].d0 * (t[k].nd == 2 ? (size_t)t[k].d1 : 1);
        if (t[k].nd == 2)
            hl += (size_t)snprintf(h + hl, hcap - hl, ", \"%s\": {\"dtype\": \"%s\", \"shape\": [%ld, %ld], ",
                                   t[k].name, dtype, t[k].d0, t[k].d1);
        else
            hl += (size_t)snprintf(h + hl, hcap - hl, ", \"%s\": {\"dtype\": \"%s\", \"shape\": [%ld], ", t[k].name,
                                   dtype, t[k].d0);
        hl += (size_t)snprintf(h + hl, hcap - hl, "\"data_offsets\": [%zu, %zu]}", off, off + ne * esz);
        off += ne * esz;
    }
    hl += (size_t)snprintf(h + hl, hcap - hl, "}");
    while (hl % 8) h[hl++] = ' '; /* F32 data 4-byte aligned: the zero-copy path */
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot create %s", path);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(h, 1, hl, f);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (int k = 0; k < n; k++) {
        size_t ne = (size_t)t[k].d0 * (t[k].nd == 2 ? (size_t)t[k].d1 : 1);
        float *v = malloc(ne * sizeof *v);
        for (size_t i = 0; i < ne; i++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            float r = ((float)(rng >> 40) / 16777216.0f - 0.5f) * 0.1f;
            v[i] = t[k].init == 1 ? 1.0f : t[k].init == 2 ? 0.0f : r;
        }
        if (edit) edit(t[k].name, v, ne, user);
        for (size_t i = 0; i < ne; i++) {
            if (esz == 4) {
                fwrite(&v[i], 4, 1, f); /* little-endian hosts only, as the loader */
            } else {
                uint32_t u;
                memcpy(&u, &v[i], 4);
                uint16_t half = strcmp(dtype, "F16") == 0 ? to_f16(v[i]) : (uint16_t)(u >> 16);
                fwrite(&half, 2, 1, f);
            }
        }
        free(v);
    }
    cr_assert_eq(fclose(f), 0);
    free(h);
    free(t);
}

/* bytes_to_unicode of GPT-2's encoder.py: the code point that stands for byte b. */
static unsigned byte_cp(int b) {
    int n = 0;
    for (int x = 0; x < 256; x++) {
        int printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
        if (x == b) return printable ? (unsigned)x : 256u + (unsigned)n;
        if (!printable) n++;
    }
    return 0;
}

void kvh_fx_write_byte_tokenizer(const char *dir) {
    mkdir(dir, 0755);
    char path[1024];
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputc('{', f);
    for (int b = 0; b < 256; b++) {
        unsigned cp = byte_cp(b);
        fputs(b ? ", \"" : "\"", f);
        if (cp == '"' || cp == '\\') fprintf(f, "\\%c", (char)cp);
        else if (cp < 0x80) fputc((int)cp, f);
        else {
            fputc((int)(0xC0 | (cp >> 6)), f);
            fputc((int)(0x80 | (cp & 0x3F)), f);
        }
        fprintf(f, "\": %d", b);
    }
    fputs(", \"<|endoftext|>\": 256}\n", f);
    fclose(f);
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("#version: 0.2\n", f);
    fclose(f);
}
