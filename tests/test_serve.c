/* test_serve.c — `kvhost serve` without sockets (host/serve/):
 * - request parsing and validation (api.c): defaults, text and token-id prompts, every 400 with its param
 *   and code (malformed JSON, unknown and duplicate fields, OpenAI options with non-default values,
 *   max_tokens ranges, the context limit and "truncate"), the error object's shape;
 * - sendable text: a character split over two tokens waits, stop strings over token boundaries cut the
 *   text, ill-formed bytes become U+FFFD; SSE framing and the completion object; the API key check;
 * - the Prometheus text (metrics.c): names, cumulative buckets, label escaping;
 * - the bridge (bridge.c) on a small random model: tokens arrive through the outbox, cancellation ends a
 *   running request at once, 429 when max_waiting requests wait, 503 once draining. */
#include <criterion/criterion.h>
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "model/model.h"
#include "serve/api.h"
#include "serve/bridge.h"
#include "serve/metrics.h"

static kvh_tokenizer *tok;

static void setup(void) {
    kvh_err err = {{0}};
    cr_assert_eq(kvh_tokenizer_load_embedded(&tok, &err), 0, "%s", err.msg);
}
static void teardown(void) { kvh_tokenizer_free(tok); }

static kvh_serve_limits limits(void) {
    kvh_serve_limits l = {.tok = tok, .n_vocab = 50257, .n_positions = 64, .eot = 50256, .default_seed = 5};
    return l;
}

static int parse(const char *body, kvh_serve_params *p, kvh_serve_error *e) {
    kvh_serve_limits l = limits();
    memset(e, 0, sizeof *e);
    return kvh_serve_parse_completion(body, strlen(body), &l, p, e);
}

/* The body must be refused with 400, naming param (NULL: none) and code. */
static void refused(const char *body, const char *param, const char *code) {
    kvh_serve_params p;
    kvh_serve_error e;
    cr_assert_eq(parse(body, &p, &e), -1, "accepted: %s", body);
    cr_assert_eq(e.status, 400, "%s: status %d", body, e.status);
    cr_assert_str_eq(e.param, param ? param : "", "%s: param '%s' (%s)", body, e.param, e.message);
    cr_assert_str_eq(e.code, code, "%s: code '%s' (%s)", body, e.code, e.message);
    cr_assert(e.message[0]);
}

TestSuite(serve_api, .init = setup, .fini = teardown);

Test(serve_api, defaults_and_text_prompt) {
    kvh_serve_params p;
    kvh_serve_error e;
    cr_assert_eq(parse("{\"model\":\"m\",\"prompt\":\"Hello world\"}", &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_prompt, 2);
    cr_assert_eq(p.prompt[0], 15496); /* "Hello" */
    cr_assert_eq(p.prompt[1], 995);   /* " world" */
    cr_assert_eq(p.max_tokens, 16);
    cr_assert_float_eq(p.sampling.temperature, 1.0f, 0);
    cr_assert_float_eq(p.sampling.top_p, 1.0f, 0);
    cr_assert_eq(p.sampling.top_k, 0);
    cr_assert_eq(p.sampling.seed, 5u);
    cr_assert(!p.stream);
    cr_assert_eq(p.n_stop, 0);
    kvh_serve_params_free(&p);
}

Test(serve_api, all_fields_and_ignored_openai_defaults) {
    kvh_serve_params p;
    kvh_serve_error e;
    const char *body = "{\"prompt\":[1,2,3],\"max_tokens\":7,\"temperature\":0.5,\"top_k\":40,\"top_p\":0.9,"
                       "\"seed\":123,\"stop\":[\"\\n\",\"END\"],\"stream\":true,\"n\":1,\"logprobs\":null,"
                       "\"echo\":false,\"user\":\"u\",\"presence_penalty\":0,\"frequency_penalty\":0,\"best_of\":1}";
    cr_assert_eq(parse(body, &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_prompt, 3);
    cr_assert_eq(p.prompt[2], 3);
    cr_assert_eq(p.max_tokens, 7);
    cr_assert_float_eq(p.sampling.temperature, 0.5f, 1e-7);
    cr_assert_eq(p.sampling.top_k, 40);
    cr_assert_float_eq(p.sampling.top_p, 0.9f, 1e-7);
    cr_assert_eq(p.sampling.seed, 123u);
    cr_assert(p.stream);
    cr_assert_eq(p.n_stop, 2);
    cr_assert_str_eq(p.stop[0], "\n");
    cr_assert_str_eq(p.stop[1], "END");
    kvh_serve_params_free(&p);
    cr_assert_eq(parse("{\"prompt\":\"a\",\"stop\":\"x\"}", &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_stop, 1);
    kvh_serve_params_free(&p);
    /* [text] and [[ids]] are one prompt; "" is OpenAI's default prompt, <|endoftext|> */
    cr_assert_eq(parse("{\"prompt\":[[5,6]]}", &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_prompt, 2);
    kvh_serve_params_free(&p);
    cr_assert_eq(parse("{\"prompt\":\"\"}", &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_prompt, 1);
    cr_assert_eq(p.prompt[0], 50256);
    kvh_serve_params_free(&p);
}

Test(serve_api, refusals_name_the_field) {
    refused("{\"prompt\":\"a\"", NULL, "invalid_json");
    refused("not json", NULL, "invalid_json");
    refused("[1,2]", NULL, "invalid_json");
    refused("{\"prompt\":\"a\"} x", NULL, "invalid_json");
    refused("{\"prompt\":\"a\",\"temprature\":1}", "temprature", "unknown_field");
    refused("{\"prompt\":\"a\",\"prompt\":\"b\"}", "prompt", "invalid_value");
    refused("{\"max_tokens\":3}", "prompt", "missing_field");
    refused("{\"prompt\":\"a\",\"n\":2}", "n", "unsupported_value");
    refused("{\"prompt\":\"a\",\"best_of\":3}", "best_of", "unsupported_value");
    refused("{\"prompt\":\"a\",\"logprobs\":5}", "logprobs", "unsupported_value");
    refused("{\"prompt\":\"a\",\"echo\":true}", "echo", "unsupported_value");
    refused("{\"prompt\":\"a\",\"presence_penalty\":0.5}", "presence_penalty", "unsupported_value");
    refused("{\"prompt\":\"a\",\"frequency_penalty\":-1}", "frequency_penalty", "unsupported_value");
    refused("{\"prompt\":\"a\",\"max_tokens\":-1}", "max_tokens", "invalid_value");
    refused("{\"prompt\":\"a\",\"max_tokens\":0}", "max_tokens", "invalid_value");
    refused("{\"prompt\":\"a\",\"max_tokens\":1e12}", "max_tokens", "invalid_value");
    refused("{\"prompt\":\"a\",\"max_tokens\":64}", "max_tokens", "invalid_value"); /* n_positions 64 */
    refused("{\"prompt\":\"a\",\"max_tokens\":2.5}", "max_tokens", "invalid_value");
    refused("{\"prompt\":\"a\",\"max_tokens\":\"5\"}", "max_tokens", "invalid_value");
    refused("{\"prompt\":\"a\",\"temperature\":-0.1}", "temperature", "invalid_value");
    refused("{\"prompt\":\"a\",\"temperature\":3}", "temperature", "invalid_value");
    refused("{\"prompt\":\"a\",\"top_p\":0}", "top_p", "invalid_value");
    refused("{\"prompt\":\"a\",\"top_k\":-1}", "top_k", "invalid_value");
    refused("{\"prompt\":\"a\",\"seed\":-1}", "seed", "invalid_value");
    refused("{\"prompt\":\"a\",\"stream\":1}", "stream", "invalid_value");
    refused("{\"prompt\":\"a\",\"stop\":\"\"}", "stop", "invalid_value");
    refused("{\"prompt\":\"a\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "stop", "invalid_value");
    refused("{\"prompt\":\"a\",\"stop\":[1]}", "stop", "invalid_value");
    refused("{\"prompt\":[]}", "prompt", "invalid_value");
    refused("{\"prompt\":[1,50257]}", "prompt", "invalid_value");
    refused("{\"prompt\":[1,-2]}", "prompt", "invalid_value");
    refused("{\"prompt\":[\"a\",\"b\"]}", "prompt", "unsupported_value");
    refused("{\"prompt\":5}", "prompt", "invalid_value");
    refused("{\"prompt\":\"a\",\"model\":3}", "model", "invalid_value");
}

Test(serve_api, context_limit_and_truncate) {
    char body[1024];
    int n = snprintf(body, sizeof body, "{\"prompt\":[");
    for (int i = 0; i < 60; i++) n += snprintf(body + n, sizeof body - (size_t)n, "%s%d", i ? "," : "", i);
    snprintf(body + n, sizeof body - (size_t)n, "],\"max_tokens\":10}");
    refused(body, "prompt", "context_length_exceeded");
    snprintf(body + n, sizeof body - (size_t)n, "],\"max_tokens\":10,\"truncate\":true}");
    kvh_serve_params p;
    kvh_serve_error e;
    cr_assert_eq(parse(body, &p, &e), 0, "%s", e.message);
    cr_assert_eq(p.n_prompt, 54); /* 64 - 10: the last 54 of 0..59 */
    cr_assert_eq(p.n_truncated, 6);
    cr_assert_eq(p.prompt[0], 6);
    cr_assert_eq(p.prompt[53], 59);
    kvh_serve_params_free(&p);
}

Test(serve_api, error_object_shape) {
    kvh_serve_error e;
    kvh_serve_fail(&e, 400, "max_tokens", "invalid_value", "bad \"%s\"", "x");
    char *s = kvh_serve_error_json(&e);
    cJSON *j = cJSON_Parse(s);
    cr_assert(j);
    cJSON *o = cJSON_GetObjectItem(j, "error");
    cr_assert_str_eq(cJSON_GetObjectItem(o, "message")->valuestring, "bad \"x\"");
    cr_assert_str_eq(cJSON_GetObjectItem(o, "type")->valuestring, "invalid_request_error");
    cr_assert_str_eq(cJSON_GetObjectItem(o, "param")->valuestring, "max_tokens");
    cr_assert_str_eq(cJSON_GetObjectItem(o, "code")->valuestring, "invalid_value");
    cJSON_Delete(j);
    free(s);
    kvh_serve_fail(&e, 429, NULL, NULL, "full");
    s = kvh_serve_error_json(&e);
    j = cJSON_Parse(s);
    o = cJSON_GetObjectItem(j, "error");
    cr_assert_str_eq(cJSON_GetObjectItem(o, "type")->valuestring, "rate_limit_error");
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(o, "param")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(o, "code")));
    cJSON_Delete(j);
    free(s);
}

/* ---- text -------------------------------------------------------------------------------------------- */

static const char *pushed(kvh_serve_text *t, const char *bytes, int *rc) {
    size_t from;
    *rc = kvh_serve_text_push(t, bytes, strlen(bytes), &from);
    return t->out ? t->out + from : "";
}

Test(serve_api, text_waits_for_whole_characters) {
    kvh_serve_text t;
    kvh_serve_text_init(&t, NULL, 0);
    int rc;
    cr_assert_str_eq(pushed(&t, "caf\xc3", &rc), "caf");
    cr_assert_str_eq(pushed(&t, "\xa9!", &rc), "\xc3\xa9!");
    cr_assert_str_eq(pushed(&t, "\xe2\x82", &rc), ""); /* the euro sign, 2 of 3 bytes */
    cr_assert_str_eq(pushed(&t, "\xac", &rc), "\xe2\x82\xac");
    cr_assert_str_eq(pushed(&t, "\xff" "a", &rc), "\xef\xbf\xbd" "a"); /* ill-formed: U+FFFD at once */
    cr_assert_str_eq(pushed(&t, "\xf0\x9f", &rc), "");
    size_t from;
    cr_assert_eq(kvh_serve_text_flush(&t, &from), 0);
    cr_assert_str_eq(t.out + from, "\xef\xbf\xbd"); /* unfinished at the end */
    cr_assert_str_eq(t.out, "caf\xc3\xa9!\xe2\x82\xac\xef\xbf\xbd" "a\xef\xbf\xbd");
    kvh_serve_text_free(&t);
}

Test(serve_api, stop_strings_across_tokens) {
    char *stop[] = {"END", "\n\n"};
    kvh_serve_text t;
    kvh_serve_text_init(&t, stop, 2);
    int rc;
    cr_assert_str_eq(pushed(&t, "Hello E", &rc), "Hello "); /* "E" may start "END" */
    cr_assert_eq(rc, 0);
    cr_assert_str_eq(pushed(&t, "Nx", &rc), "ENx"); /* not a stop after all */
    cr_assert_str_eq(pushed(&t, " E", &rc), " ");
    cr_assert_str_eq(pushed(&t, "N", &rc), "");
    cr_assert_str_eq(pushed(&t, "Dafter", &rc), "");
    cr_assert_eq(rc, 1);
    cr_assert(t.stopped);
    cr_assert_str_eq(t.out, "Hello ENx ");
    cr_assert_str_eq(pushed(&t, "more", &rc), ""); /* nothing after the stop */
    cr_assert_eq(rc, 1);
    kvh_serve_text_free(&t);

    kvh_serve_text_init(&t, stop, 2);
    cr_assert_str_eq(pushed(&t, "a\n", &rc), "a");
    cr_assert_str_eq(pushed(&t, "\nb", &rc), "");
    cr_assert_eq(rc, 1);
    cr_assert_str_eq(t.out, "a");
    kvh_serve_text_free(&t);

    /* a stop string inside one token; the earliest of two wins */
    kvh_serve_text_init(&t, stop, 2);
    cr_assert_str_eq(pushed(&t, "x\n\nyEND", &rc), "x");
    cr_assert_eq(rc, 1);
    kvh_serve_text_free(&t);
}

Test(serve_api, sse_chunks_and_completion) {
    char *s = kvh_serve_sse_chunk("cmpl-1", 7, "m", "a\"b\0c", 5, NULL, -1, 0);
    cr_assert(strncmp(s, "data: {", 7) == 0, "%s", s);
    const size_t n = strlen(s);
    cr_assert(n > 8 && strcmp(s + n - 2, "\n\n") == 0);
    cr_assert(!strchr(s, '\n') || strchr(s, '\n') == s + n - 2, "one line of data: %s", s);
    cJSON *j = cJSON_Parse(s + 6);
    cr_assert(j, "%s", s);
    cr_assert_str_eq(cJSON_GetObjectItem(j, "object")->valuestring, "text_completion");
    cJSON *c = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    cr_assert(strstr(s, "a\\\"b\\u0000c"), "%s", s); /* NUL byte escaped */
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(c, "finish_reason")));
    cr_assert_eq(cJSON_GetObjectItem(c, "index")->valueint, 0);
    cr_assert_null(cJSON_GetObjectItem(j, "usage"));
    cJSON_Delete(j);
    free(s);
    cr_assert_str_eq(KVH_SERVE_SSE_DONE, "data: [DONE]\n\n");

    s = kvh_serve_completion_json("cmpl-2", 9, "m", "hi\n", 3, "length", 4, 3);
    j = cJSON_Parse(s);
    cr_assert(j, "%s", s);
    cr_assert_str_eq(cJSON_GetObjectItem(j, "id")->valuestring, "cmpl-2");
    cr_assert_eq(cJSON_GetObjectItem(j, "created")->valueint, 9);
    cr_assert_str_eq(cJSON_GetObjectItem(j, "model")->valuestring, "m");
    c = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    cr_assert_str_eq(cJSON_GetObjectItem(c, "text")->valuestring, "hi\n");
    cr_assert_str_eq(cJSON_GetObjectItem(c, "finish_reason")->valuestring, "length");
    cJSON *u = cJSON_GetObjectItem(j, "usage");
    cr_assert_eq(cJSON_GetObjectItem(u, "prompt_tokens")->valueint, 4);
    cr_assert_eq(cJSON_GetObjectItem(u, "completion_tokens")->valueint, 3);
    cr_assert_eq(cJSON_GetObjectItem(u, "total_tokens")->valueint, 7);
    cJSON_Delete(j);
    free(s);
}

Test(serve_api, api_key) {
    cr_assert(kvh_serve_auth_ok(NULL, NULL));
    cr_assert(kvh_serve_auth_ok("anything", ""));
    cr_assert(kvh_serve_auth_ok("Bearer s3cret", "s3cret"));
    cr_assert(!kvh_serve_auth_ok(NULL, "s3cret"));
    cr_assert(!kvh_serve_auth_ok("Bearer s3cre", "s3cret"));
    cr_assert(!kvh_serve_auth_ok("Bearer s3cretX", "s3cret"));
    cr_assert(!kvh_serve_auth_ok("Bearer s3creT", "s3cret"));
    cr_assert(!kvh_serve_auth_ok("bearer s3cret", "s3cret"));
    cr_assert(!kvh_serve_auth_ok("", "s3cret"));
}

/* ---- metrics ----------------------------------------------------------------------------------------- */

Test(serve_metrics, names_buckets_labels) {
    kvh_bridge_snapshot s;
    memset(&s, 0, sizeof s);
    s.engine.running = 2;
    s.waiting = 3;
    s.engine.generated_tokens = 100;
    s.engine.kv_bytes_held = 4096;
    s.engine.prefix_blocks_looked_up = 4;
    s.engine.prefix_blocks_hit = 1;
    s.ttft.count[0] = 1;
    s.ttft.count[3] = 2;
    s.ttft.count[KVH_BRIDGE_TTFT_BUCKETS] = 1;
    s.ttft.n = 4;
    s.ttft.sum = 50.5;
    uint64_t http[KVH_SERVE_N_CODES] = {0};
    http[kvh_serve_code_index(429)] = 2;
    kvh_serve_info info = {.version = "0.1", .model = "a\"b\\c\nd", .backend = "cpu", .plugins = "h2o.so,int8.so",
                           .layer_lines = "kvhost_layer_plugin_info{layer=\"0\",policy=\"h2o\",store=\"int8\"} 1\n",
                           .threads = 4, .max_seqs = 8, .token_budget = 1000, .kv_limit_bytes = 1 << 20};
    char *t = kvh_serve_metrics_text(&s, &info, http);
    cr_assert(t);
    const char *want[] = {
        "kvhost_info{version=\"0.1\",model=\"a\\\"b\\\\c\\nd\",backend=\"cpu\",threads=\"4\",plugins=\"h2o.so,int8.so\"} 1\n",
        "kvhost_layer_plugin_info{layer=\"0\",policy=\"h2o\",store=\"int8\"} 1\n",
        "# TYPE kvhost_requests_running gauge\nkvhost_requests_running 2\n",
        "kvhost_requests_waiting 3\n",
        "kvhost_http_responses_total{code=\"429\"} 2\n",
        "# TYPE kvhost_generated_tokens_total counter\nkvhost_generated_tokens_total 100\n",
        "# TYPE kvhost_time_to_first_token_seconds histogram\n",
        "kvhost_time_to_first_token_seconds_bucket{le=\"0.005\"} 1\n",
        "kvhost_time_to_first_token_seconds_bucket{le=\"0.01\"} 1\n",
        "kvhost_time_to_first_token_seconds_bucket{le=\"0.05\"} 3\n",
        "kvhost_time_to_first_token_seconds_bucket{le=\"30\"} 3\n",
        "kvhost_time_to_first_token_seconds_bucket{le=\"+Inf\"} 4\n",
        "kvhost_time_to_first_token_seconds_sum 50.5\n",
        "kvhost_time_to_first_token_seconds_count 4\n",
        "kvhost_time_per_output_token_seconds_count 0\n",
        "kvhost_kv_bytes_held 4096\n",
        "kvhost_kv_bytes_limit 1048576\n",
        "kvhost_kv_tokens_held 0\n",
        "kvhost_kv_tokens_budget 1000\n",
        "kvhost_evict_calls_total 0\n",
        "kvhost_preemptions_total 0\n",
        "kvhost_prefix_cache_hit_ratio 0.25\n",
        "kvhost_draining 0\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) cr_assert(strstr(t, want[i]), "missing: %s\n%s", want[i], t);
    /* every sample line names a metric declared by a # TYPE line before it */
    for (char *line = t; *line;) {
        char *end = strchr(line, '\n');
        cr_assert(end, "unterminated line");
        if (line[0] != '#') {
            char name[128];
            size_t k = strcspn(line, "{ ");
            cr_assert_lt(k, sizeof name);
            memcpy(name, line, k);
            name[k] = 0;
            for (const char *suf = "_bucket"; suf; suf = NULL) {
                const size_t L = strlen(name), ls = strlen(suf);
                if (L > ls && strcmp(name + L - ls, suf) == 0) name[L - ls] = 0;
            }
            char *s2 = strstr(name, "_sum");
            if (s2 && !s2[4]) *s2 = 0;
            s2 = strstr(name, "_count");
            if (s2 && !s2[6]) *s2 = 0;
            char decl[200];
            snprintf(decl, sizeof decl, "# TYPE %s ", name);
            char *d = strstr(t, decl);
            cr_assert(d && d < line, "sample of %s without its # TYPE line", name);
        }
        line = end + 1;
    }
    free(t);
}

/* ---- the bridge on a small random model -------------------------------------------------------------- */

static kvh_model model;
static kvh_engine *eng;

static kvh_bridge *bridge_up(int max_seqs, int max_waiting) {
    /* 4096 positions: a request of 4000 tokens runs long enough (thousands of steps) that a cancel issued
     * right after its first tokens lands before it ends, even when the test thread is descheduled for a
     * while on a loaded machine (with 240 tokens of this tiny model it could end first: a flake) */
    kvh_model_config c = {.n_vocab = 97, .n_positions = 4096, .n_embd = 64, .n_head = 4, .n_layer = 2,
                          .n_inner = 128, .ln_eps = 1e-5f, .bos_id = 96};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_model_init_random(&model, &c, 7, "random:small", &err), 0, "%s", err.msg);
    kvh_session_options so = kvh_session_default_options();
    so.threads = 1;
    so.block_slots = 16;
    kvh_engine_options eo = {.max_seqs = (uint32_t)max_seqs, .step_tokens = 64, .check_invariants = true};
    cr_assert_eq(kvh_engine_create(&eng, &model, NULL, &so, &eo, &err), 0, "%s", err.msg);
    kvh_bridge *b = NULL;
    kvh_bridge_options bo = {.max_waiting = max_waiting};
    cr_assert_eq(kvh_bridge_create(&b, eng, &bo, &err), 0, "%s", err.msg);
    return b;
}

static void bridge_down(kvh_bridge *b) {
    kvh_bridge_free(b);
    kvh_engine_free(eng);
    kvh_model_free(&model);
}

static kvh_engine_request request(int max_tokens) {
    static const int32_t prompt[] = {1, 2, 3, 4, 5};
    kvh_engine_request r = {.prompt = prompt, .n_prompt = 5, .max_tokens = max_tokens, .ignore_eos = true};
    r.sampling = kvh_sampler_default_params();
    r.sampling.temperature = 0;
    return r;
}

/* Reads the request's tokens until it ends; returns how many. */
static int drain_tokens(kvh_bridge *b, kvh_bridge_req *q, kvh_bridge_poll *p) {
    static int32_t toks[4096];
    int have = 0;
    do {
        kvh_bridge_wait(b, q, have, toks + have, 4096 - have, 5000, p);
        have += p->n_new;
    } while (!p->done);
    return have;
}

TestSuite(serve_bridge, .timeout = 120);

Test(serve_bridge, tokens_through_the_outbox) {
    kvh_bridge *b = bridge_up(4, 0);
    kvh_bridge_req *q[3];
    for (int i = 0; i < 3; i++) {
        kvh_engine_request r = request(10 + i);
        cr_assert_eq(kvh_bridge_submit(b, &r, &q[i]), KVH_BRIDGE_OK);
    }
    for (int i = 0; i < 3; i++) {
        kvh_bridge_poll p;
        cr_assert_eq(drain_tokens(b, q[i], &p), 10 + i);
        cr_assert_eq(p.why, KVH_FINISH_LENGTH);
        cr_assert(!p.failed);
        uint64_t t0, t1, t2;
        kvh_bridge_req_times(b, q[i], &t0, &t1, &t2);
        cr_assert(t0 > 0 && t1 >= t0 && t2 >= t1);
        kvh_bridge_release(b, q[i]);
    }
    cr_assert(kvh_bridge_wait_idle(b, 5000));
    kvh_bridge_snapshot s;
    kvh_bridge_snapshot_get(b, &s);
    cr_assert_eq(s.completed, 3u);
    cr_assert_eq(s.in_flight, 0u);
    cr_assert_eq(s.waiting, 0u);
    cr_assert_eq(s.ttft.n, 3u);
    cr_assert_eq(s.tpot.n, 3u);
    bridge_down(b);
}

Test(serve_bridge, refused_request_fails_with_the_engines_message) {
    kvh_bridge *b = bridge_up(2, 0);
    kvh_engine_request r = request(5000); /* prompt 5 + 5000 > n_positions 4096 */
    kvh_bridge_req *q;
    cr_assert_eq(kvh_bridge_submit(b, &r, &q), KVH_BRIDGE_OK);
    kvh_bridge_poll p;
    cr_assert_eq(drain_tokens(b, q, &p), 0);
    cr_assert(p.failed);
    cr_assert(strstr(p.error, "n_positions"), "%s", p.error);
    kvh_bridge_release(b, q);
    bridge_down(b);
}

Test(serve_bridge, cancel_full_and_draining) {
    kvh_bridge *b = bridge_up(1, 1);
    kvh_engine_request r = request(4000);
    kvh_bridge_req *run, *wait, *extra;
    cr_assert_eq(kvh_bridge_submit(b, &r, &run), KVH_BRIDGE_OK);
    int32_t first[4];
    kvh_bridge_poll p;
    kvh_bridge_wait(b, run, 0, first, 4, 5000, &p); /* running now: no longer waiting */
    cr_assert_gt(p.n_new, 0);
    kvh_engine_request r2 = request(3);
    cr_assert_eq(kvh_bridge_submit(b, &r2, &wait), KVH_BRIDGE_OK); /* max_seqs 1: it waits */
    cr_assert_eq(kvh_bridge_submit(b, &r2, &extra), KVH_BRIDGE_FULL);
    cr_assert_null(extra);
    /* cancelling the running request lets the waiting one run */
    kvh_bridge_cancel(b, run);
    const int got = drain_tokens(b, run, &p);
    cr_assert_eq(p.why, KVH_FINISH_CANCELLED);
    cr_assert_lt(got, 4000);
    cr_assert_eq(drain_tokens(b, wait, &p), 3);
    kvh_bridge_release(b, run);
    kvh_bridge_release(b, wait);
    /* releasing a request that is still going cancels it */
    kvh_bridge_req *gone;
    cr_assert_eq(kvh_bridge_submit(b, &r, &gone), KVH_BRIDGE_OK);
    kvh_bridge_release(b, gone);
    cr_assert(kvh_bridge_wait_idle(b, 5000));
    kvh_bridge_snapshot s;
    kvh_bridge_snapshot_get(b, &s);
    cr_assert_eq(s.cancelled, 2u);
    cr_assert_eq(s.completed, 1u);
    cr_assert_eq(s.rejected_full, 1u);
    cr_assert_eq(s.engine.running, 0u);
    kvh_bridge_drain(b);
    cr_assert_eq(kvh_bridge_submit(b, &r2, &extra), KVH_BRIDGE_DRAINING);
    bridge_down(b);
}

Test(serve_bridge, free_with_requests_in_flight) {
    kvh_bridge *b = bridge_up(2, 0);
    kvh_engine_request r = request(200);
    kvh_bridge_req *q[4];
    for (int i = 0; i < 4; i++) cr_assert_eq(kvh_bridge_submit(b, &r, &q[i]), KVH_BRIDGE_OK);
    kvh_bridge_cancel_all(b);
    cr_assert(kvh_bridge_wait_idle(b, 5000));
    for (int i = 0; i < 4; i++) kvh_bridge_release(b, q[i]);
    kvh_bridge_submit(b, &r, &q[0]);
    kvh_bridge_release(b, q[0]);
    bridge_down(b); /* ASan: nothing leaks, nothing is used after free */
}
