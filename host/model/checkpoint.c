/* checkpoint.c — implementation of checkpoint.h. A sharded checkpoint is what save_pretrained writes
 * past max_shard_size: model.safetensors.index.json {"metadata": {...}, "weight_map": {tensor: file}}
 * beside model-0000N-of-0000M.safetensors. Each shard is mapped and validated by safetensors.c; this
 * file checks that the index and the shards agree exactly, so a stale index or a mixed-up directory is
 * an error naming the tensor and the files, never a silently different model. */
#include "model/checkpoint.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static bool exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

void kvh_checkpoint_close(kvh_checkpoint *ck) {
    if (!ck) return;
    for (int i = 0; i < ck->n_files; i++) kvh_st_close(&ck->files[i]);
    free(ck->files);
    free(ck->tensors);
    free(ck->file_of);
    memset(ck, 0, sizeof *ck);
}

int kvh_checkpoint_find(const kvh_checkpoint *ck, const char *name) {
    for (int i = 0; i < ck->n_tensors; i++)
        if (strcmp(ck->tensors[i]->name, name) == 0) return i;
    return -1;
}

const char *kvh_checkpoint_file(const kvh_checkpoint *ck, int i) { return ck->files[ck->file_of[i]].path; }

/* Builds the merged table from the open files (every name once: checked for shards by the caller). */
static int build_table(kvh_checkpoint *ck, kvh_err *err) {
    size_t n = 0;
    for (int f = 0; f < ck->n_files; f++) n += (size_t)ck->files[f].n_tensors;
    if (n > (size_t)1 << 30) return kvh_fail(err, "%s: %zu tensors in all: too many", ck->path, n);
    ck->tensors = calloc(n + 1, sizeof *ck->tensors);
    ck->file_of = calloc(n + 1, sizeof *ck->file_of);
    if (!ck->tensors || !ck->file_of) return kvh_fail(err, "%s: out of memory", ck->path);
    for (int f = 0; f < ck->n_files; f++)
        for (int t = 0; t < ck->files[f].n_tensors; t++) {
            ck->tensors[ck->n_tensors] = &ck->files[f].tensors[t];
            ck->file_of[ck->n_tensors++] = f;
        }
    return 0;
}

/* A shard name from the index: a plain file name in the same directory (no '/', not "." or "..", no
 * control characters), so an index cannot make kvhost map files elsewhere. */
static int check_shard_name(const char *index_path, const char *tensor, const char *file, kvh_err *err) {
    bool bad = !*file || strchr(file, '/') || strcmp(file, ".") == 0 || strcmp(file, "..") == 0 ||
               strlen(file) > 255;
    for (const unsigned char *c = (const unsigned char *)file; !bad && *c; c++) bad = *c < 0x20 || *c == 0x7f;
    if (bad)
        return kvh_fail(err, "%s: weight_map['%s'] = '%s': a shard must be a plain file name in the model "
                        "directory", index_path, tensor, file);
    return 0;
}

static int open_sharded(kvh_checkpoint *ck, const char *dir, kvh_err *err) {
    char *text = NULL;
    size_t len = 0;
    if (kvh_read_file(ck->path, KVH_CK_INDEX_MAX_BYTES, &text, &len, err) != 0) return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    int rc = -1;
    char **names = NULL; /* distinct shard file names, in first-use order */
    int n_names = 0;
    if (!root || !cJSON_IsObject(root)) {
        kvh_fail(err, "%s: not a JSON object (a sharded checkpoint's index is {\"metadata\": ..., "
                 "\"weight_map\": {tensor: file}})", ck->path);
        goto done;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm) || !wm->child) {
        kvh_fail(err, "%s: no \"weight_map\" object naming each tensor's file", ck->path);
        goto done;
    }
    int n_entries = 0;
    for (const cJSON *e = wm->child; e; e = e->next) {
        if (!cJSON_IsString(e)) {
            kvh_fail(err, "%s: weight_map['%s'] is not a file name string", ck->path, e->string);
            goto done;
        }
        if (++n_entries > KVH_CK_MAX_ENTRIES) {
            kvh_fail(err, "%s: weight_map lists more than %d tensors (a GPT-2 of 256 layers has about 3,300)",
                     ck->path, KVH_CK_MAX_ENTRIES);
            goto done;
        }
        if (check_shard_name(ck->path, e->string, e->valuestring, err) != 0) goto done;
        for (const cJSON *d = wm->child; d != e; d = d->next)
            if (strcmp(d->string, e->string) == 0) {
                kvh_fail(err, "%s: weight_map names tensor '%s' twice ('%s' and '%s'): each tensor must be in "
                         "exactly one shard", ck->path, e->string, d->valuestring, e->valuestring);
                goto done;
            }
        int k = 0;
        while (k < n_names && strcmp(names[k], e->valuestring) != 0) k++;
        if (k == n_names) {
            char **grown = realloc(names, (size_t)(n_names + 1) * sizeof *names);
            if (!grown) {
                kvh_fail(err, "%s: out of memory", ck->path);
                goto done;
            }
            names = grown;
            names[n_names++] = e->valuestring;
        }
    }
    ck->files = calloc((size_t)n_names, sizeof *ck->files);
    if (!ck->files) {
        kvh_fail(err, "%s: out of memory", ck->path);
        goto done;
    }
    for (int k = 0; k < n_names; k++) {
        char path[4096];
        if (snprintf(path, sizeof path, "%s/%s", dir, names[k]) >= (int)sizeof path) {
            kvh_fail(err, "%s: path of shard '%s' too long", ck->path, names[k]);
            goto done;
        }
        if (!exists(path)) {
            kvh_fail(err, "%s: shard '%s' named by the index is missing (an incomplete download?)", ck->path,
                     names[k]);
            goto done;
        }
        if (kvh_st_open(&ck->files[k], path, err) != 0) goto done;
        ck->n_files++;
    }
    /* index -> shards: every listed tensor is in the file the index names */
    for (const cJSON *e = wm->child; e; e = e->next) {
        int k = 0;
        while (strcmp(names[k], e->valuestring) != 0) k++;
        if (!kvh_st_find(&ck->files[k], e->string)) {
            kvh_fail(err, "%s: weight_map puts tensor '%s' in '%s', which does not hold it (a stale index?)",
                     ck->path, e->string, names[k]);
            goto done;
        }
    }
    /* shards -> index: every tensor of a shard is listed, and listed in that shard (so none is in two) */
    for (int k = 0; k < n_names; k++)
        for (int t = 0; t < ck->files[k].n_tensors; t++) {
            const char *name = ck->files[k].tensors[t].name;
            const cJSON *e = cJSON_GetObjectItemCaseSensitive(wm, name);
            if (!e) {
                kvh_fail(err, "%s: shard '%s' holds tensor '%s', which weight_map does not list", ck->path,
                         names[k], name);
                goto done;
            }
            if (strcmp(e->valuestring, names[k]) != 0) {
                kvh_fail(err, "%s: tensor '%s' is in shard '%s' and in '%s' (weight_map says '%s'): each tensor "
                         "must be in exactly one shard", ck->path, name, names[k], e->valuestring, e->valuestring);
                goto done;
            }
        }
    rc = build_table(ck, err);
    if (rc == 0 && ck->n_tensors != n_entries) /* cannot happen after the two checks; kept as a guard */
        rc = kvh_fail(err, "%s: %d tensors in the shards, %d in weight_map", ck->path, ck->n_tensors, n_entries);
done:
    free(names);
    cJSON_Delete(root);
    return rc;
}

int kvh_checkpoint_open(kvh_checkpoint *ck, const char *dir, kvh_err *err) {
    memset(ck, 0, sizeof *ck);
    char single[4096], index[4096], bin[4096], bin_index[4096];
    if (snprintf(single, sizeof single, "%s/model.safetensors", dir) >= (int)sizeof single ||
        snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir) >= (int)sizeof index ||
        snprintf(bin, sizeof bin, "%s/pytorch_model.bin", dir) >= (int)sizeof bin ||
        snprintf(bin_index, sizeof bin_index, "%s/pytorch_model.bin.index.json", dir) >= (int)sizeof bin_index)
        return kvh_fail(err, "model '%s': path too long", dir);
    int rc;
    if (exists(single) || !exists(index)) {
        if (!exists(single)) {
            if (exists(bin) || exists(bin_index))
                return kvh_fail(err, "%s: only pytorch_model.bin is here, and kvhost does not load it: a .bin is a "
                                "Python pickle, and unpickling runs code. Convert it once (with transformers "
                                "installed): python3 -c \"import sys; from transformers import "
                                "GPT2LMHeadModel as M; M.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1], "
                                "safe_serialization=True)\" %s", dir, dir);
            return kvh_fail(err, "%s: cannot open: no such file, and no model.safetensors.index.json of a sharded checkpoint "
                            "beside it (expected a Hugging Face GPT-2 directory)", single);
        }
        snprintf(ck->path, sizeof ck->path, "%s", single);
        ck->files = calloc(1, sizeof *ck->files);
        if (!ck->files) return kvh_fail(err, "%s: out of memory", single);
        rc = kvh_st_open(&ck->files[0], single, err);
        if (rc == 0) {
            ck->n_files = 1;
            rc = build_table(ck, err);
        }
    } else {
        snprintf(ck->path, sizeof ck->path, "%s", index);
        rc = open_sharded(ck, dir, err);
    }
    if (rc != 0) kvh_checkpoint_close(ck);
    return rc;
}
