/* test_safetensors.c — Criterion suite for host/model/safetensors.c.
 * Owns: malformed-file checks (each asserts the error names the file, the tensor and the problem), a
 * valid file with F32/F16/BF16/I8 tensors whose converted values are compared with numbers worked out
 * by hand from the IEEE bit patterns. Files are written by the tests into a fresh temp directory. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/safetensors.h"

static char g_dir[256];

static void make_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/kvh_st_test_XXXXXX");
    cr_assert_not_null(mkdtemp(g_dir), "mkdtemp failed");
}

static void remove_dir(void) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
}

TestSuite(safetensors, .init = make_dir, .fini = remove_dir);

/* Writes raw bytes to g_dir/name; returns the path (static buffer). */
static const char *write_raw(const char *name, const void *bytes, size_t len) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot create %s", path);
    if (len) cr_assert_eq(fwrite(bytes, 1, len, f), len);
    fclose(f);
    return path;
}

/* Writes a safetensors file: 8-byte little-endian length of `header`, header, then data. */
static const char *write_st(const char *name, const char *header, const void *data, size_t data_len) {
    size_t hlen = strlen(header);
    size_t len = 8 + hlen + data_len;
    unsigned char *buf = calloc(1, len + 1);
    cr_assert_not_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    if (data_len) memcpy(buf + 8 + hlen, data, data_len);
    const char *p = write_raw(name, buf, len);
    free(buf);
    return p;
}

/* Opens a file expected to be rejected; checks the message names the path and contains every needle. */
static void expect_error(const char *path, const char *needle1, const char *needle2) {
    kvh_safetensors st;
    kvh_err err = {{0}};
    int rc = kvh_st_open(&st, path, &err);
    cr_assert_eq(rc, -1, "expected %s to be rejected", path);
    cr_assert_not_null(strstr(err.msg, path), "message does not name the file: %s", err.msg);
    cr_assert_not_null(strstr(err.msg, needle1), "message lacks '%s': %s", needle1, err.msg);
    if (needle2) cr_assert_not_null(strstr(err.msg, needle2), "message lacks '%s': %s", needle2, err.msg);
    cr_assert_null(st.tensors, "failed open left a tensor table");
    cr_assert_null(st.map_base, "failed open left a mapping");
}

static const unsigned char ZEROS[64];

Test(safetensors, truncated_file) {
    expect_error(write_raw("short.safetensors", "\x10\x00\x00", 3), "too short", NULL);
    expect_error(write_raw("empty.safetensors", "", 0), "too short", NULL);
}

Test(safetensors, header_length_beyond_file) {
    unsigned char buf[16] = {0};
    buf[0] = 0x00;
    buf[1] = 0x10; /* 4096 */
    memcpy(buf + 8, "{}      ", 8);
    expect_error(write_raw("hlen.safetensors", buf, sizeof buf), "header length 4096 is beyond the file", NULL);
    /* a huge length (2^63) must not overflow the bounds check */
    unsigned char big[16] = {0, 0, 0, 0, 0, 0, 0, 0x80, '{', '}', ' ', ' ', ' ', ' ', ' ', ' '};
    expect_error(write_raw("hlen2.safetensors", big, sizeof big), "beyond the file", NULL);
}

Test(safetensors, bad_json) {
    expect_error(write_st("json.safetensors", "{\"a\": {\"dtype\": \"F32\",", ZEROS, 8), "not valid JSON", NULL);
    expect_error(write_st("arr.safetensors", "[1, 2]", ZEROS, 8), "not a JSON object", NULL);
    expect_error(write_st("trail.safetensors", "{} xx", ZEROS, 8), "trailing bytes", NULL);
    expect_error(write_st("entry.safetensors", "{\"w\": 3}", ZEROS, 8), "tensor 'w'", "not a JSON object");
}

Test(safetensors, missing_fields) {
    expect_error(write_st("nooff.safetensors", "{\"h.3.attn.c_attn.weight\": {\"dtype\": \"F32\", \"shape\": [2]}}",
                          ZEROS, 8),
                 "tensor 'h.3.attn.c_attn.weight'", "missing \"data_offsets\"");
    expect_error(write_st("nodtype.safetensors", "{\"w\": {\"shape\": [2], \"data_offsets\": [0, 8]}}", ZEROS, 8),
                 "tensor 'w'", "missing \"dtype\"");
    expect_error(write_st("noshape.safetensors", "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 8]}}", ZEROS,
                          8),
                 "tensor 'w'", "missing \"shape\"");
    expect_error(write_st("badoff.safetensors",
                          "{\"w\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8, 9]}}", ZEROS, 8),
                 "tensor 'w'", "[begin, end]");
}

Test(safetensors, overlapping_offsets) {
    const char *h = "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
                    " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}";
    expect_error(write_st("overlap.safetensors", h, ZEROS, 24), "overlap", "tensor 'b'");
    /* an overlap hidden behind a shorter tensor that starts later */
    const char *h2 = "{\"big\": {\"dtype\": \"F32\", \"shape\": [8], \"data_offsets\": [0, 32]},"
                     " \"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]},"
                     " \"y\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [16, 20]}}";
    expect_error(write_st("overlap2.safetensors", h2, ZEROS, 32), "overlap", "'big'");
}

Test(safetensors, offsets_beyond_data) {
    const char *h = "{\"h.3.attn.c_attn.weight\": {\"dtype\": \"F32\", \"shape\": [8], \"data_offsets\": [0, 32]}}";
    expect_error(write_st("beyond.safetensors", h, ZEROS, 16), "tensor 'h.3.attn.c_attn.weight'",
                 "data_offsets [0, 32] end beyond data section of 16 bytes");
    const char *h2 = "{\"w\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [8, 4]}}";
    expect_error(write_st("inverted.safetensors", h2, ZEROS, 16), "tensor 'w'", "begin > end");
}

Test(safetensors, shape_size_mismatch) {
    const char *h = "{\"w\": {\"dtype\": \"F16\", \"shape\": [2, 4], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("mismatch.safetensors", h, ZEROS, 16), "tensor 'w'", "need 16 bytes");
}

Test(safetensors, shape_product_overflow) {
    /* 2^32 * 2^32 * 16 elements: the product does not fit in 64 bits */
    const char *h = "{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 16], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("ovf.safetensors", h, ZEROS, 8), "tensor 'w'", "overflows");
    /* elements fit, bytes do not: 2^62 F32 elements */
    const char *h2 = "{\"w\": {\"dtype\": \"F32\", \"shape\": [2147483648, 2147483648], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("ovf2.safetensors", h2, ZEROS, 8), "tensor 'w'", "overflows");
    /* beyond 2^53 a JSON number is not an exact integer */
    const char *h3 = "{\"w\": {\"dtype\": \"F32\", \"shape\": [1e30], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("ovf3.safetensors", h3, ZEROS, 8), "tensor 'w'", "shape[0]");
}

Test(safetensors, bad_dims) {
    const char *neg = "{\"w\": {\"dtype\": \"F32\", \"shape\": [-2], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("neg.safetensors", neg, ZEROS, 8), "tensor 'w'", "shape[0] is not a non-negative integer");
    const char *frac = "{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 1.5], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("frac.safetensors", frac, ZEROS, 8), "tensor 'w'", "shape[1]");
    const char *many = "{\"w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,2], \"data_offsets\": [0, 8]}}";
    expect_error(write_st("many.safetensors", many, ZEROS, 8), "tensor 'w'", "9 dimensions");
}

Test(safetensors, duplicate_name) {
    const char *h = "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]},"
                    " \"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}";
    expect_error(write_st("dup.safetensors", h, ZEROS, 8), "tensor 'w'", "more than once");
}

Test(safetensors, unknown_dtype) {
    const char *h = "{\"w\": {\"dtype\": \"F13\", \"shape\": [1], \"data_offsets\": [0, 4]}}";
    expect_error(write_st("dtype.safetensors", h, ZEROS, 8), "tensor 'w'", "unknown dtype 'F13'");
    const char *h2 = "{\"w\": {\"dtype\": 32, \"shape\": [1], \"data_offsets\": [0, 4]}}";
    expect_error(write_st("dtype2.safetensors", h2, ZEROS, 8), "tensor 'w'", "not a string");
}

Test(safetensors, missing_file) {
    char path[512];
    snprintf(path, sizeof path, "%s/nope.safetensors", g_dir);
    expect_error(path, "cannot open", NULL);
    expect_error(g_dir, "not a regular file", NULL);
}

/* Little-endian byte writers for building the data section by hand. */
static void put_u16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}
static void put_f32(unsigned char *p, float f) {
    uint32_t v;
    memcpy(&v, &f, 4);
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Bit-exact float comparison (so -0.0 and NaN payload questions are explicit). */
static void assert_same_float(float got, float want, const char *what) {
    uint32_t a, b;
    memcpy(&a, &got, 4);
    memcpy(&b, &want, 4);
    cr_assert_eq(a, b, "%s: got %.9g (0x%08x), expected %.9g (0x%08x)", what, (double)got, a, (double)want, b);
}

Test(safetensors, valid_file_and_conversion) {
    /* data: f32 [2,2] at 0..16, f16 [8] at 16..32, bf16 [4] at 32..40, i8 [3] at 40..43, empty f32 at 43 */
    unsigned char data[43] = {0};
    const float f32v[4] = {1.5f, -2.25f, 3.0e-8f, 65504.0f};
    for (int i = 0; i < 4; i++) put_f32(data + 4 * i, f32v[i]);
    /* F16 patterns and their exact values:
     * 0x3C00 = 1.0; 0xC000 = -2.0; 0x3555 = 2^-2 * (1 + 341/1024) = 0.333251953125;
     * 0x7BFF = 2^15 * (1 + 1023/1024) = 65504 (largest half); 0x0001 = 2^-24 (smallest subnormal);
     * 0x03FF = 1023 * 2^-24 (largest subnormal); 0x8000 = -0.0; 0xFC00 = -inf */
    const uint16_t f16v[8] = {0x3C00, 0xC000, 0x3555, 0x7BFF, 0x0001, 0x03FF, 0x8000, 0xFC00};
    for (int i = 0; i < 8; i++) put_u16(data + 16 + 2 * i, f16v[i]);
    /* BF16 = top 16 bits of an fp32: 0x3F80 = 1.0; 0xC049 = -(2^1 * (1 + 73/128)) = -3.140625;
     * 0x4780 = 2^16 = 65536; 0x0001 = 2^-133 (fp32 subnormal) */
    const uint16_t bf16v[4] = {0x3F80, 0xC049, 0x4780, 0x0001};
    for (int i = 0; i < 4; i++) put_u16(data + 32 + 2 * i, bf16v[i]);
    data[40] = 1;
    data[41] = 0xff;
    data[42] = 7;
    const char *h = "{\"__metadata__\": {\"format\": \"pt\"},"
                    " \"m.f32\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]},"
                    " \"m.f16\": {\"dtype\": \"F16\", \"shape\": [8], \"data_offsets\": [16, 32]},"
                    " \"m.bf16\": {\"dtype\": \"BF16\", \"shape\": [1, 4], \"data_offsets\": [32, 40]},"
                    " \"m.i8\": {\"dtype\": \"I8\", \"shape\": [3], \"data_offsets\": [40, 43]},"
                    " \"m.empty\": {\"dtype\": \"F32\", \"shape\": [0, 5], \"data_offsets\": [43, 43]}}    ";
    const char *path = write_st("ok.safetensors", h, data, sizeof data);

    kvh_safetensors st;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_st_open(&st, path, &err), 0, "open failed: %s", err.msg);
    cr_assert_eq(st.n_tensors, 5, "__metadata__ must not count as a tensor");
    cr_assert_not_null(st.map_base);
    cr_assert_null(kvh_st_find(&st, "__metadata__"));
    cr_assert_null(kvh_st_find(&st, "m.f64"));

    const kvh_st_tensor *t = kvh_st_find(&st, "m.f32");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, KVH_ST_F32);
    cr_assert_str_eq(t->dtype_name, "F32");
    cr_assert_eq(t->n_dims, 2);
    cr_assert_eq(t->shape[0], 2);
    cr_assert_eq(t->shape[1], 2);
    cr_assert_eq(t->n_elems, 4);
    cr_assert_eq(t->n_bytes, 16);
    float out[8];
    kvh_st_to_f32(t, out);
    for (int i = 0; i < 4; i++) assert_same_float(out[i], f32v[i], "F32 copy");

    t = kvh_st_find(&st, "m.f16");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, KVH_ST_F16);
    cr_assert_eq(t->n_elems, 8);
    kvh_st_to_f32(t, out);
    assert_same_float(out[0], 1.0f, "F16 0x3C00");
    assert_same_float(out[1], -2.0f, "F16 0xC000");
    assert_same_float(out[2], 0.333251953125f, "F16 0x3555");
    assert_same_float(out[3], 65504.0f, "F16 0x7BFF");
    assert_same_float(out[4], ldexpf(1.0f, -24), "F16 0x0001");
    assert_same_float(out[5], ldexpf(1023.0f, -24), "F16 0x03FF");
    assert_same_float(out[6], -0.0f, "F16 0x8000");
    assert_same_float(out[7], -INFINITY, "F16 0xFC00");

    t = kvh_st_find(&st, "m.bf16");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, KVH_ST_BF16);
    cr_assert_eq(t->n_dims, 2);
    kvh_st_to_f32(t, out);
    assert_same_float(out[0], 1.0f, "BF16 0x3F80");
    assert_same_float(out[1], -3.140625f, "BF16 0xC049");
    assert_same_float(out[2], 65536.0f, "BF16 0x4780");
    assert_same_float(out[3], ldexpf(1.0f, -133), "BF16 0x0001");

    t = kvh_st_find(&st, "m.i8");
    cr_assert_not_null(t);
    cr_assert_eq(t->dtype, KVH_ST_OTHER, "I8 parses but is marked unusable");
    cr_assert_str_eq(t->dtype_name, "I8");
    cr_assert_eq(((const signed char *)t->data)[1], -1);

    t = kvh_st_find(&st, "m.empty");
    cr_assert_not_null(t);
    cr_assert_eq(t->n_elems, 0);
    cr_assert_eq(t->n_bytes, 0);
    kvh_st_close(&st);
    cr_assert_null(st.tensors);
    cr_assert_null(st.map_base);
}

Test(safetensors, F16_NaN_and_parse_in_memory_unaligned) {
    /* A header of odd length makes the data section start at an odd address; parse works on a buffer. */
    const char *h = "{\"x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                    " \"n\": {\"dtype\": \"F16\", \"shape\": [1], \"data_offsets\": [8, 10]}}";
    size_t hlen = strlen(h);
    cr_assert_eq(hlen % 2, 1, "fixture needs an odd header length");
    unsigned char buf[512] = {0};
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, h, hlen);
    put_f32(buf + 8 + hlen, 0.1f);
    put_f32(buf + 8 + hlen + 4, -7.0f);
    put_u16(buf + 8 + hlen + 8, 0x7E00); /* quiet NaN */
    kvh_safetensors st;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_st_parse(&st, buf, 8 + hlen + 10, "mem", &err), 0, "%s", err.msg);
    cr_assert_null(st.map_base);
    const kvh_st_tensor *t = kvh_st_find(&st, "x");
    cr_assert_not_null(t);
    cr_assert_neq((uintptr_t)t->data % 4, 0, "data should be unaligned in this fixture");
    float out[2];
    kvh_st_to_f32(t, out);
    assert_same_float(out[0], 0.1f, "unaligned F32[0]");
    assert_same_float(out[1], -7.0f, "unaligned F32[1]");
    kvh_st_to_f32(kvh_st_find(&st, "n"), out);
    cr_assert(isnan(out[0]), "F16 0x7E00 must convert to NaN, got %g", (double)out[0]);
    kvh_st_close(&st);

    /* the in-memory parser reports errors with the given name */
    cr_assert_eq(kvh_st_parse(&st, buf, 7, "mem-short", &err), -1);
    cr_assert_not_null(strstr(err.msg, "mem-short"), "%s", err.msg);
}
