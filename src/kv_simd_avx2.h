/* kv_simd_avx2.h -- the kernel vocabulary on 8-lane AVX2 + FMA + F16C
 * vectors.  Only included inside kv_attn_avx2.c's target region. */
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#define KV_VL 8
#define KV_TB 8
#define KV_RS 1   /* query rows per dot-product block */
#define KV_RV 2   /* query rows per value block */
typedef __m256 vf;

static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vset1(float x) { return _mm256_set1_ps(x); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vloadh(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline vf vloadb(const uint8_t *p)
{
    /* b ^ 0x80 read as signed is b - 128 */
    __m128i b = _mm_xor_si128(_mm_loadl_epi64((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
static inline void vloadn(const uint8_t *p, vf *lo, vf *hi)
{
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i eight = _mm256_set1_epi32(8);
    *lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
    *hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
}
static inline void vzip(vf even, vf odd, vf *first, vf *second)
{
    vf a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);
    /* a = e0 o0 e1 o1 | e4 o4 e5 o5, b = e2 o2 e3 o3 | e6 o6 e7 o7 */
    *first = _mm256_permute2f128_ps(a, b, 0x20);
    *second = _mm256_permute2f128_ps(a, b, 0x31);
}
static inline float vhsum(vf a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float vhmax(vf a)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* Eight horizontal sums at once: a tree of hadds, then the two 128-bit
 * halves added. */
static inline void vreduce_tb(const vf *a, float *out)
{
    vf h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    vf h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    vf h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    vf s = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                         _mm256_permute2f128_ps(h0123, h4567, 0x31));
    _mm256_storeu_ps(out, s);
}
/* For kv_simd_exp.h's vexp. */
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vfloor(vf a) { return _mm256_floor_ps(a); }
static inline vf vpow2i(vf n)
{
    __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
#include "kv_simd_exp.h"
