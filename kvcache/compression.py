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
from dataclasses import dataclass, field

from . import _core

__all__ = ["CompressionStrategy", "CompressionStats"]


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
        by: dict = {}
        blocks = tokens = before = after = raw = 0
        for name, ntok, b0, b1 in results:
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
