/* kv_attn.c -- the attention kernels' dispatch table (baseline code: no ISA
 * instructions here; kv_cpu.c's detection says which variants may run), the
 * float32 state shared by every variant, and the explicit prefetch. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_attn.h"
#include "kv_cpu.h"
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

int kv_attn_runnable(const kv_attn_kernel *k)
{
    return kv_cpu_runs(k->needs, KV_CPU_ALL);
}

const kv_attn_kernel *kv_attn_select(int allow_simd)
{
    return KV_CPU_PICK(kv_attn_kernel, kv_attn_kernels, KV_CPU_ALLOWED(allow_simd));
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
