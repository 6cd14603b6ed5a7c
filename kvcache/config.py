"""A cache's configuration: one validated, immutable record of the
constructor's options.

:class:`CacheConfig` is what :class:`kvcache.KVCache` is built from (its
constructor's arguments are checked here, nowhere else) and what a save file
records (:meth:`CacheConfig.to_dict` / :meth:`CacheConfig.from_dict`).  Its
fields hold the values as applied: defaults that depend on the shape
(``block_size``, the group sizes, ``keep_first``) are resolved, so two
configs that build the same cache compare equal.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields

import numpy as np

from .compression import CompressionStrategy

__all__ = ["CacheConfig", "DEFAULT_BLOCK_SIZE", "MAX_TOKENS"]

# Tokens per block.  Measured (docs/storage_and_metrics.md, "Choosing the block size"): 64 keeps a
# one-token update at its floor and makes keys()/values() copy 8 KiB runs per
# head in float16; smaller blocks cost more runs per read, larger ones more
# slack per layer and row at short contexts.
DEFAULT_BLOCK_SIZE = 64
# Largest capacity accepted: far beyond any context, small enough that no
# size computed from it can overflow 64 bits.
MAX_TOKENS = 2**40

_DTYPE_NAMES = {np.dtype("float16"): "float16", np.dtype("float32"): "float32"}
# The JSON type each annotation is recorded as (compression by its name).
_RECORDED_TYPES = {"int": int, "int | None": int, "str": str, "bool": bool, "float": float,
                   "CompressionStrategy": str}


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _positive_int(name: str, value, minimum: int = 1, maximum: int = MAX_TOKENS) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not minimum <= v <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {v}")
    return v


def _dtype_name(dtype) -> str:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float16' or 'float32', got {dtype!r}") from None
    if dt not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be 'float16' or 'float32', got {dt}")
    return _DTYPE_NAMES[dt]


def _group_size(label: str, given, fitted_limit: int, maximum: int, head_dim: int) -> int:
    """A quantization group size as applied: None fits the largest divisor of
    head_dim not above ``fitted_limit``; a given size is capped at head_dim (a
    group never spans two tokens) and must divide it."""
    if given is None:
        return _largest_divisor(head_dim, fitted_limit)
    g = min(_positive_int(label, given, maximum=maximum), head_dim)
    if head_dim % g:
        raise ValueError(f"{label} ({g}) must divide head_dim ({head_dim})")
    return g


def checked_field(obj: dict, key: str, types, where: str):
    """``obj[key]``, checked to be exactly of ``types`` (a type or a tuple:
    JSON's bool is no int); an int is accepted, as a float, where float is.
    ValueError when the key is missing, TypeError for another type, each
    naming ``where.key``."""
    if key not in obj:
        raise ValueError(f"{where} lacks the field {key!r}")
    value = obj[key]
    types = types if isinstance(types, tuple) else (types,)
    if float in types and type(value) is int:          # JSON may write 1.0 as 1
        value = float(value)
    if not any(type(value) is t for t in types):
        raise TypeError(f"{where}.{key} must be {' or '.join(t.__name__ for t in types)}, "
                        f"got {type(value).__name__} {value!r:.40}")
    return value


@dataclass(frozen=True)
class CacheConfig:
    """The options a :class:`kvcache.KVCache` is built with, validated.

    The fields and their meaning are the constructor's (see
    :class:`kvcache.KVCache`), except ``clock``, which is not configuration
    (it is never saved).  Construction raises what the constructor raises:
    ``TypeError`` for a value of the wrong type, ``ValueError`` for one out of
    range, each naming the option, what it must be and what it got.

    After construction the fields hold the values as applied:
    ``block_size`` is :data:`DEFAULT_BLOCK_SIZE` when not given;
    ``group_size`` (INT4) and ``int8_group_size`` are fitted to ``head_dim``
    when not given (the largest divisor not above 32 and 64); ``keep_first``
    defaults to ``sink_tokens`` (4 without sinks); ``compression`` is a
    :class:`CompressionStrategy`, ``dtype`` its name, ``error_budget`` a
    float.

    Examples
    --------
    >>> from kvcache import CacheConfig
    >>> CacheConfig(2, 4, 80).group_size, CacheConfig(2, 4, 80).int8_group_size
    (20, 40)
    >>> CacheConfig(2, 4, 64, group_size=32).group_size
    32
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int = 4096
    batch_size: int = 1
    dtype: str = "float16"
    block_size: int | None = None
    sink_tokens: int = 0
    overflow: str = "ring"
    metrics: bool = True
    compression: CompressionStrategy = CompressionStrategy.NONE
    residual_tokens: int = 128
    group_size: int | None = None
    int8_group_size: int | None = None
    keep_first: int | None = None
    error_budget: float = 0.10
    auto_compress: bool = False
    background: bool = False
    lossless_codec: str = "lz4"

    def __post_init__(self) -> None:
        # The checks run in the constructor's historical order, so that a call
        # with several bad options reports the same one as before.
        num_layers = _positive_int("num_layers", self.num_layers, maximum=1 << 20)
        num_kv_heads = _positive_int("num_kv_heads", self.num_kv_heads, maximum=1 << 16)
        head_dim = _positive_int("head_dim", self.head_dim, maximum=1 << 16)
        max_seq_len = _positive_int("max_seq_len", self.max_seq_len)
        batch_size = _positive_int("batch_size", self.batch_size, maximum=1 << 20)
        block_size = _positive_int("block_size", DEFAULT_BLOCK_SIZE if self.block_size is None
                                   else self.block_size, maximum=1 << 20)
        sink_tokens = _positive_int("sink_tokens", self.sink_tokens, minimum=0)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        dtype = _dtype_name(self.dtype)
        if self.overflow not in ("ring", "error"):
            raise ValueError(f"overflow must be 'ring' or 'error', got {self.overflow!r}")
        if sink_tokens >= max_seq_len:
            raise ValueError(f"sink_tokens ({sink_tokens}) must be smaller than max_seq_len "
                             f"({max_seq_len}) to leave room for a window")
        token_bytes = 2 * batch_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize
        if token_bytes * block_size > 1 << 40:
            raise ValueError(f"one block would take {token_bytes * block_size} bytes; "
                             "reduce block_size, heads, head_dim or batch_size")
        strategy = CompressionStrategy.coerce(self.compression)
        residual_tokens = _positive_int("residual_tokens", self.residual_tokens, minimum=0)
        keep_first = _positive_int("keep_first", (sink_tokens or 4) if self.keep_first is None
                                   else self.keep_first, minimum=0)
        g4 = _group_size("group_size", self.group_size, 32, 256, head_dim)
        g8 = _group_size("int8_group_size", self.int8_group_size, 64, 1 << 16, head_dim)
        if strategy in (CompressionStrategy.INT4, CompressionStrategy.ADAPTIVE) and head_dim % 2:
            raise ValueError(f"INT4 packs two channels per byte: head_dim must be even, "
                             f"got {head_dim}")
        budget = self.error_budget
        if not (isinstance(budget, (int, float)) and 0 <= budget < math.inf):
            raise ValueError(f"error_budget must be a finite number >= 0, got {budget!r}")
        if self.auto_compress and strategy is CompressionStrategy.NONE:
            raise ValueError("auto_compress needs a compression strategy")
        if self.background and not self.auto_compress:
            raise ValueError("background=True compresses automatically: it needs "
                             "auto_compress=True")
        if self.lossless_codec not in ("lz4", "zstd"):
            raise ValueError(f"lossless_codec must be 'lz4' or 'zstd', "
                             f"got {self.lossless_codec!r}")
        applied = dict(
            num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
            max_seq_len=max_seq_len, batch_size=batch_size, dtype=dtype,
            block_size=block_size, sink_tokens=sink_tokens, metrics=bool(self.metrics),
            compression=strategy, residual_tokens=residual_tokens, group_size=g4,
            int8_group_size=g8, keep_first=keep_first, error_budget=float(budget),
            auto_compress=bool(self.auto_compress), background=bool(self.background))
        for name, value in applied.items():
            object.__setattr__(self, name, value)       # frozen: set once, here

    def kwargs(self) -> dict:
        """The fields as keyword arguments of :class:`kvcache.KVCache`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict:
        """The fields as JSON values (``compression`` by its name)."""
        d = self.kwargs()
        d["compression"] = self.compression.name
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CacheConfig:
        """The config :meth:`to_dict` described, checked strictly (it may come
        from a file): every field present, no other, each of its recorded
        JSON type (an integer is accepted for the float ``error_budget``), then
        validated as by the constructor.  ``ValueError``/``TypeError`` name the
        field."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        kw = {f.name: checked_field(d, f.name, _RECORDED_TYPES[f.type], "config")
              for f in fields(cls)}
        unknown = sorted(set(d) - set(kw))
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}")
        try:
            kw["compression"] = CompressionStrategy[kw["compression"]]
        except KeyError:
            raise ValueError(f"unknown compression strategy {kw['compression']!r}") from None
        return cls(**kw)
