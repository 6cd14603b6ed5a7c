/* kv_cpu.c -- CPU feature detection (baseline code: cpuid and xgetbv only,
 * no ISA instructions), cached after the first call, and the variant pick
 * every dispatch table shares. */
#include <stdint.h>
#include <string.h>

#include "kv_cpu.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    /* The instruction's bytes, so no -mxsave is needed; only executed once
     * cpuid has reported OSXSAVE. */
    uint32_t lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int detect(void)
{
    unsigned a, b, c, d, max_leaf;
    int f = 0, avx, fma, f16c;
    uint64_t xcr0 = 0;
    if (!__get_cpuid(0, &max_leaf, &b, &c, &d) || max_leaf < 7) {
        return 0;
    }
    __get_cpuid(1, &a, &b, &c, &d);
    avx = (c >> 28) & 1;
    fma = (c >> 12) & 1;
    f16c = (c >> 29) & 1;
    if ((c >> 27) & 1) {                       /* OSXSAVE: xgetbv is there */
        xcr0 = xgetbv0();
    }
    if ((xcr0 & 0x6) == 0x6) {                 /* XMM and YMM state */
        f |= KV_CPU_OS_YMM;
    }
    if ((xcr0 & 0xe6) == 0xe6) {               /* and opmask, ZMM_Hi256, Hi16_ZMM */
        f |= KV_CPU_OS_ZMM;
    }
    __cpuid_count(7, 0, a, b, c, d);
    if (avx && fma && f16c && ((b >> 5) & 1) && (f & KV_CPU_OS_YMM)) {
        f |= KV_CPU_AVX2;
    }
    /* AVX-512 F (b16), DQ (b17), BW (b30), VL (b31) */
    if ((f & KV_CPU_AVX2) && (f & KV_CPU_OS_ZMM) && ((b >> 16) & 1) && ((b >> 17) & 1)
        && ((b >> 30) & 1) && ((b >> 31) & 1)) {
        f |= KV_CPU_AVX512;
        if ((c >> 11) & 1) {
            f |= KV_CPU_AVX512_VNNI;
        }
    }
    return f;
}
#elif defined(__aarch64__)
static int detect(void) { return KV_CPU_NEON; }   /* baseline on AArch64 */
#else
static int detect(void) { return 0; }
#endif

int kv_cpu_features(void)
{
    /* Racing first calls compute the same value; int stores do not tear. */
    static volatile int cached = -1;
    if (cached < 0) {
        cached = detect();
    }
    return cached;
}

int kv_cpu_runs(int needs, int allowed)
{
    return (kv_cpu_features() & allowed & needs) == needs;
}

/* The table's entries are read as `const void *`: every ABI this builds for
 * represents all object pointers alike, and the tables are constant data. */
const void *kv_cpu_pick(const void *const *table, size_t needs_offset, int allowed)
{
    int needs;
    for (; *table; table++) {
        /* The entry's `int needs` member, wherever its type puts it. */
        memcpy(&needs, (const char *)*table + needs_offset, sizeof needs);
        if (kv_cpu_runs(needs, allowed)) {
            return *table;
        }
    }
    return NULL;
}
