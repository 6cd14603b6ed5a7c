# cython: language_level=3
"""Compiled block store of kvcache.

The store keeps every layer's keys and values in fixed-size blocks drawn from
one pool per cache, with a block table per layer and batch row (the
PagedAttention layout, on the CPU).  Tokens are never moved once written:
appending touches one block, ring eviction reuses the evicted tokens' slots,
growth only lengthens the block tables.  Blocks come from the pool on first
write, so memory follows the tokens held, not the capacity.

This file is the class shell: KVStore's Python-visible methods, each
validating its arguments and calling the mechanism in the include file that
holds it:

* ``_layout.pxi``   where a position lives: slots, spans, the held-range walk
* ``_pool.pxi``     the block pool, block tables, growth of a table, reorder
* ``_codecs.pxi``   tier codecs as the store uses them (and LOSSLESS glue)
* ``_write.pxi``    update: a pure plan, then its commit
* ``_read.pxi``     keys(), values(), positions()
* ``_compress.pxi`` compression mechanisms (candidates, trial errors, compress)
* ``_export.pxi``   export/import of the whole store (save files)
* ``_counters.pxi`` counters and memory gauges
* ``_dispatch.pxi`` which attention kernel and codecs this CPU runs
* ``_attention.pxi`` attention and prefetch over the block tables

It decides no policy: growth, compression choice and eligibility, statistics
and logging live in plain Python (:mod:`kvcache.cache`,
:mod:`kvcache.compression`, :mod:`kvcache.growth`, :mod:`kvcache.stats`),
called back only when a layer runs out of capacity with growth enabled or a
block boundary leaves the window automatic compression watches.

Ownership: the store owns every block and table; they are freed exactly once,
in ``__dealloc__`` or when released to the pool beyond its spare bound.
"""

cimport numpy as cnp
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uintptr_t
from libc.string cimport memcpy, memset

import math
import numbers
import operator
import os
import warnings
from time import monotonic, perf_counter

import numpy as np

cnp.import_array()
kv_tiers_init()

# Tier codes for Python (kvcache.compression, kvcache.fileformat).
TIER_FULL = KV_TIER_FULL
TIER_FP16 = KV_TIER_FP16
TIER_INT8 = KV_TIER_INT8
TIER_INT4 = KV_TIER_INT4
TIER_LOSSLESS = KV_TIER_LOSSLESS
TIER_NAMES = {KV_TIER_FULL: "full", KV_TIER_FP16: "fp16", KV_TIER_INT8: "int8",
              KV_TIER_INT4: "int4", KV_TIER_LOSSLESS: "lossless"}
# Block flags (candidates report them; save files record them).
FLAG_INCOMPRESSIBLE = KV_FLAG_INCOMPRESSIBLE
FLAG_ENCODING = KV_FLAG_ENCODING
FLAG_ZSTD = KV_FLAG_ZSTD

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


cdef inline int64_t _round_up(int64_t a, int64_t b) noexcept nogil:
    return _ceil_div(a, b) * b


cdef kv_layer *_layer_at(KVStore s, object layer_idx) except NULL:
    """The layer `layer_idx` names; IndexError for anything else."""
    cdef int64_t li = _as_int64(layer_idx, "layer_idx", IndexError)
    if li < 0 or li >= s.num_layers:
        raise IndexError(f"layer_idx must be in [0, {s.num_layers}), got {layer_idx}")
    return &s.layers[li]


cdef cnp.ndarray _plan_array(object x, object dtype, str name):
    """A compression plan's argument as a contiguous 1-D array of `dtype`."""
    a = np.ascontiguousarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


include "_layout.pxi"
include "_pool.pxi"
include "_codecs.pxi"
include "_write.pxi"
include "_read.pxi"
include "_compress.pxi"
include "_export.pxi"
include "_counters.pxi"
include "_dispatch.pxi"
include "_attention.pxi"


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
        self.auto_lag = -1

    def __dealloc__(self):
        _free_store(self)

    def _init_store(self, int64_t num_layers, int64_t num_kv_heads, int64_t head_dim,
                    int64_t max_seq_len, int64_t batch_size, str dtype,
                    int64_t block_size, int64_t sink_tokens, bint ring, bint metrics,
                    int64_t group8=64, int64_t group4=32, object clock=None):
        """Allocate the layer tables.  Arguments are validated by KVCache."""
        cdef int64_t i
        if self.layers != NULL:
            raise ValueError("the store is already initialised")
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.typenum, self.itemsize = _DTYPES[dtype]
        self._dtype = np.dtype(dtype)
        self.num_layers = 0
        self.batch = batch_size
        self.heads = num_kv_heads
        self.head_dim = head_dim
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
        memset(self.layers, 0, num_layers * sizeof(kv_layer))
        self.num_layers = num_layers
        for i in range(num_layers):
            _set_capacity(self, &self.layers[i], max_seq_len)

    # ------------------------------------------------------------ writing

    def update(self, layer_idx, object k, object v, seq_len):
        """Write ``k``/``v`` at positions ``seq_len - t .. seq_len - 1`` of the
        layer and set its length to ``seq_len`` (``t = k.shape[2]``).

        Appends, overwrites in place or truncates by that one rule; see
        :class:`kvcache.KVCache` for the full statement.  Validates everything
        before it changes anything.
        """
        cdef cnp.ndarray ka, va
        cdef int64_t t = 0
        cdef kv_layer *L = _layer_at(self, layer_idx)
        cdef int64_t m = _as_int64(seq_len, "seq_len", ValueError)
        if k is None and v is None:
            ka = va = None
        elif k is None or v is None:
            raise TypeError("k and v must both be arrays, or both None for a pure truncate; "
                            f"got k={type(k).__name__}, v={type(v).__name__}")
        else:
            ka = _as_input(self, k, "k")
            va = _as_input(self, v, "v")
            t = cnp.PyArray_DIMS(ka)[2]
            if cnp.PyArray_DIMS(va)[2] != t:
                raise ValueError(f"k and v must hold the same number of tokens: "
                                 f"k has {t}, v has {cnp.PyArray_DIMS(va)[2]}")
        _write(self, L, L - self.layers, ka, va, t, m)

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
            lo_i = _layer_at(self, layer_idx) - self.layers
            hi_i = lo_i + 1
        for i in range(lo_i, hi_i):
            if self.layers[i].n > seq_len:
                _write(self, &self.layers[i], i, None, None, 0, seq_len)

    def reorder_batch(self, indices):
        """Make row ``r`` of every layer what row ``indices[r]`` was.

        Beam-search reordering, batch selection and repetition in one call:
        ``len(indices)`` becomes the batch size and rows may repeat.  Only
        block-table entries move; a block shared by several rows is copied
        when one of them is next written (copy-on-write).
        """
        cdef cnp.ndarray idx_arr
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
        if idx_arr.shape[0] == 0:
            raise ValueError("indices must select at least one row")
        if idx_arr.shape[0] > (1 << 20):
            raise ValueError(f"indices select {idx_arr.shape[0]} rows; at most {1 << 20} "
                             "are allowed")
        # Compare before converting: uint64 values past int64 would wrap.
        if idx_arr.min() < 0 or idx_arr.max() >= self.batch:
            raise IndexError(f"indices must be in [0, {self.batch}), got values from "
                             f"{idx_arr.min()} to {idx_arr.max()}")
        idx_arr = np.ascontiguousarray(idx_arr, dtype=np.int64)
        _reorder_rows(self, <const int64_t *>cnp.PyArray_DATA(idx_arr), idx_arr.shape[0])

    def reset(self):
        """Empty every layer and return capacity to ``max_seq_len``.

        Counters are kept (see ``reset_stats``); blocks go back to the pool.
        """
        cdef int64_t i
        cdef kv_layer *L
        for i in range(self.num_layers):
            L = &self.layers[i]
            _release_tail(self, L, 0)
            L.n = L.lo = 0
            L.epoch += 1
            if L.cap != self.initial_cap:
                PyMem_RawFree(_set_capacity(self, L, self.initial_cap))

    # Policy hooks (kvcache.KVCache overrides them).

    def _auto_compress(self, Py_ssize_t layer_idx):
        """Called when a block boundary passes n - auto_lag in a layer."""

    def _grown_capacity(self, Py_ssize_t layer_idx, int64_t cap, int64_t needed):
        """The new capacity of a layer that needs `needed` tokens."""
        return cap

    def _growth_done(self, Py_ssize_t layer_idx, int64_t old_cap, int64_t new_cap,
                     double seconds):
        """Called after a growth committed."""

    # ------------------------------------------------------------ reading

    def seq_len(self, layer_idx):
        """Tokens logically in the layer: its absolute length, evicted included."""
        return _layer_at(self, layer_idx).n

    def capacity(self, layer_idx):
        """Tokens the layer can hold before it evicts, grows or fails."""
        return _layer_at(self, layer_idx).cap

    def held(self, layer_idx):
        """Tokens the layer holds (sinks plus window)."""
        return _held(self, _layer_at(self, layer_idx))

    def keys(self, layer_idx):
        """The held keys, [batch, kv_heads, held, head_dim], in position order
        (sinks, then window).  Always a fresh copy."""
        return _read(self, _layer_at(self, layer_idx), 0)

    def values(self, layer_idx):
        """The held values, laid out as :meth:`keys`.  Always a fresh copy."""
        return _read(self, _layer_at(self, layer_idx), 1)

    def positions(self, layer_idx):
        """Absolute positions held, in the order keys() returns them (int64)."""
        return _positions(self, _layer_at(self, layer_idx))

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
        machines measured so far it never made attention faster.  Each token
        read counts as a hit (full tier) or a miss (compressed) in the stats.
        """
        return _attention(self, layer_idx, q, scale, out, prefetch)

    def prefetch(self, layer_idx, seq_len):
        """Hint the memory the next ``attention(layer_idx, ...)`` reads
        first, for a layer of length ``seq_len``: its first 32 KiB to every
        cache level, the next 480 KiB to L2.  Call it for the next layer
        while this one computes.  Returns the bytes hinted (0 where the
        compiler has no prefetch builtin); never faults."""
        return _prefetch(self, layer_idx, seq_len)

    # -------------------------------------------------------- compression

    def _candidates(self, layer_idx):
        """``(epoch, seq_len, records)``: the layer's epoch and length, and one
        kv_candidate record per distinct block it holds (bytes;
        kvcache.compression reads them as CANDIDATE_DTYPE)."""
        return _candidates(self, _layer_at(self, layer_idx))

    def _trial_errors(self, layer_idx, int64_t epoch, blocks, int tier, exacts):
        """Reconstruction error of each block in `tier` (float64, NaN for a
        block no longer at full precision); None when the layer is busy or
        past `epoch`."""
        cdef kv_layer *L = _layer_at(self, layer_idx)
        return _trial_errors(self, L, L - self.layers, epoch,
                             _plan_array(blocks, np.int32, "blocks"), tier,
                             _plan_array(exacts, np.int64, "exacts"))

    def _compress_blocks(self, layer_idx, int64_t epoch, blocks, tiers, exacts):
        """Compress the layer's `blocks` to `tiers` (KV_TIER_* codes), each
        keeping its first `exacts` slots verbatim; see _compress.pxi."""
        cdef kv_layer *L = _layer_at(self, layer_idx)
        return _compress_blocks(self, L, L - self.layers, epoch,
                                _plan_array(blocks, np.int32, "blocks"),
                                _plan_array(tiers, np.int8, "tiers"),
                                _plan_array(exacts, np.int64, "exacts"))

    def _block_tiers(self, layer_idx):
        """[batch, table entries] tier codes of the layer's blocks (-1: none)."""
        return _block_tiers(self, _layer_at(self, layer_idx))

    def _set_auto(self, int64_t lag):
        """Call _auto_compress whenever a block boundary passes n - `lag` in a
        layer (-1: never)."""
        self.auto_lag = lag

    def _set_lossless_codec(self, str name):
        """"lz4" (default) or "zstd" for LOSSLESS blocks compressed from now on."""
        _lossless.require(name)          # fail now, not at the first compression
        self.zstd = name == "zstd"

    def _set_track_ages(self, bint on):
        """Keep block ages current on ring wrap (only compression reads them)."""
        self.track_ages = on

    # ----------------------------------------------------------- save/load

    def _payload_nbytes(self, int tier, int64_t exact):
        """Bytes of a FP16/INT8/INT4 payload keeping `exact` leading slots
        verbatim (what a saved block of that tier must hold)."""
        return _payload_size(self, tier, exact)

    def _held_entries(self, int64_t n, int64_t lo, int64_t cap):
        """int64 [ceil(cap / block_size)]: held positions per table entry of a
        layer of capacity `cap` with window [lo, n) (the loader checks save
        files' tables against it)."""
        cdef kv_layer L
        memset(&L, 0, sizeof(kv_layer))
        if cap <= self.sinks or not 0 <= lo <= n:
            raise ValueError(f"no layer has capacity {cap}, window [{lo}, {n}) and "
                             f"{self.sinks} sinks")
        L.cap = cap
        L.nblk = _ceil_div(cap, self.block_size)
        out = np.empty(L.nblk, dtype=np.int64)
        _count_held(self, &L, lo, n, <int64_t *>cnp.PyArray_DATA(out), NULL)
        return out

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
        return _export(self, layers, prefix)

    def _import(self, list states, list tables, list blocks):
        """Give a fresh, empty store the state `_export` described, already
        validated by kvcache.fileformat (every value in range, every table
        entry a block of this layer, every payload the size its tier needs).

        A MemoryError part way leaves the store unusable but consistent for
        ``__dealloc__`` (which frees every block): the loader discards it.
        """
        _import(self, states, tables, blocks)

    # ------------------------------------------------------------ metrics

    def _counters(self, dtype):
        """Every layer's counters as one structured array of `dtype`
        (kvcache.stats.COUNTER_DTYPE)."""
        return _counter_array(self, dtype)

    def _reset_counters(self):
        _reset_counters(self)

    def _memory(self):
        """(memory_bytes, live_bytes, blocks, spare_blocks, compressed_blocks,
        compressed_bytes); see _counters.pxi."""
        return _memory(self)

    # -------------------------------------------------------- configuration

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

    def _clock(self):
        return self.clock()

    property _max_capacity:
        def __get__(self):
            return self.max_capacity

    def _set_growth(self, bint enabled, int64_t max_capacity):
        self.growth_enabled = enabled
        self.max_capacity = max_capacity


_init_backend()
