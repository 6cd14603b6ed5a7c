# Declarations of kvcache's compiled block store (see _core.pyx).
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t


cdef extern from "kv_platform.h":
    void KV_PREFETCH_T0(const void *p) noexcept nogil
    void KV_PREFETCH_T1(const void *p) noexcept nogil
    int KV_HAVE_PREFETCH
    int KV_ALIGN

# Directories of descriptor chunks replaced as the pool grows (sizes double
# from 8, so 32 covers any pool that block ids can address).
cdef enum:
    MAX_RETIRED = 32
    # Block descriptors come in chunks of KV_CHUNK that never move.
    KV_CHUNK_SHIFT = 10
    KV_CHUNK = 1024


# One fixed-size block of the pool: `block_size` tokens of one layer and one
# batch row, keys then values, each laid out [heads][block_size][head_dim] so
# that one head's tokens are contiguous (what attention streams).
ctypedef struct kv_block:
    char *raw          # what PyMem_RawMalloc returned; NULL when compressed or unused
    char *data         # raw rounded up to KV_ALIGN
    uint8_t *payload   # the compressed form (tier != KV_TIER_FULL), else NULL
    int64_t payload_bytes
    double born        # clock() when taken from the pool (or last rewritten)
    int32_t refcount   # block-table entries pointing here; 0 while spare
    int32_t next       # next id in the spare or unused list; -1 ends it
    int32_t tier       # enum kv_tier
    int32_t flags      # KV_FLAG_*
    int32_t exact_rows  # leading slots kept verbatim after a quantized payload


cdef extern from "kv_tiers.h":
    enum:
        KV_TIER_FULL
        KV_TIER_FP16
        KV_TIER_INT8
        KV_TIER_INT4
        KV_TIER_LOSSLESS
    ctypedef struct kv_shape:
        int64_t heads, tokens, dim, itemsize, g8, g4
    void kv_tiers_init()
    float kv_half_to_float(uint16_t h) nogil
    uint16_t kv_float_to_half(float f) nogil
    int64_t kv_payload_bytes(int tier, const kv_shape *s) nogil
    ctypedef struct kv_codec_table:
        const char *name
        void (*encode_fp16)(const kv_shape *, const void *, uint8_t *) noexcept nogil
        void (*decode_fp16)(const kv_shape *, const uint8_t *, void *, int) noexcept nogil
        void (*encode_int8)(const kv_shape *, const void *, uint8_t *) noexcept nogil
        void (*decode_int8)(const kv_shape *, const uint8_t *, void *, int) noexcept nogil
        void (*encode_int4)(const kv_shape *, const void *, uint8_t *) noexcept nogil
        void (*decode_int4)(const kv_shape *, const uint8_t *, void *, int) noexcept nogil
    const kv_codec_table *kv_codecs_select(int allow_simd)
    void kv_shuffle(const uint8_t *inp, uint8_t *out, int64_t n, int64_t itemsize) nogil
    void kv_unshuffle(const uint8_t *inp, uint8_t *out, int64_t n, int64_t itemsize) nogil
    double kv_block_rel_error(const kv_shape *s, const void *exact, const void *approx) nogil


cdef extern from "kv_attn.h":
    enum:
        KV_FMT_F32
        KV_FMT_F16
        KV_FMT_INT8
        KV_FMT_INT4
        KV_ATTN_MAX_RUN
        KV_CPU_AVX2
        KV_CPU_AVX512
        KV_CPU_NEON
        KV_CPU_OS_YMM
        KV_CPU_OS_ZMM
        KV_CPU_AVX512_VNNI
    ctypedef struct kv_run:
        const uint8_t *base
        int64_t pos
        int32_t fmt, stride, off, n
    ctypedef struct kv_attn_geom:
        int64_t kv_heads, dim, rows, t_q, q_pos0, g8, g4
        int prefetch
    ctypedef struct kv_attn_kernel:
        const char *name
        int needs
        int (*supports)(const kv_attn_geom *g) noexcept nogil
        int64_t (*attend)(const kv_attn_geom *g, const float *q, const kv_run *runs,
                          int64_t nruns, float *state) noexcept nogil
    const kv_attn_kernel **kv_attn_kernels
    int kv_attn_runnable(const kv_attn_kernel *k) nogil
    const kv_attn_kernel *kv_attn_select(int allow_simd) nogil
    int kv_cpu_features() nogil
    int64_t kv_attn_state_floats(const kv_attn_geom *g) nogil
    void kv_attn_state_init(const kv_attn_geom *g, float *state) nogil
    void kv_attn_finish(const kv_attn_geom *g, const float *state, float *out) nogil
    void kv_run_span(const kv_attn_geom *g, const kv_run *r, int64_t head, int half,
                     const uint8_t **p, int64_t *nbytes) nogil
    int64_t kv_prefetch_range(const void *p, int64_t nbytes, int64_t hot) nogil


cdef enum:
    # LOSSLESS was tried and did not shrink the block: it stays full precision
    # and is not tried again.
    KV_FLAG_INCOMPRESSIBLE = 1
    # Being encoded without the GIL (pinned by an extra reference).
    KV_FLAG_ENCODING = 2
    # A LOSSLESS payload packed by zstd (else lz4).
    KV_FLAG_ZSTD = 4


# The per-layer counters, one struct: CacheStats reads them as one structured
# array (kvcache.stats.COUNTER_DTYPE declares the same fields in this order).
# The ones every update touches come first, in the layer's first cache line.
ctypedef struct kv_counters:
    int64_t updates
    int64_t tokens_written     # positions written, per batch row
    int64_t evictions
    int64_t hits
    int64_t misses
    int64_t truncations
    int64_t prefetches         # prefetch hints issued (cache lines)
    int64_t prefetch_bytes


# Per-layer state.  Held positions are [0, min(S, lo)) and [lo, n), S the sink
# count.  Position p lives in slot p when p < S, else in slot
# S + (p - S) % (cap - S): linear until the window wraps, a ring after.
ctypedef struct kv_layer:
    int64_t n           # tokens logically in the layer (absolute length)
    int64_t lo          # first held position of the window
    int64_t cap         # capacity in tokens (a bound: blocks come on first write)
    int64_t nblk        # table entries per batch row: ceil(cap / block_size)
    int32_t *table      # [batch][nblk] block ids, -1 where no block yet
    # Counters, per layer so threads on different layers never share one.
    kv_counters c
    # Copies in flight without the GIL (reads, large writes): the background
    # compressor leaves a busy layer alone until they finish.
    int64_t busy
    # Bumped by every change that can move a held position to another block
    # or another block to a table entry (rewrite, truncation, ring eviction,
    # growth, reorder, reset); plain appends leave it.  A compression plan
    # made from the layer's candidates is applied only at the same epoch.
    int64_t epoch
    # Pads the struct to two cache lines: adjacent layers updated by
    # different threads never share a line (no false sharing).
    char _pad[8]


# One step of a walk over positions (kvcache/_layout.pxi): `n` consecutive
# positions from `pos`, in consecutive slots of table entry `blk` from `off`.
ctypedef struct kv_span:
    int64_t pos, n, blk, off


# A walk over two position ranges [a0, b0) then [a1, b1) (the held ones:
# [0, min(S, lo)) and [lo, n)), one span per block piece.
ctypedef struct kv_walk:
    int64_t p, end, a1, b1
    int second


# What one update does (kvcache/_write.pxi): computed by a pure function of
# the layer's extent and the call, committed after the blocks are in place.
ctypedef struct kv_write_plan:
    int status          # WRITE_OK or the WRITE_* error
    int64_t start       # first position written: seq_len - t
    int64_t n_t, lo_t   # the layer's extent after the truncation part
    int64_t held_after  # positions held afterwards if nothing is evicted
    int64_t lo_new      # first held window position afterwards
    int64_t evicted     # positions evicted, over every batch row
    int64_t a0, b0, a1, b1   # positions written: [a0, b0) and [a1, b1)
    int64_t written     # (b0 - a0) + (b1 - a1)


cdef class KVStore:
    cdef:
        int64_t num_layers, batch, heads, head_dim, itemsize
        int64_t block_size, block_shift   # block_size == 1 << block_shift
        int64_t sinks, initial_cap, max_capacity
        int64_t row_bytes       # one token of one head: head_dim * itemsize
        int64_t half_bytes      # the K (or V) half of a block
        int64_t block_bytes     # both halves
        int typenum
        bint ring, metrics, growth_enabled
        object _dtype
        kv_layer *layers        # KV_ALIGN-aligned, inside layers_raw
        void *layers_raw
        kv_block **bdir         # directory of descriptor chunks
        int64_t ndir            # directory slots
        int64_t nchunks         # chunks allocated
        int64_t nblocks         # descriptors handed out (high-water mark)
        int64_t blocks_alloc    # descriptors the chunks have room for
        int32_t spare_head      # spare blocks: data kept for reuse
        int32_t unused_head     # descriptors without data
        int64_t n_spare, max_spare, n_data_blocks
        int64_t n_compressed, payload_total   # compressed blocks and their bytes
        kv_shape shape          # one block half, for the tier codecs
        object clock            # time source for block ages (seconds)
        # >= 0: call _auto_compress when a block boundary passes n - auto_lag
        int64_t auto_lag
        bint track_ages         # compression configured: ring wraps renew ages
        bint zstd               # LOSSLESS packs with zstd instead of lz4
        kv_block **retired[MAX_RETIRED]  # old directories, freed at dealloc
        int n_retired
        int64_t retired_bytes
