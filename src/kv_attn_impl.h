/* kv_attn_impl.h -- the attention kernel, written once over a small vector
 * vocabulary and compiled once per ISA.
 *
 * Included by kv_attn_<isa>.c after a kv_simd_<isa>.h that defines:
 *   KV_VL            float lanes per vector (1 for scalar)
 *   KV_TB            tokens whose dot products are reduced together
 *   KV_ISA_NAME      the variant's name; KV_ATTN_SYM its kernel symbol
 *   vf               the vector type
 *   vzero vset1 vload vstore vadd vmul vmax vfma(a, b, c) = a * b + c
 *   vloadh(uint16_t *)   KV_VL float16 values as float32
 *   vloadb(uint8_t *)    KV_VL bytes b as float32 b - 128
 *   vloadn(uint8_t *, vf *lo, vf *hi)  KV_VL bytes: low and high nibbles,
 *                        each minus 8
 *   vzip(even, odd, vf *first, vf *second)   interleave lanes
 *   vhsum vhmax          horizontal sum / max
 *   vreduce_tb(vf a[KV_TB], float *out)  out[t] = vhsum(a[t])
 *   vexp                 e^x for x <= 0 (kv_exp_poly below, lane-wise)
 * Everything here is static: each variant is its own translation unit and
 * exports one kv_attn_kernel.
 *
 * Per run and KV head the kernel (1) scores the run's tokens for every
 * query row, (2) folds them into the row's online softmax (running max m,
 * sum l, accumulator rescaled when m grows), (3) adds the probability-
 * weighted values.  Quantized tiers are never expanded: for INT8 a group's
 * dot product is taken on the raw codes and scaled once,
 *     q . (scale * c + zero) = scale * (q . c) + zero * sum(q),
 * for INT4 keys (per-channel scales) the query is folded with the scales
 * once per run, (q * scale) . c + q . zero, and values accumulate codes
 * weighted by p * scale plus p * zero per group.  Codes are centred (c - 128,
 * c - 8, the zero moved by as many scales) so these dot products stay small
 * and float32 cancellation against the zero term costs no precision.
 * INT4 codes are used in
 * the order they are packed (even channels in low nibbles): the query is
 * permuted to match, and value accumulators are re-interleaved once per run.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_attn.h"
#include "kv_attn_exp.h"
#include "kv_platform.h"

#define MAXRUN KV_ATTN_MAX_RUN

/* Scratch after the state (floats): scores/probabilities S[rows][MAXRUN],
 * value weights W[rows][MAXRUN], per-token scales and zeros
 * SC/ZR[MAXRUN][dim] (a group count never exceeds dim), the query folded
 * with INT4 key scales QS[rows][dim], and per-row terms Z[rows]. */
static inline float *scratch_of(const kv_attn_geom *g, float *state)
{
    return state + g->kv_heads * g->rows * (2 + g->dim);
}

static inline float half_f(uint16_t h)
{
    /* Scales and zeros are float16; exact conversion without tables so the
     * kernel stays free of globals.  Normal, subnormal, zero, inf, NaN. */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ffu, bits;
    float f;
    if (e == 0) {
        f = (float)m * (1.0f / 16777216.0f);        /* m * 2^-24 */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

/* ------------------------------------------------------------ prefetch */

/* Hint the lines [p, p + nbytes) of the next run (all of them: blocks of a
 * table are scattered through the pool, so the hardware prefetcher only
 * starts on a block after its first misses). */
static inline int64_t pf_span(const void *p, int64_t nbytes)
{
#if KV_HAVE_PREFETCH
    const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)63);
    const char *end = (const char *)p + nbytes;
    int64_t lines = 0;
    for (; c < end; c += 64, lines++) {
        KV_PREFETCH_T0(c);
    }
    return lines;
#else
    (void)p; (void)nbytes;
    return 0;
#endif
}

static int64_t pf_run(const kv_attn_geom *g, const kv_run *r, int64_t h)
{
    const uint8_t *p;
    int64_t nbytes, lines = 0;
    int half;
    for (half = 0; half < 2; half++) {
        kv_run_span(g, r, h, half, &p, &nbytes);
        lines += pf_span(p, nbytes);
    }
    return lines;
}

/* ------------------------------------------------------------ scores */

/* S[r][j] = q_r . k_j for float keys (F32: fp == NULL path via kf). */
static void scores_float(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                         float *S)
{
    int64_t D = g->dim, R = g->rows, n = run->n, r, j, c, t;
    int64_t first = (h * run->stride + run->off) * D;
    const float *kf = (const float *)run->base + first;
    const uint16_t *kh = (const uint16_t *)run->base + first;
    int f32 = run->fmt == KV_FMT_F32;
    for (r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float *Sr = S + r * MAXRUN;
        for (j = 0; j + KV_TB <= n; j += KV_TB) {
            vf a[KV_TB];
            for (t = 0; t < KV_TB; t++) {
                a[t] = vzero();
            }
            if (f32) {
                for (c = 0; c < D; c += KV_VL) {
                    vf qc = vload(qr + c);
                    for (t = 0; t < KV_TB; t++) {
                        a[t] = vfma(vload(kf + (j + t) * D + c), qc, a[t]);
                    }
                }
            } else {
                for (c = 0; c < D; c += KV_VL) {
                    vf qc = vload(qr + c);
                    for (t = 0; t < KV_TB; t++) {
                        a[t] = vfma(vloadh(kh + (j + t) * D + c), qc, a[t]);
                    }
                }
            }
            vreduce_tb(a, Sr + j);
        }
        for (; j < n; j++) {
            vf a = vzero();
            for (c = 0; c < D; c += KV_VL) {
                a = vfma(f32 ? vload(kf + j * D + c) : vloadh(kh + j * D + c), vload(qr + c), a);
            }
            Sr[j] = vhsum(a);
        }
    }
}

/* Per-token group scales and zeros of one half of a quantized run, as
 * float32: SC/ZR[j][grp], the zero moved to the centre of the codes:
 * scale * c + zero = scale * (c - bias) + (zero + bias * scale). */
static void group_params(const uint16_t *scales, const uint16_t *zeros, int64_t first_group,
                         int64_t groups_per_token, int64_t n, float bias, float *SC, float *ZR)
{
    int64_t i, cnt = n * groups_per_token;
    for (i = 0; i < cnt; i++) {
        SC[i] = half_f(scales[first_group + i]);
        ZR[i] = half_f(zeros[first_group + i]) + bias * SC[i];
    }
}

static void scores_int8(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                        float *S, float *SC, float *ZR, float *QSUM)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t G = g->g8, ng = D / G, nq = 2 * H * T * ng, r, j, c, t, k;
    const uint8_t *codes = run->base + (h * T + run->off) * D;
    const uint16_t *scales = (const uint16_t *)(run->base + 2 * H * T * D);
    group_params(scales, scales + nq, (h * T + run->off) * ng, ng, n, 128.0f, SC, ZR);
    for (r = 0; r < R; r++) {                 /* sum(q) per group */
        for (k = 0; k < ng; k++) {
            vf a = vzero();
            for (c = k * G; c < (k + 1) * G; c += KV_VL) {
                a = vadd(a, vload(q + r * D + c));
            }
            QSUM[r * ng + k] = vhsum(a);
        }
    }
    for (r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float *Sr = S + r * MAXRUN;
        float dots[KV_TB];
        for (j = 0; j < n; j++) {
            Sr[j] = 0.0f;
        }
        for (k = 0; k < ng; k++) {
            float qs = QSUM[r * ng + k];
            for (j = 0; j + KV_TB <= n; j += KV_TB) {
                vf a[KV_TB];
                for (t = 0; t < KV_TB; t++) {
                    a[t] = vzero();
                }
                for (c = k * G; c < (k + 1) * G; c += KV_VL) {
                    vf qc = vload(qr + c);
                    for (t = 0; t < KV_TB; t++) {
                        a[t] = vfma(vloadb(codes + (j + t) * D + c), qc, a[t]);
                    }
                }
                vreduce_tb(a, dots);
                for (t = 0; t < KV_TB; t++) {
                    Sr[j + t] += SC[(j + t) * ng + k] * dots[t] + ZR[(j + t) * ng + k] * qs;
                }
            }
            for (; j < n; j++) {
                vf a = vzero();
                for (c = k * G; c < (k + 1) * G; c += KV_VL) {
                    a = vfma(vloadb(codes + j * D + c), vload(qr + c), a);
                }
                Sr[j] += SC[j * ng + k] * vhsum(a) + ZR[j * ng + k] * qs;
            }
        }
    }
}

/* Nibble order of a chunk of 2 * KV_VL channels: the KV_VL even channels,
 * then the odd ones (the scalar build's chunk of 2 is the natural order). */
#if KV_VL > 1
static inline int64_t nib_slot(int64_t c)
{
    int64_t base = c - c % (2 * KV_VL), i = c - base;
    return base + (i & 1) * KV_VL + (i >> 1);
}

static void scores_int4(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                        float *S, float *QS, float *Z)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, r, j, c, t;
    const uint8_t *codes = run->base + (h * T + run->off) * D / 2;
    const uint16_t *ks = (const uint16_t *)(run->base + nel / 2) + h * D;
    const uint16_t *kz = (const uint16_t *)(run->base + nel / 2) + H * D + h * D;
    for (r = 0; r < R; r++) {      /* fold the per-channel scales into the query */
        float z = 0.0f;
        for (c = 0; c < D; c++) {
            float sc = half_f(ks[c]);
            QS[r * D + nib_slot(c)] = q[r * D + c] * sc;
            z += q[r * D + c] * (half_f(kz[c]) + 8.0f * sc);
        }
        Z[r] = z;
    }
    for (r = 0; r < R; r++) {
        const float *qr = QS + r * D;
        float *Sr = S + r * MAXRUN;
        for (j = 0; j + KV_TB <= n; j += KV_TB) {
            vf a[KV_TB];
            for (t = 0; t < KV_TB; t++) {
                a[t] = vzero();
            }
            for (c = 0; c < D; c += 2 * KV_VL) {
                vf qe = vload(qr + c), qo = vload(qr + c + KV_VL), lo, hi;
                for (t = 0; t < KV_TB; t++) {
                    vloadn(codes + ((j + t) * D + c) / 2, &lo, &hi);
                    a[t] = vfma(hi, qo, vfma(lo, qe, a[t]));
                }
            }
            vreduce_tb(a, Sr + j);
            for (t = 0; t < KV_TB; t++) {
                Sr[j + t] += Z[r];
            }
        }
        for (; j < n; j++) {
            vf a = vzero(), lo, hi;
            for (c = 0; c < D; c += 2 * KV_VL) {
                vloadn(codes + (j * D + c) / 2, &lo, &hi);
                a = vfma(hi, vload(qr + c + KV_VL), vfma(lo, vload(qr + c), a));
            }
            Sr[j] = vhsum(a) + Z[r];
        }
    }
}

#endif

/* ------------------------------------------------------------ values */

/* acc[r][c0 .. c0 + w) += sum_j P[r][j] * v_j[c0 ..] + Z[r] for float values
 * (Z NULL: none).  Two rows at once, chunks four at a time: eight
 * independent multiply-add chains keep the FMA units busy. */
static void values_float(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                         float *acc)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, r, j, c, u, nr;
    int64_t first = ((H + h) * run->stride + run->off) * D;
    const float *vf32 = (const float *)run->base + first;
    const uint16_t *vh = (const uint16_t *)run->base + first;
    int f32 = run->fmt == KV_FMT_F32;
    for (r = 0; r < R; r += 2) {
        nr = R - r < 2 ? R - r : 2;
        const float *P0 = P + r * MAXRUN, *P1 = P0 + (nr > 1 ? MAXRUN : 0);
        float *A0 = acc + r * D, *A1 = A0 + (nr > 1 ? D : 0);
        for (c = 0; c < D; c += 4 * KV_VL) {
            int64_t w = D - c < 4 * KV_VL ? (D - c) / KV_VL : 4;
            vf a0[4], a1[4], x[4];
            for (u = 0; u < w; u++) {
                a0[u] = vzero();
                a1[u] = vzero();
            }
            for (j = 0; j < n; j++) {
                vf p0 = vset1(P0[j]), p1 = vset1(P1[j]);
                for (u = 0; u < w; u++) {
                    x[u] = f32 ? vload(vf32 + j * D + c + u * KV_VL)
                               : vloadh(vh + j * D + c + u * KV_VL);
                    a0[u] = vfma(p0, x[u], a0[u]);
                    a1[u] = vfma(p1, x[u], a1[u]);
                }
            }
            for (u = 0; u < w; u++) {
                vstore(A0 + c + u * KV_VL, vadd(vload(A0 + c + u * KV_VL), a0[u]));
                if (nr > 1) {
                    vstore(A1 + c + u * KV_VL, vadd(vload(A1 + c + u * KV_VL), a1[u]));
                }
            }
        }
    }
}

/* W[r][j] = P[r][j] * SC[j][k]; Z[r] = sum_j P[r][j] * ZR[j][k]. */
static void group_weights(int64_t R, int64_t n, int64_t ng, int64_t k, const float *P,
                          const float *SC, const float *ZR, float *W, float *Z)
{
    int64_t r, j;
    for (r = 0; r < R; r++) {
        float z = 0.0f;
        for (j = 0; j < n; j++) {
            W[r * MAXRUN + j] = P[r * MAXRUN + j] * SC[j * ng + k];
            z += P[r * MAXRUN + j] * ZR[j * ng + k];
        }
        Z[r] = z;
    }
}

static void values_int8(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                        float *acc, float *W, float *SC, float *ZR, float *Z)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t G = g->g8, ng = D / G, nq = 2 * H * T * ng, r, j, c, k, u, nr;
    const uint8_t *codes = run->base + ((H + h) * T + run->off) * D;
    const uint16_t *scales = (const uint16_t *)(run->base + 2 * H * T * D);
    group_params(scales, scales + nq, ((H + h) * T + run->off) * ng, ng, n, 128.0f, SC, ZR);
    for (k = 0; k < ng; k++) {
        group_weights(R, n, ng, k, P, SC, ZR, W, Z);
        for (r = 0; r < R; r += 2) {
            nr = R - r < 2 ? R - r : 2;
            const float *W0 = W + r * MAXRUN, *W1 = W0 + (nr > 1 ? MAXRUN : 0);
            float *A0 = acc + r * D, *A1 = A0 + (nr > 1 ? D : 0);
            vf z0 = vset1(Z[r]), z1 = vset1(Z[r + nr - 1]);
            for (c = k * G; c < (k + 1) * G; c += 4 * KV_VL) {
                int64_t w = (k + 1) * G - c < 4 * KV_VL ? ((k + 1) * G - c) / KV_VL : 4;
                vf a0[4], a1[4], x[4];
                for (u = 0; u < w; u++) {
                    a0[u] = z0;
                    a1[u] = z1;
                }
                for (j = 0; j < n; j++) {
                    vf w0 = vset1(W0[j]), w1 = vset1(W1[j]);
                    for (u = 0; u < w; u++) {
                        x[u] = vloadb(codes + j * D + c + u * KV_VL);
                        a0[u] = vfma(w0, x[u], a0[u]);
                        a1[u] = vfma(w1, x[u], a1[u]);
                    }
                }
                for (u = 0; u < w; u++) {
                    vstore(A0 + c + u * KV_VL, vadd(vload(A0 + c + u * KV_VL), a0[u]));
                    if (nr > 1) {
                        vstore(A1 + c + u * KV_VL, vadd(vload(A1 + c + u * KV_VL), a1[u]));
                    }
                }
            }
        }
    }
}

#if KV_VL > 1
static void values_int4(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                        float *acc, float *W, float *SC, float *ZR, float *Z)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, G = g->g4, ng = D / G, r, j, c, k, u, nr;
    const uint8_t *vcodes = run->base + nel / 2 + 4 * H * D;
    const uint8_t *codes = vcodes + (h * T + run->off) * D / 2;
    const uint16_t *scales = (const uint16_t *)(vcodes + nel / 2);
    group_params(scales, scales + nel / G, (h * T + run->off) * ng, ng, n, 8.0f, SC, ZR);
    for (k = 0; k < ng; k++) {
        group_weights(R, n, ng, k, P, SC, ZR, W, Z);
        for (r = 0; r < R; r += 2) {
            nr = R - r < 2 ? R - r : 2;
            const float *W0 = W + r * MAXRUN, *W1 = W0 + (nr > 1 ? MAXRUN : 0);
            float *A0 = acc + r * D, *A1 = A0 + (nr > 1 ? D : 0);
            for (c = k * G; c < (k + 1) * G; c += 4 * KV_VL) {
                /* u indexes vectors: even u low nibbles, odd u high ones */
                int64_t w = (k + 1) * G - c < 4 * KV_VL ? ((k + 1) * G - c) / KV_VL : 4;
                vf a0[4], a1[4], x[4], f0, f1;
                for (u = 0; u < w; u++) {
                    a0[u] = vzero();
                    a1[u] = vzero();
                }
                for (j = 0; j < n; j++) {
                    vf w0 = vset1(W0[j]), w1 = vset1(W1[j]);
                    for (u = 0; u < w; u += 2) {
                        vloadn(codes + (j * D + c + u * KV_VL) / 2, &x[u], &x[u + 1]);
                        a0[u] = vfma(w0, x[u], a0[u]);
                        a1[u] = vfma(w1, x[u], a1[u]);
                        a0[u + 1] = vfma(w0, x[u + 1], a0[u + 1]);
                        a1[u + 1] = vfma(w1, x[u + 1], a1[u + 1]);
                    }
                }
                for (u = 0; u < w; u += 2) {
                    float *d0 = A0 + c + u * KV_VL, *d1 = A1 + c + u * KV_VL;
                    vf z0 = vset1(Z[r]), z1 = vset1(Z[r + nr - 1]);
                    vzip(a0[u], a0[u + 1], &f0, &f1);
                    vstore(d0, vadd(vload(d0), vadd(f0, z0)));
                    vstore(d0 + KV_VL, vadd(vload(d0 + KV_VL), vadd(f1, z0)));
                    if (nr > 1) {
                        vzip(a1[u], a1[u + 1], &f0, &f1);
                        vstore(d1, vadd(vload(d1), vadd(f0, z1)));
                        vstore(d1 + KV_VL, vadd(vload(d1 + KV_VL), vadd(f1, z1)));
                    }
                }
            }
        }
    }
}

#endif

#if KV_VL == 1
/* The scalar variant reads INT4 codes by flat element index, so it covers
 * every geometry (odd head_dim or group sizes included) that the packed
 * fast paths above it do not. */
static inline float nib(const uint8_t *codes, int64_t e)
{
    return (float)((codes[e >> 1] >> ((e & 1) * 4)) & 15);
}

static void scores_int4_flat(const kv_attn_geom *g, const kv_run *run, int64_t h,
                             const float *q, float *S)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, r, j, c, e0;
    const uint16_t *ks = (const uint16_t *)(run->base + nel / 2) + h * D;
    const uint16_t *kz = (const uint16_t *)(run->base + nel / 2) + H * D + h * D;
    for (r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float z = 0.0f;
        for (c = 0; c < D; c++) {
            z += qr[c] * half_f(kz[c]);
        }
        for (j = 0; j < n; j++) {
            float a = 0.0f;
            e0 = (h * T + run->off + j) * D;
            for (c = 0; c < D; c++) {
                a += qr[c] * half_f(ks[c]) * nib(run->base, e0 + c);
            }
            S[r * MAXRUN + j] = a + z;
        }
    }
}

static void values_int4_flat(const kv_attn_geom *g, const kv_run *run, int64_t h,
                             const float *P, float *acc)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, G = g->g4, r, j, c, e0;
    const uint8_t *vcodes = run->base + nel / 2 + 4 * H * D;
    const uint16_t *vs = (const uint16_t *)(vcodes + nel / 2), *vz = vs + nel / G;
    for (j = 0; j < n; j++) {
        e0 = (h * T + run->off + j) * D;
        for (c = 0; c < D; c++) {
            float x = nib(vcodes, e0 + c) * half_f(vs[(e0 + c) / G]) + half_f(vz[(e0 + c) / G]);
            for (r = 0; r < R; r++) {
                acc[r * D + c] += P[r * MAXRUN + j] * x;
            }
        }
    }
}
#endif

/* ------------------------------------------------------------ softmax */

/* Fold row scores S[r][0 .. n) into (m, l) and rescale acc; leave the
 * probabilities in S, zero past the row's causal limit. */
static void softmax_update(const kv_attn_geom *g, const kv_run *run, float *S, float *m,
                           float *l, float *acc)
{
    int64_t D = g->dim, R = g->rows, n = run->n, r, j, c;
    for (r = 0; r < R; r++) {
        float *Sr = S + r * MAXRUN, mx = -INFINITY, mnew, corr, sum;
        int64_t vis = g->q_pos0 + r % g->t_q - run->pos + 1;
        vis = vis < 0 ? 0 : (vis > n ? n : vis);
        for (j = vis; j < n; j++) {
            Sr[j] = 0.0f;
        }
        if (vis == 0) {
            continue;
        }
        j = 0;
        if (vis >= KV_VL) {
            vf vm = vload(Sr);
            for (j = KV_VL; j + KV_VL <= vis; j += KV_VL) {
                vm = vmax(vm, vload(Sr + j));
            }
            mx = vhmax(vm);
        }
        for (; j < vis; j++) {
            mx = Sr[j] > mx ? Sr[j] : mx;
        }
        mnew = mx > m[r] ? mx : m[r];
        corr = m[r] == -INFINITY ? 0.0f : kv_exp_poly(m[r] - mnew);
        vf vs = vzero(), vmn = vset1(-mnew);
        for (j = 0; j + KV_VL <= vis; j += KV_VL) {
            vf p = vexp(vadd(vload(Sr + j), vmn));
            vstore(Sr + j, p);
            vs = vadd(vs, p);
        }
        sum = vhsum(vs);
        for (; j < vis; j++) {
            Sr[j] = kv_exp_poly(Sr[j] - mnew);
            sum += Sr[j];
        }
        l[r] = l[r] * corr + sum;
        m[r] = mnew;
        if (corr != 1.0f) {
            vf vc = vset1(corr);
            for (c = 0; c < D; c += KV_VL) {
                vstore(acc + r * D + c, vmul(vload(acc + r * D + c), vc));
            }
        }
    }
}

/* ------------------------------------------------------------ kernel */

static int64_t attend(const kv_attn_geom *g, const float *q, const kv_run *runs, int64_t nruns,
                      float *state)
{
    int64_t H = g->kv_heads, R = g->rows, D = g->dim, i, h, lines = 0;
    float *m = state, *l = m + H * R, *acc = l + H * R, *scr = scratch_of(g, state);
    float *S = scr, *W = S + R * MAXRUN, *SC = W + R * MAXRUN, *ZR = SC + MAXRUN * D;
    float *QS = ZR + MAXRUN * D, *Z = QS + R * D;
    for (i = 0; i < nruns; i++) {
        const kv_run *run = &runs[i];
        for (h = 0; h < H; h++) {
            const float *qh = q + h * R * D;
            float *acch = acc + h * R * D;
            if (g->prefetch && i + 1 < nruns) {
                lines += pf_run(g, &runs[i + 1], h);
            }
            switch (run->fmt) {
            case KV_FMT_INT8:
                scores_int8(g, run, h, qh, S, SC, ZR, QS);
                break;
            case KV_FMT_INT4:
#if KV_VL == 1
                scores_int4_flat(g, run, h, qh, S);
#else
                scores_int4(g, run, h, qh, S, QS, Z);
#endif
                break;
            default:
                scores_float(g, run, h, qh, S);
            }
            softmax_update(g, run, S, m + h * R, l + h * R, acch);
            switch (run->fmt) {
            case KV_FMT_INT8:
                values_int8(g, run, h, S, acch, W, SC, ZR, Z);
                break;
            case KV_FMT_INT4:
#if KV_VL == 1
                values_int4_flat(g, run, h, S, acch);
#else
                values_int4(g, run, h, S, acch, W, SC, ZR, Z);
#endif
                break;
            default:
                values_float(g, run, h, S, acch);
            }
        }
    }
    return lines;
}

static int supports(const kv_attn_geom *g)
{
    /* Fast paths take whole vectors: INT4 codes two vectors (one byte
     * vector) at a time, groups whole vectors.  The scalar variant takes
     * every geometry. */
    if (KV_VL == 1) {
        return 1;
    }
    return g->dim % (2 * KV_VL) == 0 && g->g8 % KV_VL == 0 && g->g4 % (2 * KV_VL) == 0;
}

const kv_attn_kernel KV_ATTN_SYM = {KV_ISA_NAME, supports, attend};
