/* plugin_guard.c — implementation of plugin_guard.h. The handler only uses async-signal-safe calls
 * (write, sigaction, raise). */
#define _XOPEN_SOURCE 700
#include "plugin_guard.h"

#include <signal.h>
#include <string.h>
#include <unistd.h>

typedef struct guard_frame {
    const char *plugin;
    const char *file;
    const char *hook;
    int layer;
    int active;
} guard_frame;

/* Per thread: hooks are called from one thread at a time per instance, but the host may use several. */
static _Thread_local guard_frame current;

void kvh_plugin_guard_enter(const char *plugin, const char *file, const char *hook, int layer) {
    current.plugin = plugin;
    current.file = file;
    current.hook = hook;
    current.layer = layer;
    current.active = 1;
}

void kvh_plugin_guard_leave(void) { current.active = 0; }

static void put(const char *s) {
    if (!s) s = "?";
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void put_int(int v) {
    char buf[16];
    int i = (int)sizeof buf - 1;
    buf[i] = '\0';
    unsigned u = v < 0 ? (unsigned)(-(long)v) : (unsigned)v;
    do {
        buf[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u && i > 1);
    if (v < 0) buf[--i] = '-';
    put(buf + i);
}

static const char *signal_name(int sig) {
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGABRT: return "SIGABRT";
    default: return "a fatal signal";
    }
}

static void on_fatal(int sig) {
    if (current.active) {
        put("kvhost: plugin '");
        put(current.plugin);
        put("' (");
        put(current.file);
        put(") crashed with ");
        put(signal_name(sig));
        put(" in hook ");
        put(current.hook);
        if (current.layer >= 0) {
            put(" (layer ");
            put_int(current.layer);
            put(")");
        }
        put(". The plugin is at fault; kvhost stops because its memory can no longer be trusted.\n");
    }
    /* die with the original signal so the exit status tells what happened */
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

void kvh_plugin_guard_install(void) {
    static int installed;
    if (installed) return;
    installed = 1;
    /* an alternate stack, so a stack overflow inside a plugin is reported too */
    static char alt_stack[64 * 1024];
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, NULL);
    const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_fatal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_ONSTACK | SA_RESETHAND;
        sigaction(sigs[i], &sa, NULL);
    }
}
