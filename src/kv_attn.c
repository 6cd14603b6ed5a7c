/* kv_attn.c -- the attention kernels' dispatcher (baseline code: no ISA
 * instructions here, only cpuid/xgetbv to learn which variants may run),
 * the float32 state shared by every variant, and the explicit prefetch. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_attn.h"
#include "kv_platform.h"

extern const kv_attn_kernel kv_attn_kernel_scalar;
#if KV_BUILD_AVX2
extern const kv_attn_kernel kv_attn_kernel_avx2;
#endif
#if KV_BUILD_AVX512
extern const kv_attn_kernel kv_attn_kernel_avx512;
#endif
#if KV_BUILD_NEON
extern const kv_attn_kernel kv_attn_kernel_neon;
#endif

const kv_attn_kernel *const kv_attn_kernels[] = {
#if KV_BUILD_AVX512
    &kv_attn_kernel_avx512,
#endif
#if KV_BUILD_AVX2
    &kv_attn_kernel_avx2,
#endif
#if KV_BUILD_NEON
    &kv_attn_kernel_neon,
#endif
    &kv_attn_kernel_scalar,
    NULL,
};

/* ------------------------------------------------------------ CPU */

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

int kv_attn_runnable(const kv_attn_kernel *k)
{
    int f = kv_cpu_features();
    if (strcmp(k->name, "avx512") == 0) {
        return (f & KV_CPU_AVX512) != 0;
    }
    if (strcmp(k->name, "avx2") == 0) {
        return (f & KV_CPU_AVX2) != 0;
    }
    if (strcmp(k->name, "neon") == 0) {
        return (f & KV_CPU_NEON) != 0;
    }
    return 1;
}

/* ------------------------------------------------------------ state */

int64_t kv_attn_state_floats(const kv_attn_geom *g)
{
    int64_t R = g->rows, D = g->dim;
    return g->kv_heads * R * (2 + D)                 /* m, l, acc */
           + 2 * R * KV_ATTN_MAX_RUN                 /* S, W */
           + 3 * KV_ATTN_MAX_RUN * D                 /* SC, ZR, TMP */
           + R * D + R                               /* QS, Z */
           + 2 * g->kv_heads * R * D;                /* QN_all, QSUM_all */
}

void kv_attn_state_init(const kv_attn_geom *g, float *state)
{
    int64_t i, nr = g->kv_heads * g->rows;
    for (i = 0; i < nr; i++) {
        state[i] = -INFINITY;
    }
    memset(state + nr, 0, (size_t)(nr * (1 + g->dim)) * sizeof(float));
}

void kv_attn_finish(const kv_attn_geom *g, const float *state, float *out)
{
    int64_t nr = g->kv_heads * g->rows, D = g->dim, r, c;
    const float *l = state + nr, *acc = l + nr;
    for (r = 0; r < nr; r++) {
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (c = 0; c < D; c++) {
            out[r * D + c] = acc[r * D + c] * inv;
        }
    }
}

/* ------------------------------------------------------------ prefetch */

void kv_run_span(const kv_attn_geom *g, const kv_run *r, int64_t head, int half,
                 const uint8_t **p, int64_t *nbytes)
{
    int64_t H = g->kv_heads, D = g->dim, T = r->stride, slot = (half * H + head) * T + r->off;
    switch (r->fmt) {
    case KV_FMT_F32:
        *p = r->base + slot * D * 4;
        *nbytes = r->n * D * 4;
        break;
    case KV_FMT_F16:
        *p = r->base + slot * D * 2;
        *nbytes = r->n * D * 2;
        break;
    case KV_FMT_INT8:
        *p = r->base + slot * D;
        *nbytes = r->n * D;
        break;
    default:  /* INT4: K codes [H][T][D/2], then scales and zeros [H][D], then V codes */
        *p = r->base + (half ? H * T * D / 2 + 4 * H * D : 0) + (head * T + r->off) * D / 2;
        *nbytes = r->n * D / 2;
        break;
    }
}

int64_t kv_prefetch_range(const void *p, int64_t nbytes, int64_t hot)
{
#if KV_HAVE_PREFETCH
    const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)63);
    const char *end = (const char *)p + nbytes, *hot_end = (const char *)p + hot;
    int64_t lines = 0;
    for (; c < end; c += 64, lines++) {
        if (c < hot_end) {
            KV_PREFETCH_T0(c);
        } else {
            KV_PREFETCH_T1(c);
        }
    }
    return lines;
#else
    (void)p; (void)nbytes; (void)hot;
    return 0;
#endif
}
