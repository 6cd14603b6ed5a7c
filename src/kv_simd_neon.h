/* kv_simd_neon.h -- the kernel vocabulary on 4-lane NEON vectors (AArch64,
 * where NEON and its float16 conversions are part of the baseline). */
#include <stdint.h>
#include <string.h>

#include <arm_neon.h>

#define KV_VL 4
#define KV_TB 4
#define KV_RS 2   /* query rows per dot-product block */
#define KV_RV 4   /* query rows per value block */
typedef float32x4_t vf;

static inline vf vzero(void) { return vdupq_n_f32(0.0f); }
static inline vf vset1(float x) { return vdupq_n_f32(x); }
static inline vf vload(const float *p) { return vld1q_f32(p); }
static inline void vstore(float *p, vf x) { vst1q_f32(p, x); }
static inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
static inline vf vloadh(const uint16_t *p)
{
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}
static inline vf vloadb(const uint8_t *p)
{
    uint32_t w;
    memcpy(&w, p, 4);
    int16x8_t h = vreinterpretq_s16_u16(vmovl_u8(vcreate_u8((uint64_t)w)));
    return vcvtq_f32_s32(vsubq_s32(vmovl_s16(vget_low_s16(h)), vdupq_n_s32(128)));
}
static inline void vloadn(const uint8_t *p, vf *lo, vf *hi)
{
    uint32_t w;
    memcpy(&w, p, 4);
    int32x4_t b = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8((uint64_t)w)))));
    *lo = vcvtq_f32_s32(vsubq_s32(vandq_s32(b, vdupq_n_s32(15)), vdupq_n_s32(8)));
    *hi = vcvtq_f32_s32(vsubq_s32(vshrq_n_s32(b, 4), vdupq_n_s32(8)));
}
static inline void vzip(vf even, vf odd, vf *first, vf *second)
{
    *first = vzip1q_f32(even, odd);
    *second = vzip2q_f32(even, odd);
}
static inline float vhsum(vf a) { return vaddvq_f32(a); }
static inline float vhmax(vf a) { return vmaxvq_f32(a); }
static inline void vreduce_tb(const vf *a, float *out)
{
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3])));
}
/* For kv_simd_exp.h's vexp. */
static inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
static inline vf vfloor(vf a) { return vrndmq_f32(a); }
static inline vf vpow2i(vf n)
{
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
#include "kv_simd_exp.h"
