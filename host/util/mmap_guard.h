/* mmap_guard.h — naming the file when a memory-mapped input changes under a run.
 * Owns: a small table of read-only file mappings (model.safetensors) and a SIGBUS handler that, when the
 * faulting address lies inside one of them, writes "kvhost: <path> changed while this run had it mapped
 * (truncated or rewritten?) ..." to stderr and ends the process with exit status 1. A fault anywhere else
 * is passed on to the handler that was installed before (plugin_guard.c's, which names a crashing
 * plugin), or to the default action. Does not own: mapping files (safetensors.c, model.c).
 * Why a handler at all: reading a page of a mapping past the file's new end raises SIGBUS, and without
 * one the run dies with "Bus error" and no hint of which file or why. */
#ifndef KVH_MMAP_GUARD_H
#define KVH_MMAP_GUARD_H

#include <stddef.h>

/* Registers [base, base + len) as a mapping of path (copied) and installs the handler if another one
 * replaced it since. Returns 0, or -1 when the table is full (the mapping then works unguarded). */
int kvh_mmap_guard_add(const void *base, size_t len, const char *path);
/* Forgets the mapping starting at base (before it is unmapped). */
void kvh_mmap_guard_remove(const void *base);

#endif
