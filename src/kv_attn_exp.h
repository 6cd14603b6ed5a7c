/* kv_attn_exp.h -- e^x for the softmax, one algorithm for every variant.
 *
 * Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so r is
 * exact), e^r by a degree-7 polynomial, times 2^n built in the exponent
 * bits.  About 1 ulp on the softmax's domain x <= 0; below -87.3 the result
 * is the smallest normal float (a weight of 1e-38 next to the row maximum's
 * 1).  The SIMD variants evaluate the same steps lane-wise, so all variants
 * agree to an ulp or two (libm's expf would differ from them by more).
 */
#ifndef KV_ATTN_EXP_H
#define KV_ATTN_EXP_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define KV_EXP_LO (-87.3f)
#define KV_EXP_HI 88.3f
#define KV_LOG2E 1.44269504088896341f
#define KV_LN2_HI 0.693359375f
#define KV_LN2_LO (-2.12194440e-4f)
#define KV_EXP_P0 1.9875691500e-4f
#define KV_EXP_P1 1.3981999507e-3f
#define KV_EXP_P2 8.3334519073e-3f
#define KV_EXP_P3 4.1665795894e-2f
#define KV_EXP_P4 1.6666665459e-1f
#define KV_EXP_P5 5.0000001201e-1f

static inline float kv_exp_poly(float x)
{
    float n, r, p;
    int32_t e;
    uint32_t bits;
    x = x < KV_EXP_LO ? KV_EXP_LO : (x > KV_EXP_HI ? KV_EXP_HI : x);
    n = floorf(x * KV_LOG2E + 0.5f);
    r = x - n * KV_LN2_HI;
    r = r - n * KV_LN2_LO;
    p = KV_EXP_P0;
    p = p * r + KV_EXP_P1;
    p = p * r + KV_EXP_P2;
    p = p * r + KV_EXP_P3;
    p = p * r + KV_EXP_P4;
    p = p * r + KV_EXP_P5;
    p = p * (r * r) + r + 1.0f;
    e = (int32_t)n + 127;
    bits = (uint32_t)e << 23;
    memcpy(&n, &bits, 4);
    return p * n;
}

#endif /* KV_ATTN_EXP_H */
