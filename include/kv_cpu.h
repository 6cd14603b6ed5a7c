/* kv_cpu.h -- what this CPU and OS run, detected once, and the one rule by
 * which every dispatch table (the attention kernels', kv_attn.h; the tier
 * codecs', kv_tiers.h) picks its variant. */
#ifndef KV_CPU_H
#define KV_CPU_H

#include <stddef.h>

/* CPU features, detected once (cpuid + xgetbv on x86: an ISA counts only
 * when the OS saves its registers). */
enum {
    KV_CPU_AVX2 = 1 << 0,      /* with FMA and F16C */
    KV_CPU_AVX512 = 1 << 1,    /* F, BW, DQ, VL */
    KV_CPU_NEON = 1 << 2,
    KV_CPU_OS_YMM = 1 << 3,    /* XCR0 saves the AVX state */
    KV_CPU_OS_ZMM = 1 << 4,    /* XCR0 saves the AVX-512 state */
    KV_CPU_AVX512_VNNI = 1 << 5
};
int kv_cpu_features(void);

/* `allowed` of a dispatch: every feature detected, or none (the scalar kill
 * switch, KVCACHE_DISABLE_SIMD). */
#define KV_CPU_ALL (~0)
#define KV_CPU_ALLOWED(allow_simd) ((allow_simd) ? KV_CPU_ALL : 0)

/* Whether code built for the KV_CPU_* features `needs` (0: any CPU) runs
 * here using only the features in `allowed`. */
int kv_cpu_runs(int needs, int allowed);

/* The selection rule of every dispatch table: the first entry that runs
 * here (kv_cpu_runs).  A table is an array of pointers to its entries, best
 * first, NULL-terminated, ending with a variant that needs nothing (so a
 * pick never fails); each entry has an `int needs` member, which
 * KV_CPU_PICK finds by offsetof so that one function serves tables of any
 * entry type. */
const void *kv_cpu_pick(const void *const *table, size_t needs_offset, int allowed);
#define KV_CPU_PICK(type, table, allowed) \
    ((const type *)kv_cpu_pick((const void *const *)(table), offsetof(type, needs), (allowed)))

#endif /* KV_CPU_H */
