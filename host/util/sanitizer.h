/* sanitizer.h — whether this translation unit is built with AddressSanitizer (KVH_ASAN defined), and its
 * interface when it is. GCC says so with __SANITIZE_ADDRESS__, clang with __has_feature. Code that poisons
 * memory or installs ASan callbacks, and tests that must skip under ASan, test KVH_ASAN. */
#ifndef KVH_SANITIZER_H
#define KVH_SANITIZER_H

#if defined(__SANITIZE_ADDRESS__)
#define KVH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVH_ASAN 1
#endif
#endif

#ifdef KVH_ASAN
#include <sanitizer/asan_interface.h>
#endif

#endif
