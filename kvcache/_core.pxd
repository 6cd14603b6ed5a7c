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
    # The ones every update touches sit in the first cache line with the state.
    int64_t updates
    int64_t tokens_written     # positions written, per batch row
    int64_t evictions
    int64_t hits
    int64_t misses
    int64_t truncations
    int64_t prefetches         # prefetch hints issued (cache lines)
    int64_t prefetch_bytes
    # Copies in flight without the GIL (reads, large writes): the background
    # compressor leaves a busy layer alone until they finish.
    int64_t busy
    # Pads the struct to two cache lines: adjacent layers updated by
    # different threads never share a line (no false sharing).
    char _pad[16]


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
        int64_t auto_residual   # >= 0: compress blocks leaving this window
        bint track_ages         # compression configured: ring wraps renew ages
        bint zstd               # LOSSLESS packs with zstd instead of lz4
        kv_block **retired[MAX_RETIRED]  # old directories, freed at dealloc
        int n_retired
        int64_t retired_bytes

    cdef int32_t _take_block(self) except -2
    cdef int _add_chunk(self) except -1
    cdef void _release_block(self, int32_t bid) noexcept
    cdef void _trim_spares(self) noexcept
    cdef void _free_data(self, int32_t bid) noexcept
    cdef void _release_unheld(self, kv_layer *L) noexcept
    cdef void _release_tail(self, kv_layer *L, int64_t first_blk) noexcept
    cdef int64_t _run(self, const kv_layer *L, int64_t p, int64_t end,
                      int64_t *blk, int64_t *off) noexcept nogil
    cdef int64_t _held(self, const kv_layer *L) noexcept nogil
    cdef int64_t _live_bytes(self, const kv_layer *L) noexcept
    cdef int _ensure_blocks(self, kv_layer *L, int64_t a0, int64_t b0,
                            int64_t a1, int64_t b1) except -1
    cdef int _gather(self, const kv_layer *L, int64_t half, char *out,
                     int64_t *hits, int64_t *misses) except -1 nogil
    cdef int _decode(self, int32_t bid, char *dst, int halves) except -1
    cdef int _decode_nogil(self, int32_t bid, char *dst, int halves) except -1 nogil
    cdef bint _touches(self, const kv_layer *L, int64_t a, int64_t b, bint entered) noexcept
    cdef void _touch(self, const kv_layer *L, int64_t a, int64_t b, bint entered,
                     double now) noexcept
    cdef list _eligible(self, const kv_layer *L, int64_t residual, int64_t keep_first)
    cdef object _compress_block(self, const kv_layer *L, int32_t bid, int tier, double budget,
                                int64_t exact)
    cdef object _compress_pinned(self, const kv_layer *L, int32_t bid, int tier, double budget,
                                 int64_t exact, int32_t refs)
    cdef object _install_if(self, const kv_layer *L, int32_t bid, int tier, uint8_t *payload,
                            int64_t nbytes, int64_t exact, int32_t refs)
    cdef object _install(self, int32_t bid, int tier, uint8_t *payload, int64_t nbytes,
                         int64_t exact)
    cdef uint8_t *_encode_block(self, int32_t bid, int tier, int64_t exact,
                                int64_t *nbytes) except NULL
    cdef int64_t _payload_size(self, int tier, int64_t exact) noexcept nogil
    cdef void _encode_into(self, int32_t bid, int tier, int64_t exact, uint8_t *payload,
                           char *masked) noexcept nogil
    cdef list _compress_batch(self, const kv_layer *L, list blocks, int tier)
    cdef bint _unchanged(self, const kv_layer *L, int32_t bid, int32_t refs) noexcept
    cdef object _install_in_place(self, const kv_layer *L, int32_t bid, int tier,
                                  const uint8_t *encoded, int64_t nbytes, int64_t exact,
                                  int32_t refs)
    cdef void _restore_prefix(self, const uint8_t *payload, int tier, int64_t exact,
                              char *dst, int halves) noexcept nogil
    cdef cnp.ndarray _as_input(self, object x, str name)
    cdef cnp.ndarray _convert_input(self, object x, str name)
    cdef int _write(self, kv_layer *L, Py_ssize_t layer_idx, cnp.ndarray ka,
                    cnp.ndarray va, int64_t t, int64_t m) except -1
    cdef kv_layer *_layer(self, object layer_idx) except NULL
    cdef object _read(self, object layer_idx, int which)
