/* xxh3 built for AVX2, whatever the compiler's default target (x86-64's baseline is SSE2), and
 * called only where the CPU has AVX2 (see _pagehash.c): three times as fast on cached data. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2")
#ifndef XXH_INLINE_ALL /* setup.py defines it for both files */
#define XXH_INLINE_ALL
#endif
#define XXH_VECTOR XXH_AVX2
#include <stddef.h>
#include <stdint.h>
#include <xxhash.h>

uint64_t pagehash_xxh3_avx2(const void *p, size_t n) { return XXH3_64bits(p, n); }
#endif
