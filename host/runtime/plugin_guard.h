/* plugin_guard.h — naming the plugin when plugin code crashes or ends the process.
 * Owns: a record of which plugin code runs right now, per thread — a hook of an instance, or a stage
 * of loading a .so file (its constructors run by dlopen, kvp_plugin_entry, its destructors run by
 * dlclose); fatal-signal handlers (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) that, while plugin code
 * runs, write "kvhost: plugin 'NAME' (FILE) crashed with SIGSEGV in hook evict (layer 3)" to stderr
 * before the process dies with that signal; an alternate signal stack on every thread that enters
 * plugin code (OpenMP workers included), so a stack overflow is reported too, as one; and the exit
 * guard: exit(), quick_exit(), _exit() or _Exit() called while plugin code runs is reported ("plugin
 * 'NAME' (FILE) called exit() in hook evict (layer 3)") and the process ends with KVH_EXIT_PLUGIN
 * instead of the plugin's status, so a plugin can never end a run silently with exit status 0.
 * exit()/quick_exit() are caught by atexit/at_quick_exit handlers; _exit()/_Exit() only when the
 * executable interposes them (host/cli/main.c). Plugins run in-process (like any shared library, with
 * the user's rights); after a crash inside one the host's memory cannot be trusted, so kvhost does
 * not try to continue: it reports who crashed and where, then ends with the signal, never with a
 * half record (records are appended whole at the end of a run).
 * Does not own: loading or calling plugins (plugin.c, router.c, the backends). */
#ifndef KVH_PLUGIN_GUARD_H
#define KVH_PLUGIN_GUARD_H

/* Exit status of a process that plugin code tried to end (exit/_exit from a hook or while loading). */
#define KVH_EXIT_PLUGIN 1

/* Installs the signal handlers and the exit guard (idempotent). Commands call it once at start. */
void kvh_plugin_guard_install(void);

/* Marks the start and end of a hook call on this thread. plugin/file/hook must outlive the call. The
 * first call on a thread gives it an alternate signal stack if it has none. */
void kvh_plugin_guard_enter(const char *plugin, const char *file, const char *hook, int layer);
/* Marks the start of a loading stage of the plugin file `path` (stage: e.g. "in its constructors, run
 * by dlopen"); ended by kvh_plugin_guard_leave. path/stage must outlive the stage. */
void kvh_plugin_guard_enter_load(const char *path, const char *stage);
void kvh_plugin_guard_leave(void);

/* Called by the executable's own _exit/_Exit (host/cli/main.c) with how = "_exit()" / "_Exit()": when plugin
 * code runs on this thread, reports it and ends the process with KVH_EXIT_PLUGIN (does not return);
 * otherwise returns and the caller exits as asked. Async-signal-safe. */
void kvh_plugin_guard_check_exit(const char *how);

/* Who a plugin instance is, for messages from code that holds only a store's settings (the backends
 * and the cache call store hooks through kvh_layer_policy_settings, whose store_fail_ctx is the
 * router's instance context). */
typedef struct kvh_plugin_site {
    const char *plugin; /* descriptor name */
    const char *file;   /* .so file name */
    int layer;
} kvh_plugin_site;

/* The site of the store instance behind kvh_layer_policy_settings.store_fail_ctx; a placeholder
 * ("store plugin", layer -1) for NULL. Defined by router.c, which owns those contexts. */
const kvh_plugin_site *kvh_plugin_site_of(const void *store_fail_ctx);

#endif
