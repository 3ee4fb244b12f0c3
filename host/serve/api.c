/* api.c — the OpenAI completions API without sockets (api.h): request validation, answers, SSE framing,
 * and sendable text from token bytes. */
#define _GNU_SOURCE /* memmem */
#include "serve/api.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "util/utf8.h"

int kvh_serve_fail(kvh_serve_error *e, int status, const char *param, const char *code, const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    e->type = status == 401   ? "authentication_error"
              : status == 429 ? "rate_limit_error"
              : status >= 500 ? "server_error"
                              : "invalid_request_error";
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

char *kvh_serve_error_json(const kvh_serve_error *e) {
    cJSON *root = cJSON_CreateObject(), *o = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    if (!o) {
        cJSON_Delete(root);
        return NULL;
    }
    /* messages quote request text, which may hold ill-formed UTF-8: repaired so the answer is valid JSON */
    size_t n = 0;
    char *msg = kvh_utf8_repair(e->message, strlen(e->message), &n);
    cJSON_AddStringToObject(o, "message", msg ? msg : "error");
    free(msg);
    cJSON_AddStringToObject(o, "type", e->type ? e->type : "server_error");
    if (e->param[0]) cJSON_AddStringToObject(o, "param", e->param);
    else cJSON_AddNullToObject(o, "param");
    if (e->code[0]) cJSON_AddStringToObject(o, "code", e->code);
    else cJSON_AddNullToObject(o, "code");
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

/* ---- request parsing --------------------------------------------------------------------------------- */

#define BAD(param, ...) kvh_serve_fail(e, 400, param, "invalid_value", __VA_ARGS__)

static bool is_int(const cJSON *v, double lo, double hi) {
    return cJSON_IsNumber(v) && isfinite(v->valuedouble) && floor(v->valuedouble) == v->valuedouble &&
           v->valuedouble >= lo && v->valuedouble <= hi;
}

/* OpenAI fields clients send with their defaults: accepted when they ask for nothing more. */
static int check_ignored(const cJSON *v, kvh_serve_error *e) {
    const char *k = v->string;
    bool ok;
    if (strcmp(k, "n") == 0 || strcmp(k, "best_of") == 0) ok = cJSON_IsNull(v) || is_int(v, 1, 1);
    else if (strcmp(k, "logprobs") == 0 || strcmp(k, "suffix") == 0) ok = cJSON_IsNull(v);
    else if (strcmp(k, "echo") == 0) ok = cJSON_IsNull(v) || cJSON_IsFalse(v);
    else if (strcmp(k, "presence_penalty") == 0 || strcmp(k, "frequency_penalty") == 0)
        ok = cJSON_IsNull(v) || (cJSON_IsNumber(v) && v->valuedouble == 0);
    else if (strcmp(k, "logit_bias") == 0) ok = cJSON_IsNull(v) || (cJSON_IsObject(v) && !v->child);
    else if (strcmp(k, "user") == 0) ok = cJSON_IsNull(v) || cJSON_IsString(v);
    else if (strcmp(k, "stream_options") == 0) ok = cJSON_IsNull(v) || cJSON_IsObject(v);
    else return 0; /* not one of them */
    if (!ok)
        return kvh_serve_fail(e, 400, k, "unsupported_value",
                              "'%s': only the default value is supported by kvhost serve (n=1, best_of=1, "
                              "logprobs=null, echo=false, suffix=null, penalties=0, logit_bias={})", k);
    return 1;
}

static int parse_prompt(const cJSON *v, const kvh_serve_limits *lim, kvh_serve_params *p, kvh_serve_error *e) {
    /* [x] with one string or one array of ids is the same as x; more than one is a batch */
    if (cJSON_IsArray(v) && cJSON_GetArraySize(v) >= 1 && !cJSON_IsNumber(v->child)) {
        if (cJSON_GetArraySize(v) > 1)
            return kvh_serve_fail(e, 400, "prompt", "unsupported_value",
                                  "'prompt': a batch of %d prompts is not supported; send one request per prompt",
                                  cJSON_GetArraySize(v));
        v = v->child;
    }
    if (cJSON_IsString(v)) {
        const size_t n = strlen(v->valuestring);
        if (n == 0) { /* OpenAI's default prompt */
            if (lim->eot < 0) return BAD("prompt", "'prompt' is empty");
            p->prompt = malloc(sizeof *p->prompt);
            if (!p->prompt) return kvh_serve_fail(e, 500, NULL, NULL, "out of memory");
            p->prompt[0] = lim->eot;
            p->n_prompt = 1;
            return 0;
        }
        int32_t *ids = NULL;
        size_t n_ids = 0;
        kvh_err err = {{0}};
        if (kvh_tokenizer_encode(lim->tok, v->valuestring, n, 1, &ids, &n_ids, &err) != 0)
            return BAD("prompt", "'prompt': %s", err.msg);
        if (n_ids == 0 || n_ids > (size_t)1 << 30) {
            free(ids);
            return BAD("prompt", "'prompt' encodes to no token");
        }
        p->prompt = ids;
        p->n_prompt = (int)n_ids;
        return 0;
    }
    if (cJSON_IsArray(v)) {
        const int n = cJSON_GetArraySize(v);
        if (n == 0) return BAD("prompt", "'prompt' is an empty array: give text or at least one token id");
        p->prompt = malloc((size_t)n * sizeof *p->prompt);
        if (!p->prompt) return kvh_serve_fail(e, 500, NULL, NULL, "out of memory");
        int i = 0;
        for (const cJSON *t = v->child; t; t = t->next, i++) {
            if (!is_int(t, 0, lim->n_vocab - 1))
                return BAD("prompt", "'prompt'[%d]: expected a token id in [0, %d)", i, lim->n_vocab);
            p->prompt[i] = (int32_t)t->valuedouble;
        }
        p->n_prompt = n;
        return 0;
    }
    return BAD("prompt", "'prompt': expected a string, an array of token ids, or an array with one of them");
}

static int parse_stop(const cJSON *v, kvh_serve_params *p, kvh_serve_error *e) {
    if (cJSON_IsNull(v)) return 0;
    const cJSON *one = cJSON_IsString(v) ? v : NULL;
    if (!one && !cJSON_IsArray(v)) return BAD("stop", "'stop': expected a string or an array of strings");
    if (!one && cJSON_GetArraySize(v) > KVH_SERVE_MAX_STOP)
        return BAD("stop", "'stop': at most %d strings (got %d)", KVH_SERVE_MAX_STOP, cJSON_GetArraySize(v));
    for (const cJSON *s = one ? one : v->child; s; s = one ? NULL : s->next) {
        if (!cJSON_IsString(s)) return BAD("stop", "'stop': expected strings");
        const size_t n = strlen(s->valuestring);
        if (n == 0) return BAD("stop", "'stop': an empty string would stop before the first token");
        if (n > KVH_SERVE_MAX_STOP_BYTES)
            return BAD("stop", "'stop': a stop string of %zu bytes (at most %d)", n, KVH_SERVE_MAX_STOP_BYTES);
        p->stop[p->n_stop] = strdup(s->valuestring);
        if (!p->stop[p->n_stop]) return kvh_serve_fail(e, 500, NULL, NULL, "out of memory");
        p->n_stop++;
    }
    return 0;
}

static int parse_fields(const cJSON *root, const kvh_serve_limits *lim, kvh_serve_params *p, kvh_serve_error *e) {
    const cJSON *prompt = NULL, *max_tokens = NULL;
    for (const cJSON *v = root->child; v; v = v->next) {
        const char *k = v->string;
        for (const cJSON *w = root->child; w != v; w = w->next)
            if (strcmp(w->string, k) == 0) return BAD(k, "field '%s' is given twice", k);
        const int ig = check_ignored(v, e);
        if (ig < 0) return -1;
        if (ig > 0) continue;
        if (strcmp(k, "model") == 0) {
            if (!cJSON_IsString(v)) return BAD(k, "'model': expected a string");
        } else if (strcmp(k, "prompt") == 0) {
            prompt = v;
        } else if (strcmp(k, "max_tokens") == 0) {
            max_tokens = v;
        } else if (strcmp(k, "temperature") == 0) {
            if (!cJSON_IsNull(v)) {
                if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0 && v->valuedouble <= 2))
                    return BAD(k, "'temperature': expected a number in [0, 2] (0 = greedy)");
                p->sampling.temperature = (float)v->valuedouble;
            }
        } else if (strcmp(k, "top_p") == 0) {
            if (!cJSON_IsNull(v)) {
                if (!cJSON_IsNumber(v) || !(v->valuedouble > 0 && v->valuedouble <= 1))
                    return BAD(k, "'top_p': expected a number in (0, 1]");
                p->sampling.top_p = (float)v->valuedouble;
            }
        } else if (strcmp(k, "top_k") == 0) {
            if (!cJSON_IsNull(v)) {
                if (!is_int(v, 0, lim->n_vocab))
                    return BAD(k, "'top_k': expected a whole number in [0, %d] (0 = off)", lim->n_vocab);
                p->sampling.top_k = (int)v->valuedouble;
            }
        } else if (strcmp(k, "seed") == 0) {
            if (!cJSON_IsNull(v)) {
                if (!is_int(v, 0, 9007199254740992.0)) return BAD(k, "'seed': expected a whole number in [0, 2^53]");
                p->sampling.seed = (uint64_t)v->valuedouble;
            }
        } else if (strcmp(k, "stop") == 0) {
            if (parse_stop(v, p, e) != 0) return -1;
        } else if (strcmp(k, "stream") == 0) {
            if (!cJSON_IsNull(v) && !cJSON_IsBool(v)) return BAD(k, "'stream': expected true or false");
            p->stream = cJSON_IsTrue(v);
        } else if (strcmp(k, "truncate") == 0) {
            if (!cJSON_IsNull(v) && !cJSON_IsBool(v)) return BAD(k, "'truncate': expected true or false");
            p->truncate = cJSON_IsTrue(v);
        } else {
            return kvh_serve_fail(e, 400, k, "unknown_field",
                                  "unknown field '%s' (kvhost serve takes model, prompt, max_tokens, temperature, "
                                  "top_k, top_p, seed, stop, stream, truncate)", k);
        }
    }
    if (!prompt) return kvh_serve_fail(e, 400, "prompt", "missing_field", "'prompt' is required");
    p->max_tokens = KVH_SERVE_DEFAULT_MAX_TOKENS;
    if (max_tokens && !cJSON_IsNull(max_tokens)) {
        if (!is_int(max_tokens, -1e300, 1e300))
            return BAD("max_tokens", "'max_tokens': expected a whole number");
        if (max_tokens->valuedouble < 1 || max_tokens->valuedouble > lim->n_positions - 1)
            return BAD("max_tokens", "'max_tokens' %.0f: expected 1..%d (the model's context is %d tokens)",
                       max_tokens->valuedouble, lim->n_positions - 1, lim->n_positions);
        p->max_tokens = (int)max_tokens->valuedouble;
    }
    if (parse_prompt(prompt, lim, p, e) != 0) return -1;
    if (p->n_prompt + p->max_tokens > lim->n_positions) {
        if (!p->truncate)
            return kvh_serve_fail(e, 400, "prompt", "context_length_exceeded",
                                  "the prompt (%d tokens) + max_tokens (%d) exceeds the model's context of %d tokens; "
                                  "shorten it, lower max_tokens, or send \"truncate\": true to keep its last %d tokens",
                                  p->n_prompt, p->max_tokens, lim->n_positions, lim->n_positions - p->max_tokens);
        const int keep = lim->n_positions - p->max_tokens;
        p->n_truncated = p->n_prompt - keep;
        memmove(p->prompt, p->prompt + p->n_truncated, (size_t)keep * sizeof *p->prompt);
        p->n_prompt = keep;
    }
    return 0;
}

int kvh_serve_parse_completion(const char *body, size_t len, const kvh_serve_limits *lim, kvh_serve_params *out,
                               kvh_serve_error *e) {
    memset(out, 0, sizeof *out);
    if (memchr(body, 0, len)) return kvh_serve_fail(e, 400, NULL, "invalid_json", "the body holds a NUL byte");
    char *text = malloc(len + 1);
    if (!text) return kvh_serve_fail(e, 500, NULL, NULL, "out of memory");
    memcpy(text, body, len);
    text[len] = 0;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(text, &end, 1);
    if (!root) {
        const size_t at = end && end >= text ? (size_t)(end - text) : 0;
        free(text);
        return kvh_serve_fail(e, 400, NULL, "invalid_json", "malformed JSON body (at byte %zu of %zu)", at, len);
    }
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return kvh_serve_fail(e, 400, NULL, "invalid_json", "the body must be a JSON object");
    }
    kvh_serve_params p = {0};
    p.sampling = kvh_sampler_default_params();
    p.sampling.temperature = 1.0f; /* OpenAI's default */
    p.sampling.top_k = 0;
    p.sampling.top_p = 1.0f;
    p.sampling.seed = lim->default_seed;
    const int rc = parse_fields(root, lim, &p, e);
    cJSON_Delete(root);
    if (rc != 0) {
        kvh_serve_params_free(&p);
        return -1;
    }
    *out = p;
    return 0;
}

void kvh_serve_params_free(kvh_serve_params *p) {
    if (!p) return;
    free(p->prompt);
    for (int i = 0; i < p->n_stop; i++) free(p->stop[i]);
    memset(p, 0, sizeof *p);
}

/* ---- sendable text ---------------------------------------------------------------------------------- */

void kvh_serve_text_init(kvh_serve_text *t, char *const *stop, int n_stop) {
    memset(t, 0, sizeof *t);
    t->stop = stop;
    t->n_stop = n_stop;
}

void kvh_serve_text_free(kvh_serve_text *t) {
    free(t->pend);
    free(t->out);
    memset(t, 0, sizeof *t);
}

static int grow(char **p, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    char *q = realloc(*p, c);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

/* Moves pend[0..n) to out (ill-formed bytes as U+FFFD). */
static int emit(kvh_serve_text *t, size_t n) {
    if (n == 0) return 0;
    size_t m = 0;
    char *r = kvh_utf8_repair(t->pend, n, &m);
    if (!r || grow(&t->out, &t->cap_out, t->n_out + m + 1) != 0) {
        free(r);
        return -1;
    }
    memcpy(t->out + t->n_out, r, m);
    t->n_out += m;
    t->out[t->n_out] = 0;
    free(r);
    memmove(t->pend, t->pend + n, t->n_pend - n);
    t->n_pend -= n;
    return 0;
}

/* Bytes at the end of pend that may still become a whole character. */
static size_t utf8_hold(const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        int ok = 0;
        const size_t k = kvh_utf8_scan(s + i, n - i, &ok);
        if (!ok && i + k == n) {
            const unsigned c = (unsigned char)s[i];
            const size_t want = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 1;
            if (c >= 0xC2 && c <= 0xF4 && k < want) return k;
        }
        i += k;
    }
    return 0;
}

/* Longest end of pend that is the start of a stop string (shorter than the whole string). */
static size_t stop_hold(const kvh_serve_text *t) {
    size_t best = 0;
    for (int j = 0; j < t->n_stop; j++) {
        const size_t L = strlen(t->stop[j]);
        for (size_t k = L - 1 < t->n_pend ? L - 1 : t->n_pend; k > best; k--)
            if (memcmp(t->pend + t->n_pend - k, t->stop[j], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

int kvh_serve_text_push(kvh_serve_text *t, const char *bytes, size_t n, size_t *emit_from) {
    *emit_from = t->n_out;
    if (t->stopped) return 1;
    if (grow(&t->pend, &t->cap_pend, t->n_pend + n) != 0) return -1;
    memcpy(t->pend + t->n_pend, bytes, n);
    t->n_pend += n;
    /* the earliest stop string in the pending bytes (what was sent holds none, and no start of one) */
    size_t first = (size_t)-1;
    for (int j = 0; j < t->n_stop; j++) {
        const char *hit = memmem(t->pend, t->n_pend, t->stop[j], strlen(t->stop[j]));
        if (hit && (size_t)(hit - t->pend) < first) first = (size_t)(hit - t->pend);
    }
    if (first != (size_t)-1) {
        if (emit(t, first) != 0) return -1;
        t->n_pend = 0;
        t->stopped = true;
        return 1;
    }
    const size_t h1 = utf8_hold(t->pend, t->n_pend), h2 = stop_hold(t);
    return emit(t, t->n_pend - (h1 > h2 ? h1 : h2));
}

int kvh_serve_text_flush(kvh_serve_text *t, size_t *emit_from) {
    *emit_from = t->n_out;
    if (t->stopped) return 1;
    if (emit(t, t->n_pend) != 0) return -1;
    if (!t->out && grow(&t->out, &t->cap_out, 1) == 0) t->out[0] = 0;
    return t->out ? 0 : -1;
}

/* ---- answers ------------------------------------------------------------------------------------------ */

/* text[0..len) as a JSON string literal (malloc'd): cJSON strings end at a NUL byte, token text may hold
 * one. */
static char *json_string(const char *s, size_t n) {
    char *o = malloc(n * 6 + 3), *w = o;
    if (!o) return NULL;
    *w++ = '"';
    for (size_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *w++ = '\\';
            *w++ = (char)c;
        } else if (c == '\n') {
            *w++ = '\\';
            *w++ = 'n';
        } else if (c < 0x20 || c == 0x7f) {
            w += sprintf(w, "\\u%04x", c);
        } else {
            *w++ = (char)c;
        }
    }
    *w++ = '"';
    *w = 0;
    return o;
}

static cJSON *completion_object(const char *id, long long created, const char *model, const char *text, size_t len,
                                const char *finish_reason, int prompt_tokens, int completion_tokens) {
    cJSON *o = cJSON_CreateObject();
    char *js = json_string(text, len);
    if (!o || !js) goto oom;
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", "text_completion");
    cJSON_AddNumberToObject(o, "created", (double)created);
    cJSON_AddStringToObject(o, "model", model);
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    cJSON *c = cJSON_CreateObject();
    if (!choices || !c || !cJSON_AddItemToArray(choices, c)) {
        cJSON_Delete(c);
        goto oom;
    }
    if (!cJSON_AddRawToObject(c, "text", js)) goto oom;
    cJSON_AddNumberToObject(c, "index", 0);
    cJSON_AddNullToObject(c, "logprobs");
    if (finish_reason) cJSON_AddStringToObject(c, "finish_reason", finish_reason);
    else cJSON_AddNullToObject(c, "finish_reason");
    if (prompt_tokens >= 0) {
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        if (!u) goto oom;
        cJSON_AddNumberToObject(u, "prompt_tokens", prompt_tokens);
        cJSON_AddNumberToObject(u, "completion_tokens", completion_tokens);
        cJSON_AddNumberToObject(u, "total_tokens", prompt_tokens + completion_tokens);
    }
    free(js);
    return o;
oom:
    free(js);
    cJSON_Delete(o);
    return NULL;
}

char *kvh_serve_completion_json(const char *id, long long created, const char *model, const char *text, size_t len,
                                const char *finish_reason, int prompt_tokens, int completion_tokens) {
    cJSON *o = completion_object(id, created, model, text, len, finish_reason, prompt_tokens, completion_tokens);
    char *s = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return s;
}

char *kvh_serve_sse_chunk(const char *id, long long created, const char *model, const char *text, size_t len,
                          const char *finish_reason, int prompt_tokens, int completion_tokens) {
    cJSON *o = completion_object(id, created, model, text, len, finish_reason, prompt_tokens, completion_tokens);
    char *j = o ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!j) return NULL;
    const size_t n = strlen(j);
    char *s = malloc(n + 9);
    if (s) {
        memcpy(s, "data: ", 6);
        memcpy(s + 6, j, n);
        memcpy(s + 6 + n, "\n\n", 3);
    }
    free(j);
    return s;
}

char *kvh_serve_models_json(const char *model, long long created) {
    cJSON *o = cJSON_CreateObject();
    cJSON *data = o ? cJSON_AddArrayToObject(o, "data") : NULL;
    cJSON *m = cJSON_CreateObject();
    if (!data || !m || !cJSON_AddItemToArray(data, m)) {
        cJSON_Delete(m);
        cJSON_Delete(o);
        return NULL;
    }
    cJSON_AddStringToObject(o, "object", "list");
    cJSON_AddStringToObject(m, "id", model);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)created);
    cJSON_AddStringToObject(m, "owned_by", "kvhost");
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

bool kvh_serve_auth_ok(const char *header, const char *key) {
    if (!key || !key[0]) return true;
    if (!header) return false;
    static const char prefix[] = "Bearer ";
    const size_t np = sizeof prefix - 1, nk = strlen(key), nh = strlen(header);
    /* every byte of the header is compared (against the expected text, or against itself past its end),
     * and the lengths are folded in at the end: no early exit */
    unsigned diff = (unsigned)(nh != np + nk);
    for (size_t i = 0; i < nh; i++) {
        const unsigned char want = i < np ? (unsigned char)prefix[i] : i < np + nk ? (unsigned char)key[i - np] : 0;
        diff |= (unsigned)((unsigned char)header[i] ^ want);
    }
    return diff == 0;
}
