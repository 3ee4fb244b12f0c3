/* checkpoint.h — the weight files of a Hugging Face model directory, as one table of tensors.
 * Owns: deciding which files hold the weights (model.safetensors, or model.safetensors.index.json and
 * the shards its weight_map names), opening every file (safetensors.c), validating the index (each
 * tensor in exactly one shard, every shard present and holding exactly the tensors the index gives it,
 * file names without directories), and the clear refusals: a pytorch_model.bin-only directory (pickle is
 * never loaded) and missing weights. Does not own: what the tensors mean (model.c), config.json. */
#ifndef KVH_CHECKPOINT_H
#define KVH_CHECKPOINT_H

#include "model/safetensors.h"
#include "util/util.h"

typedef struct kvh_checkpoint {
    char path[4096];              /* model.safetensors, or the index file of a sharded checkpoint */
    kvh_safetensors *files;       /* [n_files] */
    int n_files;
    const kvh_st_tensor **tensors; /* [n_tensors]: every tensor of every file, each once */
    int *file_of;                 /* [n_tensors]: index into files */
    int n_tensors;
} kvh_checkpoint;

/* Upper bounds on model.safetensors.index.json (GPT-2 XL's is 30 KB and lists 581 tensors; the largest
 * config.json allows, 256 layers, about 3,300): the checks between index and shards are quadratic in the
 * number of entries, so a hostile index is refused rather than left to run for hours. */
enum { KVH_CK_INDEX_MAX_BYTES = 16 << 20, KVH_CK_MAX_ENTRIES = 16384 };

/* Opens the weights of directory dir. On failure *ck is zeroed and nothing stays mapped. */
int kvh_checkpoint_open(kvh_checkpoint *ck, const char *dir, kvh_err *err);
void kvh_checkpoint_close(kvh_checkpoint *ck);
/* Index into ck->tensors, or -1. */
int kvh_checkpoint_find(const kvh_checkpoint *ck, const char *name);
/* The file holding tensor i (for messages). */
const char *kvh_checkpoint_file(const kvh_checkpoint *ck, int i);

#endif
