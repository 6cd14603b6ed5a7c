"""Fuzzing KVCache.load: mutated save files never crash, hang or leak.

Each mutated file either raises CacheFormatError or loads into a cache that
then works (reads, attention, an update, compression).  Half the mutants get
their checksums recomputed, so the mutations reach the structural checks
behind them rather than stopping at the first CRC.

``KVCACHE_FUZZ_FILES`` sets how many mutants (default 20,000, ~8 s here); a
longer run: ``KVCACHE_FUZZ_FILES=1000000 pytest tests/test_fuzz_loader.py``.
``KVCACHE_FUZZ_SEED`` picks another sequence.  Run it under the sanitizer
build (tools/sanitize.sh) to check memory safety, not only absence of crashes.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from kvcache import CacheFormatError, GrowthStrategy, KVCache
from kvcache import fileformat as ff

FILES = int(os.environ.get("KVCACHE_FUZZ_FILES", "20000"))
SEED = int(os.environ.get("KVCACHE_FUZZ_SEED", "20261127"))


def _cache(tokens, seed=0, **kw) -> KVCache:
    kw = {"max_seq_len": 48, "block_size": 8, **kw}
    c = KVCache(kw.pop("layers", 2), kw.pop("heads", 2), kw.pop("dim", 8), **kw)
    rng = np.random.default_rng(seed)
    for li in range(c.num_layers):
        for t in range(0, tokens, 5):
            n = min(5, tokens - t)
            k = (rng.integers(-8, 8, (c.batch_size, c.num_kv_heads, n, c.head_dim)) / 4)
            c.update(li, k.astype(c.dtype), (-k).astype(c.dtype), t + n)
    return c


def _seed_files(tmp_path) -> list[bytes]:
    """Valid files covering every tier, rings with sinks, shared blocks, growth."""
    caches = [
        _cache(40, compression="INT8", residual_tokens=8, keep_first=2),
        _cache(40, compression="INT4", residual_tokens=8, dtype="float32"),
        _cache(40, compression="LOSSLESS", residual_tokens=0),
        _cache(40, compression="LOSSLESS", residual_tokens=0, lossless_codec="zstd",
               dtype="float32"),
        _cache(70, sink_tokens=3, compression="FP16", dtype="float32", residual_tokens=8),
        _cache(30, batch_size=2, compression="ADAPTIVE", residual_tokens=0),
        _cache(0, layers=1),
    ]
    caches[5].reorder_batch([1, 1])
    grow = _cache(0, max_seq_len=16)
    grow.enable_dynamic_growth(GrowthStrategy.exponential(2.0), max_capacity=64)
    k = np.ones((1, 2, 20, 8), np.float16)
    for li in range(2):
        grow.update(li, k, k, 20)
    caches.append(grow)
    out = []
    for i, c in enumerate(caches):
        if c.compression.name != "NONE":
            c.compress_old_entries(0)
        c.save(tmp_path / f"s{i}")
        out.append((tmp_path / f"s{i}").read_bytes())
    return out


def _repair(data: bytes) -> bytes:
    """Recompute the checksums of a (possibly mangled) file where its fields allow."""
    b = bytearray(data)
    if len(b) < 32:
        return data
    _, _, json_len, meta_len, _, _ = ff._PREAMBLE.unpack(bytes(b[:32]))
    meta_len = min(meta_len, len(b) - 32)
    try:
        desc = json.loads(bytes(b[32:32 + min(json_len, meta_len)]))
        caps = [s[2] for s in desc["layers"]]
        bs, batch = desc["config"]["block_size"], desc["config"]["batch_size"]
        at = 32 + json_len + 4 * sum(batch * -(-c // bs) for c in caps)
        nblocks = desc["blocks"]
        if at + 40 * nblocks <= len(b):
            index = np.frombuffer(bytearray(b[at:at + 40 * nblocks]), dtype=ff.BLOCK_DTYPE)
            for rec in index:
                off, n = int(rec["offset"]), int(rec["nbytes"])
                rec["crc"] = zlib.crc32(bytes(b[off:off + n]))
            b[at:at + index.nbytes] = index.tobytes()
    except Exception:
        pass
    struct.pack_into("<I", b, 24, zlib.crc32(bytes(b[32:32 + meta_len])))
    struct.pack_into("<I", b, 28, zlib.crc32(bytes(b[:28])))
    return bytes(b)


_INTERESTING = [0, 1, -1, 2, 7, 8, 63, 64, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40,
                2**62, 2**63 - 1, -(2**31), 10**30, 0.5, 1e308, float("nan"), None, True,
                "x", [], {}]


def _mutate_json(rng, data: bytes) -> bytes:
    """Change one value of the JSON description to an interesting one."""
    _, _, json_len, meta_len, _, _ = ff._PREAMBLE.unpack(data[:32])
    desc = json.loads(data[32:32 + json_len])
    slots = []

    def walk(obj):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            slots.append((obj, key))
            if isinstance(value, (dict, list)):
                walk(value)

    walk(desc)
    obj, key = slots[int(rng.integers(len(slots)))]
    value = _INTERESTING[int(rng.integers(len(_INTERESTING)))]
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5 \
            and isinstance(obj[key], int) and not isinstance(obj[key], bool):
        value = obj[key] + int(rng.integers(-3, 4))
    obj[key] = value
    text = json.dumps(desc).encode()
    b = bytearray(data[:32]) + text + data[32 + json_len:]
    struct.pack_into("<I", b, 12, len(text))
    struct.pack_into("<Q", b, 16, meta_len + len(text) - json_len)
    return bytes(b)


def _mutate(rng, data: bytes, seeds: list[bytes]) -> bytes:
    kind = int(rng.integers(9))
    b = bytearray(data)
    if kind == 0 and b:                                   # flip bits
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
    elif kind == 1 and b:                                 # set bytes
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(len(b)))] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF,
                                                           int(rng.integers(256))]))
    elif kind == 2:                                       # truncate
        del b[int(rng.integers(len(b) + 1)):]
    elif kind == 3:                                       # insert
        at = int(rng.integers(len(b) + 1))
        b[at:at] = rng.bytes(int(rng.integers(1, 64)))
    elif kind == 4 and b:                                 # delete a range
        at = int(rng.integers(len(b)))
        del b[at:at + int(rng.integers(1, 64))]
    elif kind == 5:                                       # splice two files
        other = seeds[int(rng.integers(len(seeds)))]
        cut = int(rng.integers(min(len(b), len(other)) + 1))
        b = b[:cut] + other[cut:]
    elif kind == 6 and len(b) >= 40:                      # an integer field of the index/tables
        at = int(rng.integers(32, len(b) - 3)) & ~3
        struct.pack_into("<i", b, at, int(rng.choice([-2, -1, 0, 1, 2**31 - 1,
                                                      int(rng.integers(-5, 50))])))
    elif kind in (7, 8):                                  # the JSON description
        try:
            b = bytearray(_mutate_json(rng, data))
        except Exception:
            pass
    return bytes(b)


def _exercise(cache: KVCache) -> None:
    """A loaded mutant must behave like any cache."""
    rng = np.random.default_rng(0)
    for li in range(min(cache.num_layers, 4)):
        k, v = cache.keys(li), cache.values(li)
        assert k.shape == v.shape == (cache.batch_size, cache.num_kv_heads, cache.held(li),
                                      cache.head_dim)
        assert len(cache.positions(li)) == cache.held(li)
        q = rng.standard_normal((cache.batch_size, cache.num_kv_heads, 1, cache.head_dim))
        if cache.held(li):
            cache.attention(li, q.astype(np.float32))
        t = np.zeros((cache.batch_size, cache.num_kv_heads, 1, cache.head_dim), cache.dtype)
        try:
            cache.update(li, t, t, cache.seq_len(li) + 1)
        except (IndexError, ValueError):          # CacheFullError (overflow="error")
            pass
    if cache.compression.name != "NONE":
        cache.compress_old_entries(0)
    cache.stats()
    cache.close()


def test_loader_fuzz(tmp_path):
    seeds = _seed_files(tmp_path)
    for data in seeds:                            # the seeds themselves load and work
        _exercise(KVCache.loads(data))
    rng = np.random.default_rng(SEED)
    loaded = rejected = 0
    for i in range(FILES):
        data = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 3))):
            data = _mutate(rng, data, seeds)
        if rng.random() < 0.5:
            data = _repair(data)
        try:
            cache = KVCache.loads(data)
        except CacheFormatError:
            rejected += 1
            continue
        except Exception as exc:
            path = tmp_path / f"crash{i}.kvc"
            path.write_bytes(data)
            raise AssertionError(f"mutant {i} raised {exc!r} (saved as {path})") from exc
        loaded += 1
        _exercise(cache)
    # Both outcomes must actually occur, or the fuzzer is not reaching the
    # structural checks (everything rejected) or not mutating (everything loads).
    assert rejected > FILES // 4 and loaded > FILES // 100, (loaded, rejected)
    print(f"\n{FILES} mutants: {rejected} rejected, {loaded} loaded and exercised")


def test_rejected_and_loaded_files_leak_nothing(tmp_path):
    """Memory after many loads (failing and succeeding) returns to its level
    after the first few: no block, table or buffer outlives its cache."""
    seeds = _seed_files(tmp_path)
    rng = np.random.default_rng(SEED + 1)
    mutants = []
    for _ in range(300):
        data = _repair(_mutate(rng, seeds[int(rng.integers(len(seeds)))], seeds))
        mutants.append(data)

    def run():
        for data in mutants:
            try:
                KVCache.loads(data).close()
            except CacheFormatError:
                pass

    run()                                          # warm caches (imports, interned strings)
    tracemalloc.start()
    try:
        run()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            run()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 << 10, f"{grown} bytes more after 900 further loads"


@pytest.mark.parametrize("mm", [False, True])
def test_file_based_load_of_mutants(tmp_path, mm):
    """The same checks through KVCache.load (read and mmap) on a few mutants."""
    seeds = _seed_files(tmp_path)
    rng = np.random.default_rng(SEED + 2)
    for i in range(200):
        data = _mutate(rng, seeds[i % len(seeds)], seeds)
        if i % 2:
            data = _repair(data)
        path = tmp_path / "m"
        path.write_bytes(data)
        try:
            cache = KVCache.load(path, mmap=mm)
        except CacheFormatError:
            continue
        _exercise(cache)
