/* kv_simd_exp.h -- vexp(x): kv_attn_exp.h's e^x evaluated lane-wise, the
 * same steps in the same order for every SIMD vocabulary (so the variants
 * agree to an ulp or two).
 *
 * Included at the end of kv_simd_avx2.h, kv_simd_avx512.h and
 * kv_simd_neon.h, over their primitives: vset1 vadd vmul vmax (kv_attn_impl.h
 * lists them) and four that only e^x needs:
 *   vsub vmin            lane-wise a - b, min(a, b)
 *   vfloor               round toward minus infinity
 *   vpow2i(n)            2^n for lanes holding whole numbers in [-126, 127],
 *                        built in the exponent bits
 * (The scalar vocabulary calls kv_exp_poly on its one lane instead.)
 */
#include "kv_attn_exp.h"

static inline vf vexp(vf x)
{
    vf n, r, p;
    x = vmin(vmax(x, vset1(KV_EXP_LO)), vset1(KV_EXP_HI));
    n = vfloor(vadd(vmul(x, vset1(KV_LOG2E)), vset1(0.5f)));
    r = vsub(x, vmul(n, vset1(KV_LN2_HI)));
    r = vsub(r, vmul(n, vset1(KV_LN2_LO)));
    p = vset1(KV_EXP_P0);
    p = vadd(vmul(p, r), vset1(KV_EXP_P1));
    p = vadd(vmul(p, r), vset1(KV_EXP_P2));
    p = vadd(vmul(p, r), vset1(KV_EXP_P3));
    p = vadd(vmul(p, r), vset1(KV_EXP_P4));
    p = vadd(vmul(p, r), vset1(KV_EXP_P5));
    p = vadd(vadd(vmul(p, vmul(r, r)), r), vset1(1.0f));
    return vmul(p, vpow2i(n));
}
