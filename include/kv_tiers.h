/* kv_tiers.h -- encoders and decoders of kvcache's compressed block tiers.
 *
 * A block holds keys then values, each [heads][tokens][dim] in the cache
 * dtype (float16 bits when itemsize == 2, float32 when 4).  Every encoder
 * reads one whole block and writes a payload the caller allocated with
 * kv_payload_bytes(); every decoder writes a whole block back in the cache
 * dtype.  The float32 formulas are the ones tests/quant_reference.py
 * implements with numpy (bit-exact agreement is tested):
 *
 *   INT8: per token, groups of g8 channels, 255 levels.
 *   INT4 (KIVI): keys per channel across the block's tokens, values per
 *         token in groups of g4 channels, 15 levels, two codes per byte
 *         (low nibble = even channel).
 *   FP16: float32 block -> float16 (a float16 cache needs no FP16 tier).
 *   For each group: zero = f16(min), scale = f16((max - min) / levels),
 *   q = clip(rint((x - zero) / scale), 0, levels) (q = 0 when scale == 0),
 *   x' = q * scale + zero, all in float32.
 *
 * Pure functions on caller-owned memory: no allocation, no globals besides
 * the half->float table filled once by kv_tiers_init(); safe without the GIL.
 * The codecs are compiled once per ISA and reached through a table of
 * function pointers (kv_codec_table); the rest is plain baseline code.
 */
#ifndef KV_TIERS_H
#define KV_TIERS_H

#include <stdint.h>

enum kv_tier {
    KV_TIER_FULL = 0,      /* the cache dtype, uncompressed */
    KV_TIER_FP16 = 1,
    KV_TIER_INT8 = 2,
    KV_TIER_INT4 = 3,
    KV_TIER_LOSSLESS = 4   /* byte-shuffled then LZ4 (the codec runs in Python) */
};

/* Largest INT4 value group (channels): one group is quantized in one pass
 * over a stack buffer of this many floats. */
#define KV_MAX_G4 256

typedef struct {
    int64_t heads, tokens, dim;   /* one half of a block: [heads][tokens][dim] */
    int64_t itemsize;             /* 2: float16 cache, 4: float32 cache */
    int64_t g8, g4;               /* INT8 and INT4 value group sizes (channels) */
} kv_shape;

void kv_tiers_init(void);

/* float16 bits -> float32, exact (numpy's conversion), filled once by
 * kv_tiers_init(); read-only after it, so safe without the GIL. */
extern float kv_half_table[65536];

static inline float kv_half(uint16_t h)
{
    return kv_half_table[h];
}

float kv_half_to_float(uint16_t h);
uint16_t kv_float_to_half(float f);

/* Payload size in bytes of a block encoded in `tier` (FP16/INT8/INT4;
 * 0 for the others, whose size depends on the data). */
int64_t kv_payload_bytes(int tier, const kv_shape *s);

/* One compiled variant of the codecs.  Decoders write only the halves
 * named by `halves` (1: keys, 2: values, 3: both) and leave the other half
 * of `block` untouched.  Every variant writes the same bytes (tested). */
typedef struct {
    const char *name;
    int needs;         /* the KV_CPU_* features it runs on (0: any CPU) */
    void (*encode_fp16)(const kv_shape *s, const void *block, uint8_t *out);
    void (*decode_fp16)(const kv_shape *s, const uint8_t *in, void *block, int halves);
    void (*encode_int8)(const kv_shape *s, const void *block, uint8_t *out);
    void (*decode_int8)(const kv_shape *s, const uint8_t *in, void *block, int halves);
    void (*encode_int4)(const kv_shape *s, const void *block, uint8_t *out);
    void (*decode_int4)(const kv_shape *s, const uint8_t *in, void *block, int halves);
} kv_codec_table;

/* Every variant compiled in, best first; NULL-terminated (the last is the
 * scalar one, which needs nothing).  As for the attention kernels, one
 * source (src/kv_tiers_impl.h) is compiled once per ISA (kv_tiers_scalar.c,
 * kv_tiers_avx2.c) and kv_tiers.c keeps this table. */
extern const kv_codec_table *const kv_codec_tables[];

/* The codecs in use, chosen at start-up (and by tests): the best variant
 * this CPU and OS run, or the scalar one when allow_simd is 0 (the
 * KVCACHE_DISABLE_SIMD kill switch).  kv_cpu.h's rule, as for the kernels. */
const kv_codec_table *kv_codecs_select(int allow_simd);

/* Byte (un)shuffle of n elements of `itemsize` bytes: plane b holds byte b
 * of every element (what makes float exponents compressible). */
void kv_shuffle(const uint8_t *in, uint8_t *out, int64_t n, int64_t itemsize);
void kv_unshuffle(const uint8_t *in, uint8_t *out, int64_t n, int64_t itemsize);

/* Relative Frobenius error of `approx` against `exact` (both whole blocks in
 * the cache dtype), the larger of the keys' and the values'. */
double kv_block_rel_error(const kv_shape *s, const void *exact, const void *approx);

#endif /* KV_TIERS_H */
