/* test_checkpoint.c — weights in other shapes than one model.safetensors (issue 20): sharded checkpoints
 * (model.safetensors.index.json + shards, built here from a single file, the way save_pretrained splits
 * them) load to the same logits as the single file, bit for bit; every disagreement between the index and
 * the shards is an error naming the tensor and files; a pytorch_model.bin-only directory, a git-lfs
 * pointer and a hub id (found in, or missing from, a Hugging Face cache laid out here) get their
 * messages. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/checkpoint.h"
#include "model/model.h"
#include "helpers/model_fixture.h"
#include "runtime/session.h"
#include "helpers/test_util.h"

static const kvh_fx_shape SHAPE = {.V = 257, .P = 64, .C = 32, .NH = 4, .L = 3};

static void copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    cr_assert(a && b, "copy %s -> %s", from, to);
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) cr_assert_eq(fwrite(buf, 1, n, b), n);
    fclose(a);
    fclose(b);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "wb");
    cr_assert_not_null(f, "%s", p);
    fputs(text, f);
    fclose(f);
}

/* Writes one safetensors file holding tensors idx[0..n-1] of src (bytes copied as stored). */
static void write_shard(const char *path, const kvh_safetensors *src, const int *idx, int n) {
    char *hdr = malloc(1 << 20);
    size_t hl = 0, off = 0;
    hl += (size_t)sprintf(hdr + hl, "{");
    for (int k = 0; k < n; k++) {
        const kvh_st_tensor *t = &src->tensors[idx[k]];
        hl += (size_t)sprintf(hdr + hl, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", k ? "," : "", t->name, t->dtype_name);
        for (int d = 0; d < t->n_dims; d++) hl += (size_t)sprintf(hdr + hl, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        hl += (size_t)sprintf(hdr + hl, "],\"data_offsets\":[%zu,%zu]}", off, off + t->n_bytes);
        off += t->n_bytes;
    }
    hl += (size_t)sprintf(hdr + hl, "}");
    while (hl % 8) hdr[hl++] = ' ';
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "%s", path);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(hdr, 1, hl, f);
    for (int k = 0; k < n; k++) fwrite(src->tensors[idx[k]].data, 1, src->tensors[idx[k]].n_bytes, f);
    fclose(f);
    free(hdr);
}

/* Splits src_dir/model.safetensors into n_shards files (tensor i -> shard i % n_shards) in dst_dir, with
 * config.json (and the tokenizer when present) copied and model.safetensors.index.json written. */
static void make_sharded(const char *src_dir, const char *dst_dir, int n_shards) {
    mkdir(dst_dir, 0755);
    char p[4096], q[4096];
    const char *copies[] = {"config.json", "vocab.json", "merges.txt"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", src_dir, copies[i]);
        snprintf(q, sizeof q, "%s/%s", dst_dir, copies[i]);
        if (access(p, R_OK) == 0) copy_file(p, q);
    }
    snprintf(p, sizeof p, "%s/model.safetensors", src_dir);
    kvh_safetensors st;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_st_open(&st, p, &err), 0, "%s", err.msg);
    int *idx = malloc((size_t)st.n_tensors * sizeof *idx);
    char *index = malloc(1 << 20);
    size_t il = (size_t)sprintf(index, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
    for (int s = 0; s < n_shards; s++) {
        int n = 0;
        for (int t = s; t < st.n_tensors; t += n_shards) {
            idx[n++] = t;
            il += (size_t)sprintf(index + il, "%s\n  \"%s\": \"model-%05d-of-%05d.safetensors\"", il > 60 ? "," : "",
                                  st.tensors[t].name, s + 1, n_shards);
        }
        snprintf(q, sizeof q, "%s/model-%05d-of-%05d.safetensors", dst_dir, s + 1, n_shards);
        write_shard(q, &st, idx, n);
    }
    sprintf(index + il, "\n}}\n");
    write_text(dst_dir, "model.safetensors.index.json", index);
    free(index);
    free(idx);
    kvh_st_close(&st);
}

static const char *fixture_dir(const char *name) {
    static char buf[8][4096];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 4096, "%s/%s", kvh_test_tmpdir(), name);
    return p;
}

/* all-position logits [n, V] of ids under model m */
static float *logits_of(const kvh_model *m, const int32_t *ids, int n) {
    kvh_session_options o = kvh_session_default_options();
    o.threads = 2;
    kvh_session *s = NULL;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_session_create(&s, m, NULL, &o, &err), 0, "%s", err.msg);
    float *out = malloc((size_t)n * (size_t)m->cfg.n_vocab * sizeof(float));
    int seq = 0;
    kvh_batch b = {.n = 1, .seq = &seq, .tokens = &ids, .n_tokens = &n, .all_logits = true};
    cr_assert_eq(kvh_session_forward(s, &b, out, &err), 0, "%s", err.msg);
    kvh_session_free(s);
    return out;
}

static void expect_same_logits(const char *single, const char *sharded) {
    kvh_model a, b;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&a, single, &err), 0, "%s", err.msg);
    cr_assert_eq(kvh_model_load(&b, sharded, &err), 0, "%s: %s", sharded, err.msg);
    cr_assert_eq(a.n_params, b.n_params);
    int32_t ids[12];
    for (int i = 0; i < 12; i++) ids[i] = (int32_t)((i * 37 + 5) % (a.cfg.n_vocab < 256 ? a.cfg.n_vocab : 256));
    float *la = logits_of(&a, ids, 12), *lb = logits_of(&b, ids, 12);
    size_t n = (size_t)12 * (size_t)a.cfg.n_vocab;
    kvh_test_compare("sharded vs single-file logits", lb, la, n, 0.0);
    cr_assert_eq(memcmp(la, lb, n * sizeof(float)), 0, "sharded logits are not bit-identical to the single file's");
    free(la);
    free(lb);
    kvh_model_free(&a);
    kvh_model_free(&b);
}

Test(checkpoint, sharded_equals_single_file) {
    const char *single = fixture_dir("single"), *two = fixture_dir("two"), *five = fixture_dir("five");
    kvh_fx_write_model(single, SHAPE, "F32", NULL, NULL, NULL);
    make_sharded(single, two, 2);
    make_sharded(single, five, 5);
    kvh_checkpoint ck;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_checkpoint_open(&ck, five, &err), 0, "%s", err.msg);
    cr_assert_eq(ck.n_files, 5);
    cr_assert(strstr(ck.path, "model.safetensors.index.json"));
    kvh_checkpoint_close(&ck);
    expect_same_logits(single, two);
    expect_same_logits(single, five);
}

Test(checkpoint, sharded_bf16_equals_single_file) {
    const char *single = fixture_dir("single16"), *three = fixture_dir("three16");
    kvh_fx_write_model(single, SHAPE, "BF16", NULL, NULL, NULL);
    make_sharded(single, three, 3);
    expect_same_logits(single, three);
}

/* The trained tiny model (HF layout with the transformer. prefix and attn.bias buffers), in 3 shards. */
Test(checkpoint, tiny_model_sharded_equals_single_file) {
    const char *dir = kvh_test_tiny_model_dir();
    if (!dir) cr_skip_test("../shared/models/gpt2-tiny-wt absent");
    const char *three = fixture_dir("tiny3");
    make_sharded(dir, three, 3);
    expect_same_logits(dir, three);
}

/* A sharded copy of a fixture whose index is then replaced by `index` (NULL: keep), for the refusals. */
static const char *broken(const char *name, const char *index) {
    const char *single = fixture_dir("base"), *d = fixture_dir(name);
    char p[4096];
    snprintf(p, sizeof p, "%s/model.safetensors", single);
    if (access(p, R_OK) != 0) kvh_fx_write_model(single, SHAPE, "F32", NULL, NULL, NULL);
    make_sharded(single, d, 2);
    if (index) write_text(d, "model.safetensors.index.json", index);
    return d;
}

static void expect_refused(const char *dir, const char *f1, const char *f2) {
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, dir, &err), -1, "%s loaded", dir);
    cr_assert(strstr(err.msg, f1), "expected '%s' in: %s", f1, err.msg);
    if (f2) cr_assert(strstr(err.msg, f2), "expected '%s' in: %s", f2, err.msg);
}

/* Reads the written index and applies one textual substitution. */
static char *index_with(const char *dir, const char *from, const char *to) {
    char p[4096], *buf = calloc(1, 1 << 20);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(p, "rb");
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *at = strstr(buf, from);
    cr_assert_not_null(at, "'%s' not in the index", from);
    char *out = calloc(1, (1 << 20) + strlen(to));
    memcpy(out, buf, (size_t)(at - buf));
    strcat(out, to);
    strcat(out, at + strlen(from));
    free(buf);
    return out;
}

Test(checkpoint, index_and_shards_must_agree) {
    const char *d = broken("missing_shard", NULL);
    char p[4096];
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", d);
    cr_assert_eq(unlink(p), 0);
    expect_refused(d, "shard 'model-00002-of-00002.safetensors' named by the index is missing", NULL);

    /* the index says wpe.weight is in shard 1, but it is in shard 2 */
    d = broken("stale", NULL);
    char *ix = index_with(d, "\"wpe.weight\": \"model-00002-of-00002", "\"wpe.weight\": \"model-00001-of-00002");
    write_text(d, "model.safetensors.index.json", ix);
    free(ix);
    expect_refused(d, "puts tensor 'wpe.weight' in 'model-00001-of-00002.safetensors', which does not hold it", NULL);

    /* a tensor in a shard that the index does not list */
    d = broken("unlisted", NULL);
    ix = index_with(d, "\n  \"wpe.weight\": \"model-00002-of-00002.safetensors\",", "");
    write_text(d, "model.safetensors.index.json", ix);
    free(ix);
    expect_refused(d, "holds tensor 'wpe.weight', which weight_map does not list", NULL);

    /* a tensor listed twice */
    d = broken("twice", NULL);
    ix = index_with(d, "\"weight_map\": {", "\"weight_map\": {\"wpe.weight\": \"model-00002-of-00002.safetensors\", ");
    write_text(d, "model.safetensors.index.json", ix);
    free(ix);
    expect_refused(d, "names tensor 'wpe.weight' twice", NULL);

    /* a tensor in two shards: shard 1 rewritten with its own tensors (even indices) plus tensor 1, which
     * the index and shard 2 hold */
    d = broken("in_two", NULL);
    {
        char a[4096];
        kvh_safetensors st;
        kvh_err err = {{0}};
        snprintf(a, sizeof a, "%s/model.safetensors", fixture_dir("base"));
        cr_assert_eq(kvh_st_open(&st, a, &err), 0, "%s", err.msg);
        int idx[256], n = 0;
        for (int t = 0; t < st.n_tensors; t += 2) idx[n++] = t;
        idx[n++] = 1;
        snprintf(a, sizeof a, "%s/model-00001-of-00002.safetensors", d);
        write_shard(a, &st, idx, n);
        char want[512];
        snprintf(want, sizeof want, "tensor '%s' is in shard 'model-00001-of-00002.safetensors' and in "
                 "'model-00002-of-00002.safetensors'", st.tensors[1].name);
        kvh_st_close(&st);
        expect_refused(d, want, "must be in exactly one shard");
    }

    /* shard names must stay in the directory */
    d = broken("escape", NULL);
    ix = index_with(d, "\"model-00001-of-00002.safetensors\"", "\"../base/model.safetensors\"");
    write_text(d, "model.safetensors.index.json", ix);
    free(ix);
    expect_refused(d, "'../base/model.safetensors': a shard must be a plain file name", NULL);

    d = broken("no_map", "{\"metadata\": {}}");
    expect_refused(d, "no \"weight_map\" object", NULL);
    d = broken("not_json", "{\"weight_map\": ");
    expect_refused(d, "not a JSON object", NULL);
}

static const char LFS_POINTER[] = "version https://git-lfs.github.com/spec/v1\n"
                                  "oid sha256:4b1e1b1f8f6c6e1f0d1f7e9a3d0b3c7c2e5a1c7b1d2e3f4a5b6c7d8e9f0a1b2c\n"
                                  "size 1421662352\n";

Test(checkpoint, lfs_pointer_bin_and_missing_weights_are_named) {
    const char *single = fixture_dir("lfs");
    kvh_fx_write_model(single, SHAPE, "F32", NULL, NULL, NULL);
    write_text(single, "model.safetensors", LFS_POINTER);
    expect_refused(single, "git-lfs pointer", "git lfs pull");

    const char *sh = broken("lfs_shard", NULL);
    write_text(sh, "model-00002-of-00002.safetensors", LFS_POINTER);
    expect_refused(sh, "model-00002-of-00002.safetensors: this is a git-lfs pointer", NULL);

    const char *bin = fixture_dir("bin_only");
    kvh_fx_write_model(bin, SHAPE, "F32", NULL, NULL, NULL);
    char p[4096];
    snprintf(p, sizeof p, "%s/model.safetensors", bin);
    cr_assert_eq(unlink(p), 0);
    write_text(bin, "pytorch_model.bin", "PK\003\004 not unpickled");
    expect_refused(bin, "only pytorch_model.bin is here", "save_pretrained");

    snprintf(p, sizeof p, "%s/pytorch_model.bin", bin);
    cr_assert_eq(unlink(p), 0);
    expect_refused(bin, "model.safetensors: cannot open: no such file, and no model.safetensors.index.json", NULL);
}

/* A hub id resolves to its snapshot in the cache (HF_HOME/hub/models--ORG--NAME/snapshots/REV, REV from
 * refs/main); a missing one names the cache directory and prints the download command. */
Test(checkpoint, hub_id_from_the_cache_or_a_download_hint) {
    const char *home = fixture_dir("hf_home");
    char repo[1024], snap[1100], cmd[2400];
    cr_assert(snprintf(repo, sizeof repo, "%s/hub/models--test-org--tiny-gpt2", home) < (int)sizeof repo);
    cr_assert(snprintf(snap, sizeof snap, "%s/snapshots/0123abcd", repo) < (int)sizeof snap);
    cr_assert(snprintf(cmd, sizeof cmd, "mkdir -p '%s/refs' '%s/snapshots/ffff0000'", repo, repo) < (int)sizeof cmd);
    cr_assert_eq(system(cmd), 0);
    kvh_fx_write_model(snap, SHAPE, "F32", NULL, NULL, NULL);
    write_text(repo, "refs/main", "0123abcd\n");
    setenv("HF_HOME", home, 1);
    unsetenv("HF_HUB_CACHE");
    kvh_model m;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_load(&m, "test-org/tiny-gpt2", &err), 0, "%s", err.msg);
    cr_assert_str_eq(m.name, "tiny-gpt2");
    cr_assert(strstr(m.source, "snapshots/0123abcd"), "source %s", m.source);
    kvh_model_free(&m);

    cr_assert_eq(kvh_model_load(&m, "test-org/absent-model", &err), -1);
    cr_assert(strstr(err.msg, "models--test-org--absent-model"), "%s", err.msg);
    cr_assert(strstr(err.msg, "huggingface-cli download test-org/absent-model --local-dir"), "%s", err.msg);
    cr_assert_eq(kvh_model_load(&m, "gpt2-medium", &err), -1);
    cr_assert(strstr(err.msg, "huggingface-cli download openai-community/gpt2-medium"), "%s", err.msg);
    /* paths are not hub ids: the old message stays */
    cr_assert_eq(kvh_model_load(&m, "/nonexistent/dir/x", &err), -1);
    cr_assert(strstr(err.msg, "not a directory"), "%s", err.msg);
}

/* A hostile index with more entries than any GPT-2 has is refused at once (the checks are quadratic). */
Test(checkpoint, huge_index_refused) {
    const char *d = broken("huge", NULL);
    size_t cap = 40u << 20;
    char *ix = malloc(cap);
    size_t n = (size_t)sprintf(ix, "{\"weight_map\": {");
    for (int i = 0; i < 20000; i++) n += (size_t)sprintf(ix + n, "%s\"t%d\": \"model-00001-of-00002.safetensors\"", i ? "," : "", i);
    sprintf(ix + n, "}}");
    write_text(d, "model.safetensors.index.json", ix);
    free(ix);
    expect_refused(d, "weight_map lists more than 16384 tensors", NULL);
}
