/* plugin_guard.c — implementation of plugin_guard.h. The handlers only use async-signal-safe calls
 * (write, sigaction, raise, syscall). */
#define _GNU_SOURCE /* pthread_getattr_np, syscall */
#include "runtime/plugin_guard.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "util/sanitizer.h"

typedef struct guard_frame {
    const char *plugin; /* NULL while loading a file (the name is not known yet) */
    const char *file;   /* file name of a hook's plugin; the path while loading */
    const char *hook;   /* hook name, or the loading stage */
    int layer;
    int active;
} guard_frame;

/* Per thread: hooks are called from one thread at a time per instance, but the host may use several. */
static _Thread_local guard_frame current;

/* Per thread, set up on its first entry into plugin code: its stack bounds (to tell a stack overflow
 * from other faults) and whether it has an alternate signal stack. */
static _Thread_local struct {
    int ready;
    uintptr_t stack_lo, stack_hi;
} thread_info;

/* Alternate stacks of threads other than the main one, unmapped when their thread ends. */
#define ALT_STACK_BYTES (64 * 1024)
static pthread_key_t alt_stack_key;
static int alt_stack_key_ok;
static pthread_once_t alt_stack_once = PTHREAD_ONCE_INIT;

static void alt_stack_release(void *p) {
    stack_t off;
    memset(&off, 0, sizeof off);
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, NULL);
    munmap(p, ALT_STACK_BYTES);
}

static void alt_stack_key_create(void) {
    alt_stack_key_ok = pthread_key_create(&alt_stack_key, alt_stack_release) == 0;
}

/* Once per thread (not per hook): a thread whose stack overflows inside a plugin can only run the
 * handler on another stack, and sigaltstack is per thread, so OpenMP workers need their own. */
static void thread_setup(void) {
    thread_info.ready = 1;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void *addr;
        size_t size;
        if (pthread_attr_getstack(&attr, &addr, &size) == 0) {
            thread_info.stack_lo = (uintptr_t)addr;
            thread_info.stack_hi = (uintptr_t)addr + size;
        }
        pthread_attr_destroy(&attr);
    }
    stack_t old;
    if (sigaltstack(NULL, &old) != 0 || !(old.ss_flags & SS_DISABLE)) return; /* has one (the main thread) */
    pthread_once(&alt_stack_once, alt_stack_key_create);
    void *p = mmap(NULL, ALT_STACK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = p;
    ss.ss_size = ALT_STACK_BYTES;
    if (sigaltstack(&ss, NULL) != 0) {
        munmap(p, ALT_STACK_BYTES);
        return;
    }
    if (alt_stack_key_ok) pthread_setspecific(alt_stack_key, p);
}

void kvh_plugin_guard_enter(const char *plugin, const char *file, const char *hook, int layer) {
    if (!thread_info.ready) thread_setup();
    current.plugin = plugin;
    current.file = file;
    current.hook = hook;
    current.layer = layer;
    current.active = 1;
}

void kvh_plugin_guard_enter_load(const char *path, const char *stage) {
    kvh_plugin_guard_enter(NULL, path, stage, -1);
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

/* "plugin 'NAME' (FILE) <what><detail><extra> in hook H (layer L)" or
 * "plugin file PATH <what><detail><extra> while loading, STAGE" */
static void put_who(const char *what, const char *detail, const char *extra) {
    if (current.plugin) {
        put("kvhost: plugin '");
        put(current.plugin);
        put("' (");
        put(current.file);
        put(") ");
        put(what);
        put(detail);
        put(extra);
        put(" in hook ");
        put(current.hook);
        if (current.layer >= 0) {
            put(" (layer ");
            put_int(current.layer);
            put(")");
        }
    } else {
        put("kvhost: plugin file ");
        put(current.file);
        put(" ");
        put(what);
        put(detail);
        put(extra);
        put(" while loading, ");
        put(current.hook);
    }
}

/* A fault within 1 MiB below the thread's stack (its guard region) or in its lowest page: an overflow. */
static int is_stack_overflow(int sig, const siginfo_t *info) {
    if ((sig != SIGSEGV && sig != SIGBUS) || !info || !thread_info.stack_lo) return 0;
    uintptr_t a = (uintptr_t)info->si_addr, lo = thread_info.stack_lo;
    return a < lo + 4096 && a + ((uintptr_t)1 << 20) >= lo;
}

static void on_fatal(int sig, siginfo_t *info, void *uctx) {
    (void)uctx;
    if (current.active) {
        put_who("crashed with ", signal_name(sig), is_stack_overflow(sig, info) ? " (stack overflow)" : "");
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

void kvh_plugin_guard_check_exit(const char *how) {
    if (!current.active) return;
    put_who("called ", how, "");
    put(": plugins must not end the process. kvhost stops with exit status ");
    put_int(KVH_EXIT_PLUGIN);
    put(" and writes no record.\n");
    current.active = 0;
    /* the raw system call: no further atexit handlers or stdio flushing run on behalf of the plugin */
    for (;;) syscall(SYS_exit_group, KVH_EXIT_PLUGIN);
}

#ifdef KVH_ASAN
/* AddressSanitizer stops the process after a bad access (its report is printed just before): when plugin
 * code was running on this thread, say which plugin, hook and layer, like a crash. */
static void on_asan_death(void) {
    if (!current.active) return;
    put_who("made an invalid memory access", "", " (AddressSanitizer's report above)");
    put(". The plugin is at fault.\n");
}
#endif

static void on_exit_called(void) { kvh_plugin_guard_check_exit("exit()"); }
static void on_quick_exit_called(void) { kvh_plugin_guard_check_exit("quick_exit()"); }

void kvh_plugin_guard_install(void) {
    static int installed;
    if (installed) return;
    installed = 1;
    /* an alternate stack for the main thread, so a stack overflow inside a plugin is reported too
     * (other threads get theirs on their first hook, thread_setup) */
    static char alt_stack[ALT_STACK_BYTES];
    stack_t ss;
    memset(&ss, 0, sizeof ss);
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, NULL);
    const int sigs[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fatal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESETHAND;
        sigaction(sigs[i], &sa, NULL);
    }
    atexit(on_exit_called);
    at_quick_exit(on_quick_exit_called);
#ifdef KVH_ASAN
    __asan_set_death_callback(on_asan_death);
#endif
}
