"""The save file of a :class:`~kvcache.KVCache`: versioned, checksummed, written atomically.

``KVCache.save`` and ``KVCache.load`` are the API; this module holds the
format, its writer and its validating reader.

Layout (integers little-endian)::

    preamble, 32 bytes
       0  magic      8 bytes  b"KVCACHE\\0"
       8  version    u32      FORMAT_VERSION
      12  json_len   u32      bytes of the JSON description
      16  meta_len   u64      bytes of the meta section that follows
      24  meta_crc   u32      CRC-32 of the meta section
      28  pre_crc    u32      CRC-32 of bytes 0..27
    meta, meta_len bytes
      JSON (UTF-8): configuration, growth policy, per layer (n, lo, cap)
      block tables: int32, per layer [batch][ceil(cap / block_size)]
      block index: BLOCK_DTYPE per stored block (offset, size, CRC-32, tier, ...)
    payloads: the blocks, back to back in index order, ending at the file's end

Blocks are stored as the cache holds them: full precision, or the payload of
their compressed tier byte for byte, so a loaded cache reads exactly what the
saved one did.  A block several batch rows share is stored once.

The reader trusts nothing: every size is checked against the file's length
before anything is allocated, every checksum before any byte is used, every
table entry and layer state against the invariants of the store, and only
then is a cache built.  Anything wrong raises :class:`CacheFormatError`
naming it.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import struct
import sys
import tempfile
import warnings
import zlib
from typing import TYPE_CHECKING

import numpy as np

from . import _core
from .compression import CompressionStrategy
from .growth import Adaptive, Exponential, Linear

if TYPE_CHECKING:  # pragma: no cover
    from .cache import KVCache

__all__ = ["CacheFormatError", "FORMAT_VERSION", "MAGIC", "save", "load", "loads"]

MAGIC = b"KVCACHE\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQII")          # magic, version, json_len, meta_len, crcs
PREAMBLE_BYTES = _PREAMBLE.size                # 32
BLOCK_DTYPE = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("age", "<f8"),
                        ("crc", "<u4"), ("exact_rows", "<i4"), ("tier", "u1"),
                        ("flags", "u1"), ("_pad", "u1", (6,))])
_TABLE_DTYPE = np.dtype("<i4")
# LZ4's block format expands at most 255-fold: a LOSSLESS block claiming more
# is corrupt (and would make the check allocate far beyond the file's size).
_LZ4_MAX_RATIO = 255
# zstd has no such limit (a block of zeros packs ~3000-fold), so the blocks a
# file may unpack while it is checked are bounded in total instead: at most
# this many times the file's size (plus a constant), which keeps a hostile
# file from making the check run for minutes.
_ZSTD_BUDGET_RATIO = 1024
_ZSTD_BUDGET_EXTRA = 64 << 20

# The configuration recorded: KVCache's constructor arguments and their types.
_CONFIG_TYPES = {
    "num_layers": int, "num_kv_heads": int, "head_dim": int, "max_seq_len": int,
    "batch_size": int, "dtype": str, "block_size": int, "sink_tokens": int,
    "overflow": str, "metrics": bool, "compression": str, "residual_tokens": int,
    "group_size": int, "int8_group_size": int, "keep_first": int, "error_budget": float,
    "auto_compress": bool, "background": bool, "lossless_codec": str,
}
_GROWTH = {"exponential": (Exponential, {"factor": float}),
           "linear": (Linear, {"increment": int}),
           "adaptive": (Adaptive, {"horizon_s": float, "min_factor": float,
                                   "max_factor": float})}


class CacheFormatError(ValueError):
    """A save file that is not a valid kvcache file: truncated, corrupted,
    of an unknown version, or inconsistent.  The message names what is wrong."""


# ------------------------------------------------------------------- writing

def _config(cache: KVCache) -> dict:
    return {
        "num_layers": cache.num_layers, "num_kv_heads": cache.num_kv_heads,
        "head_dim": cache.head_dim, "max_seq_len": cache.max_seq_len,
        "batch_size": cache.batch_size, "dtype": str(cache.dtype),
        "block_size": cache.block_size, "sink_tokens": cache.sink_tokens,
        "overflow": cache.overflow, "metrics": bool(cache.metrics_enabled),
        "compression": cache.compression.name, "residual_tokens": cache.residual_tokens,
        "group_size": cache.group_size, "int8_group_size": cache.int8_group_size,
        "keep_first": cache.keep_first, "error_budget": float(cache.error_budget),
        "auto_compress": bool(cache.auto_compress),
        "background": cache._background is not None,
        "lossless_codec": cache.lossless_codec,
    }


def _growth(cache: KVCache) -> dict | None:
    strategy = cache.growth_strategy
    if strategy is None:
        return None
    for kind, (cls, fields) in _GROWTH.items():
        if type(strategy) is cls:
            return {"kind": kind, "max_capacity": cache._max_capacity,
                    **{f: getattr(strategy, f) for f in fields}}
    warnings.warn(f"the growth strategy {type(strategy).__name__} cannot be saved; "
                  "the loaded cache will not grow (enable_dynamic_growth after load)",
                  UserWarning, stacklevel=3)
    return None


def _check_layers(cache: KVCache, layers) -> list[int]:
    if layers is None:
        return list(range(cache.num_layers))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be a sequence of layer indices or None, "
                        f"got {type(layers).__name__}")
    out = []
    for li in layers:
        if isinstance(li, (bool, np.bool_)) or not isinstance(li, (int, np.integer)):
            raise TypeError(f"layer indices must be integers, got {type(li).__name__}")
        if not 0 <= li < cache.num_layers:
            raise IndexError(f"layer index {li} out of range for {cache.num_layers} layers")
        out.append(int(li))
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat an index, got {out}")
    return sorted(out)


def _check_prefix(cache: KVCache, layers: list[int], prefix) -> int:
    if prefix is None:
        return -1
    if isinstance(prefix, (bool, np.bool_)) or not isinstance(prefix, (int, np.integer)):
        raise TypeError(f"prefix must be an integer number of positions, "
                        f"got {type(prefix).__name__}")
    prefix = int(prefix)
    if prefix < 0:
        raise ValueError(f"prefix must be >= 0, got {prefix}")
    for li in layers:
        held = cache.positions(li)
        if prefix > cache.seq_len(li):
            raise ValueError(f"prefix {prefix} is longer than layer {li} "
                             f"({cache.seq_len(li)} positions)")
        if prefix and (prefix > len(held) or held[prefix - 1] != prefix - 1):
            gaps = np.flatnonzero(held != np.arange(len(held)))
            first_gap = int(gaps[0]) if gaps.size else len(held)
            raise ValueError(f"prefix {prefix} includes positions layer {li}'s ring already "
                             f"evicted (from {first_gap}); at most {first_gap} can be saved")
    return prefix


def save(cache: KVCache, path, layers=None, prefix=None) -> int:
    """Write ``cache`` to ``path`` atomically; returns the file's size in bytes.

    See :meth:`kvcache.KVCache.save`.
    """
    path = os.fspath(path)
    saved = _check_layers(cache, layers)
    cut = _check_prefix(cache, saved, prefix)
    growth = _growth(cache)
    states, tables, blocks = cache._export(saved, cut)
    # Layers not saved are recorded empty, at the configured capacity.
    by_layer = dict(zip(saved, zip(states, tables)))
    empty_blk = -(-cache.max_seq_len // cache.block_size)
    layer_states, layer_tables = [], []
    for li in range(cache.num_layers):
        state, table = by_layer.get(li, ((0, 0, cache.max_seq_len), None))
        if table is None:
            table = np.full((cache.batch_size, empty_blk), -1, dtype=np.int32)
        layer_states.append(list(state))
        layer_tables.append(table)
    description = {
        "format": "kvcache", "kvcache_version": _version(),
        "byteorder": sys.byteorder, "config": _config(cache), "growth": growth,
        "layers": layer_states, "saved_layers": saved,
        "prefix": None if cut < 0 else cut, "blocks": len(blocks),
    }
    text = json.dumps(description, separators=(",", ":")).encode()
    index = np.zeros(len(blocks), dtype=BLOCK_DTYPE)
    table_bytes = b"".join(t.astype(_TABLE_DTYPE, copy=False).tobytes() for t in layer_tables)
    meta_len = len(text) + len(table_bytes) + index.nbytes
    offset = PREAMBLE_BYTES + meta_len
    for i, (tier, flags, exact, age, data) in enumerate(blocks):
        index[i] = (offset, len(data), age, zlib.crc32(data), exact, tier, flags, 0)
        offset += len(data)
    meta = text + table_bytes + index.tobytes()
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text), meta_len, zlib.crc32(meta), 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    _write_atomically(path, [head, meta] + [b[4] for b in blocks])
    return offset


def _version() -> str:
    from . import __version__
    return __version__


def _write_atomically(path: str, parts) -> None:
    """Write to a temporary file beside ``path``, flush and fsync it, then
    rename it over ``path`` and fsync the directory: a crash at any point
    leaves the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        # A new file is readable by its owner only (mkstemp's 0600: it holds a
        # conversation's state); a file replaced keeps its permissions.
        try:
            os.chmod(fd, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    # The rename itself is durable only once the directory is synced.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:                                 # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(dfd)
    except OSError:                                 # pragma: no cover - some filesystems
        pass
    finally:
        os.close(dfd)


# ------------------------------------------------------------------- reading

def load(path, mmap: bool = False, clock=None) -> KVCache:
    """Read a cache written by :func:`save`.  See :meth:`kvcache.KVCache.load`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        if not mmap:
            # One read into an uninitialised buffer (f.read() would build a
            # bytes object through an extra copy).
            data = np.empty(os.fstat(f.fileno()).st_size, dtype=np.uint8)
            if f.readinto(data) != data.size:
                _fail(f"the file changed size while it was read ({path})")
        elif os.fstat(f.fileno()).st_size == 0:
            data = b""                           # mmap cannot map an empty file
        else:
            data = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
    try:
        return _parse(memoryview(data), clock)
    finally:
        if isinstance(data, _mmap.mmap):
            try:
                data.close()
            except BufferError:     # a traceback still holds a view: GC unmaps it
                pass


def loads(data, clock=None) -> KVCache:
    """A cache from the bytes of a save file (what the fuzzer drives)."""
    return _parse(memoryview(data).cast("B"), clock)


def _fail(message: str):
    raise CacheFormatError(message)


def _parse(buf: memoryview, clock) -> KVCache:
    from .cache import KVCache

    size = len(buf)
    if size < PREAMBLE_BYTES:
        _fail(f"truncated: the file has {size} bytes, a kvcache file starts with a "
              f"{PREAMBLE_BYTES}-byte preamble")
    magic, version, json_len, meta_len, meta_crc, pre_crc = _PREAMBLE.unpack(
        buf[:PREAMBLE_BYTES])
    if magic != MAGIC:
        _fail(f"not a kvcache file: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if zlib.crc32(buf[:PREAMBLE_BYTES - 4]) != pre_crc:
        _fail("preamble checksum mismatch: the file is corrupted")
    if version != FORMAT_VERSION:
        _fail(f"unsupported format version {version} (this kvcache reads version "
              f"{FORMAT_VERSION})")
    if meta_len > size - PREAMBLE_BYTES:
        _fail(f"truncated: the meta section needs {meta_len} bytes after the preamble, "
              f"the file has {size - PREAMBLE_BYTES}")
    if json_len > meta_len:
        _fail(f"the description ({json_len} bytes) is longer than the meta section "
              f"({meta_len} bytes)")
    meta = buf[PREAMBLE_BYTES:PREAMBLE_BYTES + meta_len]
    if zlib.crc32(meta) != meta_crc:
        _fail("meta section checksum mismatch: the file is corrupted")
    try:
        desc = json.loads(bytes(meta[:json_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        _fail(f"the description is not valid JSON: {exc}")
    d = _Fields(desc, "description")
    if d.get("format", str) != "kvcache":
        _fail(f"description format is {desc.get('format')!r}, expected 'kvcache'")
    if d.get("byteorder", str) != sys.byteorder:
        _fail(f"written on a {desc['byteorder']}-endian machine; this one is "
              f"{sys.byteorder}-endian")
    cfg = _Fields(d.get("config", dict), "config")
    config = {k: cfg.get(k, t) for k, t in _CONFIG_TYPES.items()}
    if set(desc["config"]) != set(_CONFIG_TYPES):
        _fail(f"config has unknown fields {sorted(set(desc['config']) - set(_CONFIG_TYPES))}")
    layers = d.get("layers", list)
    nblocks = d.get("blocks", int)
    if nblocks < 0:
        _fail(f"blocks must be >= 0, got {nblocks}")
    num_layers, batch, bs = config["num_layers"], config["batch_size"], config["block_size"]
    if len(layers) != num_layers:
        _fail(f"{len(layers)} layer states for num_layers={num_layers}")
    if not (isinstance(bs, int) and bs > 0 and batch > 0):
        _fail(f"block_size and batch_size must be positive, got {bs} and {batch}")
    states = []
    for li, state in enumerate(layers):
        if (not isinstance(state, list) or len(state) != 3
                or not all(type(x) is int for x in state)):
            _fail(f"layer {li}: state must be [n, lo, cap] integers, got {state!r}")
        states.append(tuple(state))
    # Every size against the file before anything is allocated.
    caps = [s[2] for s in states]
    if min(caps, default=1) < 1 or max(caps, default=1) > 2**40:
        _fail(f"layer capacities must be in [1, 2**40], got {min(caps)}..{max(caps)}")
    entries = [batch * -(-cap // bs) for cap in caps]
    expected = json_len + 4 * sum(entries) + BLOCK_DTYPE.itemsize * nblocks
    if expected != meta_len:
        _fail(f"the meta section holds {meta_len} bytes but its description implies "
              f"{expected} (tables for capacities {sorted(set(caps))[:4]}..., "
              f"{nblocks} blocks)")
    if config["max_seq_len"] > min(caps, default=2**40):
        _fail(f"max_seq_len {config['max_seq_len']} exceeds a layer's capacity "
              f"({min(caps)})")
    growth = d.get("growth", (dict, type(None)))

    # The configuration, by the constructor's own checks (now cheap: its
    # tables are no larger than the ones the file holds).
    try:
        strategy = CompressionStrategy[config["compression"]]
    except KeyError:
        _fail(f"unknown compression strategy {config['compression']!r}")
    try:
        cache = KVCache(**{**config, "compression": strategy, "background": False},
                        clock=clock)
    except (TypeError, ValueError, OverflowError) as exc:
        _fail(f"invalid configuration: {exc}")
    except MemoryError as exc:
        raise MemoryError(f"not enough memory for the saved configuration: {exc}") from exc
    try:
        strategy_obj, max_capacity = _parse_growth(growth, cache, caps)
        tables = _parse_tables(meta, json_len, entries, states, cache, nblocks)
        index = np.frombuffer(meta, dtype=BLOCK_DTYPE, count=nblocks,
                              offset=json_len + 4 * sum(entries))
        blocks = _parse_blocks(buf, index, cache, PREAMBLE_BYTES + meta_len)
        _check_references(tables, states, cache, nblocks, blocks)
        cache._import(states, tables, blocks)
    except BaseException:
        cache.close()
        raise
    if strategy_obj is not None:
        cache._strategy = strategy_obj
        cache._set_growth(True, max_capacity)
    if config["background"]:
        from .compression import BackgroundCompressor
        cache._background = BackgroundCompressor(cache)
    return cache


class _Fields:
    """Typed access to a JSON object, failing with the field's name."""

    def __init__(self, obj, name: str) -> None:
        if not isinstance(obj, dict):
            _fail(f"{name} must be a JSON object, got {type(obj).__name__}")
        self.obj, self.name = obj, name

    def get(self, key: str, types):
        if key not in self.obj:
            _fail(f"{self.name} lacks the field {key!r}")
        value = self.obj[key]
        types = types if isinstance(types, tuple) else (types,)
        ok = any(type(value) is t for t in types)
        if float in types and type(value) is int:      # JSON writes 1.0 as 1.0, but be lenient
            ok, value = True, float(value)
        if not ok:
            _fail(f"{self.name}.{key} must be {' or '.join(t.__name__ for t in types)}, "
                  f"got {type(value).__name__} {value!r:.40}")
        return value


def _parse_growth(growth, cache, caps):
    if growth is None:
        return None, None
    g = _Fields(growth, "growth")
    kind = g.get("kind", str)
    if kind not in _GROWTH:
        _fail(f"unknown growth strategy {kind!r}, expected one of {sorted(_GROWTH)}")
    cls, fields = _GROWTH[kind]
    max_capacity = g.get("max_capacity", int)
    if not max(caps) <= max_capacity <= 2**40:
        _fail(f"growth max_capacity {max_capacity} must be in [{max(caps)}, 2**40]")
    try:
        return cls(**{f: g.get(f, t) for f, t in fields.items()}), max_capacity
    except (TypeError, ValueError) as exc:
        _fail(f"invalid growth strategy: {exc}")


def _parse_tables(meta, json_len, entries, states, cache, nblocks):
    flat = np.frombuffer(meta, dtype=_TABLE_DTYPE, count=sum(entries), offset=json_len)
    if flat.size and (flat.min() < -1 or flat.max() >= nblocks):
        _fail(f"a block table entry is out of range [-1, {nblocks}): "
              f"{int(flat.min())}..{int(flat.max())}")
    tables, at = [], 0
    S, bs, batch = cache.sink_tokens, cache.block_size, cache.batch_size
    for li, ((n, lo, cap), count) in enumerate(zip(states, entries)):
        # The store's invariants for (n, lo, cap): held positions are
        # [0, min(S, lo)) and [lo, n); lo is 0 until the ring first evicts,
        # and at most S + window of them are held.
        if not 0 <= n <= 2**40:
            _fail(f"layer {li}: length {n} out of range")
        if cap <= S:
            _fail(f"layer {li}: capacity {cap} leaves no window after {S} sink tokens")
        if lo == 0:
            if n > cap:
                _fail(f"layer {li}: length {n} exceeds capacity {cap} without a wrapped ring")
        elif not (cache.overflow == "ring" and 0 < lo <= n and min(S, lo) + n - lo <= cap):
            _fail(f"layer {li}: window start {lo} is inconsistent with length {n}, "
                  f"capacity {cap}, {S} sinks and overflow={cache.overflow!r}")
        table = flat[at:at + count].reshape(batch, count // batch).astype(np.int32)
        at += count
        held = _held_blocks(n, lo, cap, S, bs)
        if (table[:, held] < 0).any():
            r, j = np.argwhere(table[:, held] < 0)[0]
            _fail(f"layer {li}: row {r} has no block for table entry "
                  f"{int(np.flatnonzero(held)[j])}, which holds positions")
        if (table[:, ~held] >= 0).any():
            _fail(f"layer {li}: a block table entry holds no position but names a block")
        tables.append(np.ascontiguousarray(table))
    return tables


def _held_blocks(n, lo, cap, S, bs) -> np.ndarray:
    """Which table entries hold a position: the slots of [0, min(S, lo)) and
    [lo, n), position p in slot p below S, else in S + (p - S) % (cap - S)."""
    held = np.zeros(-(-cap // bs), dtype=bool)

    def mark(first_slot, end_slot):
        held[first_slot // bs:-(-end_slot // bs)] = True

    for a, b in ((0, min(S, lo)), (lo, n)):
        if min(b, S) > a:                             # below S: slot == position
            mark(a, min(b, S))
        a = max(a, S)
        if b > a:                                     # the window (count <= cap - S)
            first = S + (a - S) % (cap - S)
            end = first + b - a
            mark(first, min(end, cap))
            if end > cap:                             # wrapped back to the window's start
                mark(S, S + end - cap)
    return held


def _parse_blocks(buf, index, cache, start) -> list:
    size = len(buf)
    if index.size:
        ends = index["offset"] + index["nbytes"]
        if index["offset"][0] != start or (index["offset"][1:] != ends[:-1]).any():
            _fail("block payloads must follow the meta section back to back")
        if (index["nbytes"] == 0).any():
            _fail("a block has an empty payload")
        if int(ends[-1]) > size:
            i = int(np.argmax(ends > size))
            _fail(f"truncated: block {i} ends at byte {int(ends[i])} but the file has "
                  f"{size} bytes")
        end = int(ends[-1])
    else:
        end = start
    if end != size:
        _fail(f"{size - end} bytes of trailing data after the last block")
    full, lossless = _core.TIER_FULL, int(CompressionStrategy.LOSSLESS)
    quantized = {int(CompressionStrategy.FP16), int(CompressionStrategy.INT8),
                 int(CompressionStrategy.INT4)}
    block_bytes = 2 * cache.num_kv_heads * cache.block_size * cache.head_dim \
        * cache.dtype.itemsize
    blocks = []
    zstd_budget = _ZSTD_BUDGET_RATIO * size + _ZSTD_BUDGET_EXTRA
    # Plain tuples: reading numpy records field by field costs ~20 us a block.
    records = index[["offset", "nbytes", "age", "crc", "exact_rows", "tier", "flags"]].tolist()
    for i, (off, nbytes, age, crc, exact, tier, flags) in enumerate(records):
        where = f"block {i}"
        if not (math.isfinite(age) and age >= 0):
            _fail(f"{where}: age {age} is not a finite number of seconds >= 0")
        if tier == full:
            expected = block_bytes
            if exact or flags & ~_core.FLAG_INCOMPRESSIBLE:
                _fail(f"{where}: a full block with exact_rows={exact}, flags={flags}")
        elif tier in quantized:
            if flags or not 0 <= exact < cache.block_size:
                _fail(f"{where}: exact_rows {exact} or flags {flags} invalid for its tier")
            if tier == int(CompressionStrategy.INT4) and cache.head_dim % 2:
                _fail(f"{where}: INT4 with an odd head_dim ({cache.head_dim})")
            if tier == int(CompressionStrategy.FP16) and cache.dtype.itemsize == 2:
                # Never written (float16 is stored full); its decoder writes float32.
                _fail(f"{where}: an FP16 block in a float16 cache")
            expected = cache._payload_nbytes(tier, exact)
        elif tier == lossless:
            if exact or flags & ~_core.FLAG_ZSTD:
                _fail(f"{where}: a lossless block with exact_rows={exact}, flags={flags}")
            expected = nbytes
        else:
            _fail(f"{where}: unknown tier {tier}")
        if nbytes != expected:
            _fail(f"{where}: {nbytes} payload bytes, its tier needs {expected}")
        data = buf[off:off + nbytes]
        if zlib.crc32(data) != crc:
            _fail(f"{where}: checksum mismatch: the file is corrupted")
        if tier == lossless:
            if flags & _core.FLAG_ZSTD:
                zstd_budget -= block_bytes
                if zstd_budget < 0:
                    _fail(f"{where}: the zstd blocks unpack to more than "
                          f"{_ZSTD_BUDGET_RATIO} times the file's size")
            _check_lossless(data, flags & _core.FLAG_ZSTD, block_bytes, where)
        blocks.append((tier, flags, exact, age, data))
    return blocks


def _check_lossless(data, zstd: bool, block_bytes: int, where: str) -> None:
    """A LOSSLESS payload must unpack to exactly one block (checked now, so a
    bad one never reaches a read)."""
    if zstd:
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{where} is packed with zstd: install the zstandard package "
                              "(pip install 'kvcache[zstd]') to load this file") from None
        try:
            declared = zstandard.get_frame_parameters(data).content_size
            if declared != block_bytes:
                _fail(f"{where}: zstd frame declares {declared} bytes, a block is "
                      f"{block_bytes}")
            plain = zstandard.ZstdDecompressor().decompress(data, max_output_size=block_bytes)
        except zstandard.ZstdError as exc:
            _fail(f"{where}: invalid zstd payload: {exc}")
    else:
        if block_bytes > _LZ4_MAX_RATIO * len(data) + 16:
            _fail(f"{where}: {len(data)} LZ4 bytes cannot unpack to a {block_bytes}-byte block")
        import lz4.block
        try:
            plain = lz4.block.decompress(data, uncompressed_size=block_bytes)
        except lz4.block.LZ4BlockError as exc:
            _fail(f"{where}: invalid LZ4 payload: {exc}")
    if len(plain) != block_bytes:
        _fail(f"{where}: unpacks to {len(plain)} bytes, a block is {block_bytes}")


def _check_references(tables, states, cache, nblocks, blocks) -> None:
    """Each stored block belongs to one layer and one table entry (rows of a
    batch may share it), and every stored block is used."""
    owner = np.full(nblocks, -1, dtype=np.int64)
    for li, table in enumerate(tables):
        nblk = table.shape[1]
        cols = np.broadcast_to(np.arange(nblk), table.shape)
        used = table >= 0
        ids, where = table[used], li * (1 << 40) + cols[used]
        first = owner[ids]
        clash = (first >= 0) & (first != where)
        # Within this call, one id must map to one (layer, entry) too.
        order = np.argsort(ids, kind="stable")
        same = (ids[order][1:] == ids[order][:-1]) & (where[order][1:] != where[order][:-1])
        if clash.any() or same.any():
            _fail(f"layer {li}: a block is referenced from two table entries or layers")
        owner[ids] = where
    if (owner < 0).any():
        _fail(f"block {int(np.argmax(owner < 0))} is stored but not referenced")
