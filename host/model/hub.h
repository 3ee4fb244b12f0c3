/* hub.h — finding a Hugging Face hub id (`openai-community/gpt2-medium`, `gpt2`) on this machine.
 * Owns: telling a hub id from a path, the standard hub cache layout (HF_HUB_CACHE, HF_HOME/hub,
 * XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub; models--ORG--NAME/snapshots/REV), and the
 * message saying how to download a model that is not there. Does not own: downloading (kvhost never
 * reaches the network), loading the directory (model.c). */
#ifndef KVH_HUB_H
#define KVH_HUB_H

#include <stddef.h>

#include "util/util.h"

/* spec is not an existing directory. Returns 1 and fills out with a snapshot directory holding
 * config.json when spec is a hub id found in the cache (refs/main's snapshot, else the newest); 0 when
 * spec does not look like a hub id; -1 with a message giving the download command when it does but no
 * downloaded copy is found. */
int kvh_hub_resolve(const char *spec, char *out, size_t cap, kvh_err *err);

#endif
