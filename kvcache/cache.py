"""The public cache object: the compiled store plus its Python policies."""

from __future__ import annotations

import datetime
import logging
import math
import numbers
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from . import fileformat
from ._core import KVStore
from .compression import (
    BackgroundCompressor,
    CompressionPolicy,
    CompressionStats,
    CompressionStrategy,
    policy_for,
    release_freed_memory,
)
from .config import DEFAULT_BLOCK_SIZE, MAX_TOKENS, CacheConfig, _positive_int
from .growth import GrowthStrategy
from .stats import COUNTER_DTYPE, CacheStats

__all__ = ["KVCache", "DEFAULT_BLOCK_SIZE", "MAX_TOKENS"]

logger = logging.getLogger("kvcache")


class KVCache(KVStore):
    """Key/value cache of a transformer: every layer's K and V in paged blocks.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        The model's shape.
    max_seq_len : int
        Capacity in tokens of each layer (before any growth).
    batch_size : int
        Rows per update; every row of a layer shares its length.
    dtype : {"float16", "float32"} or numpy dtype
        Storage dtype, ``"float16"`` or ``"float32"``.  Inputs of either
        dtype are accepted and cast (the fast path is an input already of the
        storage dtype).
    block_size : int, optional
        Tokens per block, a power of two (default :data:`DEFAULT_BLOCK_SIZE`):
        slot arithmetic then needs shifts, not divisions.
    sink_tokens : int
        Positions ``0 .. sink_tokens - 1`` are never evicted by the ring
        (attention sinks; llama.cpp's ``n_keep``).
    overflow : {"ring", "error"}
        ``"ring"``: past capacity keep the sinks and the most recent
        ``max_seq_len - sink_tokens`` positions, reusing the evicted tokens'
        slots.  ``"error"``: raise :class:`CacheFullError`, writing nothing.
    metrics : bool
        Maintain the counters of :meth:`stats` (on by default; the cost is a
        few integer additions per call).
    compression : CompressionStrategy or str, optional
        A :class:`CompressionStrategy` (or its name) for old blocks:
        ``NONE`` (default), ``FP16``, ``INT8``, ``INT4``, ``LOSSLESS``,
        ``ADAPTIVE`` (see :mod:`kvcache.compression`).  The policy built from
        it and the three options below is :attr:`compression_policy`; assign
        your own :class:`~kvcache.compression.CompressionPolicy` there.
    residual_tokens : int
        The most recent positions of each layer stay at full precision (128).
    group_size, int8_group_size : int, optional
        Channels per quantization group of INT4 values (at most 256) and of
        INT8; a size given is capped at ``head_dim`` and must divide it.
        Left at None (the default), each is the largest divisor of
        ``head_dim`` not above 32 (64), so any head size works (80 -> 20
        and 40).
    keep_first : int, optional
        The first positions stay at full precision (attention sinks hold a
        large share of attention): default ``sink_tokens``, or 4 without sinks.
    error_budget : float
        ADAPTIVE's bound on a block's relative reconstruction error (0.10).
    auto_compress : bool
        Compress blocks as they leave the residual window, on the update that
        moves them out (incrementally: a compressed block is never touched
        again).  Needs ``compression``.
    background : bool
        With ``auto_compress``: a worker thread does the compressing, off the
        update path (see :class:`kvcache.compression.BackgroundCompressor`);
        ``wait_for_compression()`` waits for it to catch up.
    lossless_codec : {"lz4", "zstd"}
        ``"lz4"`` (default, the ``lz4`` package's block codec) or ``"zstd"``
        (needs the ``zstandard`` package: slower, usually smaller) for LOSSLESS
        blocks; each block records which codec packed it.
    clock : callable, optional
        Time source for block ages (seconds, default ``time.monotonic``);
        inject one in tests instead of sleeping.

    Notes
    -----
    Every option but ``clock`` is checked by, and kept as, a
    :class:`kvcache.CacheConfig` (:attr:`config`); the options are also
    attributes of the cache, as applied (``cache.group_size`` ...).

    The update rule: ``update(layer_idx, k, v, seq_len)`` writes the ``t = k.shape[2]`` given
    tokens at positions ``seq_len - t .. seq_len - 1`` and sets the layer's
    length to ``seq_len``, dropping everything at or beyond it: an append
    when ``seq_len - t`` equals the length, an in-place overwrite when
    ``seq_len`` equals it, a truncation (with the last ``t`` positions
    rewritten) when ``seq_len`` is smaller; ``k = v = None`` is a pure
    truncation.  A hole, a rewrite of an evicted position, a wrong shape,
    dtype, layer or length raises and leaves the cache unchanged.

    Thread safety: calls on *different* layers may run concurrently from
    several threads (counters are per layer; the pool is only touched with
    the GIL held, large copies release it).  Calls on the same layer, and
    ``reset``/``truncate(layer_idx=None)``/``enable_dynamic_growth`` against
    anything else, must be serialised by the caller.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int = 4096, batch_size: int = 1, dtype="float16",
                 block_size: int | None = None, sink_tokens: int = 0,
                 overflow: str = "ring", metrics: bool = True, compression=None,
                 residual_tokens: int = 128, group_size: int | None = None,
                 int8_group_size: int | None = None, keep_first: int | None = None,
                 error_budget: float = 0.10, auto_compress: bool = False,
                 background: bool = False, lossless_codec: str = "lz4",
                 clock=None) -> None:
        config = CacheConfig(
            num_layers, num_kv_heads, head_dim, max_seq_len=max_seq_len,
            batch_size=batch_size, dtype=dtype, block_size=block_size,
            sink_tokens=sink_tokens, overflow=overflow, metrics=metrics,
            compression=compression, residual_tokens=residual_tokens, group_size=group_size,
            int8_group_size=int8_group_size, keep_first=keep_first, error_budget=error_budget,
            auto_compress=auto_compress, background=background, lossless_codec=lossless_codec)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        c = self._config = config
        self._init_store(c.num_layers, c.num_kv_heads, c.head_dim, c.max_seq_len,
                         c.batch_size, c.dtype, c.block_size, c.sink_tokens,
                         c.overflow == "ring", c.metrics, c.int8_group_size, c.group_size,
                         clock)
        self._auto_stats = CompressionStats()
        # Guards the Python-side counters (growth, automatic compression):
        # threads growing or compressing different layers update them at once.
        self._counter_lock = threading.Lock()
        self.auto_compression_errors: list = []
        self._freed_since_trim = 0
        self._background = BackgroundCompressor(self) if c.background else None
        self._set_lossless_codec(c.lossless_codec)
        self._policy = None
        self.compression_policy = policy_for(c.compression, c.residual_tokens, c.keep_first,
                                             c.error_budget)
        self._strategy: GrowthStrategy | None = None
        self._growths = 0
        self._growth_bytes = 0
        self._growth_seconds = 0.0

    @property
    def config(self) -> CacheConfig:
        """The options this cache was built with, as applied (see
        :class:`CacheConfig`), with its current ``batch_size``
        (:meth:`reorder_batch` changes it)."""
        if self._config.batch_size != self.batch_size:
            self._config = replace(self._config, batch_size=self.batch_size)
        return self._config

    # The configuration's compression options, read-only (the config is the
    # one place they are kept).
    compression = property(lambda self: self._config.compression)
    residual_tokens = property(lambda self: self._config.residual_tokens)
    keep_first = property(lambda self: self._config.keep_first)
    error_budget = property(lambda self: self._config.error_budget)
    auto_compress = property(lambda self: self._config.auto_compress)
    lossless_codec = property(lambda self: self._config.lossless_codec)
    group_size = property(lambda self: self._config.group_size)
    int8_group_size = property(lambda self: self._config.int8_group_size)

    @property
    def token_bytes(self) -> int:
        """Bytes one position takes in one layer: keys and values, every row and head."""
        return 2 * self.batch_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    # ----------------------------------------------------------------- growth

    def enable_dynamic_growth(self, strategy: GrowthStrategy | None = None,
                              max_capacity: int | None = None) -> None:
        """Grow a layer's capacity when it runs out, instead of evicting or failing.

        ``strategy`` defaults to ``GrowthStrategy.exponential(1.5)``;
        ``max_capacity`` (tokens, default unbounded) caps it, after which
        ``overflow`` applies.  Growth never moves a stored token.  A layer
        whose ring has already wrapped cannot grow (its slots no longer match
        its positions): truncate or reset it first.
        """
        if strategy is None:
            strategy = GrowthStrategy.exponential(1.5)
        if not isinstance(strategy, GrowthStrategy):
            raise TypeError(f"strategy must be a GrowthStrategy, got {type(strategy).__name__}")
        cap_max = MAX_TOKENS if max_capacity is None else _positive_int("max_capacity",
                                                                          max_capacity)
        for i in range(self.num_layers):
            if cap_max < self.capacity(i):
                raise ValueError(f"max_capacity ({cap_max}) is below layer {i}'s capacity "
                                 f"({self.capacity(i)})")
            if self.seq_len(i) > self.capacity(i):
                raise ValueError(f"layer {i}'s ring has wrapped (seq_len {self.seq_len(i)} > "
                                 f"capacity {self.capacity(i)}); truncate or reset it first")
        self._strategy = strategy
        self._set_growth(True, cap_max)

    def disable_dynamic_growth(self) -> None:
        """Stop growing; capacities stay where growth left them."""
        self._set_growth(False, max(self.capacity(i) for i in range(self.num_layers)))
        self._strategy = None

    @property
    def growth_strategy(self) -> GrowthStrategy | None:
        return self._strategy

    def _grown_capacity(self, layer_idx: int, cap: int, needed: int) -> int:
        # The core caps the answer at max_capacity.
        return self._strategy.next_capacity(cap, needed, self.block_size, layer_idx)

    def _growth_done(self, layer_idx: int, old_cap: int, new_cap: int, seconds: float) -> None:
        if self.metrics_enabled:
            grown = (new_cap - old_cap) * self.token_bytes
            with self._counter_lock:
                self._growths += 1
                self._growth_bytes += grown
                self._growth_seconds += seconds
        logger.info("kvcache: layer %d capacity %d -> %d tokens (%.1f us)",
                    layer_idx, old_cap, new_cap, seconds * 1e6)

    # ------------------------------------------------------------ compression

    @property
    def compression_policy(self) -> CompressionPolicy | None:
        """The :class:`~kvcache.compression.CompressionPolicy` that decides what
        ``compress_old_entries`` and automatic compression do (built from
        ``compression``, ``residual_tokens``, ``keep_first`` and
        ``error_budget``; None without compression).  Assign your own policy
        to change it; automatic compression then follows its
        ``trigger_lag``."""
        return self._policy

    @compression_policy.setter
    def compression_policy(self, policy: CompressionPolicy | None) -> None:
        if policy is not None and not isinstance(policy, CompressionPolicy):
            raise TypeError(f"compression_policy must be a CompressionPolicy or None, "
                            f"got {type(policy).__name__}")
        if policy is not None:
            policy.check(self)
        elif self.auto_compress:
            raise ValueError("auto_compress needs a compression policy")
        self._policy = policy
        self._set_track_ages(policy is not None)
        self._set_auto(policy.trigger_lag if self.auto_compress else -1)

    def compress_old_entries(self, age_threshold=0.0, strategy=None,
                             workers: int | None = None) -> CompressionStats:
        """Compress every full block, in every layer, written at least
        ``age_threshold`` seconds ago (a number or a ``timedelta``; 0: every
        eligible block) that lies outside the residual window; the first
        ``keep_first`` positions keep their exact values.

        A block's age counts from when it was taken from the pool (or last
        rewritten in place).  ``strategy`` (a :class:`CompressionStrategy`,
        its name, or a :class:`~kvcache.compression.CompressionPolicy`)
        defaults to the cache's ``compression_policy``.  Blocks already
        compressed are left as they are.  ``workers`` threads compress
        different layers at once (the codecs release the GIL); default: one
        per CPU, at most 4.
        """
        if isinstance(age_threshold, datetime.timedelta):
            age_threshold = age_threshold.total_seconds()
        if isinstance(age_threshold, numbers.Real) and not isinstance(age_threshold, bool):
            age_threshold = float(age_threshold)        # numpy scalars too
        if not isinstance(age_threshold, float) or not age_threshold >= 0:
            raise ValueError(f"age_threshold must be seconds >= 0 or a timedelta, "
                             f"got {age_threshold!r}")
        if isinstance(strategy, CompressionPolicy):
            policy = strategy
            policy.check(self)
        elif strategy is None:
            policy = self._policy
        else:
            policy = self._policy_for(CompressionStrategy.coerce(strategy))
        if policy is None:
            raise ValueError("no compression strategy: pass compression= to KVCache, "
                             "or strategy= here")
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        workers = _positive_int("workers", workers, maximum=256)
        t0 = time.perf_counter()
        results = self._run_policy(policy, self.clock_now() - age_threshold,
                                   range(self.num_layers), workers)
        stats = CompressionStats.from_results(results, time.perf_counter() - t0)
        if stats.blocks:
            release_freed_memory()      # so that RSS falls with memory_bytes
        return replace(stats, seconds=time.perf_counter() - t0)

    def _policy_for(self, strategy: CompressionStrategy) -> CompressionPolicy | None:
        """The built-in policy for `strategy` with this cache's settings."""
        policy = policy_for(strategy, self.residual_tokens, self.keep_first,
                            self.error_budget)
        if policy is not None:
            policy.check(self)
        return policy

    def _run_policy(self, policy: CompressionPolicy, cutoff: float, layers,
                    workers: int = 1) -> list:
        """policy.compress_layer over `layers`; the results of all of them."""
        layers = list(layers)
        if workers == 1 or len(layers) == 1:
            return [r for li in layers for r in policy.compress_layer(self, li, cutoff)]
        # Layers are independent: each thread takes whole layers, and the
        # pool, counters and block states are only touched with the GIL.
        with ThreadPoolExecutor(min(workers, len(layers))) as pool:
            parts = pool.map(lambda li: policy.compress_layer(self, li, cutoff), layers)
            return [r for part in parts for r in part]

    def _compress(self, tier: int, residual: int, keep_first: int, cutoff: float,
                  budget: float, layers=None) -> list:
        """The built-in policy for `tier` with these settings, over `layers`
        (default all): the core's per-block results (tools and tests)."""
        policy = policy_for(CompressionStrategy(tier), residual, keep_first, budget)
        return self._run_policy(policy, cutoff,
                                range(self.num_layers) if layers is None else layers)

    def clock_now(self) -> float:
        """The cache's clock (block ages are measured on it)."""
        return self._clock()

    def _auto_compress(self, layer_idx: int) -> None:
        # Runs after an update committed: a failure to compress is logged and
        # kept (auto_compression_errors), never raised from update().
        try:
            if self._background is not None:
                self._background.submit(layer_idx)
            else:
                self._compress_layer(layer_idx)
        except Exception as exc:
            self.auto_compression_errors.append(exc)
            logger.exception("kvcache: automatic compression of layer %d failed", layer_idx)

    def _compress_layer(self, layer_idx: int) -> bool:
        """Compress the layer's eligible blocks now.  True when some work was
        left undone because another thread was copying the layer (it was
        "busy", or a payload was "dropped"): worth trying again shortly."""
        policy = self._policy
        if policy is None:
            return False
        t0 = time.perf_counter()
        results = policy.compress_layer(self, layer_idx, math.inf)
        if results:
            done = CompressionStats.from_results(results, time.perf_counter() - t0)
            with self._counter_lock:
                self._auto_stats = self._auto_stats + done
            # Hand freed blocks back to the OS now and then (a trim walks the
            # heaps: about a millisecond; once per 16 MiB keeps it rare).
            self._freed_since_trim += done.bytes_before - done.bytes_after
            if self._freed_since_trim >= 16 << 20:
                self._freed_since_trim = 0
                release_freed_memory()
        return any(r[0] in ("busy", "dropped") for r in results)

    def wait_for_compression(self) -> None:
        """Block until the background compressor has handled every queued
        layer (returns at once without ``background``)."""
        if self._background is not None:
            self._background.join()
            if self._background.errors:
                raise self._background.errors[-1]

    def close(self) -> None:
        """Stop the background compressor (the cache stays usable; automatic
        compression then runs on the update path)."""
        if self._background is not None:
            self._background.close()
            self._background = None

    @property
    def auto_compression_stats(self) -> CompressionStats:
        """What automatic compression has done since construction."""
        return self._auto_stats

    def block_tiers(self, layer_idx: int):
        """Tier name of each of the layer's blocks, per batch row, in table order
        (``None`` where a table entry has no block)."""
        from ._core import TIER_NAMES
        return [[TIER_NAMES.get(int(code)) for code in row] for row in self._block_tiers(layer_idx)]

    # -------------------------------------------------------------- save/load

    def save(self, path, layers=None, prefix: int | None = None) -> int:
        """Write the cache to ``path`` (see :mod:`kvcache.fileformat`); returns
        the file's size in bytes.

        ``layers``: the layer indices to save (default all; the others are
        recorded empty).  ``prefix``: save only positions ``0 .. prefix - 1``
        of each saved layer (a system prompt's cache, to load and extend
        later); they must all still be held (not evicted by the ring).

        Compressed blocks are stored as they are, with a CRC-32 per block and
        for the header.  The write is atomic: a temporary file beside
        ``path``, flushed and fsynced, renamed over ``path``; a crash leaves
        the old file or the new one.  Configuration, block ages and the
        growth policy are saved; statistics counters are not.  Do not update
        the cache from another thread while it saves.
        """
        saved = self._layers_to_save(layers)
        cut = self._prefix_to_save(saved, prefix)
        # A background compressor closed since construction is not restored.
        config = replace(self.config, background=self._background is not None)
        record = fileformat.SaveRecord.from_export(
            config, self._export(saved, -1 if cut is None else cut), saved, cut,
            self._strategy, self._max_capacity if self._strategy is not None else None)
        return fileformat.write(path, record)

    def _layers_to_save(self, layers) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of layer indices or None, "
                            f"got {type(layers).__name__}")
        out = []
        for li in layers:
            if isinstance(li, (bool, np.bool_)) or not isinstance(li, (int, np.integer)):
                raise TypeError(f"layer indices must be integers, got {type(li).__name__}")
            if not 0 <= li < self.num_layers:
                raise IndexError(f"layer index {li} out of range for {self.num_layers} layers")
            out.append(int(li))
        if len(set(out)) != len(out):
            raise ValueError(f"layers must not repeat an index, got {out}")
        return sorted(out)

    def _prefix_to_save(self, layers: list[int], prefix) -> int | None:
        if prefix is None:
            return None
        if isinstance(prefix, (bool, np.bool_)) or not isinstance(prefix, (int, np.integer)):
            raise TypeError(f"prefix must be an integer number of positions, "
                            f"got {type(prefix).__name__}")
        prefix = int(prefix)
        if prefix < 0:
            raise ValueError(f"prefix must be >= 0, got {prefix}")
        for li in layers:
            held = self.positions(li)
            if prefix > self.seq_len(li):
                raise ValueError(f"prefix {prefix} is longer than layer {li} "
                                 f"({self.seq_len(li)} positions)")
            if prefix and (prefix > len(held) or held[prefix - 1] != prefix - 1):
                gaps = np.flatnonzero(held != np.arange(len(held)))
                first_gap = int(gaps[0]) if gaps.size else len(held)
                raise ValueError(f"prefix {prefix} includes positions layer {li}'s ring "
                                 f"already evicted (from {first_gap}); at most {first_gap} "
                                 "can be saved")
        return prefix

    @classmethod
    def load(cls, path, mmap: bool = False, *, clock=None) -> KVCache:
        """A cache read from a file written by :meth:`save`: every position,
        tier and block age as saved; reads are bit-identical.

        The whole file is validated (sizes against its length, checksums,
        block tables) before the cache is built; a truncated, corrupted,
        wrong-version or inconsistent file raises
        :class:`kvcache.CacheFormatError` naming the problem.  ``mmap=True``
        reads through a memory map instead of one file-sized buffer (lower
        peak memory); either way the cache owns copies of its blocks, so the
        file may change or go once ``load`` returns.  ``clock``: as for the
        constructor.

        Called on a subclass, it builds that subclass, passing the saved
        configuration as :class:`KVCache`'s keyword arguments (and ``clock``).
        """
        return cls._from_record(fileformat.read(path, mmap=mmap), clock)

    @classmethod
    def loads(cls, data, *, clock=None) -> KVCache:
        """:meth:`load` from the bytes of a save file."""
        return cls._from_record(fileformat.parse(data), clock)

    @classmethod
    def _from_record(cls, record: fileformat.SaveRecord, clock) -> KVCache:
        # Built without its background worker, which starts once the blocks
        # are in (it must not see a half-imported cache).
        try:
            cache = cls(**{**record.config.kwargs(), "background": False}, clock=clock)
        except MemoryError as exc:
            raise MemoryError(f"not enough memory for the saved configuration: {exc}") from exc
        try:
            cache._import(record.states, record.tables, record.blocks)
        except BaseException:
            cache.close()
            raise
        if record.growth is not None:
            cache._strategy = record.growth
            cache._set_growth(True, record.max_capacity)
        if record.config.background:
            cache._background = BackgroundCompressor(cache)
        cache._config = record.config
        return cache

    # ---------------------------------------------------------------- metrics

    def stats(self) -> CacheStats:
        """A snapshot of the counters and memory gauges (see :mod:`kvcache.stats`).

        Reading it never stops the cache; it costs O(blocks held) (it walks
        the block tables to count a shared block once).
        """
        c = self._counters(COUNTER_DTYPE)
        names = COUNTER_DTYPE.names
        total = {k: int(c[k].sum()) for k in names}
        memory, live, blocks, spare, compressed, compressed_bytes = self._memory()
        per_layer = tuple(dict(zip(names, map(int, row))) for row in c.tolist())
        return CacheStats(
            **total, growths=self._growths,
            growth_bytes=self._growth_bytes, growth_seconds=self._growth_seconds,
            memory_bytes=memory, live_bytes=live,
            blocks=blocks, spare_blocks=spare, compressed_blocks=compressed,
            compressed_bytes=compressed_bytes,
            tokens_held=sum(self.held(i) for i in range(self.num_layers)),
            capacity_tokens=sum(self.capacity(i) for i in range(self.num_layers)),
            per_layer=per_layer)

    def reset_stats(self) -> None:
        """Zero every counter (gauges such as memory are not counters)."""
        self._reset_counters()
        with self._counter_lock:
            self._growths = 0
            self._growth_bytes = 0
            self._growth_seconds = 0.0

    def __repr__(self) -> str:
        return (f"KVCache(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, "
                f"batch_size={self.batch_size}, dtype='{self.dtype}', "
                f"block_size={self.block_size}, sink_tokens={self.sink_tokens}, "
                f"overflow='{self.overflow}')")
