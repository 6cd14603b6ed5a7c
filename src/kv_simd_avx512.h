/* kv_simd_avx512.h -- the kernel vocabulary on 16-lane AVX-512 (F, BW, DQ,
 * VL) vectors.  Only included inside kv_attn_avx512.c's target region. */
#include <stdint.h>
#include <string.h>

#include <immintrin.h>

#define KV_VL 16
#define KV_TB 8
#define KV_RS 3   /* query rows per dot-product block */
#define KV_RV 4   /* query rows per value block */
typedef __m512 vf;

static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vset1(float x) { return _mm512_set1_ps(x); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vloadh(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
static inline vf vloadb(const uint8_t *p)
{
    /* b ^ 0x80 read as signed is b - 128 */
    __m128i b = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_set1_epi8((char)0x80));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
static inline void vloadn(const uint8_t *p, vf *lo, vf *hi)
{
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m512i eight = _mm512_set1_epi32(8);
    *lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
    *hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
}
static inline void vzip(vf even, vf odd, vf *first, vf *second)
{
    /* lanes i of even/odd go to 2i, 2i + 1 of the 32-lane pair */
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                        24, 8);
    *first = _mm512_permutex2var_ps(even, lo, odd);
    *second = _mm512_permutex2var_ps(even, hi, odd);
}
static inline float vhsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline float vhmax(vf a) { return _mm512_reduce_max_ps(a); }
/* Eight sums at once: fold each 512-bit vector to 256 bits, then the hadd
 * tree of the AVX2 variant. */
static inline __m256 fold256(vf a)
{
    return _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
static inline void vreduce_tb(const vf *a, float *out)
{
    __m256 h01 = _mm256_hadd_ps(fold256(a[0]), fold256(a[1]));
    __m256 h23 = _mm256_hadd_ps(fold256(a[2]), fold256(a[3]));
    __m256 h45 = _mm256_hadd_ps(fold256(a[4]), fold256(a[5]));
    __m256 h67 = _mm256_hadd_ps(fold256(a[6]), fold256(a[7]));
    __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                             _mm256_permute2f128_ps(h0123, h4567, 0x31));
    _mm256_storeu_ps(out, s);
}
/* For kv_simd_exp.h's vexp. */
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vfloor(vf a)
{
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}
static inline vf vpow2i(vf n)
{
    __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
#include "kv_simd_exp.h"
