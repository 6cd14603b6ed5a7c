/* kv_attn.h -- decode attention over kvcache's block tables.
 *
 * softmax(q . K^T * scale) . V over runs of cached tokens, read where they
 * lie (full precision, FP16, INT8, INT4: the quantized ones dequantized
 * inside the dot products), with an online softmax in float32.  One kernel
 * source (src/kv_attn_impl.h over src/kv_attn_blocks.h) is compiled once per
 * ISA (kv_attn_scalar.c, kv_attn_avx2.c, kv_attn_avx512.c, kv_attn_neon.c);
 * kv_attn.c keeps the table of the variants built, and kv_cpu.h's one rule
 * picks from it (the tier codecs are dispatched the same way, kv_tiers.h).
 *
 * Callers own every buffer; kernels allocate nothing and touch no globals,
 * so they run without the GIL, several at once on different outputs.
 */
#ifndef KV_ATTN_H
#define KV_ATTN_H

#include <stdint.h>

#include "kv_cpu.h"
#include "kv_platform.h"

/* How the tokens of a run are stored.  The F32/F16 layouts are a block's:
 * keys [heads][stride][dim] then values the same; stride is the block size,
 * or the count of verbatim rows kept after a quantized payload.  INT8 and
 * INT4 runs point at a whole payload laid out as kv_tiers.h describes. */
enum kv_fmt {
    KV_FMT_F32 = 0,
    KV_FMT_F16 = 1,
    KV_FMT_INT8 = 2,
    KV_FMT_INT4 = 3
};

/* Longest run a kernel call takes (its score rows are this long); callers
 * split longer ones.  */
#define KV_ATTN_MAX_RUN 256

/* Consecutive positions [pos, pos + n) stored in slots [off, off + n). */
typedef struct {
    const uint8_t *base;
    int64_t pos;
    int32_t fmt;       /* enum kv_fmt */
    int32_t stride;    /* slots per head in this layout */
    int32_t off;
    int32_t n;         /* 1 .. KV_ATTN_MAX_RUN */
} kv_run;

typedef struct {
    int64_t kv_heads, dim;
    int64_t rows;      /* query rows per KV head: (query heads per KV head) * t_q */
    int64_t t_q;       /* row r is query r % t_q, at position q_pos0 + r % t_q */
    int64_t q_pos0;
    int64_t g8, g4;    /* INT8 / INT4 value group sizes (channels) */
    int prefetch;      /* hint the next run's lines while computing one */
} kv_attn_geom;

/* Float32 state of one batch row: running max m, sum l and output
 * accumulator per query row, then the kernel's scratch.  State layout:
 * m[kv_heads*rows] | l[kv_heads*rows] | acc[kv_heads*rows][dim] | scratch. */
int64_t kv_attn_state_floats(const kv_attn_geom *g);
void kv_attn_state_init(const kv_attn_geom *g, float *state);
/* out[kv_heads*rows][dim] = acc / l (0 for a row that saw no key). */
void kv_attn_finish(const kv_attn_geom *g, const float *state, float *out);

/* One compiled variant.  `attend` folds `nruns` runs into `state` for the
 * queries `q` ([kv_heads*rows][dim], already multiplied by the scale) and
 * returns the prefetch hints it issued (cache lines).  `supports` says
 * whether the variant's fast paths cover this geometry (the scalar one
 * covers every geometry). */
typedef struct {
    const char *name;
    int needs;         /* the KV_CPU_* features it runs on (0: any CPU) */
    int (*supports)(const kv_attn_geom *g);
    int64_t (*attend)(const kv_attn_geom *g, const float *q, const kv_run *runs,
                      int64_t nruns, float *state);
} kv_attn_kernel;

/* Every variant compiled in, best first; NULL-terminated (the last is the
 * scalar one, which needs nothing). */
extern const kv_attn_kernel *const kv_attn_kernels[];
/* Whether this CPU (and OS) runs the variant. */
int kv_attn_runnable(const kv_attn_kernel *k);
/* The best variant this CPU and OS run, or the scalar one when allow_simd is
 * 0 (the KVCACHE_DISABLE_SIMD kill switch): kv_codecs_select's rule. */
const kv_attn_kernel *kv_attn_select(int allow_simd);

/* The bytes a kernel streams for one run, one KV head and one half (0:
 * keys, 1: values): the token rows or codes (a few scale bytes beside them
 * are left out).  What the prefetches hint. */
void kv_run_span(const kv_attn_geom *g, const kv_run *r, int64_t head, int half,
                 const uint8_t **p, int64_t *nbytes);

/* Hint `nbytes` from p: the first `hot` bytes to every cache level (T0), the
 * rest to L2 and beyond (T1).  Returns the lines hinted (0 where the compiler
 * has no prefetch builtin). */
int64_t kv_prefetch_range(const void *p, int64_t nbytes, int64_t hot);

#endif /* KV_ATTN_H */
