/* main.c — the kvhost executable: dispatches the sub-command. Library code never prints or exits;
 * commands print their own errors and return the exit status. Also defines the executable's own
 * _exit/_Exit (the exit guard for plugins, below). */
#define _GNU_SOURCE /* syscall */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "backend/blas.h"
#include "cli/commands.h"
#include "backend/cpu_features.h"
#include "plan/plan.h"
#include "runtime/plugin.h"
#include "runtime/plugin_guard.h"

static const char *const usage =
    "kvhost " KVH_VERSION " — KV-cache techniques on GPT-2, as plugins\n"
    "\n"
    "usage: kvhost COMMAND [options]        (kvhost COMMAND --help for each)\n"
    "\n"
    "commands:\n"
    "  generate   generate text from a prompt, with timings and a JSON Lines record\n"
    "  eval       perplexity of a text file (teacher-forced or streaming through the cache), KL vs full cache\n"
    "  calibrate  activation statistics of every linear input over a text (for smoothquant.so)\n"
    "  plugins    list the plugins found, or show one plugin's parameters (plugins info sink.so)\n"
    "  plan       size a deployment: parameters, KV bytes, max batch, arithmetic intensity\n"
    "  compare    quick side-by-side of the baseline and a plugin stack (also: kvhost --plugins A.so,B.so)\n"
    "  tokenize   text -> GPT-2 token ids (--decode: ids -> text)\n"
    "  logits     the logits or log-probs of every position of a prompt, written as a .npy file\n"
    "  trace      write a synthetic request trace for replay (Poisson arrivals, shared prefixes), or --check one\n"
    "  replay     serve a request trace with continuous batching: throughput, latency, KV memory, prefix hits\n"
    "  serve      an OpenAI-compatible HTTP server (completions, streaming, /metrics) on the engine\n"
    "\n"
    "examples:\n"
    "  kvhost generate --model random:gpt2-medium --prompt \"Hello\" --max-new 32\n"
    "  kvhost generate --model ../shared/models/gpt2-tiny-wt --prompt \"The history of the city\" \\\n"
    "                  --plugins sink.so --set cache.budget=64\n"
    "  kvhost --plugins h2o.so,int8.so              (quick comparison with the baseline)\n"
    "  kvhost plugins info window.so\n"
    "  kvhost plan --model gpt2-medium --gpu-mem 80 --context 1024\n";

/* A plugin calling _exit() or _Exit() in a hook would end the run with its own status and no message:
 * atexit handlers do not run for them. The executable exports these two definitions (CMakeLists.txt,
 * --export-dynamic-symbol), and the dynamic linker binds a plugin's calls to the executable's symbols
 * before libc's, so the exit guard can name the plugin (plugin_guard.h). Outside plugin code they end
 * the process exactly as libc's do (the exit_group system call). Raw system calls stay unguarded. */
void _exit(int status) {
    kvh_plugin_guard_check_exit("_exit()");
    for (;;) syscall(SYS_exit_group, status);
}

void _Exit(int status) {
    kvh_plugin_guard_check_exit("_Exit()");
    for (;;) syscall(SYS_exit_group, status);
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        char kernels[160];
        kvh_blas_describe(kernels, sizeof kernels);
        printf("kvhost %s (plugin ABI %u.%u)\nCPU kernels: %s (cpu supports %s; KVH_ISA lowers it)\n", KVH_VERSION,
               KVP_ABI_MAJOR, KVP_ABI_MINOR, kernels, kvh_isa_name(kvh_cpu_isa_detected()));
        return 0;
    }
    kvh_plugin_guard_install();
    /* A record past the file-size limit (ulimit -f) is then an EFBIG error the writer reports, naming
     * the file, instead of a death by SIGXFSZ at the end of the run. */
    signal(SIGXFSZ, SIG_IGN);
    const char *cmd = argv[1];
    if (strcmp(cmd, "generate") == 0) return kvh_cmd_generate(argc - 1, argv + 1);
    if (strcmp(cmd, "eval") == 0) return kvh_cmd_eval(argc - 1, argv + 1);
    if (strcmp(cmd, "calibrate") == 0) return kvh_cmd_calibrate(argc - 1, argv + 1);
    if (strcmp(cmd, "plugins") == 0) return kvh_cmd_plugins(argc - 1, argv + 1);
    if (strcmp(cmd, "plan") == 0) return kvh_cmd_plan(argc - 1, argv + 1);
    if (strcmp(cmd, "compare") == 0) return kvh_cmd_compare(argc - 1, argv + 1);
    if (strcmp(cmd, "tokenize") == 0) return kvh_cmd_tokenize(argc - 1, argv + 1);
    if (strcmp(cmd, "logits") == 0) return kvh_cmd_logits(argc - 1, argv + 1);
    if (strcmp(cmd, "trace") == 0) return kvh_cmd_trace(argc - 1, argv + 1);
    if (strcmp(cmd, "replay") == 0) return kvh_cmd_replay(argc - 1, argv + 1);
    if (strcmp(cmd, "serve") == 0) return kvh_cmd_serve(argc - 1, argv + 1);
    /* `kvhost --plugins h2o.so,int8.so` (options, no command): the quick comparison against the baseline */
    if (strncmp(cmd, "--", 2) == 0) return kvh_cmd_compare(argc, argv);
    fprintf(stderr, "kvhost: unknown command '%s'\n\n%s", cmd, usage);
    return 2;
}
