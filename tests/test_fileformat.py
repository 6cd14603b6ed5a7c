"""KVCache.save / KVCache.load: exact round trips, prefixes, atomic writes,
and a reader that rejects every broken file with CacheFormatError."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvhelpers import DATA_HEAD_DIM, DATA_HEADS, real_kv

import kvcache
from kvcache import CacheFormatError, GrowthStrategy, KVCache
from kvcache import fileformat as ff


def _fill(cache: KVCache, tokens: int, seed: int = 0, chunk: int = 1) -> None:
    """Random tokens; coarse values (multiples of 1/8) so that LOSSLESS shrinks them."""
    rng = np.random.default_rng(seed)
    b, h, d = cache.batch_size, cache.num_kv_heads, cache.head_dim
    for li in range(cache.num_layers):
        n = 0
        while n < tokens:
            t = min(chunk, tokens - n)
            k = (rng.integers(-16, 16, (b, h, t, d)) / 8).astype(cache.dtype)
            v = (rng.integers(-16, 16, (b, h, t, d)) / 8).astype(cache.dtype)
            cache.update(li, k, v, n + t)
            n += t


def _state(cache: KVCache, q_seed: int = 1) -> list:
    """Everything a loaded cache must reproduce, per layer."""
    rng = np.random.default_rng(q_seed)
    out = []
    for li in range(cache.num_layers):
        q = rng.standard_normal((cache.batch_size, 2 * cache.num_kv_heads, 3,
                                 cache.head_dim)).astype(np.float32)
        out.append(dict(keys=cache.keys(li), values=cache.values(li),
                        positions=cache.positions(li), seq_len=cache.seq_len(li),
                        capacity=cache.capacity(li), held=cache.held(li),
                        tiers=cache.block_tiers(li),
                        attention=cache.attention(li, q) if cache.held(li) >= 3 else None))
    return out


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for li, (x, y) in enumerate(zip(a, b)):
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, (li, key)
                assert np.array_equal(x[key], y[key], equal_nan=True), (li, key)
            else:
                assert x[key] == y[key], (li, key, x[key], y[key])


def _roundtrip(cache: KVCache, tmp_path, **kw) -> KVCache:
    path = tmp_path / "cache.kvc"
    size = cache.save(path, **kw)
    assert size == os.path.getsize(path)
    return KVCache.load(path)


# -------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("strategy", ["NONE", "FP16", "INT8", "INT4", "LOSSLESS", "ADAPTIVE"])
def test_roundtrip_every_tier_is_exact(tmp_path, dtype, strategy):
    cache = KVCache(3, 2, 32, max_seq_len=400, dtype=dtype, block_size=16, batch_size=2,
                    compression=None if strategy == "NONE" else strategy, residual_tokens=32)
    _fill(cache, 300, chunk=7)
    if strategy != "NONE":
        done = cache.compress_old_entries(0).blocks
        assert done > 0 or (strategy == "FP16" and dtype == "float16")   # FP16 of float16: a no-op
    before = _state(cache)
    loaded = _roundtrip(cache, tmp_path)
    _assert_same(before, _state(loaded))
    assert loaded.stats().memory_bytes == cache.stats().memory_bytes
    assert loaded.compression is cache.compression
    assert loaded.block_size == 16 and loaded.batch_size == 2 and loaded.dtype == cache.dtype


def test_roundtrip_real_data_with_keep_first_and_sinks(tmp_path):
    k, v = real_kv(15)
    cache = KVCache(1, DATA_HEADS, DATA_HEAD_DIM, max_seq_len=1024, sink_tokens=4,
                    compression="INT4", residual_tokens=64)
    for t in range(0, k.shape[2], 37):                 # wraps the ring
        cache.update(0, k[:, :, t:t + 37], v[:, :, t:t + 37], min(t + 37, k.shape[2]))
    cache.compress_old_entries(0)
    assert cache.positions(0)[4] > 4                  # evicted some window positions
    before = _state(cache)
    loaded = _roundtrip(cache, tmp_path)
    _assert_same(before, _state(loaded))
    # ... and both go on identically: more tokens wrap the ring further.
    for c in (cache, loaded):
        n = c.seq_len(0)
        c.update(0, k[:, :, :100], v[:, :, :100], n + 100)
    _assert_same(_state(cache), _state(loaded))


def test_roundtrip_after_reorder_batch_stores_shared_blocks_once(tmp_path):
    cache = KVCache(2, 2, 16, max_seq_len=256, block_size=16, batch_size=2)
    _fill(cache, 100)
    single = os.path.getsize(tmp_path / "a") if cache.save(tmp_path / "a") else 0
    cache.reorder_batch([0, 0, 1, 1])                  # rows share blocks
    before = _state(cache)
    loaded = _roundtrip(cache, tmp_path)
    _assert_same(before, _state(loaded))
    assert os.path.getsize(tmp_path / "cache.kvc") < 1.2 * single
    # Copy-on-write still holds after loading: rows sharing a block get their
    # own copies when written (one shared write would leave them equal).
    k = np.arange(4, dtype=np.float16)[:, None, None, None] * np.ones((4, 2, 1, 16), np.float16)
    loaded.update(0, k, k, 50)
    assert not np.array_equal(loaded.keys(0)[0], loaded.keys(0)[1])
    cache.update(0, k, k, 50)
    _assert_same(_state(cache), _state(loaded))


def test_roundtrip_growth_policy_and_capacities(tmp_path):
    cache = KVCache(2, 1, 8, max_seq_len=64, block_size=8)
    cache.enable_dynamic_growth(GrowthStrategy.linear(40), max_capacity=400)
    _fill(cache, 150)
    loaded = _roundtrip(cache, tmp_path)
    assert loaded.growth_strategy == GrowthStrategy.linear(40)
    assert [loaded.capacity(i) for i in range(2)] == [cache.capacity(i) for i in range(2)]
    for c in (cache, loaded):
        _fill(c, 390, seed=5)                         # grows to the cap, then the ring
    _assert_same(_state(cache), _state(loaded))


def test_custom_growth_strategy_warns_and_is_not_saved(tmp_path):
    class Doubling(kvcache.growth.GrowthStrategy):
        def _propose(self, current, needed, layer_idx):
            return 2 * current

    cache = KVCache(1, 1, 8, max_seq_len=16, block_size=8)
    cache.enable_dynamic_growth(Doubling())
    _fill(cache, 40)
    with pytest.warns(UserWarning, match="cannot be saved"):
        cache.save(tmp_path / "c")
    loaded = KVCache.load(tmp_path / "c")
    assert loaded.growth_strategy is None and loaded.capacity(0) == cache.capacity(0)


def test_roundtrip_zstd_lossless(tmp_path):
    pytest.importorskip("zstandard")
    cache = KVCache(2, 2, 32, max_seq_len=256, dtype="float32", block_size=16,
                    compression="LOSSLESS", lossless_codec="zstd", residual_tokens=0)
    _fill(cache, 200)
    assert cache.compress_old_entries(0).blocks
    before = _state(cache)
    _assert_same(before, _state(_roundtrip(cache, tmp_path)))


def test_roundtrip_empty_and_subset_of_layers(tmp_path):
    cache = KVCache(4, 2, 16, max_seq_len=128)
    loaded = _roundtrip(cache, tmp_path)
    assert all(loaded.seq_len(i) == 0 for i in range(4))
    _fill(cache, 70)
    loaded = _roundtrip(cache, tmp_path, layers=[1, 3])
    for i in range(4):
        if i in (1, 3):
            assert np.array_equal(loaded.keys(i), cache.keys(i))
        else:
            assert loaded.seq_len(i) == 0 and loaded.keys(i).shape[2] == 0


def test_block_ages_survive(tmp_path):
    now = [1000.0]
    cache = KVCache(1, 1, 16, max_seq_len=512, block_size=16, compression="INT8",
                    residual_tokens=0, clock=lambda: now[0])
    _fill(cache, 64)                                  # 4 blocks born at t=1000
    now[0] = 1100.0
    _fill_more = np.zeros((1, 1, 64, 16), np.float16)
    cache.update(0, _fill_more, _fill_more, 128)      # 4 blocks born at t=1100
    now[0] = 1130.0
    cache.save(tmp_path / "c")
    later = [5.0]                                     # another process, another clock
    loaded = KVCache.load(tmp_path / "c", clock=lambda: later[0])
    # 130 s and 30 s old: only the first four are older than a minute.
    assert loaded.compress_old_entries(60).blocks == 4
    assert cache.compress_old_entries(60).blocks == 4


def test_loaded_config_and_background(tmp_path):
    cache = KVCache(2, 2, 16, max_seq_len=256, block_size=16, compression="INT8",
                    auto_compress=True, background=True, residual_tokens=16, keep_first=2,
                    error_budget=0.05, metrics=False, overflow="error", sink_tokens=3)
    _fill(cache, 100)
    cache.wait_for_compression()
    loaded = _roundtrip(cache, tmp_path)
    try:
        for attr in ("residual_tokens", "keep_first", "error_budget", "auto_compress",
                     "metrics_enabled", "overflow", "sink_tokens", "group_size",
                     "int8_group_size", "lossless_codec"):
            assert getattr(loaded, attr) == getattr(cache, attr), attr
        assert loaded._background is not None
        _fill(loaded, 200, seed=3)                    # compresses in the background
        loaded.wait_for_compression()
        assert "int8" in loaded.block_tiers(0)[0]
    finally:
        loaded.close()
        cache.close()


# ------------------------------------------------------------------ prefix

@pytest.mark.parametrize("strategy", [None, "INT8", "LOSSLESS"])
def test_prefix_is_exact_and_holds_nothing_beyond(tmp_path, strategy):
    cache = KVCache(2, 2, 16, max_seq_len=512, dtype="float32", block_size=16,
                    compression=strategy, residual_tokens=0, keep_first=0)
    _fill(cache, 70, seed=1)                          # the "system prompt"
    marker = np.full((1, 2, 1, 16), 12345.678, np.float32)
    for li in range(2):                               # a conversation after it
        for t in range(70, 200):
            cache.update(li, marker, marker, t + 1)
    if strategy:
        cache.compress_old_entries(0)
    system = [dict(keys=cache.keys(li)[:, :, :70], values=cache.values(li)[:, :, :70])
              for li in range(2)]                     # what the cache reads (lossy tiers)
    cache.save(tmp_path / "p", prefix=70)
    raw = (tmp_path / "p").read_bytes()
    assert marker[0, 0, 0, :1].tobytes() not in raw   # nothing past the prefix
    loaded = KVCache.load(tmp_path / "p")
    for li in range(2):
        assert loaded.seq_len(li) == 70
        assert np.array_equal(loaded.keys(li), system[li]["keys"])
        assert np.array_equal(loaded.values(li), system[li]["values"])
    # Reuse: extending the loaded prefix equals extending a truncated original.
    cache.truncate(70)
    for c in (cache, loaded):
        _fill_from(c, 70, 130, seed=9)
    a, b = _state(cache), _state(loaded)
    for x, y in zip(a, b):
        assert np.array_equal(x["keys"], y["keys"]) and np.array_equal(x["values"], y["values"])


def _fill_from(cache, start, end, seed):
    rng = np.random.default_rng(seed)
    for li in range(cache.num_layers):
        for t in range(start, end):
            k = rng.standard_normal((1, cache.num_kv_heads, 1, cache.head_dim))
            cache.update(li, k.astype(cache.dtype), k.astype(cache.dtype), t + 1)


def test_prefix_of_a_wrapped_ring_keeps_only_sinks(tmp_path):
    cache = KVCache(1, 1, 8, max_seq_len=32, block_size=8, sink_tokens=4)
    _fill(cache, 100)
    assert cache.save(tmp_path / "p", prefix=4)
    loaded = KVCache.load(tmp_path / "p")
    assert np.array_equal(loaded.keys(0), cache.keys(0)[:, :, :4])
    with pytest.raises(ValueError, match="evicted"):
        cache.save(tmp_path / "q", prefix=5)
    with pytest.raises(ValueError, match="evicted"):
        cache.save(tmp_path / "q", prefix=80)          # beyond the positions held
    with pytest.raises(ValueError, match="longer than layer"):
        cache.save(tmp_path / "q", prefix=101)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("kwargs, exc", [
    (dict(layers=[0, 0]), ValueError), (dict(layers=[5]), IndexError),
    (dict(layers=[-1]), IndexError), (dict(layers="0"), TypeError),
    (dict(layers=[1.0]), TypeError), (dict(layers=[True]), TypeError),
    (dict(prefix=-1), ValueError), (dict(prefix=2.5), TypeError),
    (dict(prefix=True), TypeError),
])
def test_save_bad_arguments_write_nothing(tmp_path, kwargs, exc):
    cache = KVCache(2, 1, 8, max_seq_len=32)
    _fill(cache, 10)
    with pytest.raises(exc):
        cache.save(tmp_path / "x", **kwargs)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------ atomic writes

def test_new_files_are_private_and_replaced_files_keep_their_mode(tmp_path):
    cache = KVCache(1, 1, 8, max_seq_len=32)
    cache.save(tmp_path / "c")
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "c", 0o640)
    cache.save(tmp_path / "c")
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o640


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c"
    old = KVCache(1, 1, 8, max_seq_len=32)
    _fill(old, 10)
    old.save(path)
    before = path.read_bytes()
    new = KVCache(1, 1, 8, max_seq_len=32)
    _fill(new, 20, seed=4)

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c"]


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from kvcache import KVCache
    path = sys.argv[1]
    caches = []
    for seed in (1, 2):
        c = KVCache(4, 4, 64, max_seq_len=2048, dtype="float32")
        rng = np.random.default_rng(seed)
        for li in range(4):
            k = rng.standard_normal((1, 4, 1500 + 200 * seed, 64)).astype(np.float32)
            c.update(li, k, k, k.shape[2])
        caches.append(c)
    print("ready", flush=True)
    i = 0
    while True:
        caches[i % 2].save(path)
        i += 1
""")


def test_killed_writer_leaves_old_or_new_file(tmp_path):
    """SIGKILL a process that saves two caches in turn, at many moments: the
    path always loads as one of them, complete."""
    path = tmp_path / "c"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    expected = {}
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        expected[1500 + 200 * seed] = rng.standard_normal((1, 4, 1500 + 200 * seed, 64))
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if not path.exists():                       # killed before the first rename
            continue
        loaded = KVCache.load(path)
        n = loaded.seq_len(0)
        assert n in expected
        assert np.array_equal(loaded.keys(0), expected[n].astype(np.float32))
        outcomes.add(n)
    assert outcomes, "the writer never completed a save"


# ------------------------------------------------------------ broken files

def _small_file(tmp_path, strategy="INT8", **kw) -> bytes:
    cache = KVCache(2, 2, 8, max_seq_len=64, block_size=8, batch_size=2,
                    compression=strategy, residual_tokens=8, keep_first=2, **kw)
    _fill(cache, 40, chunk=5)
    cache.compress_old_entries(0)
    cache.save(tmp_path / "small")
    return (tmp_path / "small").read_bytes()


def _with_crcs(data: bytes) -> bytes:
    """Recompute every checksum (what a hostile writer would do)."""
    b = bytearray(data)
    _, _, json_len, meta_len, _, _ = ff._PREAMBLE.unpack(bytes(b[:32]))
    meta_len = min(meta_len, max(0, len(b) - 32))
    meta = bytes(b[32:32 + meta_len])
    try:
        desc = json.loads(meta[:json_len])
        nblocks = int(desc["blocks"])
        caps = [s[2] for s in desc["layers"]]
        bs, batch = desc["config"]["block_size"], desc["config"]["batch_size"]
        at = json_len + 4 * sum(batch * -(-c // bs) for c in caps)
        index = np.frombuffer(bytearray(meta[at:at + 40 * nblocks]), dtype=ff.BLOCK_DTYPE)
        for rec in index:
            off, n = int(rec["offset"]), int(rec["nbytes"])
            rec["crc"] = zlib.crc32(bytes(b[off:off + n]))
        meta = meta[:at] + index.tobytes() + meta[at + index.nbytes:]
        b[32:32 + len(meta)] = meta
    except Exception:
        pass
    struct.pack_into("<I", b, 24, zlib.crc32(bytes(b[32:32 + meta_len])))
    struct.pack_into("<I", b, 28, zlib.crc32(bytes(b[:28])))
    return bytes(b)


def _rewrite_description(data: bytes, edit) -> bytes:
    _, _, json_len, meta_len, _, _ = ff._PREAMBLE.unpack(data[:32])
    desc = json.loads(data[32:32 + json_len])
    edit(desc)
    text = json.dumps(desc).encode()
    rest = data[32 + json_len:]
    delta = len(text) - json_len
    b = bytearray(data[:32] + text + rest)
    struct.pack_into("<I", b, 12, len(text))
    struct.pack_into("<Q", b, 16, meta_len + delta)
    # Block offsets move with the description.
    nblocks = desc.get("blocks", 0) if isinstance(desc, dict) else 0
    try:
        caps = [s[2] for s in desc["layers"]]
        bs, batch = desc["config"]["block_size"], desc["config"]["batch_size"]
        at = 32 + len(text) + 4 * sum(batch * -(-c // bs) for c in caps)
        index = np.frombuffer(bytearray(b[at:at + 40 * nblocks]), dtype=ff.BLOCK_DTYPE)
        index["offset"] += delta
        b[at:at + index.nbytes] = index.tobytes()
    except Exception:
        pass
    return _with_crcs(bytes(b))


def test_every_truncation_is_rejected(tmp_path):
    data = _small_file(tmp_path)
    for n in range(len(data)):
        with pytest.raises(CacheFormatError, match="truncated|checksum|meta|trailing"):
            KVCache.loads(data[:n])
    with pytest.raises(CacheFormatError, match="trailing"):
        KVCache.loads(data + b"\0")


def test_every_bit_flip_is_caught_by_a_checksum(tmp_path):
    data = _small_file(tmp_path)
    rng = np.random.default_rng(0)
    positions = range(len(data)) if len(data) < 6000 else rng.choice(len(data), 6000)
    for i in positions:
        b = bytearray(data)
        b[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(CacheFormatError):
            KVCache.loads(bytes(b))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(byteorder="big" if sys.byteorder == "little" else "little"), "endian"),
    (lambda d: d["config"].update(head_dim=7), "invalid configuration|needs"),
    (lambda d: d["config"].update(dtype="int8"), "invalid configuration"),
    (lambda d: d["config"].update(num_layers=3), "layer states"),
    (lambda d: d["config"].update(block_size=6), "meta section|power of two"),
    (lambda d: d["config"].update(extra=1), "unknown fields"),
    (lambda d: d["config"].pop("sink_tokens"), "lacks the field"),
    (lambda d: d["config"].update(metrics=1), "must be bool"),
    (lambda d: d["config"].update(compression="ZIP"), "compression strategy"),
    (lambda d: d["config"].update(max_seq_len=2**40), "exceeds a layer's capacity"),
    (lambda d: d["layers"][0].__setitem__(0, 10**6), "exceeds capacity"),
    (lambda d: d["layers"][0].__setitem__(0, -1), "out of range"),
    (lambda d: d["layers"][0].__setitem__(1, 41), "window start"),
    (lambda d: (d["layers"][0].__setitem__(1, 3), d["config"].update(overflow="error")),
     "window start"),
    (lambda d: d["layers"][0].__setitem__(0, 8), "names a block"),
    (lambda d: d["layers"][0].__setitem__(2, 2**40), "meta section"),
    (lambda d: d["layers"][0].__setitem__(2, 2**41), "capacities"),
    (lambda d: d["layers"][1].__setitem__(0, 0), "names a block"),
    (lambda d: d.update(layers=[[0, 0, 64]] * 2 + [[1]]), "layer states|must be"),
    (lambda d: d.update(blocks=d["blocks"] + 1), "meta section"),
    (lambda d: d.update(blocks=-1), "blocks must be"),
    (lambda d: d.update(growth={"kind": "cubic"}), "lacks|unknown growth"),
    (lambda d: d.update(growth={"kind": "linear", "increment": 0, "max_capacity": 100}),
     "invalid growth"),
    (lambda d: d.update(growth={"kind": "linear", "increment": 4, "max_capacity": 8}),
     "max_capacity"),
    (lambda d: d.pop("config"), "lacks the field"),
])
def test_inconsistent_description_is_rejected(tmp_path, edit, message):
    data = _small_file(tmp_path)
    with pytest.raises(CacheFormatError, match=message):
        KVCache.loads(_rewrite_description(data, edit))


def test_hostile_description_allocates_nothing_large(tmp_path):
    """Absurd sizes with valid checksums: rejected from the file's length,
    before any table or block is allocated."""
    data = _small_file(tmp_path)
    edits = [lambda d: d["config"].update(num_layers=1 << 20),
             lambda d: d["config"].update(max_seq_len=2**40, block_size=1),
             lambda d: d.update(layers=[[0, 0, 2**40]] * 2),
             lambda d: d["config"].update(batch_size=1 << 20),
             lambda d: d.update(blocks=1 << 40),
             lambda d: d["config"].update(num_kv_heads=1 << 16, head_dim=1 << 16)]
    tracemalloc.start()
    try:
        for edit in edits:
            bad = _rewrite_description(data, edit)
            tracemalloc.reset_peak()
            with pytest.raises(CacheFormatError):
                KVCache.loads(bad)
            assert tracemalloc.get_traced_memory()[1] < 8 * len(bad) + (1 << 20)
    finally:
        tracemalloc.stop()


def _edit_index(data: bytes, **fields) -> bytes:
    _, _, json_len, meta_len, _, _ = ff._PREAMBLE.unpack(data[:32])
    desc = json.loads(data[32:32 + json_len])
    caps = [s[2] for s in desc["layers"]]
    bs, batch = desc["config"]["block_size"], desc["config"]["batch_size"]
    at = 32 + json_len + 4 * sum(batch * -(-c // bs) for c in caps)
    b = bytearray(data)
    index = np.frombuffer(bytearray(b[at:at + 40 * desc["blocks"]]), dtype=ff.BLOCK_DTYPE)
    for name, (i, value) in fields.items():
        index[name][i] = value
    b[at:at + index.nbytes] = index.tobytes()
    return _with_crcs(bytes(b))


def _tiers(data):
    _, _, json_len, _, _, _ = ff._PREAMBLE.unpack(data[:32])
    desc = json.loads(data[32:32 + json_len])
    caps = [s[2] for s in desc["layers"]]
    bs, batch = desc["config"]["block_size"], desc["config"]["batch_size"]
    at = 32 + json_len + 4 * sum(batch * -(-c // bs) for c in caps)
    return np.frombuffer(data[at:at + 40 * desc["blocks"]], dtype=ff.BLOCK_DTYPE)


def test_inconsistent_block_index_is_rejected(tmp_path):
    data = _small_file(tmp_path)
    index = _tiers(data)
    q = int(np.flatnonzero(index["tier"] == int(kvcache.CompressionStrategy.INT8))[0])
    f = int(np.flatnonzero(index["tier"] == 0)[0])
    cases = [
        (dict(tier=(q, 9)), "unknown tier"),
        (dict(tier=(q, 3)), "payload bytes"),          # INT4 needs another size
        (dict(exact_rows=(q, 5)), "payload bytes"),
        (dict(exact_rows=(q, -1)), "exact_rows"),
        (dict(exact_rows=(f, 1)), "full block"),
        (dict(flags=(q, 4)), "flags"),
        (dict(tier=(f, int(kvcache.CompressionStrategy.FP16))), "FP16 block in a float16"),
        (dict(age=(q, float("nan"))), "age"),
        (dict(age=(q, -1.0)), "age"),
        (dict(offset=(q, 0)), "back to back"),
        (dict(nbytes=(f, 0)), "empty payload|back to back"),
    ]
    for fields, message in cases:
        with pytest.raises(CacheFormatError, match=message):
            KVCache.loads(_edit_index(data, **fields))


def test_bad_lossless_payloads_are_rejected(tmp_path):
    data = _small_file(tmp_path, strategy="LOSSLESS")
    index = _tiers(data)
    i = int(np.flatnonzero(index["tier"] == int(kvcache.CompressionStrategy.LOSSLESS))[0])
    off, n = int(index["offset"][i]), int(index["nbytes"][i])
    b = bytearray(data)
    b[off:off + n] = bytes([0xF0]) * n                 # an LZ4 literal run past the end
    with pytest.raises(CacheFormatError, match="LZ4|unpacks"):
        KVCache.loads(_with_crcs(bytes(b)))
    if pytest.importorskip("zstandard"):
        with pytest.raises(CacheFormatError, match="zstd"):
            KVCache.loads(_edit_index(data, flags=(i, 4)))


def test_references_are_checked(tmp_path):
    data = _small_file(tmp_path)
    _, _, json_len, _, _, _ = ff._PREAMBLE.unpack(data[:32])
    tables = np.frombuffer(bytearray(data[32 + json_len:32 + json_len + 4 * 16]), "<i4")
    for edit, message in [(lambda t: t.__setitem__(1, t[0]), "two table entries"),
                          (lambda t: t.__setitem__(0, 10**6), "out of range"),
                          (lambda t: t.__setitem__(0, -1), "no block")]:
        t = tables.copy()
        edit(t)
        b = bytearray(data)
        b[32 + json_len:32 + json_len + t.nbytes] = t.tobytes()
        with pytest.raises(CacheFormatError, match=message):
            KVCache.loads(_with_crcs(bytes(b)))


def test_version_and_magic(tmp_path):
    data = bytearray(_small_file(tmp_path))
    with pytest.raises(CacheFormatError, match="not a kvcache file"):
        KVCache.loads(b"PK\3\4" + bytes(data[4:]))
    struct.pack_into("<I", data, 8, 2)
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[:28])))
    with pytest.raises(CacheFormatError, match="unsupported format version 2"):
        KVCache.loads(bytes(data))
    assert issubclass(CacheFormatError, ValueError)


def test_load_errors_for_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        KVCache.load(tmp_path / "absent")
    (tmp_path / "empty").write_bytes(b"")
    for mm in (False, True):
        with pytest.raises(CacheFormatError, match="truncated"):
            KVCache.load(tmp_path / "empty", mmap=mm)


def test_a_short_foreign_file_is_not_a_kvcache_file(tmp_path):
    """Whether the file is a kvcache file at all comes first: a text file
    shorter than the preamble is "not a kvcache file", not "truncated"; a
    truncated one is a short file whose bytes start as a kvcache file's."""
    text = b"hello, this is not a cache\n"
    assert len(text) == 27 < ff.PREAMBLE_BYTES
    (tmp_path / "notes.txt").write_bytes(text)
    for mm in (False, True):
        with pytest.raises(CacheFormatError, match="not a kvcache file"):
            KVCache.load(tmp_path / "notes.txt", mmap=mm)
    for data in (b"abc", b"X", b"KVCACHE\1", b"KVCACHE\0"[:7] + b"!" * 20):
        with pytest.raises(CacheFormatError, match="not a kvcache file"):
            KVCache.loads(data)
    for data in (b"", b"KVCA", ff.MAGIC, ff.MAGIC + b"\1" * 20):
        with pytest.raises(CacheFormatError, match="truncated"):
            KVCache.loads(data)


class _TaggedCache(KVCache):
    """A user's subclass: its own attribute and method, KVCache's constructor."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "mine"

    def total_tokens(self) -> int:
        return sum(self.seq_len(i) for i in range(self.num_layers))


def test_a_subclass_loads_as_itself(tmp_path):
    cache = _TaggedCache(2, 2, 16, max_seq_len=128, block_size=16, compression="INT8",
                         residual_tokens=16)
    _fill(cache, 70)
    cache.compress_old_entries(0)
    cache.save(tmp_path / "c")
    for loaded in (_TaggedCache.load(tmp_path / "c"),
                   _TaggedCache.loads((tmp_path / "c").read_bytes())):
        assert type(loaded) is _TaggedCache and loaded.tag == "mine"
        assert loaded.total_tokens() == 140
        assert loaded.config == cache.config
        _assert_same(_state(cache), _state(loaded))
    assert type(KVCache.load(tmp_path / "c")) is KVCache


def test_records_round_trip_without_a_cache(tmp_path):
    """The format on its own: a record of plain values written and read back
    (what any cache that exports and imports records could store)."""
    config = kvcache.CacheConfig(2, 1, 4, max_seq_len=16, block_size=8, dtype="float32")
    block = np.arange(2 * 8 * 4, dtype=np.float32).tobytes()      # keys and values, one head
    record = ff.SaveRecord(
        config, states=[(5, 0, 16), (0, 0, 16)],
        tables=[np.array([[0, -1]], np.int32), np.full((1, 2), -1, np.int32)],
        blocks=[(0, 0, 0, 1.5, block)], growth=GrowthStrategy.linear(8), max_capacity=64,
        saved_layers=[0, 1], prefix=None)
    size = ff.write(tmp_path / "r", record)
    assert size == os.path.getsize(tmp_path / "r")
    for back in (ff.read(tmp_path / "r"), ff.read(tmp_path / "r", mmap=True),
                 ff.parse((tmp_path / "r").read_bytes())):
        assert back.config == config
        assert back.states == record.states and back.saved_layers == [0, 1]
        assert all(np.array_equal(a, b) for a, b in zip(back.tables, record.tables))
        assert [b[:4] for b in back.blocks] == [(0, 0, 0, 1.5)]
        assert bytes(back.blocks[0][4]) == block
        assert (back.growth, back.max_capacity, back.prefix) == (GrowthStrategy.linear(8), 64,
                                                                 None)
    loaded = KVCache.load(tmp_path / "r")
    assert np.array_equal(loaded.keys(0)[0, 0], np.arange(20, dtype=np.float32).reshape(5, 4))
    # A table naming a block for positions no layer holds is caught on read.
    record.states[0] = (0, 0, 16)
    ff.write(tmp_path / "bad", record)
    with pytest.raises(CacheFormatError, match="holds no position"):
        ff.read(tmp_path / "bad")


def test_the_format_does_not_import_the_cache():
    """kvcache.fileformat (and what it imports inside the package) never
    imports kvcache.cache: the format knows records, not KVCache."""
    import ast
    import pathlib

    root = pathlib.Path(kvcache.__file__).parent
    seen, todo = set(), ["fileformat"]
    while todo:
        name = todo.pop()
        if name in seen or not (root / f"{name}.py").exists():
            continue                                      # the compiled core, or seen
        seen.add(name)
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module] if node.module else [a.name for a in node.names]
    assert "fileformat" in seen and "config" in seen
    assert "cache" not in seen, sorted(seen)


def test_zstd_file_without_zstandard_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("zstandard")
    cache = KVCache(1, 2, 16, max_seq_len=128, block_size=16, compression="LOSSLESS",
                    lossless_codec="zstd", residual_tokens=0)
    _fill(cache, 64)
    assert cache.compress_old_entries(0).blocks
    cache.save(tmp_path / "z")
    monkeypatch.setitem(sys.modules, "zstandard", None)        # import zstandard fails
    monkeypatch.setattr(kvcache.lossless, "_modules", {})
    with pytest.raises(ImportError, match=r"block 0 is packed with zstd: install the "
                                          r"zstandard package"):
        KVCache.load(tmp_path / "z")


def test_mmap_load_equals_read_load_and_releases_the_file(tmp_path):
    cache = KVCache(2, 2, 16, max_seq_len=300, compression="INT4", residual_tokens=16)
    _fill(cache, 200)
    cache.compress_old_entries(0)
    cache.save(tmp_path / "c")
    a = KVCache.load(tmp_path / "c", mmap=True)
    os.unlink(tmp_path / "c")                         # the cache owns its blocks
    _assert_same(_state(cache), _state(a))
    b = bytearray(_small_file(tmp_path))
    b[-1] ^= 1
    (tmp_path / "bad").write_bytes(bytes(b))
    with pytest.raises(CacheFormatError, match="checksum"):
        KVCache.load(tmp_path / "bad", mmap=True)


# --------------------------------------------------------------- property

@given(st.data())
def test_roundtrip_property(tmp_path_factory, data):
    """Random caches (geometry, tiers, rings, truncations, reorders, prefix)
    round-trip exactly, and go on identically after loading."""
    draw = data.draw
    bs = draw(st.sampled_from([1, 2, 4, 8]))
    sinks = draw(st.integers(0, 3))
    cache = KVCache(draw(st.integers(1, 3)), draw(st.integers(1, 2)),
                    draw(st.sampled_from([2, 4, 6])), block_size=bs, sink_tokens=sinks,
                    max_seq_len=draw(st.integers(sinks + 1, 40)),
                    batch_size=draw(st.integers(1, 2)),
                    dtype=draw(st.sampled_from(["float16", "float32"])),
                    compression=draw(st.sampled_from(["INT8", "INT4", "LOSSLESS", "FP16"])),
                    residual_tokens=draw(st.integers(0, 8)), keep_first=draw(st.integers(0, 3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for _ in range(draw(st.integers(0, 12))):
        op = draw(st.sampled_from(["append", "append", "truncate", "compress", "reorder"]))
        for li in range(cache.num_layers):
            n = cache.seq_len(li)
            if op == "append":
                t = int(rng.integers(1, 9))
                k = rng.standard_normal((cache.batch_size, cache.num_kv_heads, t,
                                         cache.head_dim)).astype(cache.dtype)
                cache.update(li, k, -k, n + t)
            elif op == "truncate" and n:
                m = int(rng.integers(0, n + 1))
                if m == n or cache.positions(li)[:m].size == m:
                    try:
                        cache.update(li, None, None, m)
                    except (IndexError, ValueError):
                        pass
        if op == "compress":
            cache.compress_old_entries(0)
        elif op == "reorder":
            cache.reorder_batch(rng.integers(0, cache.batch_size, size=cache.batch_size))
    path = tmp_path_factory.mktemp("prop") / "c"
    cache.save(path)
    loaded = KVCache.load(path)
    _assert_same(_state(cache), _state(loaded))
    # A prefix of what every layer still holds contiguously from 0.
    longest = min(int(np.argmax(np.append(p != np.arange(len(p)), True)))
                  for p in (cache.positions(li) for li in range(cache.num_layers)))
    cut = draw(st.integers(0, longest))
    cache.save(path, prefix=cut)
    pre = KVCache.load(path)
    for li in range(cache.num_layers):
        assert pre.seq_len(li) == cut
        assert np.array_equal(pre.keys(li), cache.keys(li)[:, :, :cut])
        assert np.array_equal(pre.values(li), cache.values(li)[:, :, :cut])
    for c in (cache, loaded):
        for li in range(c.num_layers):
            k = np.ones((c.batch_size, c.num_kv_heads, 2, c.head_dim), c.dtype)
            c.update(li, k, k, c.seq_len(li) + 2)
    _assert_same(_state(cache), _state(loaded))
