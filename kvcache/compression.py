"""Compression policy: which tier old blocks go to, and what it achieved.

The codecs live in the compiled core (``src/kv_tiers_impl.h``, one body per
ISA; LOSSLESS packs through :mod:`kvcache.lossless`).  Per block:

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

Policy and mechanism
--------------------
What to compress is decided here, in plain Python, by a
:class:`CompressionPolicy`; the compiled core only carries it out.  Per
layer, a policy reads the layer's :class:`Candidates` (every block it holds,
with its table entry, held positions, tier, age and flags), keeps the
eligible ones (:meth:`CompressionPolicy.eligible`: whole blocks outside the
residual window and the first ``keep_first`` positions, at full precision,
old enough), gives each a tier (:meth:`CompressionPolicy.choose`), and hands
the plan to the core, which compresses those blocks in place (pinned, the
GIL released while they are encoded).  ``FixedTier`` and ``Adaptive`` are the
built-in policies behind :class:`CompressionStrategy`; subclass
:class:`CompressionPolicy` for your own and install it with
``cache.compression_policy = policy``.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import _core

__all__ = ["CompressionStrategy", "CompressionStats", "CompressionPolicy", "FixedTier",
           "Adaptive", "Candidates", "CANDIDATE_DTYPE", "LEAVE", "StalePlan", "policy_for",
           "BackgroundCompressor", "release_freed_memory"]

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
    ADAPTIVE = 5                    # a policy, not a tier: one of the above per block

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


# --------------------------------------------------------------- policies

# One record per block a layer holds, as the core's _candidates() lays them
# out (struct kv_candidate in kvcache/_compress.pxi: the same fields, in order).
CANDIDATE_DTYPE = np.dtype([
    ("entry", "<i8"),       # table entry: the block's index within a batch row
    ("held", "<i8"),        # positions of the layer held in its slots
    ("end", "<i8"),         # 1 + the highest position held in it
    ("born", "<f8"),        # cache clock when taken or last rewritten
    ("block", "<i4"),       # block id
    ("refcount", "<i4"),    # batch rows sharing it
    ("tier", "i1"),         # 0 full precision, else a CompressionStrategy tier
    ("flags", "u1"),        # FLAG_INCOMPRESSIBLE, FLAG_ENCODING, FLAG_ZSTD
    ("_pad", "V6"),
])
if CANDIDATE_DTYPE.itemsize != _core.CANDIDATE_ITEMSIZE:     # pragma: no cover
    raise ImportError(f"kvcache.compression.CANDIDATE_DTYPE is {CANDIDATE_DTYPE.itemsize} "
                      f"bytes but the compiled core's records are "
                      f"{_core.CANDIDATE_ITEMSIZE}: rebuild the core")

#: A tier that :meth:`CompressionPolicy.choose` gives a block to leave it as it is.
LEAVE = -1


class StalePlan(RuntimeError):
    """Raised by :meth:`Candidates.trial_errors` when the layer changed (or a
    GIL-free copy of it started) since its candidates were read;
    :meth:`CompressionPolicy.compress_layer` turns it into a "busy" result,
    so the plan is made again later."""


@dataclass(frozen=True, eq=False)
class Candidates:
    """The blocks of one layer a policy chooses from, at one moment (epoch).

    ``records`` is a structured array of :data:`CANDIDATE_DTYPE` (one per
    distinct block, shared batch rows listed once); ``exact`` the leading
    slots of each block that keep their exact values (``keep_first``).
    """

    cache: object
    layer: int
    epoch: int
    seq_len: int            # the layer's length when they were read
    records: np.ndarray
    exact: np.ndarray

    def __len__(self) -> int:
        return len(self.records)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    @property
    def incompressible(self) -> np.ndarray:
        """Blocks LOSSLESS already failed to shrink (since last written)."""
        return (self.records["flags"] & _core.FLAG_INCOMPRESSIBLE) != 0

    def subset(self, which) -> Candidates:
        """The candidates selected by a boolean mask or an index array."""
        return Candidates(self.cache, self.layer, self.epoch, self.seq_len,
                          self.records[which], self.exact[which])

    def trial_errors(self, strategy) -> np.ndarray:
        """Each block's relative reconstruction error (Frobenius norm of the
        error over that of the block, the worse of keys and values) if it
        were stored in ``strategy`` (FP16, INT8 or INT4), computed without
        the GIL; NaN for a block another thread has meanwhile compressed."""
        tier = CompressionStrategy.coerce(strategy)
        errs = self.cache._trial_errors(self.layer, self.epoch, self.records["block"],
                                        int(tier), self.exact)
        if errs is None:
            raise StalePlan(f"layer {self.layer} changed since its candidates were read")
        return errs

    @classmethod
    def read(cls, cache, layer_idx: int, keep_first: int) -> Candidates:
        """The layer's blocks now, with exact prefixes for ``keep_first``."""
        epoch, seq_len, raw = cache._candidates(layer_idx)
        records = np.frombuffer(raw, dtype=CANDIDATE_DTYPE)
        exact = np.maximum(0, keep_first - records["entry"] * cache.block_size)
        return cls(cache, layer_idx, epoch, seq_len, records, exact)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


class CompressionPolicy:
    """Which of a layer's blocks to compress, and to which tier.

    The cache calls :meth:`compress_layer` for every layer from
    ``compress_old_entries`` and, with ``auto_compress``, whenever a block
    boundary passes ``seq_len - trigger_lag`` in a layer.  Subclasses
    override :meth:`choose` (and :meth:`eligible` to change which blocks are
    considered).  A policy is plain Python and holds no block: whatever it
    returns, the core only compresses blocks the layer holds at full
    precision, into a valid tier, keeping writes and reads correct.

    Parameters
    ----------
    residual_tokens : int
        The most recent positions of each layer stay at full precision.
    keep_first : int
        The first positions keep their exact values (attention sinks).
    """

    #: The strategy a save file records for this policy (custom policies are
    #: not saved: install them again after loading).
    strategy = CompressionStrategy.NONE

    def __init__(self, residual_tokens: int = 128, keep_first: int = 4) -> None:
        self.residual_tokens = _count("residual_tokens", residual_tokens)
        self.keep_first = _count("keep_first", keep_first)

    @property
    def trigger_lag(self) -> int:
        """With ``auto_compress``, the cache calls :meth:`compress_layer` each
        time a block boundary passes ``seq_len - trigger_lag`` (the moment a
        block leaves the residual window)."""
        return self.residual_tokens

    def check(self, cache) -> None:
        """Raise ValueError if this policy cannot serve ``cache`` (called when
        it is installed)."""

    def eligible(self, cache, blocks: Candidates, cutoff: float) -> np.ndarray:
        """A boolean mask over ``blocks``: whole blocks at full precision, born
        at or before ``cutoff`` (the cache's clock), outside the last
        ``residual_tokens`` positions and not wholly inside the first
        ``keep_first`` (a block that only starts with some of them keeps them
        verbatim), not being encoded by another thread."""
        r = blocks.records
        bs = blocks.block_size
        return ((r["held"] == bs) & (r["end"] <= blocks.seq_len - self.residual_tokens)
                & ((r["entry"] + 1) * bs > self.keep_first) & (r["tier"] == _core.TIER_FULL)
                & ((r["flags"] & _core.FLAG_ENCODING) == 0) & (r["born"] <= cutoff))

    def choose(self, cache, blocks: Candidates) -> np.ndarray:
        """One tier per eligible block (a CompressionStrategy tier value, or
        :data:`LEAVE`)."""
        raise NotImplementedError

    def compress_layer(self, cache, layer_idx: int, cutoff: float = math.inf) -> list:
        """Compress the layer's eligible blocks born at or before ``cutoff``.

        Returns the core's per-block results, ``(tier name, tokens, bytes
        before, bytes after)`` (see :meth:`CompressionStats.from_results`),
        or ``[("busy", layer, 0, 0)]`` when the layer changed or was being
        copied meanwhile (nothing done: try again later).
        """
        cands = Candidates.read(cache, layer_idx, self.keep_first)
        cands = cands.subset(np.asarray(self.eligible(cache, cands, cutoff), dtype=bool))
        if not len(cands):
            return []
        try:
            tiers = np.asarray(self.choose(cache, cands))
        except StalePlan:
            return [("busy", layer_idx, 0, 0)]
        if tiers.shape != (len(cands),):
            raise ValueError(f"{type(self).__name__}.choose must return one tier per block: "
                             f"{len(cands)} expected, got shape {tiers.shape}")
        go = tiers != LEAVE
        if not go.any():
            return []
        return cache._compress_blocks(layer_idx, cands.epoch, cands.records["block"][go],
                                      tiers[go].astype(np.int8), cands.exact[go])


class FixedTier(CompressionPolicy):
    """Every eligible block to one tier (FP16, INT8, INT4 or LOSSLESS).

    FP16 leaves a float16 cache as it is (it is FP16 already); LOSSLESS skips
    blocks it already failed to shrink until they are written again.
    """

    def __init__(self, strategy, residual_tokens: int = 128, keep_first: int = 4) -> None:
        super().__init__(residual_tokens, keep_first)
        tier = CompressionStrategy.coerce(strategy)
        if tier in (CompressionStrategy.NONE, CompressionStrategy.ADAPTIVE):
            raise ValueError(f"FixedTier needs FP16, INT8, INT4 or LOSSLESS, got {tier.name}")
        self.strategy = tier

    def check(self, cache) -> None:
        if self.strategy is CompressionStrategy.INT4 and cache.head_dim % 2:
            raise ValueError(f"INT4 needs an even head_dim, got {cache.head_dim}")

    def choose(self, cache, blocks: Candidates) -> np.ndarray:
        tiers = np.full(len(blocks), int(self.strategy), dtype=np.int8)
        if self.strategy is CompressionStrategy.FP16 and cache.dtype.itemsize == 2:
            tiers[:] = LEAVE
        elif self.strategy is CompressionStrategy.LOSSLESS:
            tiers[blocks.incompressible] = LEAVE
        return tiers

    def __repr__(self) -> str:
        return (f"FixedTier({self.strategy.name}, residual_tokens={self.residual_tokens}, "
                f"keep_first={self.keep_first})")


class Adaptive(CompressionPolicy):
    """Per block, the first tier of ``order`` whose reconstruction error is
    within ``error_budget`` (FP16 skipped in a float16 cache), else
    ``fallback`` (LOSSLESS: exact; a block it cannot shrink stays as it is).
    NaN or infinite blocks never pass the budget."""

    strategy = CompressionStrategy.ADAPTIVE

    def __init__(self, error_budget: float = 0.10, residual_tokens: int = 128,
                 keep_first: int = 4, order=("int4", "int8", "fp16"),
                 fallback="lossless") -> None:
        super().__init__(residual_tokens, keep_first)
        if (isinstance(error_budget, bool) or not isinstance(error_budget, numbers.Real)
                or not 0 <= error_budget < math.inf):
            raise ValueError(f"error_budget must be a finite number >= 0, got {error_budget!r}")
        self.error_budget = float(error_budget)
        self.order = tuple(CompressionStrategy.coerce(t) for t in order)
        lossy = (CompressionStrategy.FP16, CompressionStrategy.INT8, CompressionStrategy.INT4)
        if not self.order or any(t not in lossy for t in self.order):
            raise ValueError(f"order must name FP16, INT8 or INT4 tiers, got {order!r}")
        self.fallback = None if fallback is None else CompressionStrategy.coerce(fallback)

    def check(self, cache) -> None:
        if CompressionStrategy.INT4 in self.order and cache.head_dim % 2:
            raise ValueError(f"INT4 needs an even head_dim, got {cache.head_dim}")

    def choose(self, cache, blocks: Candidates) -> np.ndarray:
        tiers = np.full(len(blocks), LEAVE, dtype=np.int8)
        todo = np.ones(len(blocks), dtype=bool)
        for tier in self.order:
            if tier is CompressionStrategy.FP16 and cache.dtype.itemsize == 2:
                continue                 # a float16 block is FP16 already
            idx = np.flatnonzero(todo)
            if not idx.size:
                break
            fits = blocks.subset(idx).trial_errors(tier) <= self.error_budget   # NaN: False
            tiers[idx[fits]] = int(tier)
            todo[idx[fits]] = False
        if self.fallback is not None:
            rest = todo & ~blocks.incompressible
            tiers[rest] = int(self.fallback)
        return tiers

    def __repr__(self) -> str:
        return (f"Adaptive(error_budget={self.error_budget}, residual_tokens="
                f"{self.residual_tokens}, keep_first={self.keep_first})")


def policy_for(strategy, residual_tokens: int = 128, keep_first: int = 4,
               error_budget: float = 0.10) -> CompressionPolicy | None:
    """The built-in policy behind a :class:`CompressionStrategy` (None for NONE)."""
    tier = CompressionStrategy.coerce(strategy)
    if tier is CompressionStrategy.NONE:
        return None
    if tier is CompressionStrategy.ADAPTIVE:
        return Adaptive(error_budget, residual_tokens, keep_first)
    return FixedTier(tier, residual_tokens, keep_first)


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
