/* model_config.c — GPT-2 hyper-parameters: the named presets, Hugging Face config.json parsing, limits.
 * Owns: kvh_model_preset, kvh_model_config_parse, kvh_model_config_check, kvh_model_config_param_count.
 * Does not own: weights (model.c) or the safetensors container (safetensors.c).
 * Limits exist so a hostile config.json cannot make the loader or a backend allocate absurd amounts. */
#include "model/model.h"

#include "util/json_scan.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Upper bounds on dimensions (inclusive). The largest real GPT-2 (xl) is C 1600, L 48, V 50257. */
enum {
    MAX_EMBD = 16384,
    MAX_HEAD = 1024,
    MAX_LAYER = 256,
    MAX_VOCAB = 1000000,
    MAX_POSITIONS = 65536,
    MAX_INNER = 4 * MAX_EMBD,
};

typedef struct preset {
    const char *name;
    int n_layer, n_embd, n_head;
} preset;

static const preset PRESETS[] = {
    {"gpt2", 12, 768, 12},
    {"gpt2-medium", 24, 1024, 16},
    {"gpt2-large", 36, 1280, 20},
    {"gpt2-xl", 48, 1600, 25},
};

int kvh_model_preset(const char *name, kvh_model_config *cfg, kvh_err *err) {
    for (size_t i = 0; i < sizeof PRESETS / sizeof PRESETS[0]; i++) {
        if (strcmp(PRESETS[i].name, name) != 0) continue;
        memset(cfg, 0, sizeof *cfg);
        cfg->n_vocab = 50257;
        cfg->n_positions = 1024;
        cfg->n_embd = PRESETS[i].n_embd;
        cfg->n_head = PRESETS[i].n_head;
        cfg->n_layer = PRESETS[i].n_layer;
        cfg->n_inner = 4 * PRESETS[i].n_embd;
        cfg->ln_eps = 1e-5f;
        cfg->bos_id = 50256;
        return 0;
    }
    return kvh_fail(err, "unknown model preset '%s' (known: gpt2, gpt2-medium, gpt2-large, gpt2-xl)", name);
}

size_t kvh_model_config_param_count(const kvh_model_config *c) {
    size_t V = (size_t)c->n_vocab, P = (size_t)c->n_positions, C = (size_t)c->n_embd;
    size_t L = (size_t)c->n_layer, F = (size_t)c->n_inner;
    size_t per_layer = 4 * C * C + 2 * C * F + 9 * C + F;
    return V * C + P * C + L * per_layer + 2 * C;
}

int kvh_model_config_check(const kvh_model_config *c, const char *what, kvh_err *err) {
    struct {
        const char *key;
        int v, lo, hi;
    } dims[] = {
        {"n_embd", c->n_embd, 1, MAX_EMBD},          {"n_head", c->n_head, 1, MAX_HEAD},
        {"n_layer", c->n_layer, 1, MAX_LAYER},       {"vocab_size", c->n_vocab, 1, MAX_VOCAB},
        {"n_positions", c->n_positions, 1, MAX_POSITIONS}, {"n_inner", c->n_inner, 1, MAX_INNER},
    };
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v < dims[i].lo || dims[i].v > dims[i].hi)
            return kvh_fail(err, "%s: key '%s' = %d is outside the supported range [%d, %d]", what,
                            dims[i].key, dims[i].v, dims[i].lo, dims[i].hi);
    if (c->n_embd % c->n_head != 0)
        return kvh_fail(err, "%s: key 'n_head' = %d does not divide n_embd = %d", what, c->n_head,
                        c->n_embd);
    if (!(c->ln_eps > 0.0f) || !(c->ln_eps < 1.0f))
        return kvh_fail(err, "%s: key 'layer_norm_epsilon' = %g must be in (0, 1)", what, (double)c->ln_eps);
    if (c->bos_id < 0 || c->bos_id >= c->n_vocab)
        return kvh_fail(err, "%s: key 'bos_token_id' = %d is outside the vocabulary [0, %d)", what,
                        c->bos_id, c->n_vocab);
    return 0;
}

/* Reads an integer key. Returns 1 when present, 0 when absent (or null if null_ok), -1 on error. */
static int get_int(const cJSON *root, const char *key, const char *path, bool null_ok, int *out,
                   kvh_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || (null_ok && cJSON_IsNull(it))) return 0;
    if (!cJSON_IsNumber(it))
        return kvh_fail(err, "%s: key '%s' must be an integer%s", path, key, null_ok ? " or null" : "");
    double v = it->valuedouble;
    if (v != floor(v) || v < -2147483648.0 || v > 2147483647.0)
        return kvh_fail(err, "%s: key '%s' = %g is not a 32-bit integer", path, key, v);
    *out = (int)v;
    return 1;
}

static int require_int(const cJSON *root, const char *key, const char *path, int *out, kvh_err *err) {
    int r = get_int(root, key, path, false, out, err);
    if (r == 0) return kvh_fail(err, "%s: missing required key '%s'", path, key);
    return r < 0 ? -1 : 0;
}

/* A boolean key that, when present, must have the value GPT-2 uses (the forward pass implements only
 * that variant). */
static int require_bool_value(const cJSON *root, const char *key, bool want, const char *path, kvh_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) return 0;
    if (!cJSON_IsBool(it)) return kvh_fail(err, "%s: key '%s' must be true or false", path, key);
    if ((bool)cJSON_IsTrue(it) != want)
        return kvh_fail(err, "%s: key '%s' = %s is not supported (GPT-2 uses %s)", path, key,
                        want ? "false" : "true", want ? "true" : "false");
    return 0;
}

int kvh_model_config_parse(const char *json_text, size_t len, const char *path, kvh_model_config *cfg,
                           kvh_err *err) {
    memset(cfg, 0, sizeof *cfg);
    cJSON *root = cJSON_ParseWithLength(json_text, len);
    if (!root) {
        /* cJSON says NULL both for bad text and for a failed allocation: tell them apart */
        kvh_json_scan j = {.s = json_text, .len = len};
        if (kvh_json_skip_value(&j, 64, NULL) == 0) {
            kvh_json_ws(&j);
            if (j.at == len) return kvh_fail(err, "%s: out of memory parsing %zu bytes of JSON", path, len);
            return kvh_fail(err, "%s: not valid JSON: trailing text at byte %zu", path, j.at);
        }
        return kvh_fail(err, "%s: not valid JSON: %s at byte %zu", path, j.error, j.at);
    }
    int rc = -1;
    kvh_model_config c = {0};
    if (!cJSON_IsObject(root)) {
        kvh_fail(err, "%s: top level is not a JSON object", path);
        goto done;
    }
    /* A repeated key is refused: Python's json (what Hugging Face reads config.json with) keeps the last
     * value and cJSON the first, so either choice would silently disagree with someone. */
    const char *dup = NULL;
    if (kvh_json_duplicate_key(root, &dup) != 0) {
        kvh_fail(err, "%s: out of memory checking for duplicate keys", path);
        goto done;
    }
    if (dup) {
        kvh_fail(err, "%s: key '%.64s' appears more than once (refused: Hugging Face would use the last value, "
                 "this parser the first; keep one)", path, dup);
        goto done;
    }

    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (mt && !(cJSON_IsString(mt) && strcmp(mt->valuestring, "gpt2") == 0)) {
        kvh_fail(err, "%s: key 'model_type' = %s%.64s%s: only \"gpt2\" models are supported", path,
                 cJSON_IsString(mt) ? "\"" : "", cJSON_IsString(mt) ? mt->valuestring : "(not a string)",
                 cJSON_IsString(mt) ? "\"" : "");
        goto done;
    }
    /* activation_function: GPT-2's GELU with the tanh approximation under either of its HF names;
     * absent means the HF default, gelu_new. */
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "activation_function");
    if (act && !(cJSON_IsString(act) && (strcmp(act->valuestring, "gelu_new") == 0 ||
                                          strcmp(act->valuestring, "gelu_pytorch_tanh") == 0))) {
        kvh_fail(err, "%s: key 'activation_function' = %s%.64s%s is not supported (gelu_new or "
                 "gelu_pytorch_tanh, the tanh-approximated GELU)", path, cJSON_IsString(act) ? "\"" : "",
                 cJSON_IsString(act) ? act->valuestring : "(not a string)", cJSON_IsString(act) ? "\"" : "");
        goto done;
    }
    /* Variants of attention scaling the forward pass does not implement. */
    if (require_bool_value(root, "scale_attn_weights", true, path, err) != 0) goto done;
    if (require_bool_value(root, "scale_attn_by_inverse_layer_idx", false, path, err) != 0) goto done;
    if (require_bool_value(root, "tie_word_embeddings", true, path, err) != 0) goto done;

    if (require_int(root, "n_embd", path, &c.n_embd, err) != 0) goto done;
    if (require_int(root, "n_head", path, &c.n_head, err) != 0) goto done;
    if (require_int(root, "n_layer", path, &c.n_layer, err) != 0) goto done;
    if (require_int(root, "vocab_size", path, &c.n_vocab, err) != 0) goto done;
    /* n_positions sizes wpe in HF; n_ctx is its older alias, used only when n_positions is absent. */
    int r = get_int(root, "n_positions", path, false, &c.n_positions, err);
    if (r < 0) goto done;
    if (r == 0) {
        r = get_int(root, "n_ctx", path, false, &c.n_positions, err);
        if (r < 0) goto done;
        if (r == 0) {
            kvh_fail(err, "%s: missing required key 'n_positions' (or 'n_ctx')", path);
            goto done;
        }
    }
    /* Optional keys take Hugging Face GPT2Config's defaults when absent, as transformers does. */
    r = get_int(root, "n_inner", path, true, &c.n_inner, err);
    if (r < 0) goto done;
    if (r == 0) {
        if (c.n_embd > MAX_EMBD || c.n_embd < 1) c.n_inner = 0; /* reported by the range check below */
        else c.n_inner = 4 * c.n_embd;
    }
    c.bos_id = 50256;
    if (get_int(root, "bos_token_id", path, false, &c.bos_id, err) < 0) goto done;
    c.ln_eps = 1e-5f;
    const cJSON *eps = cJSON_GetObjectItemCaseSensitive(root, "layer_norm_epsilon");
    if (eps) {
        if (!cJSON_IsNumber(eps)) {
            kvh_fail(err, "%s: key 'layer_norm_epsilon' must be a number", path);
            goto done;
        }
        c.ln_eps = (float)eps->valuedouble;
    }
    if (kvh_model_config_check(&c, path, err) != 0) goto done;
    *cfg = c;
    rc = 0;
done:
    cJSON_Delete(root);
    return rc;
}
