/* kv_tiers_impl.h -- the tier codecs (FP16, INT8, INT4 encoders and
 * decoders), written once and compiled once per ISA.
 *
 * Included by kv_tiers_<isa>.c, which defines:
 *   KV_ISA_NAME      the variant's name
 *   KV_ISA_NEEDS     the KV_CPU_* features it needs (kv_cpu.h)
 *   KV_CODECS_SYM    its kv_codec_table symbol (kv_tiers.c's table lists it)
 * Everything here is static: each variant is its own translation unit and
 * exports one kv_codec_table.  No intrinsics: the loops are written
 * branch-free so the compiler's auto-vectoriser handles them at the width of
 * the ISA the includer targets.  Built with -ffp-contract=off (a fused
 * multiply-add would round q * scale + zero differently from the numpy
 * reference, and from one variant to another) and -fno-trapping-math (lets a
 * division whose result a select discards run unconditionally; no value
 * changes), so every variant writes the same bytes (tested).  The only
 * global read is kv_tiers.h's float16 table; the non-variant parts (that
 * table, kv_float_to_half, payload sizes, shuffles, errors) are kv_tiers.c's.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_cpu.h"
#include "kv_tiers.h"

/* ------------------------------------------------------------ float16 rows */

/* kv_float_to_half (kv_tiers.c) without branches (every path computed, one
 * selected), so the compiler vectorises a loop of it. */
static inline uint16_t float_bits_to_half_select(uint32_t x)
{
    uint32_t sign = x & 0x80000000u, nan, sub, o;
    float f;
    x ^= sign;
    o = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;          /* normal */
    memcpy(&f, &x, 4);
    f += 0.5f;
    memcpy(&sub, &f, 4);
    sub -= 126u << 23;                                        /* subnormal */
    nan = 0x7c00u + ((x & 0x007fffffu) >> 13);
    nan += (nan == 0x7c00u);
    o = x < 0x38800000u ? sub : o;
    o = x >= 0x47800000u ? (x > 0x7f800000u ? nan : 0x7c00u) : o;
    return (uint16_t)(o | (sign >> 16));
}

static void floats_to_halves(const float *in, uint16_t *out, int64_t n)
{
    int64_t i;
    uint32_t x;
    for (i = 0; i < n; i++) {
        memcpy(&x, &in[i], 4);
        out[i] = float_bits_to_half_select(x);
    }
}

/* Write n floats to `dst` (element offset off) in the cache dtype. */
static void store_row(void *dst, int64_t off, int64_t itemsize, const float *row, int64_t n)
{
    if (itemsize == 2) {
        floats_to_halves(row, (uint16_t *)dst + off, n);
    } else {
        memcpy((float *)dst + off, row, (size_t)n * 4);
    }
}

/* half -> float without branches or the table (same bits as the table):
 * vectorises, where table lookups into 256 KiB would miss L1. */
static inline float half_to_float_select(uint16_t h)
{
    const uint32_t shifted_exp = 0x7c00u << 13;
    const float magic = 6.103515625e-05f;           /* 2**-14: 113 << 23 */
    uint32_t o = ((uint32_t)h & 0x7fffu) << 13, exp = o & shifted_exp, sub, is_special, is_small;
    float f;
    o += (uint32_t)(127 - 15) << 23;
    sub = o + (1u << 23);
    memcpy(&f, &sub, 4);
    f -= magic;                                     /* zero or subnormal */
    memcpy(&sub, &f, 4);
    /* Masks rather than ?: so the compiler if-converts and vectorises. */
    is_special = 0u - (uint32_t)(exp == shifted_exp);                /* inf, NaN */
    is_small = 0u - (uint32_t)(exp == 0);                            /* 0, subnormal */
    o += is_special & ((uint32_t)(128 - 16) << 23);
    o = (o & ~is_small) | (sub & is_small);
    o |= ((uint32_t)h & 0x8000u) << 16;
    memcpy(&f, &o, 4);
    return f;
}

/* Read n elements of `src` from element offset off as floats. */
static inline void load_row(const void *src, int64_t off, int64_t itemsize, float *row,
                            int64_t n)
{
    int64_t i;
    const uint16_t *h = (const uint16_t *)src + off;
    if (itemsize == 2) {
        for (i = 0; i < n; i++) {
            row[i] = half_to_float_select(h[i]);
        }
    } else {
        memcpy(row, (const float *)src + off, (size_t)n * 4);
    }
}

/* ------------------------------------------------------------ quantizing */

/* Rows are processed in pieces of this many elements (stack buffers). */
#define ROW KV_MAX_G4

/* rint for |v| < 2**22 in the default rounding mode (ties to even), without
 * a libm call; larger values only matter through the clip, which they pass. */
static inline float rint_small(float v)
{
    const float magic = 12582912.0f;    /* 1.5 * 2**23 */
    return (v + magic) - magic;
}

/* codes of n floats for one scale/zero: clip(rint((x - z) / s), 0, levels).
 * Branch-free so it vectorises; NaN lands on 0 (casting NaN is UB). */
static void quant_row(const float *x, int64_t n, float s, float z, float levels, uint8_t *q)
{
    int64_t i;
    float v;
    if (s == 0.0f) {
        memset(q, 0, (size_t)n);
        return;
    }
    for (i = 0; i < n; i++) {
        v = rint_small((x[i] - z) / s);
        v = v >= 0.0f ? v : 0.0f;
        v = v > levels ? levels : v;
        q[i] = (uint8_t)(int32_t)v;
    }
}

/* A float16 scale or zero inside a payload.  Byte-aligned on purpose: the
 * INT4 payload's scale arrays follow nibble-packed codes, so they start at
 * an odd address when a half holds an odd number of code bytes; reads and
 * writes go through memcpy (one plain load or store on x86). */
typedef struct {
    uint8_t b[2];
} kv_h16;

static inline uint16_t h16_get(kv_h16 x)
{
    uint16_t v;
    memcpy(&v, x.b, 2);
    return v;
}

static inline void h16_set(kv_h16 *x, uint16_t v)
{
    memcpy(x->b, &v, 2);
}

static void set_range(float lo, float hi, float levels, kv_h16 *scale, kv_h16 *zero)
{
    h16_set(zero, kv_float_to_half(lo));
    h16_set(scale, kv_float_to_half((hi - lo) / levels));
}

/* Minimum and maximum of n floats.  LANES independent accumulators: one
 * float min chain is not vectorised without -ffast-math, independent lanes
 * are (x < m ? x : m is exactly minps), and the result does not depend on
 * the order. */
#define LANES 8
static inline void range_of(const float *row, int64_t n, float *mn, float *mx)
{
    float lo[LANES], hi[LANES];
    int64_t i, k;
    for (k = 0; k < LANES; k++) {
        lo[k] = *mn;
        hi[k] = *mx;
    }
    for (i = 0; i + LANES <= n; i += LANES) {
        for (k = 0; k < LANES; k++) {
            lo[k] = row[i + k] < lo[k] ? row[i + k] : lo[k];
            hi[k] = row[i + k] > hi[k] ? row[i + k] : hi[k];
        }
    }
    for (; i < n; i++) {
        lo[0] = row[i] < lo[0] ? row[i] : lo[0];
        hi[0] = row[i] > hi[0] ? row[i] : hi[0];
    }
    for (k = 0; k < LANES; k++) {
        *mn = lo[k] < *mn ? lo[k] : *mn;
        *mx = hi[k] > *mx ? hi[k] : *mx;
    }
}

/* Quantize the contiguous group src[off .. off + n): its scale and zero, and
 * its codes into q[0 .. n).  A group that fits a row is read once. */
static void encode_group(const void *src, int64_t itemsize, int64_t off, int64_t n,
                         float levels, kv_h16 *scale, kv_h16 *zero, uint8_t *q)
{
    float row[ROW], mn = INFINITY, mx = -INFINITY;
    int64_t c, m;
    if (n <= ROW) {
        load_row(src, off, itemsize, row, n);
        range_of(row, n, &mn, &mx);
        set_range(mn, mx, levels, scale, zero);
        quant_row(row, n, kv_half(h16_get(*scale)), kv_half(h16_get(*zero)), levels, q);
        return;
    }
    for (c = 0; c < n; c += ROW) {
        m = n - c < ROW ? n - c : ROW;
        load_row(src, off + c, itemsize, row, m);
        range_of(row, m, &mn, &mx);
    }
    set_range(mn, mx, levels, scale, zero);
    for (c = 0; c < n; c += ROW) {
        m = n - c < ROW ? n - c : ROW;
        load_row(src, off + c, itemsize, row, m);
        quant_row(row, m, kv_half(h16_get(*scale)), kv_half(h16_get(*zero)), levels, q + c);
    }
}

/* ------------------------------------------------------------ FP16 */

static void encode_fp16(const kv_shape *s, const void *block, uint8_t *out)
{
    floats_to_halves((const float *)block, (uint16_t *)out, 2 * s->heads * s->tokens * s->dim);
}

static void decode_fp16(const kv_shape *s, const uint8_t *in, void *block, int halves)
{
    int64_t n = s->heads * s->tokens * s->dim, half, i;
    const uint16_t *h = (const uint16_t *)in;
    float *f = (float *)block;                      /* FP16 is for float32 caches */
    for (half = 0; half < 2; half++) {
        if (halves & (1 << half)) {
            for (i = half * n; i < (half + 1) * n; i++) {
                f[i] = half_to_float_select(h[i]);
            }
        }
    }
}

/* ------------------------------------------------------------ INT8 */

/* INT8 payload: codes [2][H][T][D] u8 | scales [2][H][T][D/g8] f16 | zeros (same). */
static void encode_int8(const kv_shape *s, const void *block, uint8_t *out)
{
    int64_t n = 2 * s->heads * s->tokens * s->dim, ng = n / s->g8, g;
    kv_h16 *scales = (kv_h16 *)(out + n);
    kv_h16 *zeros = scales + ng;
    for (g = 0; g < ng; g++) {
        encode_group(block, s->itemsize, g * s->g8, s->g8, 255.0f, &scales[g], &zeros[g],
                     out + g * s->g8);
    }
}

static void decode_int8(const kv_shape *s, const uint8_t *in, void *block, int halves)
{
    int64_t n = s->heads * s->tokens * s->dim, ng = n / s->g8, half, g, c, m, i, e;
    const kv_h16 *scales = (const kv_h16 *)(in + 2 * n);
    const kv_h16 *zeros = scales + 2 * ng;
    float row[ROW], sc, z;
    for (half = 0; half < 2; half++) {
        if (!(halves & (1 << half))) {
            continue;
        }
        for (g = half * ng; g < (half + 1) * ng; g++) {
            sc = kv_half(h16_get(scales[g]));
            z = kv_half(h16_get(zeros[g]));
            for (c = 0; c < s->g8; c += ROW) {
                m = s->g8 - c < ROW ? s->g8 - c : ROW;
                e = g * s->g8 + c;
                for (i = 0; i < m; i++) {
                    row[i] = (float)in[e + i] * sc + z;
                }
                store_row(block, e, s->itemsize, row, m);
            }
        }
    }
}

/* ------------------------------------------------------------ INT4 */

/* INT4 payload: K codes [H][T][D/2] | K scales [H][D] | K zeros [H][D] |
 *               V codes [H][T][D/2] | V scales [H][T][D/g4] | V zeros.
 * Element e of a half (flat [H][T][D] index) has its code in the low nibble
 * of byte e / 2 when e is even, the high nibble when odd. */
typedef struct {
    uint8_t *kcodes, *vcodes;
    kv_h16 *kscale, *kzero, *vscale, *vzero;
} int4_layout;

static int4_layout int4_parts(const kv_shape *s, uint8_t *p)
{
    int64_t n = s->heads * s->tokens * s->dim;
    int4_layout l;
    l.kcodes = p;
    l.kscale = (kv_h16 *)(p + n / 2);
    l.kzero = l.kscale + s->heads * s->dim;
    l.vcodes = (uint8_t *)(l.kzero + s->heads * s->dim);
    l.vscale = (kv_h16 *)(l.vcodes + n / 2);
    l.vzero = l.vscale + n / s->g4;
    return l;
}

static void put_nibbles(uint8_t *codes, int64_t e, const uint8_t *q, int64_t n)
{
    int64_t i;
    if (!(e & 1) && !(n & 1)) {          /* whole bytes: the usual case */
        for (i = 0; i < n / 2; i++) {
            codes[(e >> 1) + i] = (uint8_t)(q[2 * i] | (q[2 * i + 1] << 4));
        }
        return;
    }
    for (i = 0; i < n; i++, e++) {
        if (e & 1) {
            codes[e >> 1] = (uint8_t)(codes[e >> 1] | (q[i] << 4));
        } else {
            codes[e >> 1] = q[i];        /* the even element comes first */
        }
    }
}

static inline float get_nibble(const uint8_t *codes, int64_t e)
{
    return (float)((codes[e >> 1] >> ((e & 1) * 4)) & 15);
}

static void encode_int4(const kv_shape *s, const void *block, uint8_t *out)
{
    int64_t H = s->heads, T = s->tokens, D = s->dim, n = H * T * D;
    int64_t h, t, d0, d, m, g, c, e;
    const char *values = (const char *)block + n * s->itemsize;
    int4_layout l = int4_parts(s, out);
    float row[ROW], lo[ROW], hi[ROW], sc[ROW], z[ROW], v;
    uint8_t q[ROW];
    /* Keys: per channel across the block's tokens (outlier channels get a
     * range of their own), ROW channels at a time. */
    for (h = 0; h < H; h++) {
        for (d0 = 0; d0 < D; d0 += ROW) {
            m = D - d0 < ROW ? D - d0 : ROW;
            for (d = 0; d < m; d++) {
                lo[d] = INFINITY;
                hi[d] = -INFINITY;
            }
            for (t = 0; t < T; t++) {
                load_row(block, (h * T + t) * D + d0, s->itemsize, row, m);
                for (d = 0; d < m; d++) {
                    lo[d] = row[d] < lo[d] ? row[d] : lo[d];
                    hi[d] = row[d] > hi[d] ? row[d] : hi[d];
                }
            }
            for (d = 0; d < m; d++) {
                c = h * D + d0 + d;
                set_range(lo[d], hi[d], 15.0f, &l.kscale[c], &l.kzero[c]);
                sc[d] = kv_half(h16_get(l.kscale[c]));
                z[d] = kv_half(h16_get(l.kzero[c]));
            }
            for (t = 0; t < T; t++) {
                e = (h * T + t) * D + d0;
                load_row(block, e, s->itemsize, row, m);
                for (d = 0; d < m; d++) {
                    /* Division first, select after: branch-free, so it
                     * vectorises (a 0/0 here is discarded by the select). */
                    v = rint_small((row[d] - z[d]) / sc[d]);
                    v = v >= 0.0f ? v : 0.0f;       /* also maps NaN to 0 */
                    v = v > 15.0f ? 15.0f : v;
                    v = sc[d] == 0.0f ? 0.0f : v;
                    q[d] = (uint8_t)(int32_t)v;
                }
                put_nibbles(l.kcodes, e, q, m);
            }
        }
    }
    /* Values: per token, groups of g4 <= KV_MAX_G4 channels. */
    for (g = 0; g < n / s->g4; g++) {
        encode_group(values, s->itemsize, g * s->g4, s->g4, 15.0f, &l.vscale[g], &l.vzero[g], q);
        put_nibbles(l.vcodes, g * s->g4, q, s->g4);
    }
}

/* n codes from nibble element e (even) on, each times its scale plus its
 * zero (per-element arrays, or one value each when step is 0). */
static inline void dequant_pairs(const uint8_t *codes, int64_t e, int64_t n, const float *sc,
                                 const float *z, int64_t step, float *row)
{
    int64_t i;
    uint8_t b;
    for (i = 0; i < n / 2; i++) {
        b = codes[(e >> 1) + i];
        row[2 * i] = (float)(b & 15) * sc[2 * i * step] + z[2 * i * step];
        row[2 * i + 1] = (float)(b >> 4) * sc[(2 * i + 1) * step] + z[(2 * i + 1) * step];
    }
}

static void decode_int4(const kv_shape *s, const uint8_t *in, void *block, int halves)
{
    int64_t H = s->heads, T = s->tokens, D = s->dim, n = H * T * D;
    int64_t h, t, d0, d, m, g, e;
    char *values = (char *)block + n * s->itemsize;
    int4_layout l = int4_parts(s, (uint8_t *)in);
    float row[ROW], ks[ROW], kz[ROW], sc, z;
    if (halves & 1) {
        for (h = 0; h < H; h++) {
            for (d0 = 0; d0 < D; d0 += ROW) {
                m = D - d0 < ROW ? D - d0 : ROW;
                for (d = 0; d < m; d++) {        /* this head's channel ranges */
                    ks[d] = kv_half(h16_get(l.kscale[h * D + d0 + d]));
                    kz[d] = kv_half(h16_get(l.kzero[h * D + d0 + d]));
                }
                for (t = 0; t < T; t++) {
                    e = (h * T + t) * D + d0;
                    if (!(e & 1) && !(m & 1)) {
                        dequant_pairs(l.kcodes, e, m, ks, kz, 1, row);
                    } else {
                        for (d = 0; d < m; d++) {
                            row[d] = get_nibble(l.kcodes, e + d) * ks[d] + kz[d];
                        }
                    }
                    store_row(block, e, s->itemsize, row, m);
                }
            }
        }
    }
    if (halves & 2) {
        for (g = 0; g < n / s->g4; g++) {
            sc = kv_half(h16_get(l.vscale[g]));
            z = kv_half(h16_get(l.vzero[g]));
            e = g * s->g4;
            if (!(e & 1) && !(s->g4 & 1)) {
                dequant_pairs(l.vcodes, e, s->g4, &sc, &z, 0, row);
            } else {
                for (d = 0; d < s->g4; d++) {
                    row[d] = get_nibble(l.vcodes, e + d) * sc + z;
                }
            }
            store_row(values, e, s->itemsize, row, s->g4);
        }
    }
}

/* ------------------------------------------------------------ table */

const kv_codec_table KV_CODECS_SYM = {
    KV_ISA_NAME, KV_ISA_NEEDS, encode_fp16, decode_fp16, encode_int8, decode_int8,
    encode_int4, decode_int4,
};
