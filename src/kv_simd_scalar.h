/* kv_simd_scalar.h -- the kernel vocabulary over one lane, in portable C:
 * the reference every other variant is tested against.  Its lane is a
 * double: with one lane each dot product is a single sequential sum, whose
 * float32 rounding error would grow with head_dim and make the reference the
 * least accurate variant; in double it is the most accurate one (state and
 * scores are still stored as float32). */
#include <stdint.h>
#include <string.h>

#include "kv_attn_exp.h"
#include "kv_tiers.h"
#define KV_VL 1
#define KV_TB 1
#define KV_RS 1   /* query rows per dot-product block */
#define KV_RV 2   /* query rows per value block */
typedef double vf;

static inline vf vzero(void) { return 0.0; }
static inline vf vset1(float x) { return x; }
/* Loads through memcpy: a verbatim row or scale after an INT4 payload may sit
 * at an address its type does not align to (see kv_tiers.c, kv_h16). */
static inline vf vload(const float *p)
{
    float v;
    memcpy(&v, p, 4);
    return v;
}
static inline void vstore(float *p, vf x) { *p = (float)x; }
static inline vf vadd(vf a, vf b) { return a + b; }
static inline vf vmul(vf a, vf b) { return a * b; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
static inline vf vloadb(const uint8_t *p) { return (double)((int)*p - 128); }
static inline void vloadn(const uint8_t *p, vf *lo, vf *hi)
{
    *lo = (double)((int)(*p & 15) - 8);
    *hi = (double)((int)(*p >> 4) - 8);
}
static inline void vzip(vf even, vf odd, vf *first, vf *second)
{
    *first = even;
    *second = odd;
}
static inline float vhsum(vf a) { return (float)a; }
static inline float vhmax(vf a) { return (float)a; }
static inline void vreduce_tb(const vf *a, float *out) { out[0] = (float)a[0]; }

static inline vf vloadh(const uint16_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return kv_half(h);
}

static inline vf vexp(vf x) { return kv_exp_poly((float)x); }
