/* kv_tiers.c -- the tier codecs' dispatch table and what every variant
 * shares (baseline code, no ISA flags): the float16 conversions and their
 * table, payload sizes, the byte shuffle of the LOSSLESS tier and the error
 * that ADAPTIVE's budget is measured in.
 *
 * The codecs themselves are src/kv_tiers_impl.h, compiled once per ISA by
 * kv_tiers_<isa>.c; kv_codecs_select() picks one with kv_cpu.h's rule, as
 * kv_attn.c's table does for the attention kernels.
 */
#include <math.h>
#include <string.h>

#include "kv_cpu.h"
#include "kv_platform.h"
#include "kv_tiers.h"

/* ------------------------------------------------------------ dispatch */

extern const kv_codec_table kv_codecs_scalar;
#if KV_BUILD_AVX2
extern const kv_codec_table kv_codecs_avx2;
#endif

const kv_codec_table *const kv_codec_tables[] = {
#if KV_BUILD_AVX2
    &kv_codecs_avx2,
#endif
    &kv_codecs_scalar,
    NULL,
};

const kv_codec_table *kv_codecs_select(int allow_simd)
{
    return KV_CPU_PICK(kv_codec_table, kv_codec_tables, KV_CPU_ALLOWED(allow_simd));
}

/* ------------------------------------------------------------ float16 */

/* Half bits -> float (declared in kv_tiers.h), filled once by kv_tiers_init
 * and read by every codec and kernel variant. */
float kv_half_table[65536];
static int half_table_ready = 0;

/* numpy's npy_halfbits_to_floatbits, without the table. */
static uint32_t half_bits_to_float_bits(uint16_t h)
{
    uint16_t h_exp = (uint16_t)(h & 0x7c00u), h_sig;
    uint32_t f_sgn = ((uint32_t)h & 0x8000u) << 16, f_exp, f_sig;
    switch (h_exp) {
    case 0x0000u:                                   /* zero or subnormal */
        h_sig = (uint16_t)(h & 0x03ffu);
        if (h_sig == 0) {
            return f_sgn;
        }
        h_sig <<= 1;
        while ((h_sig & 0x0400u) == 0) {
            h_sig <<= 1;
            h_exp++;
        }
        f_exp = ((uint32_t)(127 - 15 - h_exp)) << 23;
        f_sig = ((uint32_t)(h_sig & 0x03ffu)) << 13;
        return f_sgn + f_exp + f_sig;
    case 0x7c00u:                                   /* inf or NaN */
        return f_sgn + 0x7f800000u + (((uint32_t)(h & 0x03ffu)) << 13);
    default:                                        /* normalised */
        return f_sgn + (((uint32_t)(h & 0x7fffu) + 0x1c000u) << 13);
    }
}

void kv_tiers_init(void)
{
    uint32_t i, bits;
    if (half_table_ready) {
        return;
    }
    for (i = 0; i < 65536u; i++) {
        bits = half_bits_to_float_bits((uint16_t)i);
        memcpy(&kv_half_table[i], &bits, 4);
    }
    half_table_ready = 1;
}

float kv_half_to_float(uint16_t h)
{
    return kv_half_table[h];
}

/* float -> half bits, rounding to nearest even: the same bits as numpy's
 * x.astype(np.float16) for every input (NaNs keep numpy's payload rule).
 * Normal results take the add-and-shift path; subnormal results let the FPU
 * do the rounding by adding 0.5f (after which the half's bits sit at the
 * bottom of the float's significand). */
uint16_t kv_float_to_half(float fl)
{
    const uint32_t denorm_magic = 126u << 23;       /* 0.5f */
    uint32_t x, sign, mant_odd;
    uint16_t o;
    float f;
    memcpy(&x, &fl, 4);
    sign = x & 0x80000000u;
    x ^= sign;
    if (x >= 0x47800000u) {                         /* overflow, inf or NaN */
        if (x > 0x7f800000u) {
            o = (uint16_t)(0x7c00u + ((x & 0x007fffffu) >> 13));
            if (o == 0x7c00u) {
                o++;                                /* keep it a NaN */
            }
        } else {
            o = 0x7c00u;
        }
    } else if (x < 0x38800000u) {                   /* subnormal half or zero */
        memcpy(&f, &x, 4);
        f += 0.5f;
        memcpy(&x, &f, 4);
        o = (uint16_t)(x - denorm_magic);
    } else {
        mant_odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xfffu + mant_odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* ------------------------------------------------------------ sizes, shuffle, error */

int64_t kv_payload_bytes(int tier, const kv_shape *s)
{
    int64_t n = s->heads * s->tokens * s->dim;      /* elements in one half */
    switch (tier) {
    case KV_TIER_FP16:
        return 2 * n * 2;
    case KV_TIER_INT8:
        return 2 * n + 2 * (2 * (n / s->g8)) * 2;
    case KV_TIER_INT4:
        return n / 2 + 2 * s->heads * s->dim * 2 + n / 2 + 2 * (n / s->g4) * 2;
    default:
        return 0;
    }
}

void kv_shuffle(const uint8_t *in, uint8_t *out, int64_t n, int64_t itemsize)
{
    int64_t i, b;
    for (b = 0; b < itemsize; b++) {
        for (i = 0; i < n; i++) {
            out[b * n + i] = in[i * itemsize + b];
        }
    }
}

void kv_unshuffle(const uint8_t *in, uint8_t *out, int64_t n, int64_t itemsize)
{
    int64_t i, b;
    for (b = 0; b < itemsize; b++) {
        for (i = 0; i < n; i++) {
            out[i * itemsize + b] = in[b * n + i];
        }
    }
}

/* Element i of a block in the cache dtype, as a float. */
static inline float load(const void *p, int64_t i, int64_t itemsize)
{
    if (itemsize == 2) {
        return kv_half(((const uint16_t *)p)[i]);
    }
    return ((const float *)p)[i];
}

double kv_block_rel_error(const kv_shape *s, const void *exact, const void *approx)
{
    int64_t n = s->heads * s->tokens * s->dim, half, i;
    double worst = 0.0, num, den, x, dx, rel;
    for (half = 0; half < 2; half++) {
        num = den = 0.0;
        for (i = half * n; i < (half + 1) * n; i++) {
            x = load(exact, i, s->itemsize);
            dx = load(approx, i, s->itemsize) - x;
            num += dx * dx;
            den += x * x;
        }
        if (num != num || den != den) {
            return NAN;                  /* NaN or inf in the block: never "within budget" */
        }
        rel = den > 0.0 ? sqrt(num / den) : (num > 0.0 ? INFINITY : 0.0);
        if (!(rel <= worst)) {           /* NaN counts as the worst */
            worst = rel;
        }
    }
    return worst;
}
