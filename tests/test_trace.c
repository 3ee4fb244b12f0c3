/* test_trace.c — Criterion suite for host/engine/trace.c (request trace files and the trace generator).
 * Owns: parsing of good traces (the three prompt forms, defaults, sorting by arrival, comments, CRLF,
 * streams), one check per error class (each names the line and the key), the synthetic-token rule against
 * values computed in Python (docs/trace.md's snippet), the generator's determinism, Poisson gaps, length
 * bounds, shared prefixes, and generate -> load round trips. Does not own the engine or replay. */
#define _POSIX_C_SOURCE 200809L
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/trace.h"
#include "model/tokenizer.h"

#define V 50257
#define P 1024

static kvh_tokenizer *tok_embedded(void) {
    kvh_err err = {{0}};
    kvh_tokenizer *tok = NULL;
    cr_assert_eq(kvh_tokenizer_load_embedded(&tok, &err), 0, "%s", err.msg);
    return tok;
}

static kvh_trace parse_ok(const char *text, const kvh_tokenizer *tok) {
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    int rc = kvh_trace_parse(&t, text, strlen(text), "t.jsonl", tok, V, P, &err);
    cr_assert_eq(rc, 0, "parse failed: %s\n--- text:\n%s", err.msg, text);
    return t;
}

/* The parse fails and the message contains every fragment (NULL-terminated list). */
static void parse_fails(const char *text, int vocab, int n_positions, const char *frag1, const char *frag2) {
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    int rc = kvh_trace_parse(&t, text, strlen(text), "t.jsonl", NULL, vocab, n_positions, &err);
    cr_assert_eq(rc, -1, "accepted: %s", text);
    cr_assert_null(t.req);
    cr_assert_eq(t.n, 0);
    cr_assert(strstr(err.msg, frag1) != NULL, "message '%s' lacks '%s' (text %s)", err.msg, frag1, text);
    if (frag2) cr_assert(strstr(err.msg, frag2) != NULL, "message '%s' lacks '%s' (text %s)", err.msg, frag2, text);
}
#define FAILS(text, f1, f2) parse_fails(text, V, P, f1, f2)

Test(trace, three_prompt_forms_and_defaults) {
    kvh_tokenizer *tok = tok_embedded();
    kvh_trace t = parse_ok("{\"id\": \"a\", \"arrival\": 0, \"prompt\": \"The history of the city\", \"max_tokens\": 4}\n"
                           "{\"arrival\": 0.5, \"prompt_ids\": [50256, 464, 2106], \"max_tokens\": 2, \"prefix\": \"sys\"}\n"
                           "{\"id\": \"c\", \"arrival\": 1.25, \"prompt_tokens\": 9, \"max_tokens\": 1, \"temperature\": 0.8,"
                           " \"top_k\": 50, \"top_p\": 0.9, \"seed\": 18446744073709551615, \"ignore_eos\": false}\n",
                           tok);
    cr_assert_eq(t.n, 3);
    const kvh_trace_request *a = &t.req[0], *b = &t.req[1], *c = &t.req[2];
    cr_assert_str_eq(a->id, "a");
    cr_assert_eq(a->n_prompt, 5);
    int32_t want_a[5] = {464, 2106, 286, 262, 1748};
    cr_assert_arr_eq(a->prompt, want_a, sizeof want_a);
    cr_assert_eq(a->max_tokens, 4);
    cr_assert_eq(a->line, 1);
    /* defaults: greedy, generate's seed, ignore_eos */
    cr_assert_eq(a->temperature, 0.0f);
    cr_assert_eq(a->top_k, 0);
    cr_assert_eq(a->top_p, 1.0f);
    cr_assert_eq(a->seed, 1234);
    cr_assert(a->ignore_eos);
    cr_assert_str_eq(a->prefix, "");
    cr_assert_eq(a->prefix_tokens, 0);

    cr_assert_str_eq(b->id, "line 2");
    cr_assert_eq(b->arrival_s, 0.5);
    int32_t want_b[3] = {50256, 464, 2106};
    cr_assert_eq(b->n_prompt, 3);
    cr_assert_arr_eq(b->prompt, want_b, sizeof want_b);
    cr_assert_str_eq(b->prefix, "sys"); /* a label only */
    cr_assert_eq(b->prefix_tokens, 0);

    cr_assert_eq(c->n_prompt, 9);
    for (int i = 0; i < 9; i++) cr_assert(c->prompt[i] >= 0 && c->prompt[i] < V - 1);
    cr_assert_float_eq(c->temperature, 0.8f, 1e-7);
    cr_assert_eq(c->top_k, 50);
    cr_assert_float_eq(c->top_p, 0.9f, 1e-7);
    cr_assert_eq(c->seed, UINT64_MAX);
    cr_assert(!c->ignore_eos);
    kvh_trace_free(&t);
    cr_assert_null(t.req);
    kvh_tokenizer_free(tok);
}

Test(trace, sorted_by_arrival_stable_comments_blank_crlf) {
    kvh_trace t = parse_ok("# a comment\n"
                           "\n"
                           "{\"id\": \"late\", \"arrival\": 3, \"prompt_tokens\": 2, \"max_tokens\": 1}\r\n"
                           "   # indented comment\n"
                           "{\"id\": \"tie1\", \"arrival\": 1, \"prompt_tokens\": 2, \"max_tokens\": 1}\n"
                           "  \t \n"
                           "{\"id\": \"early\", \"arrival\": 0.5, \"prompt_tokens\": 2, \"max_tokens\": 1}\n"
                           "{\"id\": \"tie2\", \"arrival\": 1e0, \"prompt_tokens\": 2, \"max_tokens\": 1}", /* no final \n */
                           NULL);
    cr_assert_eq(t.n, 4);
    cr_assert_str_eq(t.req[0].id, "early");
    cr_assert_str_eq(t.req[1].id, "tie1");
    cr_assert_str_eq(t.req[2].id, "tie2");
    cr_assert_str_eq(t.req[3].id, "late");
    cr_assert_eq(t.req[0].line, 7);
    cr_assert_eq(t.req[3].line, 3);
    kvh_trace_free(&t);
}

Test(trace, synthetic_rule_matches_python) {
    /* values from docs/trace.md's Python snippet */
    int32_t ids[8];
    kvh_trace_synthetic_ids(ids, 4, "r0", "", 0, V);
    int32_t want0[4] = {25546, 4774, 9, 38593};
    cr_assert_arr_eq(ids, want0, sizeof want0);
    kvh_trace_synthetic_ids(ids, 8, "r5", "sys", 3, V);
    int32_t want5[8] = {21854, 30347, 37158, 17212, 50095, 42971, 3013, 16443};
    cr_assert_arr_eq(ids, want5, sizeof want5);
    /* the same through the file form */
    kvh_trace t = parse_ok("{\"id\": \"r5\", \"arrival\": 0, \"prompt_tokens\": 8, \"prefix\": \"sys\", \"prefix_tokens\": 3,"
                           " \"max_tokens\": 1}\n", NULL);
    cr_assert_arr_eq(t.req[0].prompt, want5, sizeof want5);
    cr_assert_eq(t.req[0].prefix_tokens, 3);
    kvh_trace_free(&t);
}

Test(trace, synthetic_prefix_shared_rest_not) {
    kvh_trace t = parse_ok("{\"id\": \"x\", \"arrival\": 0, \"prompt_tokens\": 300, \"prefix\": \"sys\", \"prefix_tokens\": 200, \"max_tokens\": 1}\n"
                           "{\"id\": \"y\", \"arrival\": 0, \"prompt_tokens\": 250, \"prefix\": \"sys\", \"prefix_tokens\": 100, \"max_tokens\": 1}\n"
                           "{\"id\": \"z\", \"arrival\": 0, \"prompt_tokens\": 300, \"prefix\": \"other\", \"prefix_tokens\": 200, \"max_tokens\": 1}\n"
                           "{\"id\": \"w\", \"arrival\": 0, \"prompt_tokens\": 300, \"max_tokens\": 1}\n",
                           NULL);
    const kvh_trace_request *x = &t.req[0], *y = &t.req[1], *z = &t.req[2], *w = &t.req[3];
    /* the first prefix_tokens of a label are the same tokens whatever the request */
    cr_assert_arr_eq(x->prompt, y->prompt, 100 * sizeof(int32_t));
    cr_assert(memcmp(x->prompt, z->prompt, 200 * sizeof(int32_t)) != 0);
    int same = 0;
    for (int i = 100; i < 250; i++) same += x->prompt[i] == y->prompt[i];
    cr_assert_lt(same, 5, "%d of 150 tokens after the shared 100 agree", same);
    same = 0;
    for (int i = 0; i < 300; i++) same += x->prompt[i] == w->prompt[i];
    cr_assert_lt(same, 5);
    kvh_trace_free(&t);
}

Test(trace, error_json) {
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n{\"arrival\": 0,}\n", "t.jsonl:2: bad JSON at byte", NULL);
    FAILS("[1, 2]\n", "t.jsonl:1: bad JSON at byte 1: a request is a JSON object", NULL);
    FAILS("{\"arrival\": 01, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "t.jsonl:1: bad JSON", "key 'arrival'");
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1} {}\n", "t.jsonl:1: bad JSON", "text after");
    FAILS("{\"arrival\": 0, \"prompt_ids\": [[1]], \"max_tokens\": 1}\n", "t.jsonl:1: bad JSON", "key 'prompt_ids'");
    FAILS("{\"arrival\": 0, \"prompt\": \"a\tb\", \"max_tokens\": 1}\n", "t.jsonl:1: bad JSON", NULL);
    FAILS("{\"arrival\": 0, \"prompt\": \"\\ud800\", \"max_tokens\": 1}\n", "t.jsonl:1: bad JSON", NULL);
    FAILS("{\"arrival\": 0 \"max_tokens\": 1}\n", "t.jsonl:1: bad JSON", "expected ',' or '}'");
    const char nul[] = "{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n# x\0y\n";
    kvh_trace t;
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_parse(&t, nul, sizeof nul - 1, "t.jsonl", NULL, V, P, &err), -1);
    cr_assert(strstr(err.msg, "t.jsonl:2: the line holds a NUL byte"), "%s", err.msg);
}

Test(trace, error_keys) {
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"max_token\": 3}\n", "t.jsonl:1: unknown key 'max_token'", "known: id");
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"arrival\": 3}\n", "t.jsonl:1: key 'arrival' appears twice", NULL);
    FAILS("{\"prompt_tokens\": 2, \"max_tokens\": 1}\n", "t.jsonl:1: key 'arrival' is missing", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2}\n", "t.jsonl:1: key 'max_tokens' is missing", NULL);
    FAILS("{\"arrival\": 0, \"max_tokens\": 1}\n", "t.jsonl:1: give one of 'prompt'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"prompt_ids\": [1], \"max_tokens\": 1}\n", "t.jsonl:1: give only one of", "'prompt_ids' 'prompt_tokens'");
    FAILS("{}\n", "t.jsonl:1: key 'arrival' is missing", NULL);
}

Test(trace, error_values) {
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": -3}\n", "t.jsonl:1: key 'max_tokens': must be an integer >= 1 (got -3)", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1.5}\n", "key 'max_tokens': must be an integer >= 1 (got 1.5)", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": \"4\"}\n", "key 'max_tokens': must be an integer >= 1 (got \"4\")", NULL);
    FAILS("{\"arrival\": -1, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'arrival': must be a finite number of seconds >= 0 (got -1)", NULL);
    FAILS("{\"arrival\": 1e999, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'arrival'", "(got 1e999)");
    FAILS("{\"arrival\": null, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'arrival'", "(got null)");
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 0, \"max_tokens\": 1}\n", "key 'prompt_tokens': must be an integer from 1 to the model's 1024 positions (got 0)", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 1000, \"max_tokens\": 25}\n", "t.jsonl:1: key 'max_tokens': the prompt's 1000 tokens + max_tokens 25 exceed the model's 1024 positions", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [], \"max_tokens\": 1}\n", "key 'prompt_ids': must hold at least one token id", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [1, 50257], \"max_tokens\": 1}\n", "key 'prompt_ids': element 1 is not a token id in 0..50256 (got 50257)", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [1, -1], \"max_tokens\": 1}\n", "element 1 is not a token id", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [1, 2.5], \"max_tokens\": 1}\n", "element 1 is not a token id", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [1, \"2\"], \"max_tokens\": 1}\n", "element 1 is not a number", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": 5, \"max_tokens\": 1}\n", "key 'prompt_ids': must be an array", NULL);
    FAILS("{\"arrival\": 0, \"prompt\": \"hello\", \"max_tokens\": 1}\n", "t.jsonl:1: key 'prompt': a text prompt needs a tokenizer", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"temperature\": -0.5}\n", "key 'temperature': must be a number >= 0", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"top_k\": -1}\n", "key 'top_k': must be an integer >= 0", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"top_p\": 0}\n", "key 'top_p': must be a number in (0, 1]", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"top_p\": 1.01}\n", "key 'top_p'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"seed\": 18446744073709551616}\n", "key 'seed': must be a whole number", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"seed\": -1}\n", "key 'seed'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"seed\": 1e3}\n", "key 'seed'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1, \"ignore_eos\": 1}\n", "key 'ignore_eos': must be true or false (got 1)", NULL);
    FAILS("{\"id\": \"\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'id': must be 1 to 64 bytes", NULL);
    FAILS("{\"id\": 7, \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'id': must be a string (got 7)", NULL);
    FAILS("{\"id\": \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n",
          "key 'id': must be 1 to 64 bytes of text (it has 65)", NULL);
    FAILS("{\"id\": \"a\\u0000b\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'id': must not contain a NUL", NULL);
    FAILS("{\"id\": \"\xff\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n", "key 'id': not valid UTF-8", NULL);
    FAILS("{\"arrival\": 0, \"prompt_ids\": [1], \"prefix\": \"s\", \"prefix_tokens\": 1, \"max_tokens\": 1}\n", "key 'prefix_tokens': only with 'prompt_tokens'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 4, \"prefix_tokens\": 1, \"max_tokens\": 1}\n", "key 'prefix_tokens': needs 'prefix'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 4, \"prefix\": \"s\", \"max_tokens\": 1}\n", "key 'prefix': with 'prompt_tokens' give 'prefix_tokens'", NULL);
    FAILS("{\"arrival\": 0, \"prompt_tokens\": 4, \"prefix\": \"s\", \"prefix_tokens\": 5, \"max_tokens\": 1}\n", "key 'prefix_tokens': must be an integer from 1 to prompt_tokens (4) (got 5)", NULL);
}

Test(trace, error_trace_level) {
    FAILS("", "t.jsonl: no request", NULL);
    FAILS("# only a comment\n\n", "t.jsonl: no request", NULL);
    FAILS("{\"id\": \"a\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n"
          "{\"id\": \"b\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n"
          "{\"id\": \"a\", \"arrival\": 0, \"prompt_tokens\": 2, \"max_tokens\": 1}\n",
          "t.jsonl:3: key 'id': 'a' is already the id of line 1", NULL);
    /* prompt_ids longer than n_positions: refused while reading, small context */
    parse_fails("{\"arrival\": 0, \"prompt_ids\": [1, 2, 3, 4, 5], \"max_tokens\": 1}\n", 10, 4,
                "key 'prompt_ids': more than the model's 4 positions", NULL);
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_parse(&t, "x", 1, "t", NULL, 1, P, &err), -1);
    cr_assert(strstr(err.msg, "vocabulary size 1"), "%s", err.msg);
}

Test(trace, long_line_and_text_errors) {
    /* a line over 16 MiB */
    size_t n = KVH_TRACE_MAX_LINE_BYTES + 10;
    char *big = malloc(n + 1);
    cr_assert_not_null(big);
    memset(big, ' ', n);
    big[n] = '\0';
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_parse(&t, big, n, "t.jsonl", NULL, V, P, &err), -1);
    cr_assert(strstr(err.msg, "t.jsonl:1: the line is longer than 16 MiB"), "%s", err.msg);
    free(big);
    kvh_tokenizer *tok = tok_embedded();
    const char *empty = "{\"arrival\": 0, \"prompt\": \"\", \"max_tokens\": 1}\n";
    cr_assert_eq(kvh_trace_parse(&t, empty, strlen(empty), "t.jsonl", tok, V, P, &err), -1);
    cr_assert(strstr(err.msg, "t.jsonl:1: key 'prompt': the text has no token"), "%s", err.msg);
    /* text tokens beyond a smaller vocabulary */
    const char *hi = "{\"arrival\": 0, \"prompt\": \"The history\", \"max_tokens\": 1}\n";
    cr_assert_eq(kvh_trace_parse(&t, hi, strlen(hi), "t.jsonl", tok, 1000, P, &err), -1);
    cr_assert(strstr(err.msg, "outside the vocabulary 0..999"), "%s", err.msg);
    kvh_tokenizer_free(tok);
}

static char *generate_text(const kvh_trace_gen_options *o, size_t *len) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_not_null(f);
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_generate(o, f, V, &err), 0, "%s", err.msg);
    cr_assert_eq(fclose(f), 0);
    *len = n;
    return buf;
}

Test(trace, generator_deterministic) {
    kvh_trace_gen_options o = kvh_trace_gen_default_options();
    o.n_requests = 200;
    o.shared_share = 0.3;
    o.shared_tokens = 32;
    size_t n1, n2, n3;
    char *a = generate_text(&o, &n1), *b = generate_text(&o, &n2);
    cr_assert_eq(n1, n2);
    cr_assert(memcmp(a, b, n1) == 0, "same options, different bytes");
    o.seed = 2;
    char *c = generate_text(&o, &n3);
    cr_assert(n3 != n1 || memcmp(a, c, n1) != 0, "another seed, same bytes");
    o.dist = KVH_TRACE_DIST_LOGNORMAL;
    size_t n4, n5;
    char *d = generate_text(&o, &n4), *e = generate_text(&o, &n5);
    cr_assert(n4 == n5 && memcmp(d, e, n4) == 0);
    free(a);
    free(b);
    free(c);
    free(d);
    free(e);
}

Test(trace, generator_poisson_and_lengths) {
    kvh_trace_gen_options o = kvh_trace_gen_default_options();
    o.n_requests = 20000;
    o.rate_per_s = 8.0;
    o.prompt_min = 3;
    o.prompt_max = 40;
    o.output_min = 2;
    o.output_max = 9;
    size_t n;
    char *text = generate_text(&o, &n);
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_parse(&t, text, n, "gen", NULL, V, P, &err), 0, "%s", err.msg);
    free(text);
    cr_assert_eq(t.n, 20000);
    cr_assert_eq(t.req[0].arrival_s, 0.0);
    double sum = 0, sum2 = 0;
    long plen = 0;
    int pmin = 1 << 30, pmax = 0;
    for (int i = 1; i < t.n; i++) {
        double g = t.req[i].arrival_s - t.req[i - 1].arrival_s;
        cr_assert_geq(g, 0);
        sum += g;
        sum2 += g * g;
    }
    for (int i = 0; i < t.n; i++) {
        char want[16];
        snprintf(want, sizeof want, "r%d", i);
        cr_assert_str_eq(t.req[i].id, want); /* arrivals increase with the index */
        plen += t.req[i].n_prompt;
        if (t.req[i].n_prompt < pmin) pmin = t.req[i].n_prompt;
        if (t.req[i].n_prompt > pmax) pmax = t.req[i].n_prompt;
        cr_assert(t.req[i].max_tokens >= 2 && t.req[i].max_tokens <= 9);
        cr_assert_str_eq(t.req[i].prefix, "");
    }
    double mean = sum / (t.n - 1), sd = sqrt(sum2 / (t.n - 1) - mean * mean);
    /* exponential gaps: mean 1/rate = 0.125 and standard deviation equal to the mean; the standard error of
     * the mean over 19999 gaps is ~0.0009, the bound is ~5.5 of them */
    cr_assert(fabs(mean - 0.125) < 0.005, "mean gap %.5f, want 0.125", mean);
    cr_assert(fabs(sd - 0.125) < 0.01, "gap sd %.5f, want 0.125", sd);
    cr_assert_eq(pmin, 3);
    cr_assert_eq(pmax, 40);
    cr_assert(fabs((double)plen / t.n - 21.5) < 0.5, "mean prompt %.2f, want 21.5", (double)plen / t.n);
    kvh_trace_free(&t);

    /* log-normal: within bounds, median near sqrt(min*max) */
    o.n_requests = 4001;
    o.prompt_min = 10;
    o.prompt_max = 1000;
    o.output_min = 1;
    o.output_max = 16;
    o.dist = KVH_TRACE_DIST_LOGNORMAL;
    text = generate_text(&o, &n);
    cr_assert_eq(kvh_trace_parse(&t, text, n, "gen", NULL, V, 2000, &err), 0, "%s", err.msg);
    free(text);
    int below = 0;
    for (int i = 0; i < t.n; i++) {
        cr_assert(t.req[i].n_prompt >= 10 && t.req[i].n_prompt <= 1000);
        below += t.req[i].n_prompt < 100;
    }
    cr_assert(below > 1800 && below < 2200, "%d of 4001 below the median 100", below);
    kvh_trace_free(&t);

    /* rate 0: all at time 0 */
    o.rate_per_s = 0;
    o.n_requests = 10;
    text = generate_text(&o, &n);
    cr_assert_eq(kvh_trace_parse(&t, text, n, "gen", NULL, V, 2000, &err), 0, "%s", err.msg);
    free(text);
    for (int i = 0; i < t.n; i++) cr_assert_eq(t.req[i].arrival_s, 0.0);
    kvh_trace_free(&t);
}

Test(trace, generator_shared_prefix_round_trip) {
    kvh_trace_gen_options o = kvh_trace_gen_default_options();
    o.n_requests = 400;
    o.prompt_min = 50;
    o.prompt_max = 120;
    o.shared_share = 0.5;
    o.shared_tokens = 40;
    size_t n;
    char *text = generate_text(&o, &n);
    char path[] = "/tmp/test_trace_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, n), (ssize_t)n);
    close(fd);
    free(text);
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_load(&t, path, NULL, V, P, &err), 0, "%s", err.msg);
    unlink(path);
    cr_assert_eq(t.n, 400);
    const kvh_trace_request *first = NULL;
    int shared = 0;
    int32_t ids[120];
    for (int i = 0; i < t.n; i++) {
        const kvh_trace_request *r = &t.req[i];
        bool s = strcmp(r->prefix, "sys") == 0;
        cr_assert(s || r->prefix[0] == '\0');
        /* the ids written equal the synthetic rule for (id, prefix, prefix_tokens) */
        kvh_trace_synthetic_ids(ids, r->n_prompt, r->id, s ? "sys" : "", s ? 40 : 0, V);
        cr_assert_arr_eq(ids, r->prompt, (size_t)r->n_prompt * sizeof(int32_t), "request %s", r->id);
        if (!s) continue;
        shared++;
        if (!first) first = r;
        else cr_assert_arr_eq(first->prompt, r->prompt, 40 * sizeof(int32_t));
    }
    cr_assert(shared > 150 && shared < 250, "%d of 400 shared at share 0.5", shared);
    /* requests without the prefix do not start with it */
    for (int i = 0; i < t.n; i++)
        if (!t.req[i].prefix[0]) cr_assert(memcmp(t.req[i].prompt, first->prompt, 8 * sizeof(int32_t)) != 0);
    kvh_trace_summary s;
    cr_assert_eq(kvh_trace_summarize(&t, &s, &err), 0);
    cr_assert_eq(s.n_requests, 400);
    cr_assert_eq(s.n_prefix_groups, 1);
    cr_assert_eq(s.n_prefixed, shared);
    cr_assert(s.prompt_min >= 50 && s.prompt_max <= 120);
    kvh_trace_free(&t);
}

Test(trace, generator_bad_options) {
    kvh_trace_gen_options o = kvh_trace_gen_default_options();
    kvh_err err = {{0}};
    o.shared_share = 0.5;
    o.shared_tokens = 100; /* > prompt_min 64 */
    cr_assert_eq(kvh_trace_gen_check(&o, V, &err), -1);
    cr_assert(strstr(err.msg, "longer than the shortest prompt"), "%s", err.msg);
    o = kvh_trace_gen_default_options();
    o.prompt_max = 1000;
    cr_assert_eq(kvh_trace_gen_check(&o, V, &err), -1);
    cr_assert(strstr(err.msg, "exceed the model's 1024 positions"), "%s", err.msg);
    o = kvh_trace_gen_default_options();
    o.rate_per_s = NAN;
    cr_assert_eq(kvh_trace_gen_check(&o, V, &err), -1);
    o = kvh_trace_gen_default_options();
    o.output_min = 0;
    cr_assert_eq(kvh_trace_gen_check(&o, V, &err), -1);
    /* nothing is written on bad options */
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_eq(kvh_trace_generate(&o, f, V, &err), -1);
    fclose(f);
    cr_assert_eq(n, 0);
    free(buf);
}

Test(trace, load_file_errors_and_stream) {
    kvh_trace t = {NULL, 0};
    kvh_err err = {{0}};
    cr_assert_eq(kvh_trace_load(&t, "/nonexistent/t.jsonl", NULL, V, P, &err), -1);
    cr_assert(strstr(err.msg, "/nonexistent/t.jsonl: cannot open"), "%s", err.msg);
    cr_assert_eq(kvh_trace_load(&t, "/tmp", NULL, V, P, &err), -1);
    cr_assert(strstr(err.msg, "is a directory"), "%s", err.msg);
    /* a pipe, and a line split across many reads (the loader reads in 1 MiB chunks) */
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(pfd[0]);
        FILE *w = fdopen(pfd[1], "w");
        fputs("# trace\n{\"id\": \"long\", \"arrival\": 2, \"prompt_ids\": [", w);
        for (int i = 0; i < 1000; i++) fprintf(w, "%s%d", i ? ", " : "", i);
        fputs("], \"max_tokens\": 1}\n", w);
        /* padding spaces make the next line cross the chunk boundary */
        for (int i = 0; i < (3 << 20); i++) fputc(' ', w);
        fputs("{\"id\": \"b\", \"arrival\": 1, \"prompt_tokens\": 3, \"max_tokens\": 2}\n", w);
        fputs("{\"id\": \"c\", \"arrival\": 1.5, \"prompt_tokens\": 3, \"max_tokens\": 2", w); /* no final newline */
        fputc('}', w);
        fclose(w);
        _exit(0);
    }
    close(pfd[1]);
    char path[64];
    snprintf(path, sizeof path, "/dev/fd/%d", pfd[0]);
    int rc = kvh_trace_load(&t, path, NULL, V, P, &err);
    close(pfd[0]);
    cr_assert_eq(rc, 0, "%s", err.msg);
    cr_assert_eq(t.n, 3);
    cr_assert_str_eq(t.req[0].id, "b");
    cr_assert_eq(t.req[0].line, 3);
    cr_assert_str_eq(t.req[2].id, "long");
    cr_assert_eq(t.req[2].n_prompt, 1000);
    cr_assert_eq(t.req[2].prompt[999], 999);
    kvh_trace_free(&t);

    /* an error deep in a file names its line */
    char fpath[] = "/tmp/test_trace_XXXXXX";
    int fd = mkstemp(fpath);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 5000; i++) fprintf(f, "{\"arrival\": %d, \"prompt_tokens\": 4, \"max_tokens\": 2}\n", i);
    fputs("{\"arrival\": 1, \"prompt_tokens\": 4, \"max_tokens\": 0}\n", f);
    fclose(f);
    cr_assert_eq(kvh_trace_load(&t, fpath, NULL, V, P, &err), -1);
    unlink(fpath);
    char want[128];
    snprintf(want, sizeof want, "%s:5001: key 'max_tokens': must be an integer >= 1 (got 0)", fpath);
    cr_assert(strstr(err.msg, want), "'%s' lacks '%s'", err.msg, want);
    cr_assert_null(t.req);
}
