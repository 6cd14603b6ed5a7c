/* kv_attn_blocks.h -- the attention kernel's register blocks: dot
 * products of query rows with runs of keys (dot_tb, dot1, dots_all) and
 * probability-weighted sums of value rows (axpy_blk, axpy_rows, axpy_all),
 * for every way a run's rows are stored (float32, float16, INT8, INT4).
 *
 * Part of the kernel body: included by kv_attn_impl.h, so compiled once per
 * ISA after a kv_simd_<isa>.h, whose vector vocabulary (vf, vload, vfma,
 * KV_VL, KV_TB, KV_RS, KV_RV, ...: kv_attn_impl.h lists it) these loops are
 * written in.
 */
#include <stdint.h>

#include "kv_attn.h"

#define MAXRUN KV_ATTN_MAX_RUN

/* The inner blocks below take their shape (rows, vectors, load kind) as
 * constants once inlined, so their accumulators are fully unrolled into
 * registers: KV_RS rows x KV_TB tokens of dot products, KV_RV rows x 4
 * vectors of value sums (the ISA header sizes both to its register file). */
#define KV_ALWAYS static inline __attribute__((always_inline))
#if defined(__clang__)
#define KV_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KV_UNROLL _Pragma("GCC unroll 16")
#else
#define KV_UNROLL
#endif

/* How a kernel block reads keys or values: float32, float16, centred INT8
 * codes, or INT4 codes (two channels a byte, dotted with a query already in
 * nibble order, KV_VL bytes = 2 * KV_VL channels per step). */
enum { LD_F32, LD_F16, LD_I8, LD_I4 };

KV_ALWAYS vf ldx(const void *p, int64_t i, const int kind)
{
    return kind == LD_F32 ? vload((const float *)p + i)
         : kind == LD_F16 ? vloadh((const uint16_t *)p + i)
                          : vloadb((const uint8_t *)p + i);
}

/* out[rr * ostride + t] = q_rr . x_(j + t) over channels [c0, c1), for
 * NR rows and KV_TB tokens. */
KV_ALWAYS void dot_tb(const float *q, int64_t D, const void *k, int64_t j, int64_t c0,
                      int64_t c1, const int kind, const int NR, float *out, int64_t ostride)
{
    vf a[KV_RS][KV_TB];
    int rr, t;
    int64_t c;
    KV_UNROLL for (rr = 0; rr < NR; rr++) {
        KV_UNROLL for (t = 0; t < KV_TB; t++) {
            a[rr][t] = vzero();
        }
    }
    for (c = c0; c < c1; c += (kind == LD_I4 ? 2 : 1) * KV_VL) {
        vf qc[KV_RS], qo[KV_RS];
        KV_UNROLL for (rr = 0; rr < NR; rr++) {
            qc[rr] = vload(q + rr * D + c);
            if (kind == LD_I4) {
                qo[rr] = vload(q + rr * D + c + KV_VL);
            }
        }
        KV_UNROLL for (t = 0; t < KV_TB; t++) {
            if (kind == LD_I4) {
                vf lo, hi;
                vloadn((const uint8_t *)k + ((j + t) * D + c) / 2, &lo, &hi);
                KV_UNROLL for (rr = 0; rr < NR; rr++) {
                    a[rr][t] = vfma(hi, qo[rr], vfma(lo, qc[rr], a[rr][t]));
                }
            } else {
                vf x = ldx(k, (j + t) * D + c, kind);
                KV_UNROLL for (rr = 0; rr < NR; rr++) {
                    a[rr][t] = vfma(x, qc[rr], a[rr][t]);
                }
            }
        }
    }
    KV_UNROLL for (rr = 0; rr < NR; rr++) {
        vreduce_tb(a[rr], out + rr * ostride);
    }
}

/* One token's dot product with one row (the run's last n % KV_TB tokens). */
KV_ALWAYS float dot1(const float *q, const void *k, int64_t j, int64_t D, int64_t c0, int64_t c1,
                     const int kind)
{
    vf a = vzero(), lo, hi;
    int64_t c;
    for (c = c0; c < c1; c += (kind == LD_I4 ? 2 : 1) * KV_VL) {
        if (kind == LD_I4) {
            vloadn((const uint8_t *)k + (j * D + c) / 2, &lo, &hi);
            a = vfma(hi, vload(q + c + KV_VL), vfma(lo, vload(q + c), a));
        } else {
            a = vfma(ldx(k, j * D + c, kind), vload(q + c), a);
        }
    }
    return vhsum(a);
}

/* A[rr][c .. c + W vectors) += z_rr + sum_j P[rr][j] * x_j[c ..], NR rows. */
KV_ALWAYS void axpy_blk(const float *P, float *A, const vf *z, const void *v, int64_t D,
                        int64_t n, int64_t c, const int kind, const int NR, const int W)
{
    vf a[KV_RV][4];
    int rr, u;
    int64_t j;
    KV_UNROLL for (rr = 0; rr < NR; rr++) {
        KV_UNROLL for (u = 0; u < W; u++) {
            a[rr][u] = z[rr];
        }
    }
    for (j = 0; j < n; j++) {
        vf x[4];
        KV_UNROLL for (u = 0; u < W; u++) {
            x[u] = ldx(v, j * D + c + u * KV_VL, kind);
        }
        KV_UNROLL for (rr = 0; rr < NR; rr++) {
            vf p = vset1(P[rr * MAXRUN + j]);
            KV_UNROLL for (u = 0; u < W; u++) {
                a[rr][u] = vfma(p, x[u], a[rr][u]);
            }
        }
    }
    KV_UNROLL for (rr = 0; rr < NR; rr++) {
        KV_UNROLL for (u = 0; u < W; u++) {
            float *d = A + rr * D + c + u * KV_VL;
            vstore(d, vadd(vload(d), a[rr][u]));
        }
    }
}

/* axpy_blk over channels [c0, c1) for NR rows; Z (NULL: none) per row. */
KV_ALWAYS void axpy_rows(const float *P, float *A, const float *Z, const void *v, int64_t D,
                         int64_t n, int64_t c0, int64_t c1, const int kind, const int NR)
{
    vf z[KV_RV];
    int rr;
    int64_t c;
    KV_UNROLL for (rr = 0; rr < NR; rr++) {
        z[rr] = Z ? vset1(Z[rr]) : vzero();
    }
    for (c = c0; c + 4 * KV_VL <= c1; c += 4 * KV_VL) {
        axpy_blk(P, A, z, v, D, n, c, kind, NR, 4);
    }
    for (; c < c1; c += KV_VL) {
        axpy_blk(P, A, z, v, D, n, c, kind, NR, 1);
    }
}

/* All R rows, KV_RV at a time (the remainder with a narrower block). */
KV_ALWAYS void axpy_all(int64_t R, const float *P, float *A, const float *Z, const void *v,
                        int64_t D, int64_t n, int64_t c0, int64_t c1, const int kind)
{
    int64_t r = 0;
    for (; r + KV_RV <= R; r += KV_RV) {
        axpy_rows(P + r * MAXRUN, A + r * D, Z ? Z + r : NULL, v, D, n, c0, c1, kind, KV_RV);
    }
    /* The remaining rows in as few blocks as fit (GQA groups are often 3);
     * the NR arguments stay within KV_RV even where a branch is dead. */
    int64_t left = R - r;
    P += r * MAXRUN;
    A += r * D;
    Z = Z ? Z + r : NULL;
    if (KV_RV > 3 && left == 3) {
        axpy_rows(P, A, Z, v, D, n, c0, c1, kind, KV_RV > 3 ? 3 : 1);
        return;
    }
    if (KV_RV > 2 && left >= 2) {
        axpy_rows(P, A, Z, v, D, n, c0, c1, kind, KV_RV > 2 ? 2 : 1);
        P += 2 * MAXRUN;
        A += 2 * D;
        Z = Z ? Z + 2 : NULL;
        left -= 2;
    }
    for (; left > 0; left--) {
        axpy_rows(P, A, Z, v, D, n, c0, c1, kind, 1);
        P += MAXRUN;
        A += D;
        Z = Z ? Z + 1 : NULL;
    }
}

/* ------------------------------------------------------------ dot products of all rows */

/* Raw dot products q_r . x_j over channels [c0, c1), for every row r and
 * token j < n, into OUT[r][j] (row stride MAXRUN): KV_RS rows per block,
 * the remainder in one narrower block where it fits. */
KV_ALWAYS void dots_all(const float *q, int64_t R, int64_t D, const void *k, int64_t n,
                        int64_t c0, int64_t c1, const int kind, float *OUT)
{
    int64_t r = 0, j;
    for (; r + KV_RS <= R; r += KV_RS) {
        for (j = 0; j + KV_TB <= n; j += KV_TB) {
            dot_tb(q + r * D, D, k, j, c0, c1, kind, KV_RS, OUT + r * MAXRUN + j, MAXRUN);
        }
    }
    if (KV_RS > 2 && R - r == 2) {
        for (j = 0; j + KV_TB <= n; j += KV_TB) {
            dot_tb(q + r * D, D, k, j, c0, c1, kind, KV_RS > 2 ? 2 : 1, OUT + r * MAXRUN + j,
                   MAXRUN);
        }
        r += 2;
    }
    for (; r < R; r++) {
        for (j = 0; j + KV_TB <= n; j += KV_TB) {
            dot_tb(q + r * D, D, k, j, c0, c1, kind, 1, OUT + r * MAXRUN + j, MAXRUN);
        }
    }
    for (r = 0; r < R; r++) {
        for (j = n - n % KV_TB; j < n; j++) {
            OUT[r * MAXRUN + j] = dot1(q + r * D, k, j, D, c0, c1, kind);
        }
    }
}
