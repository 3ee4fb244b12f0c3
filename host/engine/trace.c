/* trace.c — request trace files (JSON Lines) and the synthetic trace generator: see trace.h and
 * docs/trace.md. Each line is walked once with util/json_scan.h: keys are looked up as they come (an
 * unknown or repeated key fails at once), each value's span is kept, then the spans are read by key. */
#define _POSIX_C_SOURCE 200809L
#include "engine/trace.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/tokenizer.h"
#include "util/json_scan.h"
#include "util/utf8.h"

/* ---- the synthetic-token rule ---------------------------------------------------------------------- */

#define GOLDEN 0x9E3779B97F4A7C15ull

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* splitmix64: the state advances by GOLDEN, the output is mix64(state) */
static uint64_t splitmix64(uint64_t *x) { return mix64(*x += GOLDEN); }

static uint64_t fnv1a64(const char *tag, const char *label) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const unsigned char *p = (const unsigned char *)tag; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    for (const unsigned char *p = (const unsigned char *)label; *p; p++) h = (h ^ *p) * 0x100000001b3ull;
    return h;
}

/* Draw k (0-based) of the stream seeded with h, as a token id: splitmix64's state after k+1 steps is
 * h + (k+1) * GOLDEN, so any position is reached without drawing the ones before it. */
static int32_t stream_token(uint64_t h, int k, int vocab) {
    return (int32_t)(mix64(h + (uint64_t)(k + 1) * GOLDEN) % (uint64_t)(vocab - 1));
}

void kvh_trace_synthetic_ids(int32_t *ids, int n, const char *id, const char *prefix, int prefix_tokens,
                             int vocab) {
    if (prefix_tokens > n) prefix_tokens = n;
    if (prefix_tokens < 0) prefix_tokens = 0;
    uint64_t hp = fnv1a64("prefix:", prefix ? prefix : "");
    uint64_t hr = fnv1a64("request:", id ? id : "");
    for (int k = 0; k < prefix_tokens; k++) ids[k] = stream_token(hp, k, vocab);
    for (int k = prefix_tokens; k < n; k++) ids[k] = stream_token(hr, k, vocab);
}

/* ---- parsing ---------------------------------------------------------------------------------------- */

enum {
    K_ID, K_ARRIVAL, K_PROMPT, K_PROMPT_IDS, K_PROMPT_TOKENS, K_MAX_TOKENS, K_PREFIX, K_PREFIX_TOKENS,
    K_TEMPERATURE, K_TOP_K, K_TOP_P, K_SEED, K_IGNORE_EOS, K_COUNT
};
static const char *const key_names[K_COUNT] = {
    "id", "arrival", "prompt", "prompt_ids", "prompt_tokens", "max_tokens", "prefix", "prefix_tokens",
    "temperature", "top_k", "top_p", "seed", "ignore_eos"};
#define KNOWN_KEYS "id, arrival, prompt, prompt_ids, prompt_tokens, max_tokens, prefix, prefix_tokens, " \
                   "temperature, top_k, top_p, seed, ignore_eos"

typedef struct parser {
    const char *name;
    const kvh_tokenizer *tok;
    int vocab, n_positions;
    kvh_trace_request *req;
    int n, cap;
} parser;

/* One line being read: its text and, per key, the span of its value (b == 0: absent). */
typedef struct line_ctx {
    const parser *p;
    const char *s;
    size_t len;
    int line;
    size_t a[K_COUNT], b[K_COUNT];
} line_ctx;

/* A value's text for messages: at most 40 bytes, unprintable bytes as '?'. */
static void shown(const line_ctx *c, int k, char *out, size_t cap) {
    size_t n = c->b[k] - c->a[k], m = n > 40 ? 40 : n, o = 0;
    for (size_t i = 0; i < m && o + 1 < cap; i++) {
        unsigned char ch = (unsigned char)c->s[c->a[k] + i];
        out[o++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    if (m < n && o + 4 < cap) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
}

static int key_fail(const line_ctx *c, int k, kvh_err *err, const char *what) {
    char got[64];
    shown(c, k, got, sizeof got);
    return kvh_fail(err, "%s:%d: key '%s': %s (got %s)", c->p->name, c->line, key_names[k], what, got);
}

/* The number at the key's span as a double; -1 when the value is not a number. */
static int span_number(const line_ctx *c, int k, double *out) {
    const char *s = c->s + c->a[k];
    size_t n = c->b[k] - c->a[k];
    if (n == 0 || !(s[0] == '-' || (s[0] >= '0' && s[0] <= '9'))) return -1;
    char small[64], *buf = small;
    if (n >= sizeof small) {
        buf = malloc(n + 1);
        if (!buf) return -1;
    }
    memcpy(buf, s, n);
    buf[n] = '\0';
    *out = strtod(buf, NULL); /* validated by kvh_json_number: the whole span is the number */
    if (buf != small) free(buf);
    return 0;
}

/* An integer key in [lo, hi]; `what` is the rule for the message. */
static int span_int(const line_ctx *c, int k, long lo, long hi, const char *what, int *out, kvh_err *err) {
    double v;
    if (span_number(c, k, &v) != 0 || !isfinite(v) || v != floor(v) || v < (double)lo || v > (double)hi)
        return key_fail(c, k, err, what);
    *out = (int)v;
    return 0;
}

/* The string at the key's span, decoded into a malloc'd NUL-terminated buffer; checks UTF-8 and NUL. */
static int span_string(const line_ctx *c, int k, char **out, size_t *out_len, kvh_err *err) {
    *out = NULL;
    if (c->s[c->a[k]] != '"') return key_fail(c, k, err, "must be a string");
    size_t raw = c->b[k] - c->a[k];
    char *buf = malloc(raw + 1);
    if (!buf) return kvh_fail(err, "%s:%d: key '%s': out of memory", c->p->name, c->line, key_names[k]);
    kvh_json_scan j = {c->s, c->b[k], c->a[k], NULL};
    size_t n = 0;
    if (kvh_json_string(&j, buf, &n) != 0) { /* cannot happen: the line was validated */
        free(buf);
        return kvh_fail(err, "%s:%d: key '%s': %s", c->p->name, c->line, key_names[k], j.error);
    }
    buf[n] = '\0';
    size_t bad = 0;
    if (memchr(buf, '\0', n)) {
        free(buf);
        return key_fail(c, k, err, "must not contain a NUL character (\\u0000)");
    }
    if (!kvh_utf8_valid(buf, n, &bad)) {
        free(buf);
        return kvh_fail(err, "%s:%d: key '%s': not valid UTF-8 (byte %zu of the decoded string)", c->p->name,
                        c->line, key_names[k], bad);
    }
    *out = buf;
    *out_len = n;
    return 0;
}

/* id or prefix: 1..64 bytes into dst[65]. */
static int span_label(const line_ctx *c, int k, char *dst, kvh_err *err) {
    char *s;
    size_t n = 0;
    if (span_string(c, k, &s, &n, err) != 0) return -1;
    if (n == 0 || n > KVH_TRACE_MAX_LABEL) {
        free(s);
        char what[96];
        snprintf(what, sizeof what, "must be 1 to %d bytes of text (it has %zu)", KVH_TRACE_MAX_LABEL, n);
        return key_fail(c, k, err, what);
    }
    memcpy(dst, s, n + 1);
    free(s);
    return 0;
}

/* prompt_ids: a non-empty array of at most n_positions ids in 0..vocab-1. */
static int span_ids(const line_ctx *c, int k, int32_t **out, int *n_out, kvh_err *err) {
    const parser *p = c->p;
    const char *s = c->s;
    size_t at = c->a[k], end = c->b[k];
    if (s[at] != '[') return key_fail(c, k, err, "must be an array of token ids");
    kvh_json_scan j = {s, end, at + 1, NULL};
    int32_t *ids = NULL;
    int n = 0, cap = 0;
    kvh_json_ws(&j);
    while (j.at < end && s[j.at] != ']') {
        size_t e0 = j.at;
        if (!(s[e0] == '-' || (s[e0] >= '0' && s[e0] <= '9'))) {
            free(ids);
            return kvh_fail(err, "%s:%d: key 'prompt_ids': element %d is not a number (token ids are integers "
                            "0..%d)", p->name, c->line, n, p->vocab - 1);
        }
        kvh_json_number(&j); /* validated before: advances past it */
        line_ctx one = *c;
        one.a[k] = e0;
        one.b[k] = j.at;
        double v;
        if (span_number(&one, k, &v) != 0 || !isfinite(v) || v != floor(v) || v < 0 || v >= p->vocab) {
            free(ids);
            char got[64];
            shown(&one, k, got, sizeof got);
            return kvh_fail(err, "%s:%d: key 'prompt_ids': element %d is not a token id in 0..%d (got %s)", p->name,
                            c->line, n, p->vocab - 1, got);
        }
        if (n == p->n_positions) {
            free(ids);
            return kvh_fail(err, "%s:%d: key 'prompt_ids': more than the model's %d positions of ids", p->name,
                            c->line, p->n_positions);
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            if (cap > p->n_positions) cap = p->n_positions;
            int32_t *g = realloc(ids, (size_t)cap * sizeof *g);
            if (!g) {
                free(ids);
                return kvh_fail(err, "%s:%d: key 'prompt_ids': out of memory", p->name, c->line);
            }
            ids = g;
        }
        ids[n++] = (int32_t)v;
        kvh_json_ws(&j);
        if (j.at < end && s[j.at] == ',') {
            j.at++;
            kvh_json_ws(&j);
        }
    }
    if (n == 0) return key_fail(c, k, err, "must hold at least one token id");
    *out = ids;
    *n_out = n;
    return 0;
}

static int missing(const line_ctx *c, int k, const char *what, kvh_err *err) {
    return kvh_fail(err, "%s:%d: key '%s' is missing (%s)", c->p->name, c->line, key_names[k], what);
}

/* Reads the spans of one line into r (r->prompt owned by the caller on success and on failure). */
static int read_request(const line_ctx *c, kvh_trace_request *r, kvh_err *err) {
    const parser *p = c->p;
    bool has[K_COUNT];
    for (int k = 0; k < K_COUNT; k++) has[k] = c->b[k] != 0;

    if (has[K_ID]) {
        if (span_label(c, K_ID, r->id, err) != 0) return -1;
    } else {
        snprintf(r->id, sizeof r->id, "line %d", c->line);
    }
    if (!has[K_ARRIVAL]) return missing(c, K_ARRIVAL, "seconds since the replay starts, >= 0", err);
    double v;
    if (span_number(c, K_ARRIVAL, &v) != 0 || !isfinite(v) || v < 0)
        return key_fail(c, K_ARRIVAL, err, "must be a finite number of seconds >= 0");
    r->arrival_s = v;
    if (!has[K_MAX_TOKENS]) return missing(c, K_MAX_TOKENS, "how many tokens to generate, >= 1", err);
    if (span_int(c, K_MAX_TOKENS, 1, INT_MAX, "must be an integer >= 1", &r->max_tokens, err) != 0) return -1;

    int forms = has[K_PROMPT] + has[K_PROMPT_IDS] + has[K_PROMPT_TOKENS];
    if (forms == 0)
        return kvh_fail(err, "%s:%d: give one of 'prompt' (text), 'prompt_ids' or 'prompt_tokens'", p->name, c->line);
    if (forms > 1)
        return kvh_fail(err, "%s:%d: give only one of 'prompt', 'prompt_ids' and 'prompt_tokens' (the line has %s%s%s)",
                        p->name, c->line, has[K_PROMPT] ? "'prompt' " : "", has[K_PROMPT_IDS] ? "'prompt_ids' " : "",
                        has[K_PROMPT_TOKENS] ? "'prompt_tokens'" : "");

    if (has[K_PREFIX] && span_label(c, K_PREFIX, r->prefix, err) != 0) return -1;
    if (has[K_PREFIX_TOKENS] && !has[K_PROMPT_TOKENS])
        return kvh_fail(err, "%s:%d: key 'prefix_tokens': only with 'prompt_tokens' (a prompt given as text or ids "
                        "shares whatever tokens it shares; 'prefix' is then a label)", p->name, c->line);
    if (has[K_PREFIX_TOKENS] && !has[K_PREFIX])
        return kvh_fail(err, "%s:%d: key 'prefix_tokens': needs 'prefix', the label whose tokens they are", p->name,
                        c->line);
    if (has[K_PROMPT_TOKENS] && has[K_PREFIX] && !has[K_PREFIX_TOKENS])
        return kvh_fail(err, "%s:%d: key 'prefix': with 'prompt_tokens' give 'prefix_tokens' too (how many leading "
                        "synthetic tokens the requests labelled '%s' share)", p->name, c->line, r->prefix);

    if (has[K_PROMPT_TOKENS]) {
        char what[96];
        snprintf(what, sizeof what, "must be an integer from 1 to the model's %d positions", p->n_positions);
        if (span_int(c, K_PROMPT_TOKENS, 1, p->n_positions, what, &r->n_prompt, err) != 0) return -1;
        if (has[K_PREFIX_TOKENS]) {
            snprintf(what, sizeof what, "must be an integer from 1 to prompt_tokens (%d)", r->n_prompt);
            if (span_int(c, K_PREFIX_TOKENS, 1, r->n_prompt, what, &r->prefix_tokens, err) != 0) return -1;
        }
        r->prompt = malloc((size_t)r->n_prompt * sizeof *r->prompt);
        if (!r->prompt) return kvh_fail(err, "%s:%d: out of memory", p->name, c->line);
        kvh_trace_synthetic_ids(r->prompt, r->n_prompt, r->id, r->prefix, r->prefix_tokens, p->vocab);
    } else if (has[K_PROMPT_IDS]) {
        if (span_ids(c, K_PROMPT_IDS, &r->prompt, &r->n_prompt, err) != 0) return -1;
    } else {
        if (!p->tok)
            return kvh_fail(err, "%s:%d: key 'prompt': a text prompt needs a tokenizer here (give 'prompt_ids' or "
                            "'prompt_tokens')", p->name, c->line);
        char *text;
        size_t tlen = 0, n_ids = 0;
        if (span_string(c, K_PROMPT, &text, &tlen, err) != 0) return -1;
        int32_t *ids = NULL;
        int rc = kvh_tokenizer_encode(p->tok, text, tlen, 1, &ids, &n_ids, err);
        free(text);
        if (rc != 0) return kvh_fail_prefix(err, "%s:%d: key 'prompt'", p->name, c->line);
        r->prompt = ids;
        if (n_ids == 0) return kvh_fail(err, "%s:%d: key 'prompt': the text has no token", p->name, c->line);
        if (n_ids > (size_t)p->n_positions)
            return kvh_fail(err, "%s:%d: key 'prompt': %zu tokens, more than the model's %d positions", p->name, c->line,
                            n_ids, p->n_positions);
        r->n_prompt = (int)n_ids;
        for (int i = 0; i < r->n_prompt; i++)
            if (ids[i] < 0 || ids[i] >= p->vocab)
                return kvh_fail(err, "%s:%d: key 'prompt': token %d of the text is id %d, outside the vocabulary "
                                "0..%d", p->name, c->line, i, (int)ids[i], p->vocab - 1);
    }
    if ((long)r->n_prompt + r->max_tokens > p->n_positions)
        return kvh_fail(err, "%s:%d: key 'max_tokens': the prompt's %d tokens + max_tokens %d exceed the model's %d "
                        "positions", p->name, c->line, r->n_prompt, r->max_tokens, p->n_positions);

    r->temperature = 0.0f;
    r->top_k = 0;
    r->top_p = 1.0f;
    r->seed = 1234;
    r->ignore_eos = true;
    if (has[K_TEMPERATURE]) {
        if (span_number(c, K_TEMPERATURE, &v) != 0 || !isfinite(v) || v < 0 || v > 1e30)
            return key_fail(c, K_TEMPERATURE, err, "must be a number >= 0 (0 = greedy)");
        r->temperature = (float)v;
    }
    if (has[K_TOP_K] && span_int(c, K_TOP_K, 0, 1 << 30, "must be an integer >= 0 (0 = off)", &r->top_k, err) != 0)
        return -1;
    if (has[K_TOP_P]) {
        if (span_number(c, K_TOP_P, &v) != 0 || !isfinite(v) || !(v > 0) || v > 1 || (float)v <= 0.0f)
            return key_fail(c, K_TOP_P, err, "must be a number in (0, 1] (1 = off)");
        r->top_p = (float)v;
    }
    if (has[K_SEED]) {
        const char *s = c->s + c->a[K_SEED];
        size_t n = c->b[K_SEED] - c->a[K_SEED];
        bool digits = n > 0 && n <= 20;
        for (size_t i = 0; digits && i < n; i++) digits = s[i] >= '0' && s[i] <= '9';
        char buf[24];
        unsigned long long u = 0;
        if (digits) {
            memcpy(buf, s, n);
            buf[n] = '\0';
            errno = 0;
            u = strtoull(buf, NULL, 10);
            digits = errno == 0;
        }
        if (!digits)
            return key_fail(c, K_SEED, err, "must be a whole number from 0 to 18446744073709551615, written without "
                            "sign, fraction or exponent");
        r->seed = (uint64_t)u;
    }
    if (has[K_IGNORE_EOS]) {
        const char *s = c->s + c->a[K_IGNORE_EOS];
        size_t n = c->b[K_IGNORE_EOS] - c->a[K_IGNORE_EOS];
        if (n == 4 && memcmp(s, "true", 4) == 0) r->ignore_eos = true;
        else if (n == 5 && memcmp(s, "false", 5) == 0) r->ignore_eos = false;
        else return key_fail(c, K_IGNORE_EOS, err, "must be true or false");
    }
    return 0;
}

static int bad_json(const parser *p, int line, const kvh_json_scan *j, const char *what, kvh_err *err) {
    return kvh_fail(err, "%s:%d: bad JSON at byte %zu: %s", p->name, line, j->at + 1, what ? what : j->error);
}

/* One physical line (without its '\n'). */
static int parse_line(parser *p, const char *s, size_t len, int line, kvh_err *err) {
    if (len > 0 && s[len - 1] == '\r') len--; /* CRLF files */
    if (len > KVH_TRACE_MAX_LINE_BYTES)
        return kvh_fail(err, "%s:%d: the line is longer than %u MiB", p->name, line, KVH_TRACE_MAX_LINE_BYTES >> 20);
    if (memchr(s, '\0', len)) return kvh_fail(err, "%s:%d: the line holds a NUL byte (not a text file?)", p->name, line);
    size_t i = 0;
    while (i < len && (s[i] == ' ' || s[i] == '\t')) i++;
    if (i == len || s[i] == '#') return 0;
    if (p->n == KVH_TRACE_MAX_REQUESTS)
        return kvh_fail(err, "%s:%d: more than %d requests in one trace", p->name, line, KVH_TRACE_MAX_REQUESTS);

    line_ctx c;
    memset(&c, 0, sizeof c);
    c.p = p;
    c.s = s;
    c.len = len;
    c.line = line;
    kvh_json_scan j = {s, len, i, NULL};
    if (s[i] != '{') return bad_json(p, line, &j, "a request is a JSON object {...} on one line", err);
    j.at++;
    kvh_json_ws(&j);
    if (j.at < len && s[j.at] == '}') {
        j.at++;
    } else {
        for (;;) {
            if (j.at >= len || s[j.at] != '"') return bad_json(p, line, &j, "expected a key (a string)", err);
            size_t k0 = j.at;
            if (kvh_json_string(&j, NULL, NULL) != 0) return bad_json(p, line, &j, NULL, err);
            int k = -1;
            size_t raw = j.at - k0 - 2;
            if (raw <= 32) {
                char key[40];
                size_t kn = 0;
                kvh_json_scan kj = {s, len, k0, NULL};
                kvh_json_string(&kj, key, &kn);
                key[kn] = '\0';
                for (int q = 0; q < K_COUNT && kn == strlen(key); q++)
                    if (strcmp(key, key_names[q]) == 0) k = q;
            }
            if (k < 0) {
                char shown_key[48];
                size_t m = raw > 40 ? 40 : raw, o = 0;
                for (size_t q = 0; q < m; q++) {
                    unsigned char ch = (unsigned char)s[k0 + 1 + q];
                    shown_key[o++] = ch >= 0x20 && ch < 0x7f ? (char)ch : '?';
                }
                shown_key[o] = '\0';
                return kvh_fail(err, "%s:%d: unknown key '%s%s' (known: " KNOWN_KEYS ")", p->name, line, shown_key,
                                raw > 40 ? "..." : "");
            }
            if (c.b[k] != 0) return kvh_fail(err, "%s:%d: key '%s' appears twice", p->name, line, key_names[k]);
            kvh_json_ws(&j);
            if (j.at >= len || s[j.at] != ':') return bad_json(p, line, &j, "expected ':' after the key", err);
            j.at++;
            kvh_json_ws(&j);
            size_t v0 = j.at;
            /* depth 1: prompt_ids is an array of numbers; nothing nests deeper */
            if (kvh_json_skip_value(&j, 1, NULL) != 0) {
                char what[160];
                snprintf(what, sizeof what, "key '%s': %s", key_names[k], j.error);
                return bad_json(p, line, &j, what, err);
            }
            c.a[k] = v0;
            c.b[k] = j.at;
            kvh_json_ws(&j);
            if (j.at < len && s[j.at] == ',') {
                j.at++;
                kvh_json_ws(&j);
                continue;
            }
            if (j.at < len && s[j.at] == '}') {
                j.at++;
                break;
            }
            return bad_json(p, line, &j, "expected ',' or '}'", err);
        }
    }
    kvh_json_ws(&j);
    if (j.at != len) return bad_json(p, line, &j, "text after the request's object (one request a line)", err);

    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        if (cap > KVH_TRACE_MAX_REQUESTS) cap = KVH_TRACE_MAX_REQUESTS;
        kvh_trace_request *g = realloc(p->req, (size_t)cap * sizeof *g);
        if (!g) return kvh_fail(err, "%s:%d: out of memory", p->name, line);
        p->req = g;
        p->cap = cap;
    }
    kvh_trace_request *r = &p->req[p->n];
    memset(r, 0, sizeof *r);
    r->line = line;
    if (read_request(&c, r, err) != 0) {
        free(r->prompt);
        r->prompt = NULL;
        return -1;
    }
    p->n++;
    return 0;
}

static void parser_free(parser *p) {
    for (int i = 0; i < p->n; i++) free(p->req[i].prompt);
    free(p->req);
    p->req = NULL;
    p->n = p->cap = 0;
}

static int cmp_arrival(const void *x, const void *y) {
    const kvh_trace_request *a = x, *b = y;
    if (a->arrival_s != b->arrival_s) return a->arrival_s < b->arrival_s ? -1 : 1;
    return (a->line > b->line) - (a->line < b->line); /* stable: file order */
}

static int cmp_id(const void *x, const void *y) {
    const kvh_trace_request *a = *(const kvh_trace_request *const *)x, *b = *(const kvh_trace_request *const *)y;
    int c = strcmp(a->id, b->id);
    return c ? c : (a->line > b->line) - (a->line < b->line);
}

/* Empty trace, repeated ids, then the sort by arrival. Frees the parser's requests on failure. */
static int finish(parser *p, kvh_trace *out, kvh_err *err) {
    if (p->n == 0) return kvh_fail(err, "%s: no request in the trace (only blank or '#' lines)", p->name);
    const kvh_trace_request **by_id = malloc((size_t)p->n * sizeof *by_id);
    if (!by_id) return kvh_fail(err, "%s: out of memory", p->name);
    for (int i = 0; i < p->n; i++) by_id[i] = &p->req[i];
    qsort(by_id, (size_t)p->n, sizeof *by_id, cmp_id);
    for (int i = 1; i < p->n; i++) {
        if (strcmp(by_id[i]->id, by_id[i - 1]->id) == 0) {
            int rc = kvh_fail(err, "%s:%d: key 'id': '%s' is already the id of line %d (ids name requests in "
                              "reports: make them unique)", p->name, by_id[i]->line, by_id[i]->id, by_id[i - 1]->line);
            free(by_id);
            return rc;
        }
    }
    free(by_id);
    qsort(p->req, (size_t)p->n, sizeof *p->req, cmp_arrival);
    out->req = p->req;
    out->n = p->n;
    p->req = NULL;
    p->n = p->cap = 0;
    return 0;
}

static int parser_init(parser *p, const char *name, const kvh_tokenizer *tok, int vocab, int n_positions,
                       kvh_err *err) {
    memset(p, 0, sizeof *p);
    p->name = name ? name : "trace";
    p->tok = tok;
    p->vocab = vocab;
    p->n_positions = n_positions;
    if (vocab < 2) return kvh_fail(err, "%s: vocabulary size %d: need at least 2 ids", p->name, vocab);
    if (n_positions < 2) return kvh_fail(err, "%s: %d positions: need at least 2", p->name, n_positions);
    return 0;
}

int kvh_trace_parse(kvh_trace *out, const char *text, size_t len, const char *name_for_errors,
                    const kvh_tokenizer *tok, int vocab, int n_positions, kvh_err *err) {
    out->req = NULL;
    out->n = 0;
    parser p;
    if (parser_init(&p, name_for_errors, tok, vocab, n_positions, err) != 0) return -1;
    size_t at = 0;
    int line = 0;
    while (at < len) {
        const char *nl = memchr(text + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - text) : len;
        if (line == INT_MAX - 1) {
            parser_free(&p);
            return kvh_fail(err, "%s: too many lines", p.name);
        }
        if (parse_line(&p, text + at, end - at, ++line, err) != 0) {
            parser_free(&p);
            return -1;
        }
        at = nl ? end + 1 : len;
    }
    if (finish(&p, out, err) != 0) {
        parser_free(&p);
        return -1;
    }
    return 0;
}

static const char *file_kind(mode_t m) {
    if (S_ISDIR(m)) return "a directory";
    if (S_ISSOCK(m)) return "a socket";
    if (S_ISBLK(m)) return "a block device";
    return "a special file";
}

int kvh_trace_load(kvh_trace *out, const char *path, const kvh_tokenizer *tok, int vocab, int n_positions,
                   kvh_err *err) {
    out->req = NULL;
    out->n = 0;
    parser p;
    if (parser_init(&p, path, tok, vocab, n_positions, err) != 0) return -1;
    /* As kvh_read_text: a regular file, or a stream (pipe, FIFO, /dev/stdin) read to EOF. Read in chunks,
     * line by line, so a large trace never sits in memory twice. */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0) {
        int e = errno;
        if (stat(path, &st) == 0 && S_ISSOCK(st.st_mode))
            return kvh_fail(err, "%s: not a file or a stream (it is a socket)", path);
        return kvh_fail(err, "%s: cannot open: %s", path, strerror(e));
    }
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kvh_fail(err, "%s: cannot stat: %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode) || S_ISSOCK(st.st_mode) || S_ISBLK(st.st_mode)) {
        close(fd);
        return kvh_fail(err, "%s: not a file or a stream (it is %s)", path, file_kind(st.st_mode));
    }
    size_t cap = 1u << 20, used = 0, scan = 0;
    char *buf = malloc(cap);
    int line = 0, rc = 0;
    if (!buf) rc = kvh_fail(err, "%s: out of memory", path);
    bool eof = false;
    while (rc == 0 && !eof) {
        if (used == cap) {
            /* a line longer than the buffer: grow, up to the line limit (+2 for "\r\n") */
            if (cap >= KVH_TRACE_MAX_LINE_BYTES + 2) {
                rc = kvh_fail(err, "%s:%d: the line is longer than %u MiB", path, line + 1,
                              KVH_TRACE_MAX_LINE_BYTES >> 20);
                break;
            }
            size_t ncap = cap * 2 > KVH_TRACE_MAX_LINE_BYTES + 2 ? KVH_TRACE_MAX_LINE_BYTES + 2 : cap * 2;
            char *g = realloc(buf, ncap);
            if (!g) {
                rc = kvh_fail(err, "%s: out of memory", path);
                break;
            }
            buf = g;
            cap = ncap;
        }
        ssize_t got = read(fd, buf + used, cap - used);
        if (got < 0) {
            if (errno == EINTR) continue;
            rc = kvh_fail(err, "%s: read failed: %s", path, strerror(errno));
            break;
        }
        if (got == 0) eof = true;
        used += (size_t)got;
        size_t start = 0;
        for (;;) {
            const char *nl = memchr(buf + scan, '\n', used - scan);
            if (!nl && !(eof && start < used)) break;
            size_t end = nl ? (size_t)(nl - buf) : used;
            if (line == INT_MAX - 1) {
                rc = kvh_fail(err, "%s: too many lines", path);
                break;
            }
            if (parse_line(&p, buf + start, end - start, ++line, err) != 0) {
                rc = -1;
                break;
            }
            start = scan = nl ? end + 1 : used;
        }
        if (rc != 0) break;
        memmove(buf, buf + start, used - start);
        used -= start;
        scan = used;
    }
    free(buf);
    close(fd);
    if (rc == 0) rc = finish(&p, out, err);
    if (rc != 0) parser_free(&p);
    return rc;
}

void kvh_trace_free(kvh_trace *t) {
    if (!t) return;
    for (int i = 0; i < t->n; i++) free(t->req[i].prompt);
    free(t->req);
    t->req = NULL;
    t->n = 0;
}

static int cmp_str(const void *x, const void *y) { return strcmp(*(const char *const *)x, *(const char *const *)y); }

int kvh_trace_summarize(const kvh_trace *t, kvh_trace_summary *s, kvh_err *err) {
    memset(s, 0, sizeof *s);
    s->n_requests = t->n;
    if (t->n == 0) return 0;
    const char **labels = malloc((size_t)t->n * sizeof *labels);
    if (!labels) return kvh_fail(err, "trace summary: out of memory");
    s->prompt_min = s->output_min = INT_MAX;
    s->first_arrival_s = t->req[0].arrival_s;
    s->last_arrival_s = t->req[0].arrival_s;
    int nl = 0;
    for (int i = 0; i < t->n; i++) {
        const kvh_trace_request *r = &t->req[i];
        s->prompt_tokens += r->n_prompt;
        s->output_tokens += r->max_tokens;
        if (r->n_prompt < s->prompt_min) s->prompt_min = r->n_prompt;
        if (r->n_prompt > s->prompt_max) s->prompt_max = r->n_prompt;
        if (r->max_tokens < s->output_min) s->output_min = r->max_tokens;
        if (r->max_tokens > s->output_max) s->output_max = r->max_tokens;
        if (r->arrival_s < s->first_arrival_s) s->first_arrival_s = r->arrival_s;
        if (r->arrival_s > s->last_arrival_s) s->last_arrival_s = r->arrival_s;
        if (r->prefix[0]) labels[nl++] = r->prefix;
        if (r->temperature > 0) s->n_sampled++;
    }
    qsort(labels, (size_t)nl, sizeof *labels, cmp_str);
    s->n_prefixed = nl;
    for (int i = 0; i < nl; i++)
        if (i == 0 || strcmp(labels[i], labels[i - 1]) != 0) s->n_prefix_groups++;
    free(labels);
    return 0;
}

/* ---- the generator ------------------------------------------------------------------------------------ */

kvh_trace_gen_options kvh_trace_gen_default_options(void) {
    kvh_trace_gen_options o = {
        .n_requests = 100, .rate_per_s = 1.0, .prompt_min = 64, .prompt_max = 512, .output_min = 16,
        .output_max = 128, .dist = KVH_TRACE_DIST_UNIFORM, .shared_share = 0.0, .shared_tokens = 0, .seed = 1,
        .n_positions = 1024};
    return o;
}

int kvh_trace_gen_check(const kvh_trace_gen_options *o, int vocab, kvh_err *err) {
    if (vocab < 2) return kvh_fail(err, "vocabulary size %d: need at least 2 ids", vocab);
    if (o->n_requests < 1 || o->n_requests > KVH_TRACE_MAX_REQUESTS)
        return kvh_fail(err, "requests %d: must be from 1 to %d", o->n_requests, KVH_TRACE_MAX_REQUESTS);
    if (!(o->rate_per_s == 0 || (o->rate_per_s >= 1e-6 && o->rate_per_s <= 1e9)))
        return kvh_fail(err, "rate %g: must be from 1e-6 to 1e9 requests per second, or 0 (all arrive at once)",
                        o->rate_per_s);
    if (o->prompt_min < 1 || o->prompt_max < o->prompt_min)
        return kvh_fail(err, "prompt length %d:%d: need 1 <= MIN <= MAX", o->prompt_min, o->prompt_max);
    if (o->output_min < 1 || o->output_max < o->output_min)
        return kvh_fail(err, "output length %d:%d: need 1 <= MIN <= MAX", o->output_min, o->output_max);
    if (o->dist != KVH_TRACE_DIST_UNIFORM && o->dist != KVH_TRACE_DIST_LOGNORMAL)
        return kvh_fail(err, "distribution %d: unknown (uniform or lognormal)", (int)o->dist);
    if (!(o->shared_share >= 0 && o->shared_share <= 1))
        return kvh_fail(err, "shared share %g: must be in [0, 1]", o->shared_share);
    if (o->shared_tokens < 0) return kvh_fail(err, "shared length %d: must be >= 0", o->shared_tokens);
    if (o->shared_share > 0 && o->shared_tokens < 1)
        return kvh_fail(err, "shared share %g needs a shared length >= 1", o->shared_share);
    if (o->shared_share > 0 && o->shared_tokens > o->prompt_min)
        return kvh_fail(err, "shared length %d: longer than the shortest prompt (%d); prompt lengths include the "
                        "shared prefix", o->shared_tokens, o->prompt_min);
    if (o->n_positions < 0) return kvh_fail(err, "n_positions %d: must be >= 0", o->n_positions);
    if (o->n_positions > 0 && (long)o->prompt_max + o->output_max > o->n_positions)
        return kvh_fail(err, "prompt length %d + output length %d exceed the model's %d positions", o->prompt_max,
                        o->output_max, o->n_positions);
    return 0;
}

static double u01(uint64_t *g) { return (double)(splitmix64(g) >> 11) * 0x1.0p-53; }

static int draw_len(uint64_t *g, kvh_trace_dist dist, int lo, int hi) {
    if (dist == KVH_TRACE_DIST_UNIFORM) return lo + (int)(splitmix64(g) % (uint64_t)(hi - lo + 1));
    double mu = 0.5 * (log((double)lo) + log((double)hi)), sigma = 0.25 * (log((double)hi) - log((double)lo));
    for (;;) {
        double u1 = u01(g), u2 = u01(g);
        double z = sqrt(-2.0 * log1p(-u1)) * cos(2.0 * 3.14159265358979323846 * u2);
        double x = floor(exp(mu + sigma * z) + 0.5);
        if (x >= lo && x <= hi) return (int)x;
    }
}

/* Appends the decimal form of v (>= 0) at p; returns the end. */
static char *put_uint(char *p, unsigned v) {
    char tmp[12];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) *p++ = tmp[--n];
    return p;
}

int kvh_trace_generate(const kvh_trace_gen_options *o, FILE *out, int vocab, kvh_err *err) {
    if (kvh_trace_gen_check(o, vocab, err) != 0) return -1;
    int32_t *ids = malloc((size_t)o->prompt_max * sizeof *ids);
    /* one line: 11 bytes per id at most, plus the fixed fields */
    size_t line_cap = (size_t)o->prompt_max * 12 + 256;
    char *line = malloc(line_cap);
    if (!ids || !line) {
        free(ids);
        free(line);
        return kvh_fail(err, "trace generator: out of memory");
    }
    uint64_t g = o->seed;
    double t = 0.0;
    int rc = 0;
    for (int i = 0; i < o->n_requests && rc == 0; i++) {
        /* fixed order of draws per request: gap, shared coin, prompt length, output length */
        double gap_u = u01(&g);
        if (i > 0 && o->rate_per_s > 0) t += -log1p(-gap_u) / o->rate_per_s;
        bool shared = u01(&g) < o->shared_share;
        int plen = draw_len(&g, o->dist, o->prompt_min, o->prompt_max);
        int olen = draw_len(&g, o->dist, o->output_min, o->output_max);
        char id[24];
        snprintf(id, sizeof id, "r%d", i);
        kvh_trace_synthetic_ids(ids, plen, id, shared ? "sys" : "", shared ? o->shared_tokens : 0, vocab);
        char *p = line;
        p += snprintf(p, 96, "{\"id\": \"%s\", \"arrival\": %.6f, \"prompt_ids\": [", id, t);
        for (int k = 0; k < plen; k++) {
            if (k) {
                *p++ = ',';
                *p++ = ' ';
            }
            p = put_uint(p, (unsigned)ids[k]);
        }
        p += snprintf(p, 96, "], \"max_tokens\": %d%s}\n", olen, shared ? ", \"prefix\": \"sys\"" : "");
        size_t n = (size_t)(p - line);
        if (fwrite(line, 1, n, out) != n) rc = kvh_fail(err, "writing the trace failed: %s", strerror(errno));
    }
    free(ids);
    free(line);
    return rc;
}
