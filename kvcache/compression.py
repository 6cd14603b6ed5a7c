"""Compression policy: which tier old blocks go to, and what it achieved.

The codecs live in the compiled core (``src/kv_tiers.c``; LZ4 through the
``lz4`` package).  Per block:

* ``FP16``: a float32 cache's block stored as float16 (a float16 cache is
  already there: FP16 compresses nothing in it).
* ``INT8``: asymmetric, per token and group of ``int8_group_size`` channels
  (default 64), float16 scale and zero point per group.
* ``INT4`` (KIVI): keys per channel across the block's tokens (keys have
  outlier channels), values per token in groups of ``group_size`` channels
  (default 32), two codes per byte.
* ``LOSSLESS``: byte shuffle then LZ4; a block that does not shrink stays at
  full precision and is flagged ("raw") so it is not tried again.
* ``ADAPTIVE``: per block the first of INT4, INT8, FP16 (float32 cache) whose
  reconstruction error (relative Frobenius, the worse of keys and values) is
  within ``error_budget``, else LOSSLESS.

Reading a compressed block decodes it (a **miss** in ``CacheStats``);
writing into one (overwrite, truncate-and-rewrite, a ring wrapping onto it)
first brings the whole block back to full precision, so a write never loses
the block's other tokens and never re-quantizes what is already quantized.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

from . import _core

__all__ = ["CompressionStrategy", "CompressionStats", "BackgroundCompressor",
           "release_freed_memory"]

logger = logging.getLogger("kvcache")


def _find_malloc_trim():
    """glibc's malloc_trim, or None: blocks freed by compression stay in the
    C allocator's heaps (worker threads even allocate from heaps of their
    own) until it hands them back to the OS; without it, RSS would not fall."""
    try:
        import ctypes
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, ImportError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_malloc_trim = _find_malloc_trim()


def release_freed_memory() -> bool:
    """Return memory the C allocator keeps free to the OS (glibc); False where
    the platform offers no way to (its allocator then decides)."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


class CompressionStrategy(enum.IntEnum):
    NONE = -1
    FP16 = _core.TIER_FP16
    INT8 = _core.TIER_INT8
    INT4 = _core.TIER_INT4
    LOSSLESS = _core.TIER_LOSSLESS
    ADAPTIVE = _core.ADAPTIVE_TIER

    @classmethod
    def coerce(cls, value) -> CompressionStrategy:
        """A strategy from a member, its name ("int8") or None (NONE)."""
        if value is None:
            return cls.NONE
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, cls):
            return value
        names = ", ".join(m.name for m in cls)
        raise ValueError(f"compression must be one of {names} (or its name), got {value!r}")


@dataclass(frozen=True)
class CompressionStats:
    """What one ``compress_old_entries`` call (or the automatic policy) did.

    ``bytes_before`` counts the token bytes the blocks held at full
    precision, ``bytes_after`` their compressed payloads; blocks LOSSLESS
    could not shrink ("raw") count on both sides and in ``raw_blocks``.
    ``by_strategy`` maps each tier chosen ("int8", "lossless", ...) to
    ``{"blocks", "tokens", "bytes_before", "bytes_after"}``.
    """

    blocks: int = 0
    tokens: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    raw_blocks: int = 0
    seconds: float = 0.0
    by_strategy: dict = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    @classmethod
    def from_results(cls, results, seconds: float) -> CompressionStats:
        """From the core's per-block results; its "busy" (a layer skipped while
        another thread copied it) and "dropped" (a block changed while it was
        being encoded) entries did nothing and are left out."""
        by: dict = {}
        blocks = tokens = before = after = raw = 0
        for name, ntok, b0, b1 in results:
            if name in ("busy", "dropped"):
                continue
            row = by.setdefault(name, {"blocks": 0, "tokens": 0, "bytes_before": 0,
                                       "bytes_after": 0})
            row["blocks"] += 1
            row["tokens"] += ntok
            row["bytes_before"] += b0
            row["bytes_after"] += b1
            if name == "raw":
                raw += 1
            else:
                blocks += 1
                tokens += ntok
            before += b0
            after += b1
        return cls(blocks, tokens, before, after, raw, seconds, by)

    def __add__(self, other: CompressionStats) -> CompressionStats:
        by = {k: dict(v) for k, v in self.by_strategy.items()}
        for k, v in other.by_strategy.items():
            row = by.setdefault(k, dict.fromkeys(v, 0))
            for key, val in v.items():
                row[key] += val
        return CompressionStats(self.blocks + other.blocks, self.tokens + other.tokens,
                                self.bytes_before + other.bytes_before,
                                self.bytes_after + other.bytes_after,
                                self.raw_blocks + other.raw_blocks,
                                self.seconds + other.seconds, by)


class BackgroundCompressor:
    """A daemon thread that compresses the layers the update path queues.

    The update that moves a block out of the residual window only queues its
    layer; this thread encodes the eligible blocks, with the GIL released
    while it packs, so a decode loop never waits on compression.  Safety
    comes from the core: a block being encoded is pinned (a concurrent write
    copies it first, a truncation cannot free it) and its payload is
    installed only if nothing changed it meanwhile and no GIL-free copy of
    its layer is in flight; otherwise the layer is retried shortly after (a
    layer read without pause is compressed once the reads pause).  The thread holds the cache by
    a weak reference and ends when the cache is gone or ``close()`` is called.
    """

    def __init__(self, cache) -> None:
        self._cache = weakref.ref(cache)
        self._queue: queue.Queue = queue.Queue()
        self.errors: list = []
        self._thread = threading.Thread(target=self._run, name="kvcache-compress", daemon=True)
        self._thread.start()

    def submit(self, layer_idx: int) -> None:
        self._queue.put(layer_idx)

    def join(self) -> None:
        """Wait until every queued layer has been compressed."""
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._cache() is None:
                    return
                continue
            try:
                cache = self._cache() if item is not None else None
                if cache is None:
                    return
                retry = cache._compress_layer(item)
                del cache
                if retry:                       # a reader was copying: try again soon
                    time.sleep(0.0005)
                    self._queue.put(item)
            except Exception as exc:            # keep serving; report, never crash
                self.errors.append(exc)
                logger.exception("kvcache: background compression of layer %s failed", item)
            finally:
                self._queue.task_done()
