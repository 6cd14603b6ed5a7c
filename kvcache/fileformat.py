"""The save file of a kvcache: versioned, checksummed, written atomically.

``KVCache.save`` and ``KVCache.load`` are the API.  This module holds the
format: :func:`write` puts a :class:`SaveRecord` (the configuration, the
growth policy, and what the compiled core's ``_export`` returns) in a file,
:func:`read` and :func:`parse` give one back, validated.  It knows nothing
of ``KVCache``: any cache that can export and import a record can use it.

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
then is a record returned.  Anything wrong raises :class:`CacheFormatError`
naming it.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from . import _core, lossless
from ._version import __version__
from .atomic_files import write_atomically
from .compression import CompressionStrategy
from .config import MAX_TOKENS, CacheConfig, checked_field
from .growth import Adaptive, Exponential, GrowthStrategy, Linear

__all__ = ["CacheFormatError", "FORMAT_VERSION", "MAGIC", "SaveRecord", "write", "read",
           "parse"]

MAGIC = b"KVCACHE\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIIQII")          # magic, version, json_len, meta_len, crcs
PREAMBLE_BYTES = _PREAMBLE.size                # 32
BLOCK_DTYPE = np.dtype([("offset", "<u8"), ("nbytes", "<u8"), ("age", "<f8"),
                        ("crc", "<u4"), ("exact_rows", "<i4"), ("tier", "u1"),
                        ("flags", "u1"), ("_pad", "u1", (6,))])
_TABLE_DTYPE = np.dtype("<i4")
# zstd has no bound on its expansion (a block of zeros packs ~3000-fold), so
# the blocks a file may unpack while it is checked are bounded in total: at
# most this many times the file's size (plus a constant), which keeps a
# hostile file from making the check run for minutes.  (LZ4's 255-fold bound
# is checked per block by kvcache.lossless.)
_ZSTD_BUDGET_RATIO = 1024
_ZSTD_BUDGET_EXTRA = 64 << 20
_GROWTH = {"exponential": (Exponential, {"factor": float}),
           "linear": (Linear, {"increment": int}),
           "adaptive": (Adaptive, {"horizon_s": float, "min_factor": float,
                                   "max_factor": float})}


class CacheFormatError(ValueError):
    """A save file that is not a valid kvcache file: truncated, corrupted,
    of an unknown version, or inconsistent.  The message names what is wrong."""


@dataclass
class SaveRecord:
    """What a save file holds, as plain values.

    ``states``, ``tables`` and ``blocks`` are what the compiled core's
    ``_export`` returns and ``_import`` takes, for every layer: per layer
    ``(n, lo, cap)`` and its block table (int32 ``[batch, nblk]``, indices
    into ``blocks``, -1 where none); per stored block ``(tier, flags,
    exact_rows, age_seconds, payload)``.  ``growth``: the growth policy, or
    None; ``max_capacity``: where growth stops (None: unbounded).
    ``saved_layers`` and ``prefix`` say what the writer chose to save (the
    other layers are recorded empty).

    A record :func:`read` returns with ``mmap=True`` has payloads that are
    views of a read-only map of the file, unmapped when the last goes.
    """

    config: CacheConfig
    states: list
    tables: list
    blocks: list
    growth: GrowthStrategy | None = None
    max_capacity: int | None = None
    saved_layers: list | None = None
    prefix: int | None = None

    @classmethod
    def from_export(cls, config: CacheConfig, exported, saved_layers, prefix=None,
                    growth=None, max_capacity=None) -> SaveRecord:
        """The record of ``_export(saved_layers, prefix)``'s result: the
        layers not saved are recorded empty, at the configured capacity."""
        states, tables, blocks = exported
        by_layer = dict(zip(saved_layers, zip(states, tables)))
        empty_blk = -(-config.max_seq_len // config.block_size)
        all_states, all_tables = [], []
        for li in range(config.num_layers):
            state, table = by_layer.get(li, ((0, 0, config.max_seq_len), None))
            if table is None:
                table = np.full((config.batch_size, empty_blk), -1, dtype=np.int32)
            all_states.append(tuple(state))
            all_tables.append(table)
        return cls(config, all_states, all_tables, list(blocks), growth, max_capacity,
                   list(saved_layers), prefix)


# ------------------------------------------------------------------- writing

def _describe_growth(record: SaveRecord) -> dict | None:
    strategy = record.growth
    if strategy is None:
        return None
    for kind, (cls, fields) in _GROWTH.items():
        if type(strategy) is cls:
            cap = MAX_TOKENS if record.max_capacity is None else record.max_capacity
            return {"kind": kind, "max_capacity": cap,
                    **{f: getattr(strategy, f) for f in fields}}
    warnings.warn(f"the growth strategy {type(strategy).__name__} cannot be saved; "
                  "the loaded cache will not grow (enable_dynamic_growth after load)",
                  UserWarning, stacklevel=4)
    return None


def write(path, record: SaveRecord) -> int:
    """Write ``record`` to ``path`` atomically; returns the file's size in bytes.

    The record is written as given (:func:`read` is what checks a file).  A
    growth policy other than the built-in ones cannot be described: it is
    left out, with a warning.
    """
    path = os.fspath(path)
    saved = (list(range(record.config.num_layers)) if record.saved_layers is None
             else record.saved_layers)
    description = {
        "format": "kvcache", "kvcache_version": __version__,
        "byteorder": sys.byteorder, "config": record.config.to_dict(),
        "growth": _describe_growth(record),
        "layers": [list(s) for s in record.states], "saved_layers": saved,
        "prefix": record.prefix, "blocks": len(record.blocks),
    }
    text = json.dumps(description, separators=(",", ":")).encode()
    blocks = record.blocks
    index = np.zeros(len(blocks), dtype=BLOCK_DTYPE)
    table_bytes = b"".join(t.astype(_TABLE_DTYPE, copy=False).tobytes() for t in record.tables)
    meta_len = len(text) + len(table_bytes) + index.nbytes
    offset = PREAMBLE_BYTES + meta_len
    for i, (tier, flags, exact, age, data) in enumerate(blocks):
        index[i] = (offset, len(data), age, zlib.crc32(data), exact, tier, flags, 0)
        offset += len(data)
    meta = text + table_bytes + index.tobytes()
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text), meta_len, zlib.crc32(meta), 0)
    head = head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))
    write_atomically(path, [head, meta] + [b[4] for b in blocks])
    return offset


# ------------------------------------------------------------------- reading

def read(path, mmap: bool = False) -> SaveRecord:
    """The record in the file at ``path``, validated (see :func:`parse`).

    ``mmap=True`` reads through a read-only memory map instead of one
    file-sized buffer (lower peak memory); the record's payloads are then
    views of the map, which stays open as long as they live.
    """
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
    return parse(data)


def parse(data) -> SaveRecord:
    """The record in ``data``, the bytes of a save file (what the fuzzer
    drives); the payloads are views of ``data``.  Raises
    :class:`CacheFormatError` naming what is wrong."""
    return _parse(memoryview(data).cast("B"))


def _fail(message: str):
    raise CacheFormatError(message)


def _check_magic(buf: memoryview) -> None:
    """First of all, whether this is a kvcache file at all: a file too short
    to hold a preamble is "truncated" only if it starts as one would."""
    head = bytes(buf[:len(MAGIC)])
    if head != MAGIC[:len(head)]:
        _fail(f"not a kvcache file: it starts with {head!r}, a kvcache file with {MAGIC!r}")
    if len(buf) < PREAMBLE_BYTES:
        _fail(f"truncated: the file has {len(buf)} bytes, a kvcache file starts with a "
              f"{PREAMBLE_BYTES}-byte preamble")


def _parse(buf: memoryview) -> SaveRecord:
    size = len(buf)
    _check_magic(buf)
    _, version, json_len, meta_len, meta_crc, pre_crc = _PREAMBLE.unpack(buf[:PREAMBLE_BYTES])
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
    # The configuration, by the constructor's own checks (they allocate nothing).
    try:
        config = CacheConfig.from_dict(d.get("config", dict))
    except (TypeError, ValueError, OverflowError) as exc:
        _fail(f"invalid configuration: {exc}")
    layers = d.get("layers", list)
    nblocks = d.get("blocks", int)
    if nblocks < 0:
        _fail(f"blocks must be >= 0, got {nblocks}")
    if len(layers) != config.num_layers:
        _fail(f"{len(layers)} layer states for num_layers={config.num_layers}")
    states = []
    for li, state in enumerate(layers):
        if (not isinstance(state, list) or len(state) != 3
                or not all(type(x) is int for x in state)):
            _fail(f"layer {li}: state must be [n, lo, cap] integers, got {state!r}")
        states.append(tuple(state))
    # Every size against the file before anything is allocated.
    caps = [s[2] for s in states]
    if min(caps) < 1 or max(caps) > 2**40:
        _fail(f"layer capacities must be in [1, 2**40], got {min(caps)}..{max(caps)}")
    entries = [config.batch_size * -(-cap // config.block_size) for cap in caps]
    expected = json_len + 4 * sum(entries) + BLOCK_DTYPE.itemsize * nblocks
    if expected != meta_len:
        _fail(f"the meta section holds {meta_len} bytes but its description implies "
              f"{expected} (tables for capacities {sorted(set(caps))[:4]}..., "
              f"{nblocks} blocks)")
    if config.max_seq_len > min(caps):
        _fail(f"max_seq_len {config.max_seq_len} exceeds a layer's capacity ({min(caps)})")
    saved_layers, prefix = _parse_selection(d, config)
    growth, max_capacity = _parse_growth(d.get("growth", (dict, type(None))), caps)
    geometry = _geometry(config)
    tables = _parse_tables(meta, json_len, entries, states, config, nblocks, geometry)
    index = np.frombuffer(meta, dtype=BLOCK_DTYPE, count=nblocks,
                          offset=json_len + 4 * sum(entries))
    blocks = _parse_blocks(buf, index, config, PREAMBLE_BYTES + meta_len, geometry)
    _check_references(tables, nblocks)
    return SaveRecord(config, states, tables, blocks, growth, max_capacity, saved_layers,
                      prefix)


class _Fields:
    """Typed access to a JSON object, failing with the field's name."""

    def __init__(self, obj, name: str) -> None:
        if not isinstance(obj, dict):
            _fail(f"{name} must be a JSON object, got {type(obj).__name__}")
        self.obj, self.name = obj, name

    def get(self, key: str, types):
        try:
            return checked_field(self.obj, key, types, self.name)
        except (TypeError, ValueError) as exc:
            _fail(str(exc))


def _parse_selection(d: _Fields, config: CacheConfig):
    """The layers the writer saved and its prefix (None: whole layers)."""
    saved = d.get("saved_layers", list)
    if (not all(type(li) is int for li in saved) or saved != sorted(set(saved))
            or not all(0 <= li < config.num_layers for li in saved)):
        _fail(f"saved_layers must be distinct layer indices in ascending order, "
              f"got {saved!r:.60}")
    prefix = d.get("prefix", (int, type(None)))
    if prefix is not None and not 0 <= prefix <= 2**40:
        _fail(f"prefix must be in [0, 2**40], got {prefix}")
    return saved, prefix


def _parse_growth(growth, caps):
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


def _parse_tables(meta, json_len, entries, states, config: CacheConfig, nblocks, geometry):
    flat = np.frombuffer(meta, dtype=_TABLE_DTYPE, count=sum(entries), offset=json_len)
    if flat.size and (flat.min() < -1 or flat.max() >= nblocks):
        _fail(f"a block table entry is out of range [-1, {nblocks}): "
              f"{int(flat.min())}..{int(flat.max())}")
    tables, at = [], 0
    S, batch = config.sink_tokens, config.batch_size
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
        elif not (config.overflow == "ring" and 0 < lo <= n and min(S, lo) + n - lo <= cap):
            _fail(f"layer {li}: window start {lo} is inconsistent with length {n}, "
                  f"capacity {cap}, {S} sinks and overflow={config.overflow!r}")
        table = flat[at:at + count].reshape(batch, count // batch).astype(np.int32)
        at += count
        held = geometry._held_entries(n, lo, cap) > 0
        if (table[:, held] < 0).any():
            r, j = np.argwhere(table[:, held] < 0)[0]
            _fail(f"layer {li}: row {r} has no block for table entry "
                  f"{int(np.flatnonzero(held)[j])}, which holds positions")
        if (table[:, ~held] >= 0).any():
            _fail(f"layer {li}: a block table entry holds no position but names a block")
        tables.append(np.ascontiguousarray(table))
    return tables


def _geometry(config: CacheConfig):
    """A store of ``config``'s shape (one layer, no block allocated): the
    core owns the slot layout and the payload layouts, so the loader asks it
    which table entries a layer holds and how large a payload must be."""
    store = _core.KVStore()
    store._init_store(1, config.num_kv_heads, config.head_dim, config.block_size + 1 +
                      config.sink_tokens, 1, config.dtype, config.block_size,
                      config.sink_tokens, True, False, config.int8_group_size,
                      config.group_size)
    return store


def _parse_blocks(buf, index, config: CacheConfig, start, geometry) -> list:
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
    full, lossless_tier = _core.TIER_FULL, int(CompressionStrategy.LOSSLESS)
    quantized = {int(CompressionStrategy.FP16), int(CompressionStrategy.INT8),
                 int(CompressionStrategy.INT4)}
    itemsize = np.dtype(config.dtype).itemsize
    block_bytes = 2 * config.num_kv_heads * config.block_size * config.head_dim * itemsize
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
            if flags or not 0 <= exact < config.block_size:
                _fail(f"{where}: exact_rows {exact} or flags {flags} invalid for its tier")
            if tier == int(CompressionStrategy.INT4) and config.head_dim % 2:
                _fail(f"{where}: INT4 with an odd head_dim ({config.head_dim})")
            if tier == int(CompressionStrategy.FP16) and itemsize == 2:
                # Never written (float16 is stored full); its decoder writes float32.
                _fail(f"{where}: an FP16 block in a float16 cache")
            expected = geometry._payload_nbytes(tier, exact)
        elif tier == lossless_tier:
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
        if tier == lossless_tier:
            if flags & _core.FLAG_ZSTD:
                zstd_budget -= block_bytes
                if zstd_budget < 0:
                    _fail(f"{where}: the zstd blocks unpack to more than "
                          f"{_ZSTD_BUDGET_RATIO} times the file's size")
            _check_lossless(data, lossless.CODECS[bool(flags & _core.FLAG_ZSTD)],
                            block_bytes, where)
        blocks.append((tier, flags, exact, age, data))
    return blocks


def _check_lossless(data, codec: str, block_bytes: int, where: str) -> None:
    """A LOSSLESS payload must unpack to exactly one block (checked now, so a
    bad one never reaches a read)."""
    try:
        lossless.require(codec)
    except ImportError:
        if codec != "zstd":
            raise
        raise ImportError(f"{where} is packed with zstd: install the zstandard package "
                          "(pip install 'kvcache[zstd]') to load this file") from None
    try:
        lossless.unpack(data, block_bytes, codec)
    except ValueError as exc:
        _fail(f"{where}: {exc}")


def _check_references(tables, nblocks: int) -> None:
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
