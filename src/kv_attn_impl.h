/* kv_attn_impl.h -- the attention kernel, written once over a small vector
 * vocabulary and compiled once per ISA.
 *
 * Included by kv_attn_<isa>.c after a kv_simd_<isa>.h that defines:
 *   KV_VL            float lanes per vector (1 for scalar)
 *   KV_TB            tokens whose dot products are reduced together
 *   KV_ISA_NAME      the variant's name; KV_ATTN_SYM its kernel symbol;
 *   KV_ISA_NEEDS     the KV_CPU_* features it needs (kv_cpu.h)
 *   vf               the vector type
 *   vzero vset1 vload vstore vadd vmul vmax vfma(a, b, c) = a * b + c
 *   vloadh(uint16_t *)   KV_VL float16 values as float32
 *   vloadb(uint8_t *)    KV_VL bytes b as float32 b - 128
 *   vloadn(uint8_t *, vf *lo, vf *hi)  KV_VL bytes: low and high nibbles,
 *                        each minus 8
 *   vzip(even, odd, vf *first, vf *second)   interleave lanes
 *   vhsum vhmax          horizontal sum / max
 *   vreduce_tb(vf a[KV_TB], float *out)  out[t] = vhsum(a[t])
 *   vexp                 e^x for x <= 0: kv_attn_exp.h's kv_exp_poly, lane-wise
 *                        (kv_simd_exp.h, over vsub vmin vfloor vpow2i)
 *   KV_RS, KV_RV         query rows per register block of dot products /
 *                        value sums (sized to the register file)
 * Everything here (and in kv_attn_blocks.h, the register-blocked dot
 * products and value sums it is built on) is static: each variant is its
 * own translation unit and exports one kv_attn_kernel.  The only global
 * read is kv_tiers.h's float16 table (read-only once kv_tiers_init has run).
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
 * and float32 cancellation against the zero term costs no precision.  INT4
 * codes are used in the order they are packed (even channels in low
 * nibbles): the query is permuted to match once per call, and value
 * accumulators are re-interleaved once per run.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_attn.h"
#include "kv_attn_blocks.h"
#include "kv_attn_exp.h"
#include "kv_platform.h"
#include "kv_tiers.h"

/* The kernel's scratch, after the state (kv_attn_state_floats counts it). */
typedef struct {
    float *S, *W;        /* [rows][MAXRUN]: scores then probabilities; INT8 raw group
                          * dot products, then value weights */
    float *SC, *ZR;      /* [groups][MAXRUN]: a run's scales and centred zeros (or, for
                          * INT4 keys, [dim] scales in nibble order and zeros) */
    float *TMP;          /* [MAXRUN * dim]: float16 scales and zeros being converted */
    float *QS, *Z;       /* [rows][dim] INT4 query folded with scales; [rows] terms */
    float *QN_all;       /* [heads][rows][dim]: the query in INT4 nibble order */
    float *QSUM_all;     /* [heads][rows][dim / g8]: query sums per INT8 group */
    const float *QN, *QSUM;   /* the current head's rows of the two above */
} kv_scr;

static kv_scr scratch_of(const kv_attn_geom *g, float *state)
{
    int64_t H = g->kv_heads, R = g->rows, D = g->dim;
    kv_scr x;
    x.S = state + H * R * (2 + D);
    x.W = x.S + R * MAXRUN;
    x.SC = x.W + R * MAXRUN;
    x.ZR = x.SC + MAXRUN * D;
    x.TMP = x.ZR + MAXRUN * D;
    x.QS = x.TMP + MAXRUN * D;
    x.Z = x.QS + R * D;
    x.QN_all = x.Z + R;
    x.QSUM_all = x.QN_all + H * R * D;
    x.QN = x.QN_all;
    x.QSUM = x.QSUM_all;
    return x;
}

/* A float16 value read through memcpy (INT4 scales may be 2-byte
 * misaligned), as float32 through the codecs' table (kv_tiers.h). */
static inline float ld_half(const uint16_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return kv_half(v);
}

/* ------------------------------------------------------------ prefetch */

/* Hint the first lines of each stream the next run reads.  A few lines
 * are enough: within a block a head's keys (and values) are contiguous, and
 * the hardware prefetcher follows them once they start; what it cannot guess
 * is where the next block begins.  (Hinting whole blocks measured slower: a
 * burst of hundreds of prefetches fills the miss queues the current block's
 * loads need.) */
#define KV_PF_BYTES 512

static int64_t pf_run(const kv_attn_geom *g, const kv_run *r, int64_t h)
{
    const uint8_t *p;
    int64_t nbytes, lines = 0;
    int half;
    for (half = 0; half < 2; half++) {
        kv_run_span(g, r, h, half, &p, &nbytes);
        lines += kv_prefetch_range(p, nbytes < KV_PF_BYTES ? nbytes : KV_PF_BYTES, KV_PF_BYTES);
    }
    return lines;
}

/* Whether run b starts where the hardware prefetcher, streaming run a, is
 * already going: in a's block, or within a page after its last value. */
static int follows(const kv_attn_geom *g, const kv_run *a, const kv_run *b)
{
    const uint8_t *p;
    int64_t nbytes;
    if (b->base == a->base) {
        return 1;
    }
    kv_run_span(g, a, g->kv_heads - 1, 1, &p, &nbytes);
    return b->base > a->base && b->base <= p + nbytes + 4096;
}

/* ------------------------------------------------------------ scores */

/* S[r][j] = q_r . k_j for float keys. */
static void scores_float(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                         float *S)
{
    int64_t D = g->dim, first = (h * run->stride + run->off) * D;
    if (run->fmt == KV_FMT_F32) {
        dots_all(q, g->rows, D, (const float *)run->base + first, run->n, 0, D, LD_F32, S);
    } else {
        dots_all(q, g->rows, D, (const uint16_t *)run->base + first, run->n, 0, D, LD_F16, S);
    }
}

/* float32 of `cnt` consecutive float16 values. */
static void halves_to_floats(const uint16_t *src, int64_t cnt, float *dst)
{
    int64_t i = 0;
    for (; i + KV_VL <= cnt; i += KV_VL) {
        vstore(dst + i, vloadh(src + i));
    }
    for (; i < cnt; i++) {
        dst[i] = ld_half(src + i);
    }
}

/* A run's per-token group scales and zeros ([token][group] float16 from
 * `first`) as float32, group-major: SC/ZR[k][j], the zero moved to the
 * centre of the codes: scale * c + zero = scale * (c - bias) + (zero +
 * bias * scale). */
static void group_params(const uint16_t *scales, const uint16_t *zeros, int64_t first,
                         int64_t ng, int64_t n, float bias, const kv_scr *x)
{
    int64_t j, k, cnt = n * ng;
    float *ts = x->TMP, *tz = x->TMP + cnt;
    halves_to_floats(scales + first, cnt, ng == 1 ? x->SC : ts);
    halves_to_floats(zeros + first, cnt, ng == 1 ? x->ZR : tz);
    if (ng > 1) {
        for (j = 0; j < n; j++) {
            for (k = 0; k < ng; k++) {
                x->SC[k * MAXRUN + j] = ts[j * ng + k];
                x->ZR[k * MAXRUN + j] = tz[j * ng + k];
            }
        }
    }
    for (k = 0; k < ng; k++) {
        float *sc = x->SC + k * MAXRUN, *zr = x->ZR + k * MAXRUN;
        vf vb = vset1(bias);
        for (j = 0; j + KV_VL <= n; j += KV_VL) {
            vstore(zr + j, vfma(vb, vload(sc + j), vload(zr + j)));
        }
        for (; j < n; j++) {
            zr[j] = bias * sc[j] + zr[j];
        }
    }
}

/* INT8 keys: per group, raw dot products with the centred codes, then
 * S += scale * dot + zero * sum(q) over the group, one vector pass a row. */
static void scores_int8(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                        const kv_scr *x)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t G = g->g8, ng = D / G, nq = 2 * H * T * ng, r, j, k;
    const uint8_t *codes = run->base + (h * T + run->off) * D;
    const uint16_t *scales = (const uint16_t *)(run->base + 2 * H * T * D);
    group_params(scales, scales + nq, (h * T + run->off) * ng, ng, n, 128.0f, x);
    for (k = 0; k < ng; k++) {
        const float *sc = x->SC + k * MAXRUN, *zr = x->ZR + k * MAXRUN;
        dots_all(q, R, D, codes, n, k * G, (k + 1) * G, LD_I8, x->W);
        for (r = 0; r < R; r++) {
            float *Sr = x->S + r * MAXRUN, *Wr = x->W + r * MAXRUN, qs = x->QSUM[r * ng + k];
            vf vq = vset1(qs);
            if (k == 0) {
                for (j = 0; j + KV_VL <= n; j += KV_VL) {
                    vstore(Sr + j, vfma(vload(sc + j), vload(Wr + j), vmul(vload(zr + j), vq)));
                }
                for (; j < n; j++) {
                    Sr[j] = sc[j] * Wr[j] + zr[j] * qs;
                }
            } else {
                for (j = 0; j + KV_VL <= n; j += KV_VL) {
                    vstore(Sr + j, vadd(vload(Sr + j), vfma(vload(sc + j), vload(Wr + j),
                                                             vmul(vload(zr + j), vq))));
                }
                for (; j < n; j++) {
                    Sr[j] += sc[j] * Wr[j] + zr[j] * qs;
                }
            }
        }
    }
}

#if KV_VL > 1
/* Nibble order of a chunk of 2 * KV_VL channels: the KV_VL even channels,
 * then the odd ones. */
static inline int64_t nib_slot(int64_t c)
{
    int64_t base = c - c % (2 * KV_VL), i = c - base;
    return base + (i & 1) * KV_VL + (i >> 1);
}

/* INT4 keys (KIVI: per-channel scales across the block's tokens): once per
 * run, QS_r = q_r * scale in nibble order and Z_r = q_r . (zero + 8 scale);
 * then S[r][j] = QS_r . (c_j - 8) + Z_r. */
static void scores_int4(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *q,
                        const kv_scr *x)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, r, j, c;
    const uint8_t *codes = run->base + (h * T + run->off) * D / 2;
    const uint16_t *ks = (const uint16_t *)(run->base + nel / 2) + h * D;
    const uint16_t *kz = (const uint16_t *)(run->base + nel / 2) + H * D + h * D;
    float *sc = x->TMP, *ksn = x->SC, *zk = x->ZR;
    halves_to_floats(ks, D, sc);
    halves_to_floats(kz, D, zk);
    for (c = 0; c < D; c++) {
        ksn[nib_slot(c)] = sc[c];
    }
    for (c = 0; c < D; c += KV_VL) {
        vstore(zk + c, vfma(vset1(8.0f), vload(sc + c), vload(zk + c)));
    }
    for (r = 0; r < R; r++) {
        vf z = vzero();
        for (c = 0; c < D; c += KV_VL) {
            vstore(x->QS + r * D + c, vmul(vload(x->QN + r * D + c), vload(ksn + c)));
            z = vfma(vload(q + r * D + c), vload(zk + c), z);
        }
        x->Z[r] = vhsum(z);
    }
    dots_all(x->QS, R, D, codes, n, 0, D, LD_I4, x->S);
    for (r = 0; r < R; r++) {
        float *Sr = x->S + r * MAXRUN, zr = x->Z[r];
        for (j = 0; j < n; j++) {
            Sr[j] += zr;
        }
    }
}
#endif

/* ------------------------------------------------------------ values */

static void values_float(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                         float *acc)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n;
    int64_t first = ((H + h) * run->stride + run->off) * D;
    if (run->fmt == KV_FMT_F32) {
        axpy_all(R, P, acc, NULL, (const float *)run->base + first, D, n, 0, D, LD_F32);
    } else {
        axpy_all(R, P, acc, NULL, (const uint16_t *)run->base + first, D, n, 0, D, LD_F16);
    }
}

/* Group k's value weights: W[r][j] = P[r][j] * SC[k][j] and the zeros'
 * share Z[r] = sum_j P[r][j] * ZR[k][j]. */
static void group_weights(int64_t R, int64_t n, int64_t k, const float *P, const kv_scr *x)
{
    const float *sc = x->SC + k * MAXRUN, *zr = x->ZR + k * MAXRUN;
    int64_t r, j;
    for (r = 0; r < R; r++) {
        const float *Pr = P + r * MAXRUN;
        float *Wr = x->W + r * MAXRUN;
        vf z = vzero();
        float zt = 0.0f;
        for (j = 0; j + KV_VL <= n; j += KV_VL) {
            vf p = vload(Pr + j);
            vstore(Wr + j, vmul(p, vload(sc + j)));
            z = vfma(p, vload(zr + j), z);
        }
        for (; j < n; j++) {
            Wr[j] = Pr[j] * sc[j];
            zt += Pr[j] * zr[j];
        }
        x->Z[r] = vhsum(z) + zt;
    }
}

static void values_int8(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                        float *acc, const kv_scr *x)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t G = g->g8, ng = D / G, nq = 2 * H * T * ng, k;
    const uint8_t *codes = run->base + ((H + h) * T + run->off) * D;
    const uint16_t *scales = (const uint16_t *)(run->base + 2 * H * T * D);
    group_params(scales, scales + nq, ((H + h) * T + run->off) * ng, ng, n, 128.0f, x);
    for (k = 0; k < ng; k++) {
        group_weights(R, n, k, P, x);
        axpy_all(R, x->W, acc, x->Z, codes, D, n, k * G, (k + 1) * G, LD_I8);
    }
}

#if KV_VL > 1
/* INT4 values for NR rows over one group [c0, c1): codes weighted by W,
 * even and odd channels accumulated apart and interleaved at the end. */
KV_ALWAYS void axpy4_rows(const float *W, float *A, const float *Z, const uint8_t *codes,
                          int64_t D, int64_t n, int64_t c0, int64_t c1, const int NR)
{
    int rr, u;
    int64_t c, j;
    for (c = c0; c < c1; c += 4 * KV_VL) {
        const int nb = c1 - c >= 4 * KV_VL ? 2 : 1;   /* byte vectors in this block */
        vf a[KV_RV][4], f0, f1;
        KV_UNROLL for (rr = 0; rr < NR; rr++) {
            KV_UNROLL for (u = 0; u < 4; u++) {
                a[rr][u] = vzero();
            }
        }
        if (nb == 2) {
            for (j = 0; j < n; j++) {
                vf v[4];
                vloadn(codes + (j * D + c) / 2, &v[0], &v[1]);
                vloadn(codes + (j * D + c) / 2 + KV_VL, &v[2], &v[3]);
                KV_UNROLL for (rr = 0; rr < NR; rr++) {
                    vf p = vset1(W[rr * MAXRUN + j]);
                    KV_UNROLL for (u = 0; u < 4; u++) {
                        a[rr][u] = vfma(p, v[u], a[rr][u]);
                    }
                }
            }
        } else {
            for (j = 0; j < n; j++) {
                vf v[2];
                vloadn(codes + (j * D + c) / 2, &v[0], &v[1]);
                KV_UNROLL for (rr = 0; rr < NR; rr++) {
                    vf p = vset1(W[rr * MAXRUN + j]);
                    a[rr][0] = vfma(p, v[0], a[rr][0]);
                    a[rr][1] = vfma(p, v[1], a[rr][1]);
                }
            }
        }
        KV_UNROLL for (rr = 0; rr < NR; rr++) {
            vf z = vset1(Z[rr]);
            for (u = 0; u < 2 * nb; u += 2) {
                float *d = A + rr * D + c + u * KV_VL;
                vzip(a[rr][u], a[rr][u + 1], &f0, &f1);
                vstore(d, vadd(vload(d), vadd(f0, z)));
                vstore(d + KV_VL, vadd(vload(d + KV_VL), vadd(f1, z)));
            }
        }
    }
}

static void values_int4(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                        float *acc, const kv_scr *x)
{
    int64_t H = g->kv_heads, D = g->dim, R = g->rows, n = run->n, T = run->stride;
    int64_t nel = H * T * D, G = g->g4, ng = D / G, r, k;
    const uint8_t *vcodes = run->base + nel / 2 + 4 * H * D;
    const uint8_t *codes = vcodes + (h * T + run->off) * D / 2;
    const uint16_t *scales = (const uint16_t *)(vcodes + nel / 2);
    group_params(scales, scales + nel / G, (h * T + run->off) * ng, ng, n, 8.0f, x);
    for (k = 0; k < ng; k++) {
        const float *W = x->W, *Z = x->Z;
        group_weights(R, n, k, P, x);
        for (r = 0; r + KV_RV <= R; r += KV_RV) {
            axpy4_rows(W + r * MAXRUN, acc + r * D, Z + r, codes, D, n, k * G, (k + 1) * G,
                       KV_RV);
        }
        if (KV_RV > 3 && R - r == 3) {
            axpy4_rows(W + r * MAXRUN, acc + r * D, Z + r, codes, D, n, k * G, (k + 1) * G,
                       KV_RV > 3 ? 3 : 1);
            r += 3;
        }
        if (KV_RV > 2 && R - r == 2) {
            axpy4_rows(W + r * MAXRUN, acc + r * D, Z + r, codes, D, n, k * G, (k + 1) * G,
                       KV_RV > 2 ? 2 : 1);
            r += 2;
        }
        for (; r < R; r++) {
            axpy4_rows(W + r * MAXRUN, acc + r * D, Z + r, codes, D, n, k * G, (k + 1) * G, 1);
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
        /* Sums in double, like the scalar variant's other dot products. */
        const float *qr = q + r * D;
        vf z = 0.0;
        for (c = 0; c < D; c++) {
            z += (vf)qr[c] * ld_half(kz + c);
        }
        for (j = 0; j < n; j++) {
            vf a = 0.0;
            e0 = (h * T + run->off + j) * D;
            for (c = 0; c < D; c++) {
                a += (vf)qr[c] * ld_half(ks + c) * nib(run->base, e0 + c);
            }
            S[r * MAXRUN + j] = (float)(a + z);
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
            float x = nib(vcodes, e0 + c) * ld_half(vs + (e0 + c) / G) + ld_half(vz + (e0 + c) / G);
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
/* Tokens of the run that row r sees: those at positions <= its query's. */
static inline int64_t row_visible(const kv_attn_geom *g, const kv_run *run, int64_t r)
{
    int64_t vis = g->q_pos0 + r % g->t_q - run->pos + 1;
    return vis < 0 ? 0 : (vis > run->n ? run->n : vis);
}

/* Returns whether every row sees the whole run. */
static int softmax_update(const kv_attn_geom *g, const kv_run *run, float *S, float *m,
                          float *l, float *acc)
{
    int64_t D = g->dim, R = g->rows, n = run->n, r, j, c;
    int whole = 1;
    for (r = 0; r < R; r++) {
        float *Sr = S + r * MAXRUN, mx = -INFINITY, mnew, corr, sum;
        int64_t vis = row_visible(g, run, r);
        whole &= vis == n;
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
    return whole;
}

/* ------------------------------------------------------------ kernel */

static void add_values(const kv_attn_geom *g, const kv_run *run, int64_t h, const float *P,
                       float *acc, const kv_scr *x)
{
    switch (run->fmt) {
    case KV_FMT_INT8:
        values_int8(g, run, h, P, acc, x);
        break;
    case KV_FMT_INT4:
#if KV_VL == 1
        values_int4_flat(g, run, h, P, acc);
#else
        values_int4(g, run, h, P, acc, x);
#endif
        break;
    default:
        values_float(g, run, h, P, acc);
    }
}

/* Per call: each head's query sums per INT8 group, and (SIMD variants)
 * the query in INT4 nibble order. */
static void prepare_queries(const kv_attn_geom *g, const float *q, kv_scr *x)
{
    int64_t nr = g->kv_heads * g->rows, D = g->dim, G = g->g8, ng = D / G, r, k, c;
    for (r = 0; r < nr; r++) {
        for (k = 0; k < ng; k++) {
            float s = 0.0f;
            for (c = k * G; c < (k + 1) * G; c++) {
                s += q[r * D + c];
            }
            x->QSUM_all[r * ng + k] = s;
        }
#if KV_VL > 1
        for (c = 0; c < D; c++) {
            x->QN_all[r * D + nib_slot(c)] = q[r * D + c];
        }
#endif
    }
}

static int64_t attend(const kv_attn_geom *g, const float *q, const kv_run *runs, int64_t nruns,
                      float *state)
{
    int64_t H = g->kv_heads, R = g->rows, D = g->dim, i, h, lines = 0;
    float *m = state, *l = m + H * R, *acc = l + H * R;
    kv_scr x = scratch_of(g, state);
    prepare_queries(g, q, &x);
    for (i = 0; i < nruns; i++) {
        const kv_run *run = &runs[i];
        /* Prefetch only where the next run is elsewhere in memory. */
        int pf = g->prefetch && i + 1 < nruns && !follows(g, run, &runs[i + 1]);
        for (h = 0; h < H; h++) {
            const float *qh = q + h * R * D;
            float *acch = acc + h * R * D;
            x.QN = x.QN_all + h * R * D;
            x.QSUM = x.QSUM_all + h * R * (D / g->g8);
            if (pf) {
                lines += pf_run(g, &runs[i + 1], h);
            }
            switch (run->fmt) {
            case KV_FMT_INT8:
                scores_int8(g, run, h, qh, &x);
                break;
            case KV_FMT_INT4:
#if KV_VL == 1
                scores_int4_flat(g, run, h, qh, x.S);
#else
                scores_int4(g, run, h, qh, &x);
#endif
                break;
            default:
                scores_float(g, run, h, qh, x.S);
            }
            if (softmax_update(g, run, x.S, m + h * R, l + h * R, acch)) {
                add_values(g, run, h, x.S, acch, &x);
            } else {
                /* Causal rows that see only part of the run: each row adds
                 * its visible tokens alone (a masked token's weight is 0,
                 * but 0 * inf or NaN in its value would still spoil the
                 * row). */
                kv_attn_geom g1 = *g;
                kv_run r1 = *run;
                int64_t r;
                g1.rows = 1;
                for (r = 0; r < R; r++) {
                    r1.n = (int32_t)row_visible(g, run, r);
                    if (r1.n > 0) {
                        add_values(&g1, &r1, h, x.S + r * MAXRUN, acch + r * D, &x);
                    }
                }
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

const kv_attn_kernel KV_ATTN_SYM = {KV_ISA_NAME, KV_ISA_NEEDS, supports, attend};
