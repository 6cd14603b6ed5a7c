/* kv_platform.h -- portable macros for kvcache's compiled core.
 *
 * Only declarations, macros and scalar inline helpers live here: this header
 * is included by baseline-compiled code (_core.c), so no ISA intrinsics may
 * appear outside the SSE guard below (SSE is part of the x86-64 baseline).
 * Every macro falls back to nothing where the compiler lacks the builtin.
 */
#ifndef KV_PLATFORM_H
#define KV_PLATFORM_H

#if defined(_MSC_VER)
#  define KV_INLINE static __forceinline
#else
#  define KV_INLINE static inline __attribute__((always_inline))
#endif

#if defined(__GNUC__) || defined(__clang__)
#  define KV_LIKELY(x)   __builtin_expect(!!(x), 1)
#  define KV_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#  define KV_LIKELY(x)   (x)
#  define KV_UNLIKELY(x) (x)
#endif

/* Prefetch hints.  KV_PREFETCH_T0: data needed next (all cache levels);
 * KV_PREFETCH_T1: data needed soon after (L2 and beyond).  Read-only hints:
 * a prefetch never faults, so a stale pointer is harmless, but callers still
 * only hint memory they own. */
#if defined(__GNUC__) || defined(__clang__)
#  define KV_PREFETCH_T0(p) __builtin_prefetch((const void *)(p), 0, 3)
#  define KV_PREFETCH_T1(p) __builtin_prefetch((const void *)(p), 0, 2)
#  define KV_HAVE_PREFETCH 1
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#  include <xmmintrin.h>
#  define KV_PREFETCH_T0(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#  define KV_PREFETCH_T1(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
#  define KV_HAVE_PREFETCH 1
#else
#  define KV_PREFETCH_T0(p) ((void)(p))
#  define KV_PREFETCH_T1(p) ((void)(p))
#  define KV_HAVE_PREFETCH 0
#endif
#define KV_PREFETCH(p) KV_PREFETCH_T0(p)

/* KV_TARGET_BEGIN("avx2,fma") ... KV_TARGET_END: compile the functions in
 * between for an ISA the build's baseline lacks (GCC's target pragma,
 * Clang's attribute push), so one file carries its ISA and the rest of the
 * extension stays at the baseline.  Only ISA variant files use it, and only
 * call into it after a run-time check (kv_cpu.h). */
#define KV_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#  define KV_TARGET_BEGIN(isa) \
       KV_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#  define KV_TARGET_END KV_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#  define KV_TARGET_BEGIN(isa) KV_PRAGMA(GCC push_options) KV_PRAGMA(GCC target(isa))
#  define KV_TARGET_END KV_PRAGMA(GCC pop_options)
#endif

/* Which ISA variants this compiler builds: one place for the conditions that
 * the per-ISA files (kv_attn_<isa>.c, kv_tiers_<isa>.c) and the dispatch
 * tables (kv_attn.c, kv_tiers.c) share.  A variant not built is an empty
 * file and no table entry. */
#if (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 5))
#define KV_BUILD_AVX2 1
#else
#define KV_BUILD_AVX2 0
#endif
#if (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 7))
#define KV_BUILD_AVX512 1           /* GCC 7: the AVX-512 reduction intrinsics */
#else
#define KV_BUILD_AVX512 0
#endif
#if defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__))
#define KV_BUILD_NEON 1
#else
#define KV_BUILD_NEON 0
#endif

/* Block payloads are aligned to a cache line so that a block's rows never
 * share a line with another block's (and later SIMD loads can be aligned). */
#define KV_ALIGN 64

#endif /* KV_PLATFORM_H */
