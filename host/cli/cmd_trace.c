/* cmd_trace.c — `kvhost trace`: writes a synthetic request trace for `kvhost replay` (Poisson arrivals,
 * length distributions, a share of requests with a common system prompt; explicit prompt ids so peer
 * benchmarks replay the same tokens), or checks a trace file and prints its summary (--check).
 * Owns: the command's options, the atomic write of --out (FILE.tmp, then renamed), the printed summary.
 * Does not own: the format, its parser or the generator (engine/trace.c; docs/trace.md). */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "engine/trace.h"
#include "model/tokenizer.h"

static const char *const trace_usage =
    "usage: kvhost trace --requests N --rate R --prompt-len MIN:MAX --output-len MIN:MAX --out FILE\n"
    "                    [--shared-share F --shared-len N] [--dist uniform|lognormal] [--seed S]\n"
    "                    [--vocab V] [--context P]\n"
    "       kvhost trace --check FILE [--vocab V] [--context P]\n"
    "\n"
    "Writes a request trace for `kvhost replay` (JSON Lines, one request a line; docs/trace.md): request\n"
    "rI arrives at a Poisson process's time (the first at 0), its prompt is explicit token ids, its\n"
    "max_tokens the output length; requests that share the common system prompt carry \"prefix\": \"sys\".\n"
    "The same options write the same bytes. With --check, validates FILE and prints a summary.\n"
    "\n"
    "  --requests N          how many requests (1 .. 1000000)\n"
    "  --rate R              mean arrivals per second (exponential gaps of mean 1/R); 0: all at time 0\n"
    "  --prompt-len MIN:MAX  prompt length in tokens, the shared prefix included (N alone: MIN = MAX = N)\n"
    "  --output-len MIN:MAX  max_tokens of each request\n"
    "  --dist D              of both lengths: uniform (default), or lognormal (median sqrt(MIN*MAX),\n"
    "                        sigma ln(MAX/MIN)/4, redrawn until it falls in MIN..MAX)\n"
    "  --shared-share F      probability that a request starts with the common prefix (default 0)\n"
    "  --shared-len N        that prefix's length in tokens (needed when F > 0; <= the prompt MIN)\n"
    "  --seed S              arrivals, lengths and who shares (default 1); token ids follow the ids\n"
    "  --vocab V             token ids are drawn in 0 .. V-2, V-1 (<|endoftext|>) never (default 50257)\n"
    "  --context P           refuse prompt MAX + output MAX > P positions (default 1024, GPT-2's)\n"
    "  --out FILE            where the trace goes (FILE.tmp, then renamed; '-' for stdout)\n"
    "  --check FILE          validate a trace against --vocab / --context (text prompts with the GPT-2\n"
    "                        tokenizer) and print requests, tokens, arrival span and prefix groups\n"
    "\n"
    "examples:\n"
    "  kvhost trace --requests 200 --rate 4 --prompt-len 64:512 --output-len 16:128 --out t.jsonl\n"
    "  kvhost trace --requests 100 --rate 0 --prompt-len 1000 --output-len 32 --shared-share 1 \\\n"
    "               --shared-len 200 --out shared.jsonl\n"
    "  kvhost trace --check t.jsonl\n";

typedef struct trace_args {
    kvh_trace_gen_options gen;
    const char *out, *check;
    bool have_requests, have_rate, have_prompt, have_output, have_share, have_shared_len, have_other;
    int vocab, context;
} trace_args;

/* "MIN:MAX" or "N" with 1 <= MIN <= MAX <= 1e6 */
static int parse_range(const char *opt, const char *v, int *lo, int *hi, kvh_err *err) {
    char buf[64];
    long a, b;
    const char *colon = strchr(v, ':');
    if (!colon) {
        if (kvh_cli_parse_int(v, 1, 1000000, &a) != 0) goto bad;
        *lo = *hi = (int)a;
        return 0;
    }
    if ((size_t)(colon - v) >= sizeof buf) goto bad;
    memcpy(buf, v, (size_t)(colon - v));
    buf[colon - v] = '\0';
    if (kvh_cli_parse_int(buf, 1, 1000000, &a) != 0 || kvh_cli_parse_int(colon + 1, 1, 1000000, &b) != 0 || b < a)
        goto bad;
    *lo = (int)a;
    *hi = (int)b;
    return 0;
bad:
    return kvh_fail(err, "%s '%s': expected MIN:MAX (or N) with 1 <= MIN <= MAX", opt, v);
}

static int parse_double(const char *opt, const char *v, double lo, double hi, const char *rule, double *out,
                        kvh_err *err) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (end == v || *end || errno || !isfinite(x) || x < lo || x > hi)
        return kvh_fail(err, "%s '%s': expected %s", opt, v, rule);
    *out = x;
    return 0;
}

static int parse_args(int argc, char **argv, trace_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    a->gen = kvh_trace_gen_default_options();
    a->vocab = 50257;
    a->context = 1024;
    for (int i = 1; i < argc;) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (o[0] != '-') return kvh_fail(err, "trace: unexpected argument '%s' (see kvhost trace --help)", o);
        if (!v) return kvh_fail(err, "trace: option '%s' needs a value (see kvhost trace --help)", o);
        long n;
        if (strcmp(o, "--requests") == 0) {
            if (kvh_cli_parse_int(v, 1, KVH_TRACE_MAX_REQUESTS, &n) != 0)
                return kvh_fail(err, "--requests '%s': expected a whole number from 1 to %d", v, KVH_TRACE_MAX_REQUESTS);
            a->gen.n_requests = (int)n;
            a->have_requests = true;
        } else if (strcmp(o, "--rate") == 0) {
            if (parse_double(o, v, 0, 1e9, "requests per second: 0 (all at once) or from 1e-6 to 1e9",
                             &a->gen.rate_per_s, err) != 0)
                return -1;
            if (a->gen.rate_per_s > 0 && a->gen.rate_per_s < 1e-6)
                return kvh_fail(err, "--rate '%s': expected requests per second: 0 (all at once) or from 1e-6 to 1e9", v);
            a->have_rate = true;
        } else if (strcmp(o, "--prompt-len") == 0) {
            if (parse_range(o, v, &a->gen.prompt_min, &a->gen.prompt_max, err) != 0) return -1;
            a->have_prompt = true;
        } else if (strcmp(o, "--output-len") == 0) {
            if (parse_range(o, v, &a->gen.output_min, &a->gen.output_max, err) != 0) return -1;
            a->have_output = true;
        } else if (strcmp(o, "--shared-share") == 0) {
            if (parse_double(o, v, 0, 1, "a probability from 0 to 1", &a->gen.shared_share, err) != 0) return -1;
            a->have_share = true;
        } else if (strcmp(o, "--shared-len") == 0) {
            if (kvh_cli_parse_int(v, 1, 1000000, &n) != 0)
                return kvh_fail(err, "--shared-len '%s': expected a whole number of tokens >= 1", v);
            a->gen.shared_tokens = (int)n;
            a->have_shared_len = true;
        } else if (strcmp(o, "--dist") == 0) {
            if (strcmp(v, "uniform") == 0) a->gen.dist = KVH_TRACE_DIST_UNIFORM;
            else if (strcmp(v, "lognormal") == 0) a->gen.dist = KVH_TRACE_DIST_LOGNORMAL;
            else return kvh_fail(err, "--dist '%s': expected uniform or lognormal", v);
            a->have_other = true;
        } else if (strcmp(o, "--seed") == 0) {
            if (kvh_cli_parse_u64(v, &a->gen.seed) != 0)
                return kvh_fail(err, "--seed '%s': expected a whole number from 0 to 18446744073709551615", v);
            a->have_other = true;
        } else if (strcmp(o, "--vocab") == 0) {
            if (kvh_cli_parse_int(v, 2, 1 << 24, &n) != 0)
                return kvh_fail(err, "--vocab '%s': expected a vocabulary size from 2 to %d", v, 1 << 24);
            a->vocab = (int)n;
        } else if (strcmp(o, "--context") == 0) {
            if (kvh_cli_parse_int(v, 2, 1 << 24, &n) != 0)
                return kvh_fail(err, "--context '%s': expected a number of positions from 2 to %d", v, 1 << 24);
            a->context = (int)n;
        } else if (strcmp(o, "--out") == 0) {
            a->out = v;
        } else if (strcmp(o, "--check") == 0) {
            a->check = v;
        } else {
            return kvh_fail(err, "trace: unknown option '%s' (see kvhost trace --help)", o);
        }
        i += 2;
    }
    a->gen.n_positions = a->context;
    if (a->check) {
        if (a->out || a->have_requests || a->have_rate || a->have_prompt || a->have_output || a->have_share ||
            a->have_shared_len || a->have_other)
            return kvh_fail(err, "--check reads a trace: the generator's options (--out, --requests, ...) are not "
                            "taken with it");
        return 0;
    }
    if (!a->have_requests || !a->have_rate || !a->have_prompt || !a->have_output)
        return kvh_fail(err, "give --requests, --rate, --prompt-len and --output-len (or --check FILE)");
    if (!a->out) return kvh_fail(err, "give --out FILE (or --out - for stdout)");
    if (a->gen.shared_share > 0 && !a->have_shared_len)
        return kvh_fail(err, "--shared-share needs --shared-len (the common prefix's length in tokens)");
    if (a->have_shared_len && !a->have_share)
        return kvh_fail(err, "--shared-len needs --shared-share (the share of requests that start with the prefix)");
    if (kvh_trace_gen_check(&a->gen, a->vocab, err) != 0) return -1;
    if (strcmp(a->out, "-") == 0) return 0;
    return kvh_cli_check_output("--out", a->out, true, err);
}

static void print_summary(const char *path, const kvh_trace_summary *s, bool ok_line) {
    double span = s->last_arrival_s - s->first_arrival_s;
    if (ok_line) printf("%s: ok, %d requests\n", path, s->n_requests);
    printf("  prompt tokens   %lld (min %d, mean %.1f, max %d)\n", (long long)s->prompt_tokens, s->prompt_min,
           (double)s->prompt_tokens / s->n_requests, s->prompt_max);
    printf("  output tokens   %lld (max_tokens: min %d, mean %.1f, max %d)\n", (long long)s->output_tokens,
           s->output_min, (double)s->output_tokens / s->n_requests, s->output_max);
    if (span > 0)
        printf("  arrivals        %.3f .. %.3f s (%.3f requests/s)\n", s->first_arrival_s, s->last_arrival_s,
               (s->n_requests - 1) / span);
    else
        printf("  arrivals        all at %.3f s\n", s->first_arrival_s);
    printf("  prefix groups   %d (%d requests labelled)\n", s->n_prefix_groups, s->n_prefixed);
    printf("  sampled         %d requests with temperature > 0 (the others greedy)\n", s->n_sampled);
}

static int check_trace(const trace_args *a, kvh_err *err) {
    kvh_tokenizer *tok = NULL;
    kvh_trace t = {NULL, 0};
    if (kvh_tokenizer_load_embedded(&tok, err) != 0) return -1;
    int rc = kvh_trace_load(&t, a->check, tok, a->vocab, a->context, err);
    kvh_tokenizer_free(tok);
    if (rc != 0) return -1;
    kvh_trace_summary s;
    rc = kvh_trace_summarize(&t, &s, err);
    kvh_trace_free(&t);
    if (rc != 0) return -1;
    print_summary(a->check, &s, true);
    return 0;
}

static int write_trace(const trace_args *a, kvh_err *err) {
    if (strcmp(a->out, "-") == 0) {
        if (kvh_trace_generate(&a->gen, stdout, a->vocab, err) != 0) return -1;
        if (fflush(stdout) != 0) return kvh_fail(err, "writing to stdout: %s", strerror(errno));
        return 0;
    }
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", a->out) >= (int)sizeof tmp) return kvh_fail(err, "%s: path too long", a->out);
    FILE *f = fopen(tmp, "wb");
    if (!f) return kvh_fail(err, "%s: cannot create: %s", tmp, strerror(errno));
    int rc = kvh_trace_generate(&a->gen, f, a->vocab, err);
    if (fclose(f) != 0 && rc == 0) rc = kvh_fail(err, "writing failed: %s", strerror(errno));
    if (rc == 0 && rename(tmp, a->out) != 0) rc = kvh_fail(err, "cannot rename %s to it: %s", tmp, strerror(errno));
    if (rc != 0) {
        remove(tmp);
        return kvh_fail_prefix(err, "--out %s", a->out);
    }
    /* read it back: the trace replay will load, and the summary of what was written */
    kvh_trace t = {NULL, 0};
    if (kvh_trace_load(&t, a->out, NULL, a->vocab, a->context, err) != 0)
        return kvh_fail_prefix(err, "internal error: the trace written does not load");
    kvh_trace_summary s;
    rc = kvh_trace_summarize(&t, &s, err);
    kvh_trace_free(&t);
    if (rc != 0) return -1;
    printf("wrote %s: %d requests (seed %llu, %s lengths)\n", a->out, s.n_requests, (unsigned long long)a->gen.seed,
           a->gen.dist == KVH_TRACE_DIST_LOGNORMAL ? "log-normal" : "uniform");
    print_summary(a->out, &s, false);
    return 0;
}

int kvh_cmd_trace(int argc, char **argv) {
    kvh_err err = {{0}};
    trace_args a;
    int pr = parse_args(argc, argv, &a, &err);
    if (pr == 1) {
        fputs(trace_usage, stdout);
        return 0;
    }
    if (pr != 0) {
        fprintf(stderr, "kvhost trace: %s\n", err.msg);
        return 2;
    }
    int rc = a.check ? check_trace(&a, &err) : write_trace(&a, &err);
    if (rc != 0) {
        fprintf(stderr, "kvhost trace: %s\n", err.msg);
        return 1;
    }
    return 0;
}
