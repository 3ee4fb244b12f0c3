/* cmd_tokenize.c — `kvhost tokenize`: text -> GPT-2 token ids, and ids -> text with --decode, so token ids
 * can be compared with any framework without linking the core library.
 * Owns: the command's options, choosing the tokenizer (the vocab.json/merges.txt beside --model, a hub
 * id's cache snapshot, else the embedded GPT-2 files), parsing id lists, printing. The BPE is tokenizer.c. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "cli/commands.h"
#include "model/hub.h"
#include "model/tokenizer.h"

#define MAX_TOKENIZE_BYTES (64u << 20)

static const char *const tokenize_usage =
    "usage: kvhost tokenize [--model SPEC] (--text TEXT | --text-file FILE) [--decode] [--eot-text]\n"
    "\n"
    "Prints the GPT-2 token ids of the text, separated by spaces, on one line. The literal text\n"
    "<|endoftext|> is the token 50256, as in generate's prompts and transformers' tokenizer (--eot-text:\n"
    "encode it as ordinary text, as eval does by default).\n"
    "\n"
    "  --model SPEC      the tokenizer beside a checkpoint directory or cached hub id (vocab.json,\n"
    "                    merges.txt); default and random:NAME: the embedded GPT-2 files\n"
    "  --text TEXT       the text (or, with --decode, the ids)\n"
    "  --text-file FILE  read it from FILE (a pipe or /dev/stdin too; at most 64 MiB)\n"
    "  --decode          the input is ids (separated by spaces, commas, newlines; [ ] allowed): print\n"
    "                    their text, byte for byte, without a trailing newline\n"
    "  --eot-text        encode <|endoftext|> as text (ids 27, 91, 437, 1659, 5239, 91, 29)\n"
    "\n"
    "examples:\n"
    "  kvhost tokenize --text \"The history of the city\"          -> 464 2106 286 262 1748\n"
    "  kvhost tokenize --decode --text \"464 2106 286 262 1748\"   -> The history of the city\n";

typedef struct tokenize_args {
    const char *model, *text, *text_file;
    bool decode, eot_text;
} tokenize_args;

static int parse_args(int argc, char **argv, tokenize_args *a, kvh_err *err) {
    memset(a, 0, sizeof *a);
    for (int i = 1; i < argc;) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) return 1;
        if (strcmp(o, "--decode") == 0) { a->decode = true; i++; continue; }
        if (strcmp(o, "--eot-text") == 0) { a->eot_text = true; i++; continue; }
        if (!v || (strcmp(o, "--model") != 0 && strcmp(o, "--text") != 0 && strcmp(o, "--text-file") != 0))
            return kvh_fail(err, "tokenize: unknown argument '%s'%s (see kvhost tokenize --help)", o,
                            v ? "" : " or missing value");
        if (strcmp(o, "--model") == 0) a->model = v;
        else if (strcmp(o, "--text") == 0) a->text = v;
        else a->text_file = v;
        i += 2;
    }
    if ((a->text != NULL) == (a->text_file != NULL)) return kvh_fail(err, "give one of --text or --text-file");
    if (a->decode && a->eot_text) return kvh_fail(err, "--eot-text is for encoding; --decode gives every id its text");
    return 0;
}

static bool is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int load_tokenizer(const char *spec, kvh_tokenizer **tok, kvh_err *err) {
    if (!spec || strncmp(spec, "random:", 7) == 0) return kvh_tokenizer_load_embedded(tok, err);
    char dir[4096];
    struct stat sb;
    snprintf(dir, sizeof dir, "%s", spec);
    if (stat(spec, &sb) != 0) {
        int found = kvh_hub_resolve(spec, dir, sizeof dir, err);
        if (found < 0) return -1;
        if (found == 0) return kvh_fail(err, "--model '%s': no such directory", spec);
    } else if (!S_ISDIR(sb.st_mode)) {
        return kvh_fail(err, "--model '%s': not a directory", spec);
    }
    char vocab[4200], merges[4200];
    snprintf(vocab, sizeof vocab, "%s/vocab.json", dir);
    snprintf(merges, sizeof merges, "%s/merges.txt", dir);
    if (is_file(vocab) && is_file(merges)) return kvh_tokenizer_load(tok, vocab, merges, err);
    fprintf(stderr, "kvhost: %s has no vocab.json/merges.txt; using the built-in GPT-2 tokenizer\n", spec);
    return kvh_tokenizer_load_embedded(tok, err);
}

/* "464, 2106 [286]" -> ids; every id in 0 .. vocab-1. */
static int parse_ids(const char *s, size_t len, int vocab, int32_t **out, size_t *n, kvh_err *err) {
    size_t cap = 0;
    *out = NULL;
    *n = 0;
    size_t i = 0;
    while (i < len) {
        char c = s[i];
        if (c == ' ' || c == ',' || c == '\n' || c == '\t' || c == '\r' || c == '[' || c == ']') {
            i++;
            continue;
        }
        if (c < '0' || c > '9')
            return kvh_fail(err, "--decode: byte %zu ('%c') is not part of an id list (whole numbers separated by "
                            "spaces or commas)", i, c >= 0x20 && c < 0x7f ? c : '?');
        long v = 0;
        size_t start = i;
        while (i < len && s[i] >= '0' && s[i] <= '9') {
            if (v > 100000000) return kvh_fail(err, "--decode: the id at byte %zu is too large", start);
            v = v * 10 + (s[i++] - '0');
        }
        if (v >= vocab)
            return kvh_fail(err, "--decode: id %ld (at byte %zu) is outside the vocabulary 0..%d", v, start, vocab - 1);
        if (*n == cap) {
            cap = cap ? 2 * cap : 256;
            int32_t *grown = realloc(*out, cap * sizeof **out);
            if (!grown) return kvh_fail(err, "--decode: out of memory");
            *out = grown;
        }
        (*out)[(*n)++] = (int32_t)v;
    }
    return 0;
}

int kvh_cmd_tokenize(int argc, char **argv) {
    kvh_err err = {{0}};
    tokenize_args a;
    int pr = parse_args(argc, argv, &a, &err);
    if (pr == 1) {
        fputs(tokenize_usage, stdout);
        return 0;
    }
    if (pr != 0) {
        fprintf(stderr, "kvhost tokenize: %s\n", err.msg);
        return 2;
    }
    kvh_tokenizer *tok = NULL;
    char *file_text = NULL, *out_text = NULL;
    int32_t *ids = NULL;
    size_t len = 0, n = 0, out_len = 0;
    int status = 1;
    const char *text = a.text;
    if (a.text_file) {
        if (kvh_read_text(a.text_file, MAX_TOKENIZE_BYTES, &file_text, &len, &err) != 0) goto out;
        text = file_text;
    } else {
        len = strlen(text);
    }
    if (load_tokenizer(a.model, &tok, &err) != 0) goto out;
    if (a.decode) {
        if (parse_ids(text, len, kvh_tokenizer_vocab_size(tok), &ids, &n, &err) != 0) goto out;
        if (kvh_tokenizer_decode(tok, ids, n, &out_text, &out_len, &err) != 0) goto out;
        if (fwrite(out_text, 1, out_len, stdout) != out_len) {
            kvh_fail(&err, "writing to stdout: %s", strerror(errno));
            goto out;
        }
    } else {
        if (kvh_tokenizer_encode(tok, text, len, a.eot_text ? 0 : 1, &ids, &n, &err) != 0) goto out;
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
        putchar('\n');
    }
    if (fflush(stdout) != 0) {
        kvh_fail(&err, "writing to stdout: %s", strerror(errno));
        goto out;
    }
    status = 0;
out:
    if (status != 0) fprintf(stderr, "kvhost tokenize: %s\n", err.msg);
    free(out_text);
    free(ids);
    free(file_text);
    kvh_tokenizer_free(tok);
    return status;
}
