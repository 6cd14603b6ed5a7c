# cython: language_level=3
"""Compiled block store of kvcache.

The store keeps every layer's keys and values in fixed-size blocks drawn from
one pool per cache, with a block table per layer and batch row (the
PagedAttention layout, on the CPU).  Tokens are never moved once written:
appending touches one block, ring eviction reuses the evicted tokens' slots,
growth only lengthens the block tables.  Blocks come from the pool on first
write, so memory follows the tokens held, not the capacity.

Policy (growth strategies, statistics objects, logging) lives in plain Python
(:mod:`kvcache.cache`); this module only calls back into it when a layer runs
out of capacity with growth enabled.

Ownership: the store owns every block and table; they are freed exactly once,
in ``__dealloc__`` or when released to the pool beyond its spare bound.
Arrays returned to Python (``keys``, ``values``, ``positions``) are always
fresh copies: they never alias a block, so they stay valid after any later
call.
"""

cimport numpy as cnp
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport int32_t, int64_t, uint16_t, uintptr_t
from libc.string cimport memcpy, memset

import operator
import os
from time import monotonic, perf_counter

import numpy as np

cnp.import_array()
kv_tiers_init()

# Tier codes for Python (kvcache.compression): _compress(tier=ADAPTIVE_TIER)
# picks a tier per block.
TIER_FP16 = KV_TIER_FP16
TIER_INT8 = KV_TIER_INT8
TIER_INT4 = KV_TIER_INT4
TIER_LOSSLESS = KV_TIER_LOSSLESS
ADAPTIVE_TIER = 5
# Block flags a save file records (kvcache.fileformat).
FLAG_INCOMPRESSIBLE = KV_FLAG_INCOMPRESSIBLE
FLAG_ZSTD = KV_FLAG_ZSTD
TIER_FULL = KV_TIER_FULL
TIER_NAMES = {KV_TIER_FULL: "full", KV_TIER_FP16: "fp16", KV_TIER_INT8: "int8",
              KV_TIER_INT4: "int4", KV_TIER_LOSSLESS: "lossless"}

cdef enum:
    # Copies larger than this many bytes release the GIL; below it, releasing
    # and re-taking the GIL costs more than the copy.
    NOGIL_COPY_BYTES = 65536
    # Most blocks a pool may hold (ids are int32 table entries).
    MAX_BLOCKS = 2147483000
    # Blocks encoded per GIL-free pass of _compress_batch (its scratch then
    # stays small enough to come from the heap's warm, reused memory).
    COMPRESS_CHUNK = 4

# Largest length or index accepted (2**62): sums of two never overflow int64.
cdef int64_t MAX_INDEX = 1LL << 62


class CacheFullError(IndexError):
    """A write needs more capacity than the cache has and may not evict.

    Raised with ``overflow="error"`` when capacity (after any growth allowed
    by ``max_capacity``) cannot hold the tokens; nothing is written.
    """


_DTYPES = {"float16": (cnp.NPY_FLOAT16, 2), "float32": (cnp.NPY_FLOAT, 4)}


cdef inline int64_t _as_int64(object x, str name, object exc) except? -1:
    """`x` as an integer (operator.index semantics).  A value beyond 64 bits
    raises `exc` (IndexError for an index, ValueError for a length) rather
    than OverflowError: it is out of range like any other bad index."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(x):
        x = operator.index(x)            # TypeError for non-integers
    v = PyLong_AsLongLongAndOverflow(x, &overflow)
    if overflow or v > MAX_INDEX or v < -MAX_INDEX:
        raise exc(f"{name} {x} is out of range")
    return v


cdef inline int64_t _min(int64_t a, int64_t b) noexcept nogil:
    return a if a < b else b


cdef inline int64_t _max(int64_t a, int64_t b) noexcept nogil:
    return a if a > b else b


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void _copy_row(char *dst, const char *src, int64_t n_items,
                           int64_t stride, int64_t itemsize) noexcept nogil:
    """Copy one head_dim row of `n_items` elements read with byte `stride`.

    Element copies go through memcpy: a strided input view may be unaligned,
    and a fixed-size memcpy compiles to a plain load where that is allowed.
    """
    cdef int64_t i
    if stride == itemsize:
        memcpy(dst, src, n_items * itemsize)
    elif itemsize == 2:
        for i in range(n_items):
            memcpy(dst + 2 * i, src + i * stride, 2)
    else:
        for i in range(n_items):
            memcpy(dst + 4 * i, src + i * stride, 4)


cdef inline kv_block *_blk(KVStore s, int64_t bid) noexcept nogil:
    """Descriptor of block `bid` (see KVStore._add_chunk for the layout)."""
    return &s.bdir[bid >> KV_CHUNK_SHIFT][bid & (KV_CHUNK - 1)]


cdef class KVStore:
    """The compiled store behind :class:`kvcache.KVCache` (use that class)."""

    def __cinit__(self, *args, **kwargs):
        # Everything NULL/zero: an uninitialised store has no layers, so every
        # layer-indexed call raises IndexError and __dealloc__ frees nothing.
        self.layers = NULL
        self.bdir = NULL
        self.num_layers = 0
        self.spare_head = -1
        self.unused_head = -1
        self.n_retired = 0
        self.retired_bytes = 0
        self.clock = None
        self.auto_residual = -1

    def __dealloc__(self):
        cdef int64_t i
        if self.layers != NULL:
            for i in range(self.num_layers):
                PyMem_RawFree(self.layers[i].table)
            PyMem_RawFree(self.layers_raw)
            self.layers = NULL
        if self.bdir != NULL:
            for i in range(self.nblocks):
                PyMem_RawFree(_blk(self, i).raw)     # NULL when compressed or unused
                PyMem_RawFree(_blk(self, i).payload)  # NULL unless compressed
            for i in range(self.nchunks):
                PyMem_RawFree(self.bdir[i])
            PyMem_RawFree(self.bdir)
            self.bdir = NULL
        for i in range(self.n_retired):
            PyMem_RawFree(self.retired[i])
        self.n_retired = 0

    def _init_store(self, int64_t num_layers, int64_t num_kv_heads, int64_t head_dim,
                    int64_t max_seq_len, int64_t batch_size, str dtype,
                    int64_t block_size, int64_t sink_tokens, bint ring, bint metrics,
                    int64_t group8=64, int64_t group4=32, object clock=None):
        """Allocate the layer tables.  Arguments are validated by KVCache."""
        cdef int64_t i
        cdef kv_layer *L
        if self.layers != NULL:
            raise ValueError("the store is already initialised")
        self.typenum, self.itemsize = _DTYPES[dtype]
        self._dtype = np.dtype(dtype)
        self.num_layers = 0
        self.batch = batch_size
        self.heads = num_kv_heads
        self.head_dim = head_dim
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.block_shift = 0
        while (1 << self.block_shift) < block_size:
            self.block_shift += 1
        self.sinks = sink_tokens
        self.initial_cap = max_seq_len
        self.max_capacity = max_seq_len
        self.ring = ring
        self.metrics = metrics
        self.growth_enabled = False
        self.clock = clock if clock is not None else monotonic
        self.shape.heads = num_kv_heads
        self.shape.tokens = block_size
        self.shape.dim = head_dim
        self.shape.itemsize = self.itemsize
        self.shape.g8 = group8
        self.shape.g4 = group4
        self.row_bytes = head_dim * self.itemsize
        self.half_bytes = num_kv_heads * block_size * self.row_bytes
        self.block_bytes = 2 * self.half_bytes
        # One spare block per layer and row lets a truncate-then-append cycle
        # (speculative decoding) reuse memory without going back to malloc.
        self.max_spare = num_layers * batch_size
        self.layers_raw = PyMem_RawMalloc(num_layers * sizeof(kv_layer) + KV_ALIGN)
        if self.layers_raw == NULL:
            raise MemoryError(f"cannot allocate {num_layers} layer descriptors")
        self.layers = <kv_layer *>((<uintptr_t>self.layers_raw + KV_ALIGN - 1)
                                   & ~(<uintptr_t>KV_ALIGN - 1))
        for i in range(num_layers):
            L = &self.layers[i]
            L.n = L.lo = 0
            L.busy = 0
            L.hits = L.misses = L.evictions = L.updates = 0
            L.tokens_written = L.truncations = L.prefetches = L.prefetch_bytes = 0
            L.cap = 0
            L.nblk = 0
            L.table = NULL
        self.num_layers = num_layers
        for i in range(num_layers):
            _set_capacity(self, &self.layers[i], max_seq_len)

    # ------------------------------------------------------------------ pool

    cdef int32_t _take_block(self) except -2:
        """A block with refcount 1: a spare one, else freshly allocated."""
        cdef int32_t bid
        cdef char *raw
        cdef double now = self.clock()
        if self.spare_head >= 0:
            bid = self.spare_head
            self.spare_head = _blk(self, bid).next
            self.n_spare -= 1
            _blk(self, bid).refcount = 1
            _blk(self, bid).born = now
            return bid
        if self.unused_head >= 0:
            bid = self.unused_head
        else:
            if self.nblocks == self.blocks_alloc:
                if self.blocks_alloc + KV_CHUNK > MAX_BLOCKS:
                    raise MemoryError(f"the block pool is limited to {MAX_BLOCKS} blocks")
                self._add_chunk()
            bid = <int32_t>self.nblocks
            _blk(self, bid).raw = NULL
            _blk(self, bid).next = -1
        raw = <char *>PyMem_RawMalloc(self.block_bytes + KV_ALIGN)
        if raw == NULL:
            if bid == self.nblocks:        # a new descriptor: park it as unused
                self.nblocks += 1
                _blk(self, bid).next = self.unused_head
                self.unused_head = bid
            raise MemoryError(f"cannot allocate a block of {self.block_bytes} bytes")
        if bid == self.unused_head:
            self.unused_head = _blk(self, bid).next
        else:
            self.nblocks += 1
        _blk(self, bid).raw = raw
        _blk(self, bid).data = <char *>(
            (<uintptr_t>raw + KV_ALIGN - 1) & ~(<uintptr_t>KV_ALIGN - 1))
        _blk(self, bid).refcount = 1
        _blk(self, bid).next = -1
        _blk(self, bid).payload = NULL
        _blk(self, bid).payload_bytes = 0
        _blk(self, bid).tier = KV_TIER_FULL
        _blk(self, bid).flags = 0
        _blk(self, bid).exact_rows = 0
        _blk(self, bid).born = now
        self.n_data_blocks += 1
        return bid

    cdef int _add_chunk(self) except -1:
        """Room for KV_CHUNK more descriptors.

        Descriptors live in fixed chunks that never move, so a pool of any
        size grows in O(1) (no copy, no latency spike) and a thread copying
        without the GIL keeps valid descriptor pointers.  Only the small
        directory of chunk pointers is ever replaced; an old directory is
        retired, not freed, because such a thread may still be reading it
        (sizes double, so the retired ones add up to less than the live one).
        """
        cdef kv_block **grown
        cdef int64_t new_dir
        cdef kv_block *chunk
        if self.nchunks == self.ndir:
            new_dir = _max(8, 2 * self.ndir)
            if self.n_retired == MAX_RETIRED:
                raise MemoryError("the block pool cannot grow further")
            grown = <kv_block **>PyMem_RawMalloc(new_dir * sizeof(kv_block *))
            if grown == NULL:
                raise MemoryError(f"cannot grow the block directory to {new_dir} chunks")
            if self.bdir != NULL:
                memcpy(grown, self.bdir, self.nchunks * sizeof(kv_block *))
                self.retired[self.n_retired] = self.bdir
                self.n_retired += 1
                self.retired_bytes += self.ndir * sizeof(kv_block *)
            self.bdir = grown
            self.ndir = new_dir
        chunk = <kv_block *>PyMem_RawMalloc(KV_CHUNK * sizeof(kv_block))
        if chunk == NULL:
            raise MemoryError(f"cannot allocate {KV_CHUNK} block descriptors")
        self.bdir[self.nchunks] = chunk
        self.nchunks += 1
        self.blocks_alloc += KV_CHUNK
        return 0

    cdef void _release_block(self, int32_t bid) noexcept:
        """Drop one reference; at zero keep the block spare or free it."""
        cdef kv_block *b = _blk(self, bid)
        b.refcount -= 1
        if b.refcount > 0:
            return
        b.flags = 0
        if self.n_spare < self.max_spare and b.tier == KV_TIER_FULL:
            b.next = self.spare_head
            self.spare_head = bid
            self.n_spare += 1
        else:
            self._free_data(bid)

    cdef void _free_data(self, int32_t bid) noexcept:
        """Return a block's memory to the allocator; its descriptor becomes unused."""
        cdef kv_block *b = _blk(self, bid)
        if b.raw != NULL:
            PyMem_RawFree(b.raw)
            self.n_data_blocks -= 1
        if b.payload != NULL:
            PyMem_RawFree(b.payload)
            self.payload_total -= b.payload_bytes
            self.n_compressed -= 1
        b.raw = NULL
        b.data = NULL
        b.payload = NULL
        b.payload_bytes = 0
        b.tier = KV_TIER_FULL
        b.exact_rows = 0
        b.next = self.unused_head
        self.unused_head = bid

    cdef void _trim_spares(self) noexcept:
        """Free spare blocks beyond max_spare."""
        cdef int32_t bid
        while self.n_spare > self.max_spare:
            bid = self.spare_head
            self.spare_head = _blk(self, bid).next
            self.n_spare -= 1
            self._free_data(bid)

    cdef void _release_unheld(self, kv_layer *L) noexcept:
        """Release the blocks (every row) in which the layer holds no slot.

        Linear layout: everything past position n.  A wrapped ring: blocks
        whose slots all fell out of the held set (a truncation behind the
        window); the ring's later writes allocate them again on demand.
        """
        cdef int64_t k, p, end, c, j, off, r
        cdef char *held_blk
        if L.lo <= self.sinks:
            self._release_tail(L, _ceil_div(L.n, self.block_size))
            return
        held_blk = <char *>PyMem_RawMalloc(L.nblk)
        if held_blk == NULL:
            return                      # only an optimisation: keep the blocks
        memset(held_blk, 0, L.nblk)
        for k in range(2):
            p = 0 if k == 0 else L.lo
            end = _min(self.sinks, L.lo) if k == 0 else L.n
            while p < end:
                c = self._run(L, p, end, &j, &off)
                held_blk[j] = 1
                p += c
        for j in range(L.nblk):
            if not held_blk[j]:
                for r in range(self.batch):
                    if L.table[r * L.nblk + j] >= 0:
                        self._release_block(L.table[r * L.nblk + j])
                        L.table[r * L.nblk + j] = -1
        PyMem_RawFree(held_blk)

    cdef void _release_tail(self, kv_layer *L, int64_t first_blk) noexcept:
        """Release every row's blocks from table index `first_blk` on."""
        cdef int64_t r, j
        cdef int32_t *row
        for r in range(self.batch):
            row = L.table + r * L.nblk
            for j in range(first_blk, L.nblk):
                if row[j] >= 0:
                    self._release_block(row[j])
                    row[j] = -1

    # --------------------------------------------------------------- mapping

    cdef int64_t _held(self, const kv_layer *L) noexcept nogil:
        return _min(self.sinks, L.lo) + L.n - L.lo

    cdef int64_t _run(self, const kv_layer *L, int64_t p, int64_t end,
                      int64_t *blk, int64_t *off) noexcept nogil:
        """Block-table index and offset of position p's slot, and how many
        positions from p (< end) follow it in consecutive slots of that block.

        Called for every run of every update, so it avoids integer division
        (tens of cycles each): block sizes are powers of two, and the window
        modulo is taken only once the ring has wrapped.
        """
        cdef int64_t s, lim, d, w
        if p < self.sinks:
            s = p
            lim = self.sinks - p
        else:
            d = p - self.sinks
            w = L.cap - self.sinks
            if d >= w:
                d = d % w
            s = self.sinks + d
            lim = L.cap - s
        blk[0] = s >> self.block_shift
        off[0] = s & (self.block_size - 1)
        return _min(_min(end - p, lim), self.block_size - off[0])

    cdef int _ensure_blocks(self, kv_layer *L, int64_t a0, int64_t b0,
                            int64_t a1, int64_t b1) except -1:
        """Give every slot of positions [a0, b0) and [a1, b1), in every row, a
        full-precision block of its own (refcount 1).  All-or-nothing: on
        an exception (MemoryError, the clock) no table entry changes."""
        cdef int64_t p, c, j, off, r, need = 0, used = 0, i, rng, a, b
        cdef int32_t bid, old
        cdef int32_t *row
        cdef int32_t stack_ids[32]
        cdef int32_t *ids = stack_ids
        cdef int pass_
        for pass_ in range(2):
            # Pass 0 counts the entries needing a new (or unshared) block and
            # takes that many from the pool; pass 1 installs them, copying a
            # shared block first (copy-on-write).
            for r in range(self.batch):
                row = L.table + r * L.nblk
                for rng in range(2):
                    a = a0 if rng == 0 else a1
                    b = b0 if rng == 0 else b1
                    p = a
                    while p < b:
                        c = self._run(L, p, b, &j, &off)
                        old = row[j]
                        if (old < 0 or _blk(self, old).refcount > 1
                                or _blk(self, old).tier != KV_TIER_FULL):
                            if pass_ == 0:
                                need += 1
                            else:
                                bid = ids[used]
                                used += 1
                                if old >= 0:
                                    # Copy-on-write of a shared block, or a
                                    # compressed block written again: it comes
                                    # back to full precision (decoded whole).
                                    self._decode(old, _blk(self, bid).data, 3)
                                    self._release_block(old)
                                row[j] = bid
                        p += c
            if pass_ == 1:
                break
            if need == 0:
                return 0
            if need > 32:
                ids = <int32_t *>PyMem_RawMalloc(need * sizeof(int32_t))
                if ids == NULL:
                    raise MemoryError(f"cannot plan {need} block allocations")
            try:
                for i in range(need):
                    ids[i] = self._take_block()
                    used += 1
            except BaseException:          # MemoryError, or a clock that raised
                for i in range(used):
                    self._release_block(ids[i])
                if ids != stack_ids:
                    PyMem_RawFree(ids)
                raise
            used = 0
        for i in range(used, need):        # pass 0 counts a revisited block twice
            self._release_block(ids[i])
        if ids != stack_ids:
            PyMem_RawFree(ids)
        return 0

    cdef int _gather(self, const kv_layer *L, int64_t half, char *out,
                     int64_t *hits, int64_t *misses) except -1 nogil:
        """Copy the held tokens of one half (0: keys, half_bytes: values) into
        `out`, laid out [batch][heads][held][head_dim], in position order.

        Tokens of compressed blocks are decoded (the whole block, into a
        scratch buffer owned by this call, so concurrent readers of other
        layers never share one) and counted as misses; the rest are hits.
        """
        # The layer's extent is read once: `out` was sized from it, and the
        # copy must not follow a length that changes under a released GIL.
        cdef int64_t n = L.n, lo = L.lo
        cdef int64_t nh = _min(self.sinks, lo) + n - lo, r, h, i, p, c, j, off, k, end, start
        cdef int64_t head_stride = self.block_size * self.row_bytes
        cdef const int32_t *row
        cdef const char *src
        cdef char *dst
        cdef char *scratch = NULL
        cdef kv_block *b
        try:
            for r in range(self.batch):
                row = L.table + r * L.nblk
                dst = out + r * self.heads * nh * self.row_bytes
                i = 0
                for k in range(2):
                    start = 0 if k == 0 else lo
                    end = _min(self.sinks, lo) if k == 0 else n
                    p = start
                    while p < end:
                        c = self._run(L, p, end, &j, &off)
                        b = _blk(self, row[j])
                        if b.tier == KV_TIER_FULL:
                            src = b.data
                            hits[0] += c
                        else:
                            if scratch == NULL:
                                scratch = <char *>PyMem_RawMalloc(self.block_bytes)
                                if scratch == NULL:
                                    with gil:
                                        raise MemoryError("cannot allocate a decode buffer")
                            self._decode_nogil(row[j], scratch, 1 if half == 0 else 2)
                            src = scratch
                            misses[0] += c
                        src += half + off * self.row_bytes
                        for h in range(self.heads):
                            memcpy(dst + (h * nh + i) * self.row_bytes,
                                   src + h * head_stride, c * self.row_bytes)
                        p += c
                        i += c
        finally:
            PyMem_RawFree(scratch)
        return 0

    cdef int _decode_nogil(self, int32_t bid, char *dst, int halves) except -1 nogil:
        """Write block `bid` at full precision into `dst` (block_bytes): the
        halves named by `halves` (1: keys, 2: values, 3: both; LOSSLESS
        always decodes both)."""
        cdef kv_block *b = _blk(self, bid)
        if b.tier == KV_TIER_FULL:
            memcpy(dst, b.data, self.block_bytes)
        elif b.tier != KV_TIER_LOSSLESS:
            _decode_payload(&self.shape, b.tier, b.payload, dst, halves)
            self._restore_prefix(b.payload, b.tier, b.exact_rows, dst, halves)
        else:
            with gil:                      # the LZ4 codec is the lz4 package's
                self._decode(bid, dst, halves)
        return 0

    cdef int _decode(self, int32_t bid, char *dst, int halves) except -1:
        cdef kv_block *b = _blk(self, bid)
        cdef bytes plain
        if b.tier != KV_TIER_LOSSLESS:
            return self._decode_nogil(bid, dst, halves)
        plain = _lossless_unpack((<char *>b.payload)[:b.payload_bytes], self.block_bytes,
                                 b.flags & KV_FLAG_ZSTD)
        if len(plain) != self.block_bytes:
            raise ValueError(f"a lossless block decoded to {len(plain)} bytes, "
                             f"expected {self.block_bytes}")
        kv_unshuffle(<const uint8_t *><char *>plain, <uint8_t *>dst,
                     self.block_bytes // self.itemsize, self.itemsize)
        return 0

    # ------------------------------------------------------------ public API

    def update(self, layer_idx, object k, object v, seq_len):
        """Write ``k``/``v`` at positions ``seq_len - t .. seq_len - 1`` of the
        layer and set its length to ``seq_len`` (``t = k.shape[2]``).

        Appends, overwrites in place or truncates by that one rule; see
        :class:`kvcache.KVCache` for the full statement.  Validates everything
        before it changes anything.
        """
        cdef kv_layer *L
        cdef cnp.ndarray ka, va
        cdef int64_t t = 0
        cdef int64_t li = _as_int64(layer_idx, "layer_idx", IndexError)
        cdef int64_t m = _as_int64(seq_len, "seq_len", ValueError)
        if li < 0 or li >= self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        L = &self.layers[li]
        if k is None and v is None:
            ka = va = None
        elif k is None or v is None:
            raise TypeError("k and v must both be arrays, or both None for a pure truncate; "
                            f"got k={type(k).__name__}, v={type(v).__name__}")
        else:
            ka = self._as_input(k, "k")
            va = self._as_input(v, "v")
            t = cnp.PyArray_DIMS(ka)[2]
            if cnp.PyArray_DIMS(va)[2] != t:
                raise ValueError(f"k and v must hold the same number of tokens: "
                                 f"k has {t}, v has {cnp.PyArray_DIMS(va)[2]}")
        self._write(L, li, ka, va, t, m)

    cdef cnp.ndarray _as_input(self, object x, str name):
        """`x` as an ndarray of the cache dtype and shape [batch, heads, t, head_dim].

        The fast path (an ndarray already of the cache dtype, native byte
        order) costs a few pointer reads; anything else goes through numpy.
        """
        cdef cnp.ndarray a
        cdef cnp.npy_intp *d
        if (cnp.PyArray_Check(x) and cnp.PyArray_TYPE(<cnp.ndarray>x) == self.typenum
                and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x)):
            a = <cnp.ndarray>x
        else:
            a = self._convert_input(x, name)
        if cnp.PyArray_NDIM(a) != 4:
            raise ValueError(f"{name} must have 4 dimensions [batch, kv_heads, tokens, head_dim], "
                             f"got shape {np.shape(a)}")
        d = cnp.PyArray_DIMS(a)
        if d[0] != self.batch or d[1] != self.heads or d[3] != self.head_dim:
            raise ValueError(
                f"{name} must have shape [{self.batch}, {self.heads}, tokens, {self.head_dim}] "
                f"(batch, kv_heads, tokens, head_dim), got {np.shape(a)}")
        return a

    cdef cnp.ndarray _convert_input(self, object x, str name):
        if not cnp.PyArray_Check(x):
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{name} must be an array of float16 or float32, "
                                f"got {type(x).__name__}") from exc
        dt = (<cnp.ndarray>x).dtype
        if dt.kind != "f" or dt.itemsize not in (2, 4):
            raise TypeError(f"{name} must have dtype float16 or float32, got {dt}")
        return np.asarray(x, dtype=self._dtype)

    cdef int _write(self, kv_layer *L, Py_ssize_t layer_idx, cnp.ndarray ka,
                    cnp.ndarray va, int64_t t, int64_t m) except -1:
        cdef int64_t S = self.sinks, start, n_t, lo_t, lo_new, cap, held_after
        cdef int64_t a0, b0, a1, b1, written, evicted = 0, n_old = L.n
        cdef double now = 0.0
        cdef bint truncated
        cdef int64_t old_cap = L.cap, old_nblk = L.nblk
        cdef int32_t *old_table = NULL
        cdef double grow_seconds = 0.0
        if m < 0:
            raise ValueError(f"seq_len must be >= 0, got {m}")
        start = m - t
        if start < 0:
            raise ValueError(f"seq_len ({m}) must be at least the number of tokens given ({t})")
        if start > L.n:
            raise ValueError(
                f"writing {t} tokens at positions {start}..{m - 1} would leave a hole: "
                f"layer {layer_idx} holds {L.n} tokens, so the first position written "
                f"must be <= {L.n}")
        # The truncation part of the rule: drop positions >= m.
        n_t = _min(L.n, m)
        lo_t = _min(L.lo, m)
        # Positions rewritten in place must still be held: none of [start, n_t)
        # may fall in the evicted gap [S, lo_t) (empty unless the ring wrapped).
        if start < n_t and lo_t > S and start < lo_t and n_t > S:
            raise IndexError(
                f"positions {start}..{n_t - 1} of layer {layer_idx} include positions the "
                f"ring already evicted ({S}..{lo_t - 1}); the oldest writable window "
                f"position is {lo_t}")
        cap = L.cap
        held_after = _min(S, lo_t) + m - lo_t
        # Growth keeps the layout linear, so it is only possible while every
        # stored position still sits in slot == position (n_t <= cap).
        if held_after > cap and self.growth_enabled and n_t <= cap and cap < self.max_capacity:
            grow_seconds = perf_counter()
            cap = _min(self._grown_capacity(layer_idx, cap, m), self.max_capacity)
            if cap > L.cap:                      # a policy never shrinks a layer
                old_table = _set_capacity(self, L, cap)
            else:
                cap = L.cap
            grow_seconds = perf_counter() - grow_seconds
        lo_new = lo_t
        # Busy from the first table change to the last byte copied: the
        # compressor (a background worker, or compress_old_entries on another
        # thread) installs nothing over this layer's blocks meanwhile.  Needed
        # even for small writes: decoding a LOSSLESS block in _ensure_blocks
        # releases the GIL while fresh, still unwritten blocks sit in the table.
        L.busy += 1
        try:
            if held_after > cap:
                if not self.ring:
                    raise CacheFullError(
                        f"layer {layer_idx} would hold {held_after} tokens but its capacity is "
                        f"{cap} and overflow='error'; nothing was written")
                lo_new = m - (cap - S)       # evict the oldest window positions
                # Held (after the truncation part) plus new, minus held after.
                evicted = ((_min(S, lo_t) + n_t - lo_t) + (m - n_t)
                           - (S + m - lo_new)) * self.batch
            # The positions written: those of [start, m) still held afterwards.
            # Evicted slots are reused as they are (the ring never copies).
            a0 = start
            b0 = _max(start, _min(m, _min(S, lo_new)))
            a1 = _max(start, lo_new)
            b1 = m
            # Blocks written again get a new age; read the clock first, before
            # any block changes, so that a failing clock changes nothing.
            if start < n_t or (evicted and self.track_ages
                               and self._touches(L, a1, b1, True)):
                now = self.clock()
            self._ensure_blocks(L, a0, b0, a1, b1)      # may raise MemoryError
        except BaseException:
            L.busy -= 1
            if old_table != NULL:                # undo the growth
                _restore_table(self, L, old_table, old_cap, old_nblk)
            raise
        # ---- commit: nothing below can fail (growth logging and automatic
        # compression, at the end, only report their own errors)
        written = (b0 - a0) + (b1 - a1)
        if self.metrics:
            # The only counting on the hot path: ~1% of its instructions.
            L.updates += 1
            L.tokens_written += written
            L.evictions += evicted
        truncated = m < L.n
        L.truncations += truncated and self.metrics
        L.n = m
        L.lo = lo_new
        if truncated:
            self._release_unheld(L)
        if written:
            if written * self.batch * self.heads * self.row_bytes * 2 > NOGIL_COPY_BYTES:
                with nogil:
                    _scatter_kv(self, L, ka, va, start, a0, b0, a1, b1)
            else:
                _scatter_kv(self, L, ka, va, start, a0, b0, a1, b1)
        L.busy -= 1
        if start < n_t:
            self._touch(L, start, n_t, False, now)   # rewritten in place: young again
        if evicted and self.track_ages:
            self._touch(L, a1, b1, True, now)        # the ring re-entered old blocks
        if old_table != NULL:
            PyMem_RawFree(old_table)
            self._growth_done(layer_idx, old_cap, cap, grow_seconds)
        if (self.auto_residual >= 0 and m > n_old
                and (m - self.auto_residual) >> self.block_shift
                != (n_old - self.auto_residual) >> self.block_shift):
            # A block boundary left the residual window: compress what is
            # now eligible (once every block_size tokens per layer).
            self._auto_compress(layer_idx)
        return 0

    def _auto_compress(self, Py_ssize_t layer_idx):
        """Automatic-compression hook (KVCache overrides it)."""

    cdef bint _touches(self, const kv_layer *L, int64_t a, int64_t b, bint entered) noexcept:
        """Whether _touch(L, a, b, entered) would touch any block."""
        cdef int64_t p = a, c, j, off
        if not entered:
            return a < b
        while p < b:
            c = self._run(L, p, b if p >= self.sinks or b <= self.sinks else self.sinks,
                          &j, &off)
            if off == 0 or j * self.block_size + off == self.sinks:
                return True
            p += c
        return False

    cdef void _touch(self, const kv_layer *L, int64_t a, int64_t b, bint entered,
                     double now) noexcept:
        """Blocks holding positions [a, b) were written again: their age
        restarts at `now` and a LOSSLESS "incompressible" verdict no longer
        holds.  With `entered`, only blocks the write entered count: at their
        first slot, or at the ring's wrap point (the first window slot)."""
        cdef int64_t p, c, j, off, r, end
        cdef kv_block *blk
        for r in range(self.batch):
            p = a
            while p < b:
                end = b if p >= self.sinks or b <= self.sinks else self.sinks
                c = self._run(L, p, end, &j, &off)
                if not entered or off == 0 or j * self.block_size + off == self.sinks:
                    blk = _blk(self, L.table[r * L.nblk + j])
                    blk.born = now
                    blk.flags &= ~KV_FLAG_INCOMPRESSIBLE
                p += c

    def _grown_capacity(self, Py_ssize_t layer_idx, int64_t cap, int64_t needed):
        """Growth policy hook (KVCache overrides it): the new capacity."""
        return cap

    def _growth_done(self, Py_ssize_t layer_idx, int64_t old_cap, int64_t new_cap,
                     double seconds):
        """Called after a growth committed (KVCache logs and counts it)."""

    def seq_len(self, layer_idx):
        """Tokens logically in the layer: its absolute length, evicted included."""
        return self._layer(layer_idx).n

    def capacity(self, layer_idx):
        """Tokens the layer can hold before it evicts, grows or fails."""
        return self._layer(layer_idx).cap

    def held(self, layer_idx):
        """Tokens the layer holds (sinks plus window)."""
        return self._held(self._layer(layer_idx))

    cdef kv_layer *_layer(self, object layer_idx) except NULL:
        cdef int64_t li = _as_int64(layer_idx, "layer_idx", IndexError)
        if li < 0 or li >= self.num_layers:
            raise IndexError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        return &self.layers[li]

    def keys(self, layer_idx):
        """The held keys, [batch, kv_heads, held, head_dim], in position order
        (sinks, then window).  Always a fresh copy."""
        return self._read(layer_idx, 0)

    def values(self, layer_idx):
        """The held values, laid out as :meth:`keys`.  Always a fresh copy."""
        return self._read(layer_idx, 1)

    cdef object _read(self, object layer_idx, int which):
        cdef kv_layer *L = self._layer(layer_idx)
        cdef int64_t nh = self._held(L)
        cdef cnp.ndarray out = np.empty((self.batch, self.heads, nh, self.head_dim),
                                        dtype=self._dtype)
        cdef char *dst = <char *>cnp.PyArray_DATA(out)
        cdef int64_t half = which * self.half_bytes, hits = 0, misses = 0
        if nh * self.batch * self.heads * self.row_bytes > NOGIL_COPY_BYTES:
            L.busy += 1
            try:
                with nogil:
                    self._gather(L, half, dst, &hits, &misses)
            finally:
                L.busy -= 1
        else:
            self._gather(L, half, dst, &hits, &misses)
        if self.metrics:
            L.hits += hits
            L.misses += misses
        return out

    def attention(self, layer_idx, q, scale=None, *, out=None, bint prefetch=False):
        """softmax(q . K^T * scale) . V over every token the layer holds.

        ``q`` is [batch, num_q_heads, t_q, head_dim] (float16/32/64;
        num_q_heads a multiple of the KV heads: grouped-query attention).
        Query i sits at position ``seq_len - t_q + i`` and sees the held
        keys at positions <= its own (causal); for one query that is every
        held token (sinks and window of a ring, every tier).  ``scale``
        defaults to 1 / sqrt(head_dim).  Returns float32 [batch,
        num_q_heads, t_q, head_dim] (written into ``out`` when given).

        The kernel walks the block tables (no copy of K or V), dequantizes
        INT8/INT4 inside its dot products, keeps an online softmax in
        float32 and releases the GIL.  ``prefetch=True`` hints the start of
        each next block that does not follow the current one in memory
        while the current one is computed; off by default, because on the
        machines measured so far it never made attention faster (README,
        "Attention").  Each token read counts as a hit (full tier) or a miss
        (compressed) in the stats.
        """
        return _attention(self, layer_idx, q, scale, out, prefetch)

    def prefetch(self, layer_idx, seq_len):
        """Hint the memory the next ``attention(layer_idx, ...)`` reads
        first, for a layer of length ``seq_len``: its first 32 KiB to every
        cache level, the next 480 KiB to L2.  Call it for the next layer
        while this one computes.  Returns the bytes hinted (0 where the
        compiler has no prefetch builtin); never faults."""
        return _prefetch(self, layer_idx, seq_len)

    def positions(self, layer_idx):
        """Absolute positions held, in the order keys() returns them (int64)."""
        cdef kv_layer *L = self._layer(layer_idx)
        return np.concatenate((np.arange(_min(self.sinks, L.lo), dtype=np.int64),
                               np.arange(L.lo, L.n, dtype=np.int64)))

    def truncate(self, seq_len, layer_idx=None):
        """Drop every position >= seq_len (of one layer, or all when None).

        A layer already shorter than ``seq_len`` is left as it is (like
        transformers' ``crop``).
        """
        cdef Py_ssize_t i, lo_i, hi_i
        seq_len = operator.index(seq_len)
        if seq_len < 0:
            raise ValueError(f"seq_len must be >= 0, got {seq_len}")
        if seq_len > MAX_INDEX:
            seq_len = MAX_INDEX              # longer than any layer: nothing to drop
        if layer_idx is None:
            lo_i, hi_i = 0, self.num_layers
        else:
            lo_i = self._layer(layer_idx) - self.layers
            hi_i = lo_i + 1
        for i in range(lo_i, hi_i):
            if self.layers[i].n > seq_len:
                self._write(&self.layers[i], i, None, None, 0, seq_len)

    def reorder_batch(self, indices):
        """Make row ``r`` of every layer what row ``indices[r]`` was.

        Beam-search reordering, batch selection and repetition in one call:
        ``len(indices)`` becomes the batch size and rows may repeat.  Only
        block-table entries move; a block shared by several rows is copied
        when one of them is next written (copy-on-write).
        """
        cdef cnp.ndarray idx_arr
        cdef const int64_t *idx
        cdef int64_t nb, r, j, i
        cdef kv_layer *L
        cdef int32_t **tables
        try:
            idx_arr = np.asarray(indices)   # not ascontiguousarray: it makes a scalar 1-D
        except Exception as exc:
            raise TypeError(f"indices must be a 1-D sequence of integers, "
                            f"got {type(indices).__name__}") from exc
        if idx_arr.dtype == object and idx_arr.ndim == 1 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in idx_arr):
            # Python ints beyond int64: out of range, not of the wrong type.
            raise IndexError(f"indices must be in [0, {self.batch}), got values from "
                             f"{min(idx_arr)} to {max(idx_arr)}")
        if idx_arr.ndim != 1 or (idx_arr.size and idx_arr.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D sequence of integers, "
                            f"got dtype {idx_arr.dtype} and shape {np.shape(idx_arr)}")
        nb = idx_arr.shape[0]
        if nb == 0:
            raise ValueError("indices must select at least one row")
        if nb > (1 << 20):
            raise ValueError(f"indices select {nb} rows; at most {1 << 20} are allowed")
        # Compare before converting: uint64 values past int64 would wrap.
        if idx_arr.min() < 0 or idx_arr.max() >= self.batch:
            raise IndexError(f"indices must be in [0, {self.batch}), got values from "
                             f"{idx_arr.min()} to {idx_arr.max()}")
        idx_arr = np.ascontiguousarray(idx_arr, dtype=np.int64)
        idx = <const int64_t *>cnp.PyArray_DATA(idx_arr)
        # Allocate every new table first: all-or-nothing.
        tables = <int32_t **>PyMem_RawMalloc(_max(1, self.num_layers) * sizeof(int32_t *))
        if tables == NULL:
            raise MemoryError("cannot allocate the new block tables")
        for i in range(self.num_layers):
            tables[i] = <int32_t *>PyMem_RawMalloc(
                _max(1, nb * self.layers[i].nblk) * sizeof(int32_t))
            if tables[i] == NULL:
                for j in range(i):
                    PyMem_RawFree(tables[j])
                PyMem_RawFree(tables)
                raise MemoryError("cannot allocate the new block tables")
        self.max_spare = self.num_layers * nb
        self._trim_spares()
        for i in range(self.num_layers):
            L = &self.layers[i]
            for r in range(nb):          # take the new references first ...
                for j in range(L.nblk):
                    tables[i][r * L.nblk + j] = L.table[idx[r] * L.nblk + j]
                    if tables[i][r * L.nblk + j] >= 0:
                        _blk(self, tables[i][r * L.nblk + j]).refcount += 1
            self._release_tail(L, 0)     # ... then drop the old ones
            PyMem_RawFree(L.table)
            L.table = tables[i]
        PyMem_RawFree(tables)
        self.batch = nb

    def reset(self):
        """Empty every layer and return capacity to ``max_seq_len``.

        Counters are kept (see ``reset_stats``); blocks go back to the pool.
        """
        cdef int64_t i
        cdef kv_layer *L
        for i in range(self.num_layers):
            L = &self.layers[i]
            self._release_tail(L, 0)
            L.n = L.lo = 0
            if L.cap != self.initial_cap:
                PyMem_RawFree(_set_capacity(self, L, self.initial_cap))

    # ----------------------------------------------------------- compression

    def _compress(self, int tier, int64_t residual, int64_t keep_first, double cutoff,
                  double budget, layers=None):
        """Compress every eligible full-precision block born at or before
        `cutoff` (clock seconds) to `tier` (KV_TIER_* or ADAPTIVE_TIER).

        A block is eligible when all its slots hold positions of the layer,
        none below `keep_first` and none among the last `residual`.  Blocks
        already compressed are never touched again.  Returns a list of
        (tier name, tokens, bytes before, bytes after), one per block tried
        ("raw" when LOSSLESS could not shrink it: it stays full precision;
        ("busy", layer, 0, 0) for a layer skipped because another thread was
        copying it without the GIL).
        """
        cdef int64_t li, j, r, exact
        cdef kv_layer *L
        cdef int32_t bid
        cdef kv_block *b
        cdef list batch = []
        cdef set queued = set()
        results = []
        for li in (range(self.num_layers) if layers is None else layers):
            L = self._layer(li)
            if L.busy:
                # Another thread is copying this layer without the GIL.
                results.append(("busy", li, 0, 0))
                continue
            for j in self._eligible(L, residual, keep_first):
                for r in range(self.batch):
                    if j >= L.nblk:          # the table changed under a released GIL
                        break
                    bid = L.table[r * L.nblk + j]
                    if bid < 0:
                        continue
                    b = _blk(self, bid)
                    if (b.tier != KV_TIER_FULL or b.born > cutoff
                            or b.flags & KV_FLAG_ENCODING):
                        continue
                    if tier == KV_TIER_LOSSLESS and b.flags & KV_FLAG_INCOMPRESSIBLE:
                        continue
                    if tier == KV_TIER_FP16 and self.itemsize == 2:
                        continue             # a float16 block is already FP16
                    exact = _max(0, keep_first - j * self.block_size)
                    if tier in (KV_TIER_FP16, KV_TIER_INT8, KV_TIER_INT4):
                        if bid not in queued:    # rows may share a block
                            queued.add(bid)
                            batch.append((bid, exact))
                        continue
                    if L.busy:
                        # A write began while the previous block was encoded
                        # without the GIL.  Pinning now would raise a refcount
                        # the write has already planned its new blocks by.
                        results.append(("busy", li, 0, 0))
                        break
                    res = self._compress_block(L, bid, tier, budget, exact)
                    if res is not None:
                        results.append(res)
                if L.busy and tier not in (KV_TIER_FP16, KV_TIER_INT8, KV_TIER_INT4):
                    break
            if batch:
                results.extend(self._compress_batch(L, batch, tier))
                batch = []
                queued.clear()
        return results

    cdef list _eligible(self, const kv_layer *L, int64_t residual, int64_t keep_first):
        """Table indices of the layer's blocks whose every slot holds a
        position below n - residual, except blocks wholly inside the first
        keep_first slots (those positions stay full precision; a block that
        only starts with some of them keeps them verbatim in its payload)."""
        cdef int64_t k, p, end, c, j, off, limit = L.n - residual
        cdef cnp.ndarray[cnp.int64_t, ndim=1] count = np.zeros(L.nblk, dtype=np.int64)
        cdef cnp.ndarray[cnp.uint8_t, ndim=1] ok = np.ones(L.nblk, dtype=np.uint8)
        for k in range(2):
            p = 0 if k == 0 else L.lo
            end = _min(self.sinks, L.lo) if k == 0 else L.n
            while p < end:
                c = self._run(L, p, end, &j, &off)
                count[j] += c
                if p + c > limit or (j + 1) * self.block_size <= keep_first:
                    ok[j] = 0
                p += c
        return [j for j in range(L.nblk) if ok[j] and count[j] == self.block_size]

    cdef object _compress_block(self, const kv_layer *L, int32_t bid, int tier, double budget,
                                int64_t exact):
        """Compress block `bid` to `tier`, its first `exact` slots verbatim.

        The block is pinned by an extra reference while it is encoded without
        the GIL: a concurrent write to it then copies it first (copy-on-write)
        and a truncation cannot free it.  The payload is installed only if
        the block's references are what they were (nobody replaced, released
        or shared it meanwhile); otherwise the work is dropped.
        """
        cdef kv_block *b = _blk(self, bid)
        cdef int32_t refs = b.refcount
        b.refcount += 1
        b.flags |= KV_FLAG_ENCODING
        try:
            res = self._compress_pinned(L, bid, tier, budget, exact, refs)
        finally:
            b = _blk(self, bid)
            b.flags &= ~KV_FLAG_ENCODING
            self._release_block(bid)
        return res

    cdef object _compress_pinned(self, const kv_layer *L, int32_t bid, int tier, double budget,
                                 int64_t exact, int32_t refs):
        cdef kv_block *b = _blk(self, bid)
        cdef uint8_t *payload = NULL
        cdef char *scratch = NULL
        cdef int64_t nbytes
        cdef int cand
        cdef double err
        cdef bytearray shuffled
        cdef bytes packed
        if tier == ADAPTIVE_TIER:
            # The smallest representation whose reconstruction error is within
            # budget; LOSSLESS otherwise.
            scratch = <char *>PyMem_RawMalloc(self.block_bytes)
            if scratch == NULL:
                raise MemoryError("cannot allocate a decode buffer")
            try:
                for cand in (KV_TIER_INT4, KV_TIER_INT8, KV_TIER_FP16):
                    if cand == KV_TIER_FP16 and self.itemsize == 2:
                        continue
                    payload = self._encode_block(bid, cand, exact, &nbytes)
                    with nogil:
                        _decode_payload(&self.shape, cand, payload, scratch, 3)
                        self._restore_prefix(payload, cand, exact, scratch, 3)
                        err = kv_block_rel_error(&self.shape, b.data, scratch)
                    b = _blk(self, bid)
                    if err <= budget:          # False for NaN: such blocks go lossless
                        return self._install_if(L, bid, cand, payload, nbytes, exact, refs)
                    PyMem_RawFree(payload)
                    payload = NULL
            finally:
                PyMem_RawFree(scratch)
            tier = KV_TIER_LOSSLESS
            if b.flags & KV_FLAG_INCOMPRESSIBLE:
                return None
        if tier == KV_TIER_LOSSLESS:
            shuffled = bytearray(self.block_bytes)
            kv_shuffle(<const uint8_t *>b.data, <uint8_t *><char *>shuffled,
                       self.block_bytes // self.itemsize, self.itemsize)
            packed = _lossless_pack(shuffled, self.zstd)
            if len(packed) >= self.block_bytes:
                b.flags |= KV_FLAG_INCOMPRESSIBLE
                return ("raw", self.block_size, self.block_bytes, self.block_bytes)
            nbytes = len(packed)
            payload = <uint8_t *>PyMem_RawMalloc(nbytes)
            if payload == NULL:
                raise MemoryError(f"cannot allocate a {nbytes}-byte payload")
            memcpy(payload, <char *>packed, nbytes)
            res = self._install_if(L, bid, tier, payload, nbytes, 0, refs)
            if self.zstd and res[0] != "dropped":
                b.flags |= KV_FLAG_ZSTD         # decode with the codec that packed it
            return res
        if tier == KV_TIER_FP16 and self.itemsize == 2:
            return None                  # a float16 block is already FP16
        payload = self._encode_block(bid, tier, exact, &nbytes)
        return self._install_if(L, bid, tier, payload, nbytes, exact, refs)

    cdef uint8_t *_encode_block(self, int32_t bid, int tier, int64_t exact,
                                int64_t *nbytes) except NULL:
        """A new payload: block `bid` in `tier` (FP16/INT8/INT4), then its
        first `exact` slots verbatim ([2][heads][exact][dim])."""
        cdef int64_t size = self._payload_size(tier, exact)
        cdef uint8_t *payload = <uint8_t *>PyMem_RawMalloc(size)
        cdef char *masked = NULL
        if payload == NULL:
            raise MemoryError(f"cannot allocate a {size}-byte payload")
        if exact:
            masked = <char *>PyMem_RawMalloc(self.block_bytes)
            if masked == NULL:
                PyMem_RawFree(payload)
                raise MemoryError("cannot allocate an encode buffer")
        with nogil:
            self._encode_into(bid, tier, exact, payload, masked)
        PyMem_RawFree(masked)
        nbytes[0] = size
        return payload

    cdef int64_t _payload_size(self, int tier, int64_t exact) noexcept nogil:
        return kv_payload_bytes(tier, &self.shape) + 2 * self.heads * exact * self.row_bytes

    cdef void _encode_into(self, int32_t bid, int tier, int64_t exact, uint8_t *payload,
                           char *masked) noexcept nogil:
        """Encode block `bid` into `payload` (_payload_size bytes).  With
        `exact`, the first slots are saved verbatim after the body and, in a
        copy (`masked`, block_bytes), replaced by the next slot's values
        before quantizing: a sink token's outliers then do not widen the
        other tokens' ranges (keys are quantized per channel across the
        block's tokens)."""
        cdef kv_block *b = _blk(self, bid)
        cdef int64_t body = kv_payload_bytes(tier, &self.shape), h, w, r
        cdef int64_t head_stride = self.block_size * self.row_bytes
        cdef const char *src = b.data
        cdef char *row
        if exact:
            memcpy(masked, b.data, self.block_bytes)
            for w in range(2):
                for h in range(self.heads):
                    row = masked + w * self.half_bytes + h * head_stride
                    memcpy(payload + body + ((w * self.heads + h) * exact) * self.row_bytes,
                           row, exact * self.row_bytes)
                    for r in range(exact):
                        memcpy(row + r * self.row_bytes, row + exact * self.row_bytes,
                               self.row_bytes)
            src = masked
        _encode(&self.shape, tier, src, payload)

    cdef list _compress_batch(self, const kv_layer *L, list blocks, int tier):
        """Compress many blocks of one layer to a quantized tier, a few blocks
        per GIL-free pass.

        Every block is pinned before the first pass (as _compress_block pins
        one), so none can be freed or reused while the GIL is released between
        passes; a write to one copies it first and its payload is dropped.
        Payloads are encoded into a small scratch buffer (reused, so its pages
        are warm) and then copied over the front of each block's own
        full-precision allocation, which is shrunk in place: compression takes
        no fresh memory (no page faults), and what it frees is each
        allocation's tail.
        """
        cdef Py_ssize_t n = len(blocks), i, first, m, pinned = 0, done = 0
        cdef int64_t width = self._payload_size(tier, self.block_size - 1)
        cdef int32_t *bids = <int32_t *>PyMem_RawMalloc(n * sizeof(int32_t))
        cdef int32_t *refs = <int32_t *>PyMem_RawMalloc(n * sizeof(int32_t))
        cdef int64_t *exacts = <int64_t *>PyMem_RawMalloc(n * sizeof(int64_t))
        cdef char *scratch = <char *>PyMem_RawMalloc(COMPRESS_CHUNK * width)
        cdef char *masked = <char *>PyMem_RawMalloc(self.block_bytes)
        cdef kv_block *b
        results = []
        try:
            if (bids == NULL or refs == NULL or exacts == NULL or scratch == NULL
                    or masked == NULL):
                raise MemoryError("cannot allocate compression buffers")
            for i in range(n):                   # pin them all
                bids[i], exacts[i] = blocks[i]
                b = _blk(self, bids[i])
                refs[i] = b.refcount
                b.refcount += 1
                b.flags |= KV_FLAG_ENCODING
                pinned += 1
            for first in range(0, n, COMPRESS_CHUNK):
                m = _min(COMPRESS_CHUNK, n - first)
                with nogil:
                    for i in range(m):
                        self._encode_into(bids[first + i], tier, exacts[first + i],
                                          <uint8_t *>scratch + i * width, masked)
                for i in range(first, first + m):    # install in place, unpin
                    results.append(self._install_in_place(
                        L, bids[i], tier, <uint8_t *>scratch + (i - first) * width,
                        self._payload_size(tier, exacts[i]), exacts[i], refs[i]))
                    b = _blk(self, bids[i])
                    b.flags &= ~KV_FLAG_ENCODING
                    self._release_block(bids[i])
                    done += 1
        finally:
            for i in range(done, pinned):            # after an error: unpin the rest
                b = _blk(self, bids[i])
                b.flags &= ~KV_FLAG_ENCODING
                self._release_block(bids[i])
            PyMem_RawFree(bids)
            PyMem_RawFree(refs)
            PyMem_RawFree(exacts)
            PyMem_RawFree(scratch)
            PyMem_RawFree(masked)
        return results

    cdef object _install_in_place(self, const kv_layer *L, int32_t bid, int tier,
                                  const uint8_t *encoded, int64_t nbytes, int64_t exact,
                                  int32_t refs):
        """_install_if for a payload still in a scratch buffer: it is stored
        over the front of the block's own allocation, shrunk to fit (or, for
        tiny heads whose scales and prefix outweigh the block, in a new one)."""
        cdef kv_block *b = _blk(self, bid)
        cdef void *shrunk
        cdef uint8_t *payload
        if not self._unchanged(L, bid, refs):
            return ("dropped", 0, 0, 0)
        if nbytes <= self.block_bytes + KV_ALIGN:
            memcpy(b.raw, encoded, nbytes)
            shrunk = PyMem_RawRealloc(b.raw, nbytes)
            if shrunk != NULL:              # shrinking in place; NULL keeps it whole
                b.raw = <char *>shrunk
            payload = <uint8_t *>b.raw
        else:
            payload = <uint8_t *>PyMem_RawMalloc(nbytes)
            if payload == NULL:
                return ("dropped", 0, 0, 0)
            memcpy(payload, encoded, nbytes)
        return self._install(bid, tier, payload, nbytes, exact)

    cdef void _restore_prefix(self, const uint8_t *payload, int tier, int64_t exact,
                              char *dst, int halves) noexcept nogil:
        """Copy a quantized payload's verbatim leading slots over `dst`."""
        cdef int64_t body = kv_payload_bytes(tier, &self.shape), w, h
        for w in range(2):
            if exact and halves & (1 << w):
                for h in range(self.heads):
                    memcpy(dst + w * self.half_bytes + h * self.block_size * self.row_bytes,
                           payload + body + ((w * self.heads + h) * exact) * self.row_bytes,
                           exact * self.row_bytes)

    cdef object _install_if(self, const kv_layer *L, int32_t bid, int tier, uint8_t *payload,
                            int64_t nbytes, int64_t exact, int32_t refs):
        """_install, unless the pinned block's references changed meanwhile or
        a GIL-free copy of its layer started while it was being encoded (that
        copy may be reading the data _install frees); then the payload is
        dropped and the block stays as it is, to be compressed later."""
        if not self._unchanged(L, bid, refs):
            PyMem_RawFree(payload)
            return ("dropped", 0, 0, 0)
        return self._install(bid, tier, payload, nbytes, exact)

    cdef bint _unchanged(self, const kv_layer *L, int32_t bid, int32_t refs) noexcept:
        """Whether a block pinned with `refs` other references may take its
        payload: nobody replaced, released or shared it, and no GIL-free copy
        of its layer is reading the data the install frees."""
        return _blk(self, bid).refcount == refs + 1 and not L.busy

    cdef object _install(self, int32_t bid, int tier, uint8_t *payload, int64_t nbytes,
                         int64_t exact):
        """Swap block `bid`'s full-precision data for `payload` (owned from
        now on); the data's memory goes back to the allocator, unless the
        payload was stored in it."""
        cdef kv_block *b = _blk(self, bid)
        if <char *>payload != b.raw:
            PyMem_RawFree(b.raw)
        b.raw = NULL
        b.data = NULL
        self.n_data_blocks -= 1
        b.payload = payload
        b.payload_bytes = nbytes
        b.tier = tier
        b.exact_rows = <int32_t>exact
        self.payload_total += nbytes
        self.n_compressed += 1
        return (TIER_NAMES[tier], self.block_size, self.block_bytes, nbytes)

    def _block_tiers(self, layer_idx):
        """[batch, table entries] tier codes of the layer's blocks (-1: none)."""
        cdef kv_layer *L = self._layer(layer_idx)
        cdef int64_t r, j
        out = np.full((self.batch, L.nblk), -1, dtype=np.int8)
        for r in range(self.batch):
            for j in range(L.nblk):
                if L.table[r * L.nblk + j] >= 0:
                    out[r, j] = _blk(self, L.table[r * L.nblk + j]).tier
        return out

    # ------------------------------------------------------------ save/load

    def _payload_nbytes(self, int tier, int64_t exact):
        """Bytes of a FP16/INT8/INT4 payload keeping `exact` leading slots
        verbatim (what a saved block of that tier must hold)."""
        return self._payload_size(tier, exact)

    def _export(self, layers, int64_t prefix):
        """What ``save`` writes (see kvcache.fileformat), one layer at a time.

        Returns ``(states, tables, blocks)``: per exported layer ``(n, lo,
        cap)`` and its block table ([batch, nblk] int32, indices into
        ``blocks``, -1 where none); per stored block ``(tier, flags,
        exact_rows, age, bytes)``.  A block shared by several rows is stored
        once.  With ``prefix >= 0`` the layers are cut to positions
        ``[0, prefix)`` (the caller checked they are all held).

        Slots holding no held position are written as zeros in full blocks
        (stale data of truncated or never-written positions stays out of the
        file).  A compressed block the prefix cuts is decoded and stored full
        with its tail zeroed: the file holds nothing past the prefix.
        Compressed blocks otherwise keep their payload byte for byte, so a
        round trip reads back exactly what the cache read.  Runs with the GIL
        held throughout: no other thread changes a block meanwhile.
        """
        cdef int64_t li, r, j, k, p, end, c, off, n, lo, bs = self.block_size
        cdef kv_layer *L
        cdef int32_t bid
        cdef kv_block *b
        cdef cnp.ndarray held, tab, plain
        cdef dict ids = {}
        cdef list states = [], tables = [], blocks = []
        cdef double now = self.clock()
        for li in layers:
            L = self._layer(li)
            n = L.n if prefix < 0 else prefix
            lo = L.lo if prefix < 0 else 0
            held = np.zeros(L.nblk * bs, dtype=np.bool_)
            for k in range(2):
                p = 0 if k == 0 else lo
                end = _min(self.sinks, lo) if k == 0 else n
                while p < end:
                    c = self._run(L, p, end, &j, &off)
                    held[j * bs + off:j * bs + off + c] = True
                    p += c
            tab = np.full((self.batch, L.nblk), -1, dtype=np.int32)
            for j in range(L.nblk):
                mask = held[j * bs:(j + 1) * bs]
                if not mask.any():
                    continue
                partial = not mask.all()
                for r in range(self.batch):
                    bid = L.table[r * L.nblk + j]
                    if bid < 0:
                        raise RuntimeError(f"layer {li} holds a slot without a block")
                    if bid in ids:
                        tab[r, j] = ids[bid]
                        continue
                    b = _blk(self, bid)
                    if b.tier == KV_TIER_FULL or (partial and prefix >= 0):
                        plain = np.empty(self.block_bytes, dtype=np.uint8)
                        self._decode(bid, <char *>cnp.PyArray_DATA(plain), 3)
                        if partial:
                            plain.reshape(2, self.heads, bs, self.row_bytes)[:, :, ~mask] = 0
                        record = (KV_TIER_FULL, b.flags & KV_FLAG_INCOMPRESSIBLE
                                  if b.tier == KV_TIER_FULL else 0, 0, plain.tobytes())
                    else:
                        record = (b.tier, b.flags & KV_FLAG_ZSTD, b.exact_rows,
                                  (<char *>b.payload)[:b.payload_bytes])
                    ids[bid] = tab[r, j] = len(blocks)
                    blocks.append(record[:3] + (max(0.0, now - b.born), record[3]))
            states.append((n, lo, L.cap))
            tables.append(tab)
        return states, tables, blocks

    def _import(self, list states, list tables, list blocks):
        """Give a fresh, empty store the state `_export` described, already
        validated by kvcache.fileformat (every value in range, every table
        entry a block of this layer, every payload the size its tier needs).

        A MemoryError part way leaves the store unusable but consistent for
        ``__dealloc__`` (which frees every block): the loader discards it.
        """
        cdef Py_ssize_t i, nb = len(blocks)
        cdef int64_t li, r, j, nbytes, n, lo, cap
        cdef kv_layer *L
        cdef kv_block *b
        cdef int32_t bid, e
        cdef const uint8_t[::1] buf
        cdef const int32_t[:, ::1] tab
        cdef cnp.ndarray bids = np.empty(_max(1, nb), dtype=np.int32)
        cdef cnp.ndarray placed = np.zeros(_max(1, nb), dtype=np.uint8)
        cdef int32_t[::1] newid = bids
        cdef uint8_t[::1] seen = placed
        cdef uint8_t *payload
        cdef double now = self.clock()
        for li in range(self.num_layers):
            if self.layers[li].n or self.nblocks:
                raise ValueError("_import needs a fresh store")
        for li in range(self.num_layers):          # tables first: no block to undo
            n, lo, cap = states[li]
            if cap != self.layers[li].cap:
                PyMem_RawFree(_set_capacity(self, &self.layers[li], cap))
        for i in range(nb):
            tier, flags, exact, age, data = blocks[i]
            buf = data
            nbytes = buf.shape[0]
            bid = self._take_block()
            newid[i] = bid
            b = _blk(self, bid)
            if tier == KV_TIER_FULL:
                memcpy(b.data, &buf[0], self.block_bytes)
            else:
                payload = <uint8_t *>PyMem_RawMalloc(nbytes)
                if payload == NULL:
                    raise MemoryError(f"cannot allocate a payload of {nbytes} bytes")
                memcpy(payload, &buf[0], nbytes)
                self._install(bid, tier, payload, nbytes, exact)
            b.flags = flags
            b.born = now - age
        # ---- nothing below can fail
        for li in range(self.num_layers):
            L = &self.layers[li]
            tab = tables[li]
            for r in range(self.batch):
                for j in range(L.nblk):
                    e = tab[r, j]
                    if e >= 0:
                        L.table[r * L.nblk + j] = newid[e]
                        if seen[e]:                 # _take_block gave the first
                            _blk(self, newid[e]).refcount += 1
                        seen[e] = 1
            L.n, L.lo = states[li][0], states[li][1]

    # -------------------------------------------------------------- metrics

    def _counters(self):
        """Per-layer counters as a dict of int64 arrays (read by CacheStats)."""
        cdef int64_t i
        cdef kv_layer *L
        names = ("hits", "misses", "evictions", "updates", "tokens_written", "truncations",
                 "prefetches", "prefetch_bytes")
        out = {k: np.zeros(self.num_layers, dtype=np.int64) for k in names}
        for i in range(self.num_layers):
            L = &self.layers[i]
            for k, val in zip(names, (L.hits, L.misses, L.evictions, L.updates,
                                      L.tokens_written, L.truncations, L.prefetches,
                                      L.prefetch_bytes)):
                out[k][i] = val
        return out

    def _reset_counters(self):
        cdef int64_t i
        cdef kv_layer *L
        for i in range(self.num_layers):
            L = &self.layers[i]
            L.hits = L.misses = L.evictions = L.updates = 0
            L.tokens_written = L.truncations = L.prefetches = L.prefetch_bytes = 0

    def _memory(self):
        """(memory_bytes, live_bytes, blocks, spare_blocks, compressed_blocks,
        compressed_bytes).

        live_bytes is the memory that holds held tokens: a full block's held
        slots, a compressed block's payload (pro rata to its held slots).

        live_bytes counts token data once per block: rows that share a block
        after reorder_batch share its bytes, so live_bytes never exceeds what
        the blocks hold and memory_efficiency stays a fraction.
        """
        cdef int64_t i, meta, live = 0
        meta = (self.blocks_alloc * sizeof(kv_block) + self.ndir * sizeof(kv_block *)
                + self.retired_bytes + self.num_layers * sizeof(kv_layer))
        for i in range(self.num_layers):
            meta += self.layers[i].nblk * self.batch * sizeof(int32_t)
            live += self._live_bytes(&self.layers[i])
        return (self.n_data_blocks * (self.block_bytes + KV_ALIGN) + self.payload_total + meta,
                live, self.n_data_blocks + self.n_compressed, self.n_spare,
                self.n_compressed, self.payload_total)

    cdef int64_t _live_bytes(self, const kv_layer *L) noexcept:
        """Bytes holding the layer's held tokens over all rows, a shared block
        once, a compressed block by its payload."""
        cdef int64_t slot_bytes = 2 * self.heads * self.row_bytes
        cdef kv_block *b
        cdef int64_t total = 0, k, p, end, c, j, off, r, q
        cdef int32_t bid
        cdef bint seen
        for k in range(2):
            p = 0 if k == 0 else L.lo
            end = _min(self.sinks, L.lo) if k == 0 else L.n
            while p < end:
                c = self._run(L, p, end, &j, &off)
                for r in range(self.batch):
                    bid = L.table[r * L.nblk + j]
                    seen = False
                    if _blk(self, bid).refcount > 1:   # shared: count at its first row
                        for q in range(r):
                            if L.table[q * L.nblk + j] == bid:
                                seen = True
                                break
                    if not seen:
                        b = _blk(self, bid)
                        if b.tier == KV_TIER_FULL:
                            total += c * slot_bytes
                        else:
                            total += b.payload_bytes * c // self.block_size
                p += c
        return total

    property dtype:
        def __get__(self):
            return self._dtype

    property num_layers:
        def __get__(self):
            return self.num_layers

    property num_kv_heads:
        def __get__(self):
            return self.heads

    property head_dim:
        def __get__(self):
            return self.head_dim

    property batch_size:
        def __get__(self):
            return self.batch

    property block_size:
        def __get__(self):
            return self.block_size

    property sink_tokens:
        def __get__(self):
            return self.sinks

    property max_seq_len:
        def __get__(self):
            return self.initial_cap

    property overflow:
        def __get__(self):
            return "ring" if self.ring else "error"

    property metrics_enabled:
        def __get__(self):
            return self.metrics

    def _set_lossless_codec(self, str name):
        """"lz4" (default) or "zstd" for LOSSLESS blocks compressed from now on."""
        if name == "zstd":
            _zstd()                    # fail now, not at the first compression
        self.zstd = name == "zstd"

    def _set_track_ages(self, bint on):
        """Keep block ages current on ring wrap (only compression reads them)."""
        self.track_ages = on

    def _clock(self):
        return self.clock()

    def _set_auto(self, int64_t residual):
        """Call _auto_compress whenever a block leaves the last `residual`
        positions of a layer (-1: never)."""
        self.auto_residual = residual

    property _max_capacity:
        def __get__(self):
            return self.max_capacity

    def _set_growth(self, bint enabled, int64_t max_capacity):
        self.growth_enabled = enabled
        self.max_capacity = max_capacity


def _float_to_half(const float[::1] x):
    """Test shim: the core's float -> half conversion, as uint16 bits."""
    cdef Py_ssize_t i
    out = np.empty(x.shape[0], dtype=np.uint16)
    cdef uint16_t[::1] o = out
    with nogil:
        for i in range(x.shape[0]):
            o[i] = kv_float_to_half(x[i])
    return out


def _half_to_float(const uint16_t[::1] h):
    """Test shim: the core's half -> float conversion."""
    cdef Py_ssize_t i
    out = np.empty(h.shape[0], dtype=np.float32)
    cdef float[::1] o = out
    with nogil:
        for i in range(h.shape[0]):
            o[i] = kv_half_to_float(h[i])
    return out


cdef object _lz4_block = None


cdef object _zstd_module = None


cdef object _zstd():
    """The zstandard package, imported on first use (an optional codec)."""
    global _zstd_module
    if _zstd_module is None:
        try:
            import zstandard
        except ImportError as exc:
            raise ImportError("lossless_codec='zstd' needs the zstandard package "
                              "(pip install zstandard)") from exc
        _zstd_module = zstandard
    return _zstd_module


cdef bytes _lossless_pack(object data, bint zstd):
    # A compressor object per call: they are not safe to share between the
    # threads that may compress different layers at once.
    if zstd:
        return _zstd().ZstdCompressor(level=3).compress(data)
    return _lz4().compress(data, store_size=False)


cdef bytes _lossless_unpack(object data, int64_t size, bint zstd):
    if zstd:
        return _zstd().ZstdDecompressor().decompress(data, max_output_size=size)
    return _lz4().decompress(data, uncompressed_size=size)


cdef object _lz4():
    """The lz4 package's block codec, imported on first use."""
    global _lz4_block
    if _lz4_block is None:
        try:
            import lz4.block
        except ImportError as exc:
            raise ImportError("the LOSSLESS tier needs the lz4 package (pip install lz4)") from exc
        _lz4_block = lz4.block
    return _lz4_block


# The codec variant in use (AVX2+F16C+FMA or scalar): chosen with the
# attention kernel by set_backend(), first by _init_backend() at import
# (environment overrides included).
cdef const kv_codec_table *_codecs = kv_codecs_select(0)


def codec_backend():
    """Name of the tier codecs in use ("avx2" or "scalar")."""
    return _codecs.name.decode()


def _select_codecs(bint allow_simd):
    """Choose the codecs again (tests run every variant; not thread-safe
    against compression running at the same time).  Returns the name."""
    global _codecs
    _codecs = kv_codecs_select(allow_simd)
    return codec_backend()


include "_attention.pxi"

_init_backend()


cdef void _encode(const kv_shape *s, int tier, const void *block, uint8_t *out) noexcept nogil:
    if tier == KV_TIER_FP16:
        _codecs.encode_fp16(s, block, out)
    elif tier == KV_TIER_INT8:
        _codecs.encode_int8(s, block, out)
    else:
        _codecs.encode_int4(s, block, out)


cdef void _decode_payload(const kv_shape *s, int tier, const uint8_t *payload,
                          void *block, int halves) noexcept nogil:
    if tier == KV_TIER_FP16:
        _codecs.decode_fp16(s, payload, block, halves)
    elif tier == KV_TIER_INT8:
        _codecs.decode_int8(s, payload, block, halves)
    else:
        _codecs.decode_int4(s, payload, block, halves)


cdef int32_t *_set_capacity(KVStore s, kv_layer *L, int64_t cap) except? NULL:
    """Give the layer a table for `cap` tokens; entries keep their block.

    Returns the previous table for the caller to free (or to restore with
    _restore_table if what follows fails).  Raises MemoryError leaving the
    layer unchanged.  Shrinking releases the blocks past the new end.
    """
    cdef int64_t nblk = _ceil_div(cap, s.block_size), r, j, keep
    cdef int32_t *table = <int32_t *>PyMem_RawMalloc(_max(1, nblk * s.batch) * sizeof(int32_t))
    cdef int32_t *old = L.table
    if table == NULL:
        raise MemoryError(f"cannot allocate a block table for {cap} tokens")
    keep = _min(nblk, L.nblk)
    if nblk < L.nblk:
        s._release_tail(L, nblk)
    for r in range(s.batch):
        for j in range(nblk):
            table[r * nblk + j] = L.table[r * L.nblk + j] if j < keep else -1
    L.table = table
    L.nblk = nblk
    L.cap = cap
    return old


cdef void _restore_table(KVStore s, kv_layer *L, int32_t *old_table, int64_t old_cap,
                         int64_t old_nblk) noexcept:
    """Undo a _set_capacity that grew the table (blocks it gained are released)."""
    s._release_tail(L, old_nblk)
    PyMem_RawFree(L.table)
    L.table = old_table
    L.cap = old_cap
    L.nblk = old_nblk


cdef void _scatter_kv(KVStore s, const kv_layer *L, cnp.ndarray ka, cnp.ndarray va,
                      int64_t start, int64_t a0, int64_t b0, int64_t a1,
                      int64_t b1) noexcept nogil:
    """Copy the input tokens of positions [a0, b0) and [a1, b1) into their slots."""
    cdef const char *kd = <const char *>cnp.PyArray_DATA(ka)
    cdef const char *vd = <const char *>cnp.PyArray_DATA(va)
    cdef const cnp.npy_intp *ks = cnp.PyArray_STRIDES(ka)
    cdef const cnp.npy_intp *vs = cnp.PyArray_STRIDES(va)
    _scatter(s, L, kd, ks, vd, vs, start, a0, b0)
    _scatter(s, L, kd, ks, vd, vs, start, a1, b1)


cdef inline void _put_rows(KVStore s, char *dst, const char *src,
                           const cnp.npy_intp *st, int64_t c) noexcept nogil:
    """Copy `c` consecutive tokens of one head (input strides `st`) to `dst`."""
    cdef int64_t j
    if st[3] == s.itemsize and st[2] == s.row_bytes:
        memcpy(dst, src, c * s.row_bytes)
    else:
        for j in range(c):
            _copy_row(dst + j * s.row_bytes, src + j * st[2], s.head_dim, st[3], s.itemsize)


cdef void _scatter(KVStore s, const kv_layer *L, const char *kd, const cnp.npy_intp *ks,
                   const char *vd, const cnp.npy_intp *vs, int64_t start,
                   int64_t a, int64_t b) noexcept nogil:
    """Copy input tokens of positions [a, b) (input index p - start), keys and
    values, into their slots, every row and head."""
    cdef int64_t r, h, p, c, j, off, i
    cdef int64_t head_stride = s.block_size * s.row_bytes
    cdef const int32_t *row
    cdef char *dst
    for r in range(s.batch):
        row = L.table + r * L.nblk
        p = a
        while p < b:
            c = s._run(L, p, b, &j, &off)
            dst = _blk(s, row[j]).data + off * s.row_bytes
            i = p - start
            for h in range(s.heads):
                _put_rows(s, dst + h * head_stride,
                          kd + r * ks[0] + h * ks[1] + i * ks[2], ks, c)
                _put_rows(s, dst + s.half_bytes + h * head_stride,
                          vd + r * vs[0] + h * vs[1] + i * vs[2], vs, c)
            p += c
