/* plugin_guard.h — naming the plugin when plugin code crashes.
 * Owns: a record of which plugin hook is running right now (per thread), and fatal-signal handlers
 * (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) that, when a hook is running, write
 * "kvhost: plugin 'NAME' (FILE) crashed with SIGSEGV in hook evict (layer 3)" to stderr before the
 * process dies with that signal. Plugins run in-process (like any shared library, with the user's
 * rights); after a crash inside one the host's memory cannot be trusted, so kvhost does not try to
 * continue: it reports who crashed and where, then ends with the signal, never with a half record
 * (records are appended whole at the end of a run). Does not own: loading or calling plugins (router.c). */
#ifndef KVH_PLUGIN_GUARD_H
#define KVH_PLUGIN_GUARD_H

/* Installs the handlers (idempotent). Commands call it once at start. */
void kvh_plugin_guard_install(void);

/* Marks the start and end of a hook call on this thread. name/file/hook must outlive the call. */
void kvh_plugin_guard_enter(const char *plugin, const char *file, const char *hook, int layer);
void kvh_plugin_guard_leave(void);

#endif
