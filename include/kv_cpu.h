/* kv_cpu.h -- what this CPU and OS run, detected once (one mechanism for
 * every dispatch: the tier codecs and the attention kernels). */
#ifndef KV_CPU_H
#define KV_CPU_H

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

#endif /* KV_CPU_H */
