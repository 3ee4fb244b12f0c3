/* fuzz_cli.c — fuzz target for the command-line option parsers (host/cli/cli.c, host/cli/cmd_plan.c, host/plan/plan.c):
 * the input, split at NUL bytes, is an argument vector. It goes through the common-option parser (as
 * every command's loop calls it, skipping what it does not consume) and then, whole, through
 * `kvhost plan` (option parsing, model shapes, the arithmetic; stdout to /dev/null). Invariants: the
 * common parser consumes at least one argument or reports; a refusal has a message; plan returns 0, 1
 * or 2. Arguments that would write files (--json, --sweep) are dropped: the target must not touch disk.
 * Does not own the parsers. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

int kvh_cmd_plan(int argc, char **argv);

#define CHECK(cond)                                                                          \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "fuzz_cli: invariant failed: %s (line %d)\n", #cond, __LINE__); \
            abort();                                                                         \
        }                                                                                    \
    } while (0)

enum { MAX_ARGS = 64 };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int quiet;
    if (!quiet) {
        quiet = 1;
        /* plan prints its table on stdout; its error lines on stderr stay (run_fuzzers.sh passes
         * -close_fd_mask=2 for this target, which keeps libFuzzer's own reports) */
        if (!freopen("/dev/null", "w", stdout)) abort();
    }
    char *buf = malloc(size + 1);
    CHECK(buf != NULL);
    memcpy(buf, data, size);
    buf[size] = '\0';
    char *argv[MAX_ARGS + 2];
    int argc = 0;
    argv[argc++] = "plan";
    for (char *p = buf; p <= buf + size && argc < MAX_ARGS;) {
        size_t n = strlen(p);
        if (strncmp(p, "--json", 6) != 0 && strncmp(p, "--sweep", 7) != 0) argv[argc++] = p;
        p += n + 1;
    }
    argv[argc] = NULL;

    kvh_cli_common c;
    memset(&c, 0, sizeof c);
    kvh_err err = {{0}};
    for (int i = 1; i < argc;) {
        int before = i;
        err.msg[0] = '\0';
        int r = kvh_cli_common_parse(&c, argc, argv, &i, &err);
        CHECK(r >= -1 && r <= 1);
        if (r < 0) {
            CHECK(err.msg[0] != '\0');
            break;
        }
        if (r == 0) i++; /* a command's own option: the command would look at it */
        CHECK(i > before && i <= argc);
    }
    for (int i = 1; i < argc; i++) {
        long v;
        size_t b;
        uint64_t u;
        (void)kvh_cli_parse_int(argv[i], -5, 5, &v);
        (void)kvh_cli_parse_bytes(argv[i], &b);
        if (kvh_cli_parse_u64(argv[i], &u) == 0) CHECK(argv[i][0] >= '0' && argv[i][0] <= '9');
    }
    int rc = kvh_cmd_plan(argc, argv);
    CHECK(rc == 0 || rc == 1 || rc == 2);
    free(buf);
    return 0;
}
