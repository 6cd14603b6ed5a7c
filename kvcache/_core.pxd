# Declarations of kvcache's compiled block store (see _core.pyx).
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t


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
    KV_CHUNK_SHIFT = 12
    KV_CHUNK = 4096


# One fixed-size block of the pool: `block_size` tokens of one layer and one
# batch row, keys then values, each laid out [heads][block_size][head_dim] so
# that one head's tokens are contiguous (what attention streams).
ctypedef struct kv_block:
    char *raw          # what PyMem_RawMalloc returned; NULL: descriptor unused
    char *data         # raw rounded up to KV_ALIGN
    int32_t refcount   # block-table entries pointing here; 0 while spare
    int32_t next       # next id in the spare or unused list; -1 ends it


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
    # Pads the struct to two cache lines: adjacent layers updated by
    # different threads never share a line (no false sharing).
    char _pad[40]


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
    cdef int64_t _held_slots(self, const kv_layer *L) noexcept
    cdef int _ensure_blocks(self, kv_layer *L, int64_t a0, int64_t b0,
                            int64_t a1, int64_t b1) except -1
    cdef void _gather(self, const kv_layer *L, int64_t half, char *out) noexcept nogil
    cdef cnp.ndarray _as_input(self, object x, str name)
    cdef cnp.ndarray _convert_input(self, object x, str name)
    cdef int _write(self, kv_layer *L, Py_ssize_t layer_idx, cnp.ndarray ka,
                    cnp.ndarray va, int64_t t, int64_t m) except -1
    cdef kv_layer *_layer(self, object layer_idx) except NULL
    cdef object _read(self, object layer_idx, int which)
