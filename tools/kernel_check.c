/* kernel_check.c -- standalone check of every compiled attention kernel
 * (and that every compiled codec variant writes the scalar codecs' bytes).
 *
 * For a few geometries and every run format (F16 and F32 caches, the FP16
 * tier of a float32 cache, INT8, INT4, and a mix of them in one call) this
 * builds random blocks, encodes them with the tier codecs, and runs each
 * kernel in kv_attn_kernels[] that this CPU runs and that supports the
 * geometry.  Each output is compared
 *   - with the scalar kernel's (relative Frobenius error <= TOL_SCALAR),
 *   - with a double-precision softmax attention computed here from the
 *     dequantized values (x' = code * scale + zero, read straight from the
 *     payload as kv_tiers.h lays it out) (<= TOL_REF_FLOAT for F16/F32,
 *     <= TOL_REF_QUANT for INT8/INT4),
 *   - and with itself run as two attend() calls over the same runs (the
 *     state carries across calls: must be bit-identical).
 * Block slots that no run covers, and the tokens of a masked tail (past
 * every query's position, in two geometries), are NaN: a kernel that reads
 * them, or lets a zero weight meet them (0 * NaN), spoils its output.
 * The state buffer is filled with NaN before kv_attn_state_init (a read of
 * scratch the kernel did not write shows up as NaN) and both the state and
 * the output carry guard words after their end.
 *
 * One line per (format, geometry, kernel) and per (geometry, codec
 * variant); exit status 1 on any failure.
 *
 * Build (from the repository root), e.g.:
 *   gcc -O3 -ffp-contract=off -fno-trapping-math -Iinclude -Isrc \
 *       tools/kernel_check.c src/kv_cpu.c src/kv_attn.c src/kv_attn_scalar.c \
 *       src/kv_attn_neon.c src/kv_attn_avx2.c src/kv_attn_avx512.c src/kv_tiers.c \
 *       src/kv_tiers_scalar.c src/kv_tiers_avx2.c -lm -o kernel_check
 * (tools/aarch64_check.sh does this natively and for AArch64 under qemu.)
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv_attn.h"
#include "kv_tiers.h"

#define TOL_SCALAR 1e-6      /* any kernel vs the scalar kernel (--tol-scalar X) */
#define TOL_REF_FLOAT 1e-5   /* vs the double reference, F16/F32 runs */
#define TOL_REF_QUANT 1e-5   /* vs the double reference, INT8/INT4 runs */

#define BLOCK 64             /* block_size (tokens per block) */
#define NBLOCKS 5
#define GUARD 16             /* guard floats after state and output */
#define GUARD_VAL 12345.678f

/* The portable variants, built everywhere: the ones the others are checked
 * against. */
extern const kv_attn_kernel kv_attn_kernel_scalar;
extern const kv_codec_table kv_codecs_scalar;

/* ------------------------------------------------------------ PRNG */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t xorshift64(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

/* uniform in [-1, 1) */
static float urand(void)
{
    return (float)((double)(xorshift64() >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ------------------------------------------------------------ setup */

typedef struct {
    int64_t H, D, rows, t_q, g8, g4;
    int prefetch;
    int64_t tail;      /* last tokens past every query (poisoned with NaN) */
} geo_spec;

static const geo_spec GEOS[] = {
    /* kv_heads 3, dim 64: decode (3 q heads per kv head) and t_q 4 */
    {3, 64, 3, 1, 64, 32, 0, 0},
    {3, 64, 12, 4, 64, 32, 1, 0},
    /* 6 rows (a 4 + 2 split of the value blocks), smaller groups */
    {3, 64, 6, 2, 32, 32, 1, 0},
    /* g4 16: the 16-lane kernel does not support it (scalar + narrower ones run) */
    {3, 64, 12, 4, 16, 16, 0, 0},
    /* dim 128, g8 64, g4 32 */
    {3, 128, 3, 1, 64, 32, 1, 0},
    {3, 128, 12, 4, 64, 32, 0, 0},
    /* masked tails holding NaN: 5 tokens (part of the last run), and 24 (the
     * whole last run, seen by no row, and part of the one before) */
    {3, 64, 12, 4, 64, 32, 1, 5},
    {3, 128, 3, 1, 64, 32, 0, 24},
};
#define NGEOS ((int)(sizeof(GEOS) / sizeof(GEOS[0])))

/* Runs over the blocks: partial ones (off > 0, n < BLOCK), one block split
 * in two runs, tails that are not a multiple of any kernel's token tile;
 * positions consecutive from 0. */
typedef struct {
    int block, off, n;
} run_spec;

static const run_spec RUNS[] = {
    {0, 3, 61}, {1, 0, 64}, {2, 0, 17}, {2, 17, 30}, {3, 9, 50}, {4, 0, 21},
};
#define NRUNS ((int)(sizeof(RUNS) / sizeof(RUNS[0])))

enum { F_F16, F_F32, F_FP16TIER, F_INT8, F_INT4, F_MIXED, NFORMATS };
static const char *FMT_NAMES[NFORMATS] = {"f16", "f32", "fp16tier", "int8", "int4", "mixed"};

/* Every encoding of the NBLOCKS blocks of one geometry. */
typedef struct {
    uint16_t *f16[NBLOCKS];    /* float16 cache blocks */
    float *f32[NBLOCKS];       /* float32 cache blocks */
    uint8_t *fp16[NBLOCKS];    /* FP16 payloads of the float32 blocks */
    uint8_t *i8[NBLOCKS];      /* INT8 payloads of the float16 blocks */
    uint8_t *i4[NBLOCKS];      /* INT4 payloads of the float16 blocks */
} blockset;

static double h2d(uint16_t h)
{
    return (double)kv_half_to_float(h);
}

/* Dequantized element (double) of run r: half hf (0 keys, 1 values), head
 * h, slot t (absolute in the block), channel c.  Read from the layouts as
 * kv_tiers.h / kv_attn.h describe them, independently of the decoders. */
static double deq(const geo_spec *gs, const kv_run *r, int hf, int64_t h, int64_t t, int64_t c)
{
    int64_t H = gs->H, D = gs->D, T = r->stride, n = H * T * D;
    const uint8_t *p = r->base;
    switch (r->fmt) {
    case KV_FMT_F32:
        return ((const float *)p)[((hf * H + h) * T + t) * D + c];
    case KV_FMT_F16:
        return h2d(((const uint16_t *)p)[((hf * H + h) * T + t) * D + c]);
    case KV_FMT_INT8: {
        /* codes [2][H][T][D] u8 | scales [2][H][T][D/g8] f16 | zeros */
        int64_t e = ((hf * H + h) * T + t) * D + c, ng = 2 * n / gs->g8;
        const uint16_t *sc = (const uint16_t *)(p + 2 * n), *zr = sc + ng;
        return (double)p[e] * h2d(sc[e / gs->g8]) + h2d(zr[e / gs->g8]);
    }
    default: {
        /* K codes [H][T][D/2] | K scales [H][D] | K zeros [H][D] |
         * V codes [H][T][D/2] | V scales [H][T][D/g4] | V zeros */
        int64_t e = (h * T + t) * D + c;
        const uint16_t *ks = (const uint16_t *)(p + n / 2), *kz = ks + H * D;
        const uint8_t *vc = (const uint8_t *)(kz + H * D);
        const uint16_t *vs = (const uint16_t *)(vc + n / 2), *vz = vs + n / gs->g4;
        const uint8_t *codes = hf ? vc : p;
        double code = (double)((codes[e >> 1] >> ((e & 1) * 4)) & 15);
        if (hf == 0) {
            return code * h2d(ks[h * D + c]) + h2d(kz[h * D + c]);
        }
        return code * h2d(vs[e / gs->g4]) + h2d(vz[e / gs->g4]);
    }
    }
}

/* Whether slot t of block blk holds a token some query may see: inside a
 * run and before the masked tail.  Every other slot is NaN in the blocks
 * (kernels must read neither slots outside their runs nor, in effect,
 * tokens past a row's causal limit). */
static int slot_live(const geo_spec *gs, int blk, int64_t t)
{
    int64_t pos = 0, total = 0;
    int i;
    for (i = 0; i < NRUNS; i++) {
        total += RUNS[i].n;
    }
    for (i = 0; i < NRUNS; i++) {
        if (RUNS[i].block == blk && t >= RUNS[i].off && t < RUNS[i].off + RUNS[i].n) {
            return pos + (t - RUNS[i].off) < total - gs->tail;
        }
        pos += RUNS[i].n;
    }
    return 0;
}

static void make_blocks(const geo_spec *gs, blockset *b, double *deq_check)
{
    int64_t H = gs->H, D = gs->D, n = H * BLOCK * D, i;
    kv_shape s16 = {H, BLOCK, D, 2, gs->g8, gs->g4};
    kv_shape s32 = {H, BLOCK, D, 4, gs->g8, gs->g4};
    int blk;
    *deq_check = 0.0;
    for (blk = 0; blk < NBLOCKS; blk++) {
        b->f16[blk] = xmalloc((size_t)(2 * n) * 2);
        b->f32[blk] = xmalloc((size_t)(2 * n) * 4);
        for (i = 0; i < 2 * n; i++) {
            int64_t c = i % D;
            float x = urand();
            if (i < n) {
                /* keys: a per-channel offset, and a few outlier channels */
                x = x * (c % 7 == 0 ? 4.0f : 1.0f) + 0.25f * (float)((c % 5) - 2);
            }
            if (!slot_live(gs, blk, (i / D) % BLOCK)) {
                x = NAN;
            }
            b->f32[blk][i] = x;
            b->f16[blk][i] = kv_float_to_half(x);
        }
        b->fp16[blk] = xmalloc((size_t)kv_payload_bytes(KV_TIER_FP16, &s32));
        kv_codecs_scalar.encode_fp16(&s32, b->f32[blk], b->fp16[blk]);
        b->i8[blk] = xmalloc((size_t)kv_payload_bytes(KV_TIER_INT8, &s16));
        kv_codecs_scalar.encode_int8(&s16, b->f16[blk], b->i8[blk]);
        b->i4[blk] = xmalloc((size_t)kv_payload_bytes(KV_TIER_INT4, &s16));
        kv_codecs_scalar.encode_int4(&s16, b->f16[blk], b->i4[blk]);

        /* Cross-check deq() against the library decoders (decoding into a
         * float32 block: x' = q * scale + zero rounded once to float32). */
        {
            float *dec = xmalloc((size_t)(2 * n) * 4);
            int which, hf;
            for (which = 0; which < 2; which++) {
                kv_run r = {which ? b->i4[blk] : b->i8[blk], 0,
                            which ? KV_FMT_INT4 : KV_FMT_INT8, BLOCK, 0, BLOCK};
                if (which) {
                    kv_codecs_scalar.decode_int4(&s32, b->i4[blk], dec, 3);
                } else {
                    kv_codecs_scalar.decode_int8(&s32, b->i8[blk], dec, 3);
                }
                for (hf = 0; hf < 2; hf++) {
                    int64_t h, t, c;
                    for (h = 0; h < H; h++) {
                        for (t = 0; t < BLOCK; t++) {
                            for (c = 0; c < D; c++) {
                                double x = deq(gs, &r, hf, h, t, c);
                                double y = dec[((hf * H + h) * BLOCK + t) * D + c];
                                double d = fabs(x - y) / (fabs(x) > 1.0 ? fabs(x) : 1.0);
                                if (!slot_live(gs, blk, t)) {
                                    continue;        /* NaN slots */
                                }
                                if (!(d <= *deq_check)) {
                                    *deq_check = d;  /* NaN counts as the worst */
                                }
                            }
                        }
                    }
                }
            }
            free(dec);
        }
    }
}

static void free_blocks(blockset *b)
{
    int blk;
    for (blk = 0; blk < NBLOCKS; blk++) {
        free(b->f16[blk]);
        free(b->f32[blk]);
        free(b->fp16[blk]);
        free(b->i8[blk]);
        free(b->i4[blk]);
    }
}

/* Counts a comparison of n bytes in *outputs; returns 1 when they differ. */
static int64_t differs(const void *got, const void *want, size_t n, int64_t *outputs)
{
    ++*outputs;
    return memcmp(got, want, n) != 0;
}

/* Every codec variant this CPU runs must write the scalar codecs' bytes:
 * payloads (encoded here again from the same blocks) and decoded blocks
 * (of the scalar payloads, in both cache dtypes, every `halves`).  Returns
 * the failures and prints one line per variant. */
static int check_codecs(const geo_spec *gs, const blockset *b, const char *gname)
{
    int64_t H = gs->H, D = gs->D, n = H * BLOCK * D;
    kv_shape s16 = {H, BLOCK, D, 2, gs->g8, gs->g4};
    kv_shape s32 = {H, BLOCK, D, 4, gs->g8, gs->g4};
    const kv_codec_table *ref = &kv_codecs_scalar;
    size_t fp16 = (size_t)kv_payload_bytes(KV_TIER_FP16, &s32);   /* the largest payload */
    size_t i8 = (size_t)kv_payload_bytes(KV_TIER_INT8, &s16);
    size_t i4 = (size_t)kv_payload_bytes(KV_TIER_INT4, &s16);
    uint8_t *pay = xmalloc(fp16);
    uint8_t *dec = xmalloc((size_t)(2 * n) * 4), *want = xmalloc((size_t)(2 * n) * 4);
    int ci, blk, it, halves, failures = 0;
    for (ci = 0; kv_codec_tables[ci]; ci++) {
        const kv_codec_table *c = kv_codec_tables[ci];
        int64_t diffs = 0, outputs = 0;
        printf("codecs   %-44s %-7s ", gname, c->name);
        if (!kv_cpu_runs(c->needs, KV_CPU_ALL)) {
            printf("skipped (CPU does not run it)\n");
            continue;
        }
        for (blk = 0; blk < NBLOCKS; blk++) {
            c->encode_fp16(&s32, b->f32[blk], pay);
            diffs += differs(pay, b->fp16[blk], fp16, &outputs);
            c->encode_int8(&s16, b->f16[blk], pay);
            diffs += differs(pay, b->i8[blk], i8, &outputs);
            c->encode_int4(&s16, b->f16[blk], pay);
            diffs += differs(pay, b->i4[blk], i4, &outputs);
            for (it = 2; it <= 4; it += 2) {
                const kv_shape *s = it == 2 ? &s16 : &s32;
                size_t bytes = (size_t)(2 * n * it);
                for (halves = 1; halves <= 3; halves++) {
                    memset(want, 0x5a, bytes);
                    memset(dec, 0x5a, bytes);
                    ref->decode_int8(s, b->i8[blk], want, halves);
                    c->decode_int8(s, b->i8[blk], dec, halves);
                    diffs += differs(dec, want, bytes, &outputs);
                    ref->decode_int4(s, b->i4[blk], want, halves);
                    c->decode_int4(s, b->i4[blk], dec, halves);
                    diffs += differs(dec, want, bytes, &outputs);
                    if (it == 4) {                  /* FP16 is for float32 caches */
                        ref->decode_fp16(s, b->fp16[blk], want, halves);
                        c->decode_fp16(s, b->fp16[blk], dec, halves);
                        diffs += differs(dec, want, bytes, &outputs);
                    }
                }
            }
        }
        printf("%lld of %lld outputs differ from scalar's  %s\n", (long long)diffs,
               (long long)outputs, diffs ? "FAIL" : "OK");
        failures += diffs != 0;
    }
    free(pay);
    free(dec);
    free(want);
    return failures;
}

static void make_runs(const blockset *b, int format, kv_run *runs, int *quantized)
{
    static const int mix[] = {KV_FMT_INT4, KV_FMT_INT8, KV_FMT_F16};
    int i;
    int64_t pos = 0;
    *quantized = 0;
    for (i = 0; i < NRUNS; i++) {
        int blk = RUNS[i].block, fmt;
        const uint8_t *base;
        switch (format) {
        case F_F16: fmt = KV_FMT_F16; base = (const uint8_t *)b->f16[blk]; break;
        case F_F32: fmt = KV_FMT_F32; base = (const uint8_t *)b->f32[blk]; break;
        case F_FP16TIER: fmt = KV_FMT_F16; base = b->fp16[blk]; break;
        case F_INT8: fmt = KV_FMT_INT8; base = b->i8[blk]; break;
        case F_INT4: fmt = KV_FMT_INT4; base = b->i4[blk]; break;
        default:
            /* mixed: by block (a split block keeps one format), from a
             * float16 cache */
            fmt = mix[blk % 3];
            base = fmt == KV_FMT_INT4 ? b->i4[blk]
                 : fmt == KV_FMT_INT8 ? b->i8[blk] : (const uint8_t *)b->f16[blk];
        }
        if (fmt == KV_FMT_INT8 || fmt == KV_FMT_INT4) {
            *quantized = 1;
        }
        runs[i].base = base;
        runs[i].pos = pos;
        runs[i].fmt = fmt;
        runs[i].stride = BLOCK;
        runs[i].off = RUNS[i].off;
        runs[i].n = RUNS[i].n;
        pos += RUNS[i].n;
    }
}

/* ------------------------------------------------------------ reference */

static void reference(const geo_spec *gs, const kv_attn_geom *g, const float *q,
                      const kv_run *runs, int nruns, double *out)
{
    int64_t H = gs->H, R = gs->rows, D = gs->D, total = 0, h, r, c;
    int i;
    double *s, *kv;
    for (i = 0; i < nruns; i++) {
        total += runs[i].n;
    }
    s = xmalloc((size_t)total * sizeof(double));
    kv = xmalloc((size_t)(2 * total * D) * sizeof(double));
    for (h = 0; h < H; h++) {
        int64_t j = 0, t;
        for (i = 0; i < nruns; i++) {        /* this head's dequantized K and V */
            for (t = 0; t < runs[i].n; t++, j++) {
                for (c = 0; c < D; c++) {
                    kv[j * D + c] = deq(gs, &runs[i], 0, h, runs[i].off + t, c);
                    kv[(total + j) * D + c] = deq(gs, &runs[i], 1, h, runs[i].off + t, c);
                }
            }
        }
        for (r = 0; r < R; r++) {
            const float *qr = q + (h * R + r) * D;
            double *o = out + (h * R + r) * D, mx = -INFINITY, sum = 0.0;
            int64_t qpos = g->q_pos0 + r % g->t_q, vis = 0;
            j = 0;
            for (i = 0; i < nruns; i++) {    /* positions are consecutive from runs[0].pos */
                for (t = 0; t < runs[i].n; t++, j++) {
                    if (runs[i].pos + t <= qpos) {
                        double a = 0.0;
                        for (c = 0; c < D; c++) {
                            a += (double)qr[c] * kv[j * D + c];
                        }
                        s[j] = a;
                        mx = a > mx ? a : mx;
                        vis = j + 1;
                    }
                }
            }
            for (c = 0; c < D; c++) {
                o[c] = 0.0;
            }
            if (vis == 0) {
                continue;
            }
            for (j = 0; j < vis; j++) {
                double p = exp(s[j] - mx);
                sum += p;
                for (c = 0; c < D; c++) {
                    o[c] += p * kv[(total + j) * D + c];
                }
            }
            for (c = 0; c < D; c++) {
                o[c] /= sum;
            }
        }
    }
    free(s);
    free(kv);
}

/* ------------------------------------------------------------ running */

static double rel_err_f(const float *a, const float *b, int64_t n)
{
    double num = 0.0, den = 0.0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    if (num != num || den != den) {
        return NAN;
    }
    return den > 0.0 ? sqrt(num / den) : (num > 0.0 ? INFINITY : 0.0);
}

static double rel_err_d(const float *a, const double *b, int64_t n)
{
    double num = 0.0, den = 0.0;
    int64_t i;
    for (i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += b[i] * b[i];
    }
    if (num != num || den != den) {
        return NAN;
    }
    return den > 0.0 ? sqrt(num / den) : (num > 0.0 ? INFINITY : 0.0);
}

/* Runs kernel k over runs[0 .. nruns) in `calls` attend() calls; 0 when a
 * guard word was overwritten. */
static double tol_scalar = TOL_SCALAR;

static int run_kernel(const kv_attn_kernel *k, const kv_attn_geom *g, const float *q,
                      const kv_run *runs, int nruns, int calls, float *out)
{
    int64_t nf = kv_attn_state_floats(g), nout = g->kv_heads * g->rows * g->dim, i;
    float *state = xmalloc((size_t)(nf + GUARD) * sizeof(float));
    int ok = 1, first = calls > 1 ? nruns / 2 : nruns;
    for (i = 0; i < nf; i++) {
        state[i] = NAN;                    /* scratch must be written before read */
    }
    for (i = 0; i < GUARD; i++) {
        state[nf + i] = GUARD_VAL;
        out[nout + i] = GUARD_VAL;
    }
    kv_attn_state_init(g, state);
    k->attend(g, q, runs, first, state);
    if (first < nruns) {
        k->attend(g, q, runs + first, nruns - first, state);
    }
    kv_attn_finish(g, state, out);
    for (i = 0; i < GUARD; i++) {
        if (state[nf + i] != GUARD_VAL || out[nout + i] != GUARD_VAL) {
            ok = 0;
        }
    }
    free(state);
    return ok;
}

int main(int argc, char **argv)
{
    int failures = 0, lines = 0, gi, fi, ki, ai;
    for (ai = 1; ai < argc; ai++) {
        if (strcmp(argv[ai], "--tol-scalar") == 0 && ai + 1 < argc) {
            tol_scalar = atof(argv[++ai]);
        } else {
            fprintf(stderr, "usage: %s [--tol-scalar X]   (default %g)\n", argv[0], TOL_SCALAR);
            return 2;
        }
    }
    kv_tiers_init();

    printf("kernels compiled:");
    for (ki = 0; kv_attn_kernels[ki]; ki++) {
        printf(" %s%s", kv_attn_kernels[ki]->name,
               kv_attn_runnable(kv_attn_kernels[ki]) ? "" : "(not runnable here)");
    }
    printf(" (selected: %s)\ncodecs compiled:", kv_attn_select(1)->name);
    for (ki = 0; kv_codec_tables[ki]; ki++) {
        printf(" %s%s", kv_codec_tables[ki]->name,
               kv_cpu_runs(kv_codec_tables[ki]->needs, KV_CPU_ALL) ? "" : "(not runnable here)");
    }
    printf(" (selected: %s)", kv_codecs_select(1)->name);
    printf("\ncpu features: 0x%x; tolerances: vs scalar %.0e, vs double ref %.0e (f16/f32) "
           "%.0e (int8/int4)\n",
           kv_cpu_features(), tol_scalar, TOL_REF_FLOAT, TOL_REF_QUANT);

    for (gi = 0; gi < NGEOS; gi++) {
        const geo_spec *gs = &GEOS[gi];
        blockset b;
        double deq_check;
        int64_t total = 0, nout = gs->H * gs->rows * gs->D, i;
        float *q = xmalloc((size_t)nout * sizeof(float));
        double *ref = xmalloc((size_t)nout * sizeof(double));
        float *out_s = xmalloc((size_t)(nout + GUARD) * sizeof(float));
        float *out_k = xmalloc((size_t)(nout + GUARD) * sizeof(float));
        float *out_2 = xmalloc((size_t)(nout + GUARD) * sizeof(float));
        char gname[96];
        kv_attn_geom g;

        for (i = 0; i < NRUNS; i++) {
            total += RUNS[i].n;
        }
        g.kv_heads = gs->H;
        g.dim = gs->D;
        g.rows = gs->rows;
        g.t_q = gs->t_q;
        g.q_pos0 = total - gs->tail - gs->t_q;   /* causal: the last t_q positions
                                                     * before the masked tail */
        g.g8 = gs->g8;
        g.g4 = gs->g4;
        g.prefetch = gs->prefetch;
        snprintf(gname, sizeof gname, "H%lld.D%lld.R%lld.tq%lld.g8=%lld.g4=%lld.pf%d",
                 (long long)gs->H, (long long)gs->D, (long long)gs->rows, (long long)gs->t_q,
                 (long long)gs->g8, (long long)gs->g4, gs->prefetch);
        if (gs->tail) {
            size_t used = strlen(gname);
            snprintf(gname + used, sizeof gname - used, ".nantail%lld", (long long)gs->tail);
        }

        make_blocks(gs, &b, &deq_check);
        for (i = 0; i < nout; i++) {       /* already scaled: scores of order 1..few */
            q[i] = urand() * 3.0f / sqrtf((float)gs->D);
        }
        printf("geometry %s: %d runs, %lld tokens, q_pos0 %lld; deq() vs the decoders: "
               "max rel diff %.2e\n",
               gname, NRUNS, (long long)total, (long long)g.q_pos0, deq_check);
        if (!(deq_check <= 1e-6)) {
            printf("FAIL: the reference's reading of the INT8/INT4 layouts disagrees with "
                   "the decoders\n");
            failures++;
        }
        failures += check_codecs(gs, &b, gname);

        for (fi = 0; fi < NFORMATS; fi++) {
            kv_run runs[NRUNS];
            int quantized, scalar_ok;
            double tol_ref, scalar_ref;
            make_runs(&b, fi, runs, &quantized);
            tol_ref = quantized ? TOL_REF_QUANT : TOL_REF_FLOAT;
            reference(gs, &g, q, runs, NRUNS, ref);
            scalar_ok = run_kernel(&kv_attn_kernel_scalar, &g, q, runs, NRUNS, 1, out_s);
            scalar_ref = rel_err_d(out_s, ref, nout);
            for (ki = 0; kv_attn_kernels[ki]; ki++) {
                const kv_attn_kernel *k = kv_attn_kernels[ki];
                double e_s, e_r;
                int ok = 1, split_same, guards;
                lines++;
                printf("%-8s %-44s %-7s ", FMT_NAMES[fi], gname, k->name);
                if (!kv_attn_runnable(k)) {
                    printf("skipped (CPU does not run it)\n");
                    continue;
                }
                if (!k->supports(&g)) {
                    printf("skipped (supports() = 0 for this geometry)\n");
                    continue;
                }
                guards = run_kernel(k, &g, q, runs, NRUNS, 1, out_k) && scalar_ok;
                guards &= run_kernel(k, &g, q, runs, NRUNS, 2, out_2);
                split_same = memcmp(out_k, out_2, (size_t)nout * sizeof(float)) == 0;
                e_s = rel_err_f(out_k, out_s, nout);
                e_r = rel_err_d(out_k, ref, nout);
                if (!(e_s <= tol_scalar) || !(e_r <= tol_ref) || !split_same || !guards) {
                    ok = 0;
                    failures++;
                }
                printf("vs_scalar %.3e  vs_ref %.3e  split %s  guards %s  %s", e_s, e_r,
                       split_same ? "same" : "DIFFERS", guards ? "ok" : "OVERWRITTEN",
                       ok ? "OK" : "FAIL");
                if (!(e_s <= tol_scalar) && e_r <= tol_ref && e_r < scalar_ref) {
                    /* the mismatch is mostly the scalar kernel's own error */
                    printf("  (scalar's own vs_ref is %.3e: scalar is the less accurate one)",
                           scalar_ref);
                }
                printf("\n");
            }
        }
        free_blocks(&b);
        free(q);
        free(ref);
        free(out_s);
        free(out_k);
        free(out_2);
    }
    printf("%d lines, %d failure(s): %s\n", lines, failures, failures ? "FAIL" : "PASS");
    return failures ? 1 : 0;
}
