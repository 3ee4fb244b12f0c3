/* mmap_guard.c — implementation of mmap_guard.h. The handler uses only async-signal-safe calls (write,
 * sigaction, raise, _exit). The table is written by the loading thread and read by the handler; each
 * slot is published by an atomic store of its base after its other fields are set. */
#define _XOPEN_SOURCE 700
#include "util/mmap_guard.h"

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

enum { MAX_MAPS = 16, PATH_CAP = 1024 };

typedef struct guard_map {
    _Atomic(uintptr_t) base; /* 0 = free slot */
    size_t len;
    char path[PATH_CAP];
} guard_map;

static guard_map maps[MAX_MAPS];
static struct sigaction previous; /* the SIGBUS action replaced by ours */
static _Atomic int have_previous;

static void put(const char *s) {
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void put_u64(uint64_t v) {
    char buf[24];
    int i = (int)sizeof buf - 1;
    buf[i] = '\0';
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v && i > 0);
    put(buf + i);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    uintptr_t a = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_MAPS; i++) {
        uintptr_t b = atomic_load(&maps[i].base);
        if (b && a >= b && a - b < maps[i].len) {
            put("kvhost: ");
            put(maps[i].path);
            put(" changed while this run had it mapped (truncated or rewritten?): reading byte ");
            put_u64((uint64_t)(a - b));
            put(" of the ");
            put_u64((uint64_t)maps[i].len);
            put(" mapped failed with SIGBUS. Do not modify a checkpoint while kvhost uses it; rerun.\n");
            _exit(1);
        }
    }
    /* not ours: hand over to the previous handler, or die of the signal as without us */
    if (atomic_load(&have_previous)) {
        if (previous.sa_flags & SA_SIGINFO) {
            if (previous.sa_sigaction) {
                previous.sa_sigaction(sig, info, ctx);
                return;
            }
        } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
            previous.sa_handler(sig);
            return;
        }
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
    raise(sig);
}

/* Installs on_sigbus unless it is the current handler, remembering whatever it replaces. */
static void install(void) {
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return;
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus) return;
    previous = cur;
    atomic_store(&have_previous, 1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sigemptyset(&sa.sa_mask);
    /* SA_ONSTACK: plugin_guard.c may have set up an alternate stack; use it like its handler does */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGBUS, &sa, NULL);
}

int kvh_mmap_guard_add(const void *base, size_t len, const char *path) {
    install();
    for (int i = 0; i < MAX_MAPS; i++) {
        uintptr_t free_slot = 0;
        /* claim the slot with the sentinel 1 (its len is 0, so the handler matches nothing meanwhile) */
        if (!atomic_compare_exchange_strong(&maps[i].base, &free_slot, (uintptr_t)1)) continue;
        maps[i].len = len;
        size_t n = strlen(path);
        if (n >= PATH_CAP) n = PATH_CAP - 1;
        memcpy(maps[i].path, path, n);
        maps[i].path[n] = '\0';
        atomic_store(&maps[i].base, (uintptr_t)base);
        return 0;
    }
    return -1;
}

void kvh_mmap_guard_remove(const void *base) {
    for (int i = 0; i < MAX_MAPS; i++) {
        if (atomic_load(&maps[i].base) != (uintptr_t)base) continue;
        maps[i].len = 0;
        atomic_store(&maps[i].base, (uintptr_t)0);
    }
}
