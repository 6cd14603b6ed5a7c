"""Cache statistics: one immutable snapshot per ``KVCache.stats()`` call.

Definitions (they are what the numbers mean, and tests hold them to it):

* A **token read** is one position of one batch row returned by ``keys()`` or
  ``values()`` (each call counts its own reads).  It is a **hit** when it is
  served from the full-precision tier and a **miss** when it had to be
  decoded from a compressed tier.  ``hit_rate = hits / (hits + misses)``,
  ``0.0`` when nothing was read.
  ``attention()`` reads each held token once per batch row and counts it
  the same way.
* ``prefetches``: prefetch hints issued (cache lines), by ``attention()``
  for blocks that do not follow the one being computed in memory, and by
  ``prefetch()``; ``prefetch_bytes`` = 64 x ``prefetches`` (0 where the
  compiler has no prefetch builtin).
* ``evictions``: tokens (positions x batch rows) the ring dropped to make room.
  Truncation is not eviction.
* ``updates``: applications of the update rule (each ``update()`` call, and
  each layer a ``truncate()`` shortens); ``tokens_written``: positions written (per batch
  row: a one-token append to a batch of 4 counts 1), ring-dropped ones excluded.
* ``growths``: growth events; ``growth_bytes``: token bytes of capacity they
  added (capacity is a bound; blocks are allocated as tokens arrive);
  ``growth_seconds``: time spent growing.
* ``memory_bytes``: bytes the cache has allocated: blocks (spare blocks
  included, alignment padding included), compressed payloads and metadata
  (block tables, block descriptors, layer descriptors).
  ``compressed_blocks`` / ``compressed_bytes``: blocks held in a compressed
  tier and their payload bytes.
* ``live_bytes``: bytes of token data held (keys and values, every layer,
  row and head), a block shared by several batch rows (after
  ``reorder_batch``) counted once.  ``memory_efficiency = live_bytes /
  memory_bytes``; slack in partly filled blocks, spares and metadata show as
  a value below 1.

Counters are cumulative since construction or ``KVCache.reset_stats()``;
``after - before`` gives the counters of an interval (gauges such as
``memory_bytes`` are taken from ``after``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

__all__ = ["CacheStats", "COUNTER_DTYPE"]

# The compiled core's per-layer counters (struct kv_counters in
# kvcache/_core.pxd: the same fields, in order), read as one structured
# array with a row per layer.
COUNTER_DTYPE = np.dtype([(name, "<i8") for name in (
    "updates", "tokens_written", "evictions", "hits", "misses", "truncations",
    "prefetches", "prefetch_bytes")])

# Counters are additive over an interval; the rest are gauges (a level now).
_COUNTERS = ("hits", "misses", "evictions", "growths", "growth_bytes", "growth_seconds",
             "updates", "tokens_written", "truncations", "prefetches", "prefetch_bytes")


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    growths: int = 0
    growth_bytes: int = 0
    growth_seconds: float = 0.0
    updates: int = 0
    tokens_written: int = 0
    truncations: int = 0
    prefetches: int = 0
    prefetch_bytes: int = 0
    memory_bytes: int = 0
    live_bytes: int = 0
    blocks: int = 0
    spare_blocks: int = 0
    compressed_blocks: int = 0
    compressed_bytes: int = 0
    tokens_held: int = 0
    capacity_tokens: int = 0
    per_layer: tuple[dict[str, int], ...] = ()

    @property
    def reads(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.reads if self.reads else 0.0

    @property
    def memory_efficiency(self) -> float:
        return self.live_bytes / self.memory_bytes if self.memory_bytes else 0.0

    def __sub__(self, before: CacheStats) -> CacheStats:
        if not isinstance(before, CacheStats):
            return NotImplemented
        delta = {name: getattr(self, name) - getattr(before, name) for name in _COUNTERS}
        per_layer = tuple(
            {k: a[k] - b.get(k, 0) for k in a}
            for a, b in zip(self.per_layer, before.per_layer)
        ) if len(self.per_layer) == len(before.per_layer) else self.per_layer
        return replace(self, per_layer=per_layer, **delta)

    def as_dict(self) -> dict[str, object]:
        """Every field and derived figure, per-layer detail left out."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_layer"}
        out.update(hit_rate=self.hit_rate, memory_efficiency=self.memory_efficiency)
        return out

    def table(self) -> str:
        """A two-column text table for terminals."""
        rows = [
            ("hits", f"{self.hits:,}"), ("misses", f"{self.misses:,}"),
            ("hit rate", f"{self.hit_rate:.1%}"), ("evictions", f"{self.evictions:,}"),
            ("growth events", f"{self.growths:,}"),
            ("growth time", f"{self.growth_seconds * 1e3:.3f} ms"),
            ("updates", f"{self.updates:,}"), ("tokens held", f"{self.tokens_held:,}"),
            ("prefetches", f"{self.prefetches:,} lines ({_mib(self.prefetch_bytes)})"),
            ("memory", _mib(self.memory_bytes)), ("live data", _mib(self.live_bytes)),
            ("memory efficiency", f"{self.memory_efficiency:.1%}"),
            ("blocks (spare)", f"{self.blocks:,} ({self.spare_blocks:,})"),
            ("compressed blocks", f"{self.compressed_blocks:,} "
                                  f"({_mib(self.compressed_bytes)})"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"
