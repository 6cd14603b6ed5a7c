"""Counters and gauges of KVCache.stats(): exact values, deltas, reset, logging, threads."""

import logging
import threading

import numpy as np
import pytest
from kvhelpers import rand_kv, real_kv

from kvcache import CacheStats, GrowthStrategy, KVCache

H, D = 3, 64


def _fill(cache, layer, n, offset=0, data_layer=15):
    k, v = real_kv(data_layer)
    b = cache.batch_size
    kk = np.repeat(k[:, :, offset:offset + n], b, axis=0)
    vv = np.repeat(v[:, :, offset:offset + n], b, axis=0)
    cache.update(layer, kk, vv, cache.seq_len(layer) + n)


def _itemsize(cache):
    return np.dtype(cache.dtype).itemsize


# ----------------------------------------------------------------- hits

def test_hit_rate_is_zero_when_nothing_read():
    cache = KVCache(2, H, D, max_seq_len=64, block_size=16)
    s = cache.stats()
    assert (s.hits, s.misses, s.reads, s.hit_rate) == (0, 0, 0, 0.0)
    _fill(cache, 0, 40)
    cache.positions(0)                      # positions are not token reads
    cache.seq_len(0)
    s = cache.stats()
    assert (s.hits, s.misses, s.hit_rate) == (0, 0, 0.0)
    assert isinstance(s.hit_rate, float)
    assert CacheStats().hit_rate == 0.0


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_exact_hit_counts(batch):
    cache = KVCache(2, H, D, max_seq_len=32, block_size=8, sink_tokens=2, batch_size=batch)
    _fill(cache, 0, 10)
    _fill(cache, 1, 50)                     # wrapped: holds 32
    cache.keys(0)
    assert cache.stats().hits == 10 * batch
    cache.values(0)
    assert cache.stats().hits == 20 * batch
    cache.keys(1)
    cache.keys(1)
    s = cache.stats()
    assert s.hits == 20 * batch + 2 * 32 * batch
    assert s.per_layer[0]["hits"] == 20 * batch
    assert s.per_layer[1]["hits"] == 64 * batch
    assert s.misses == 0 and s.hit_rate == 1.0
    cache.truncate(0, layer_idx=0)
    cache.keys(0)                           # an empty read reads nothing
    assert cache.stats().hits == s.hits


# ------------------------------------------------------------ evictions

@pytest.mark.parametrize("batch", [1, 2])
def test_evictions_exact(batch):
    cap, S = 16, 2
    cache = KVCache(1, H, D, max_seq_len=cap, block_size=4, sink_tokens=S, batch_size=batch)
    _fill(cache, 0, 20)                     # one write past capacity
    # held before 0, new 20, held after 16
    assert cache.stats().evictions == 4 * batch
    assert cache.positions(0).tolist() == [0, 1] + list(range(6, 20))
    cache.truncate(10)                      # truncation is not eviction
    assert cache.stats().evictions == 4 * batch
    assert cache.stats().truncations == 1
    assert cache.positions(0).tolist() == [0, 1, 6, 7, 8, 9]
    _fill(cache, 0, 15, offset=100)         # held 6 + new 15 - held after 16 = 5
    assert cache.stats().evictions == 9 * batch
    assert cache.positions(0).tolist() == [0, 1] + list(range(11, 25))
    for _ in range(7):                      # decode: one eviction per token
        _fill(cache, 0, 1, offset=300)
    assert cache.stats().evictions == 16 * batch
    # a truncating rewrite is not an eviction either
    k, v = real_kv(0)
    kk, vv = np.repeat(k[:, :, :3], batch, 0), np.repeat(v[:, :, :3], batch, 0)
    cache.update(0, kk, vv, 30)
    assert cache.stats().evictions == 16 * batch
    assert cache.positions(0).tolist() == [0, 1] + list(range(18, 30))
    # overwrite 28, 29 and append 30..32: held 14 + new 3 - held after 16 = 1
    k5, v5 = np.repeat(k[:, :, :5], batch, 0), np.repeat(v[:, :, :5], batch, 0)
    cache.update(0, k5, v5, 33)
    assert cache.stats().evictions == 17 * batch
    assert cache.stats().per_layer[0]["evictions"] == 17 * batch
    assert cache.positions(0).tolist() == [0, 1] + list(range(19, 33))
    np.testing.assert_array_equal(cache.keys(0)[:, :, -5:], k5)


def test_no_evictions_without_overflow():
    cache = KVCache(3, H, D, max_seq_len=64, block_size=16)
    for layer in range(3):
        _fill(cache, layer, 64)
    cache.truncate(5)
    _fill(cache, 0, 59)
    assert cache.stats().evictions == 0


def test_updates_tokens_written_truncations():
    cache = KVCache(2, H, D, max_seq_len=16, block_size=4, batch_size=2)
    _fill(cache, 0, 5)
    _fill(cache, 0, 3)
    _fill(cache, 1, 20)                     # 4 of them dropped by the ring
    s = cache.stats()
    assert s.updates == 3
    # positions written per batch row; ring-dropped ones excluded
    assert s.tokens_written == 5 + 3 + 16
    assert s.truncations == 0
    k, v = rand_kv(np.random.default_rng(0), 2, H, 2, D)
    cache.update(0, k, v, 8)                # in-place overwrite: not a truncation
    cache.update(0, k, v, 6)                # truncating rewrite
    cache.update(0, None, None, 3)          # pure truncate
    s = cache.stats()
    assert s.updates == 6
    assert s.tokens_written == 5 + 3 + 16 + 2 + 2
    assert s.truncations == 2
    assert s.per_layer[0]["truncations"] == 2 and s.per_layer[1]["truncations"] == 0
    for name in ("hits", "misses", "evictions", "updates", "tokens_written", "truncations"):
        assert getattr(s, name) == sum(p[name] for p in s.per_layer), name


# --------------------------------------------------------------- memory

@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch", [1, 2])
def test_live_bytes_formula(dtype, batch):
    cache = KVCache(3, H, D, max_seq_len=24, block_size=8, sink_tokens=3, dtype=dtype,
                    batch_size=batch)
    assert cache.stats().live_bytes == 0
    _fill(cache, 0, 7)
    _fill(cache, 1, 24)
    _fill(cache, 2, 90)                     # wrapped: holds 24
    held = 7 + 24 + 24
    s = cache.stats()
    assert s.tokens_held == held
    assert s.live_bytes == held * batch * H * D * _itemsize(cache) * 2
    assert s.capacity_tokens == 3 * 24
    cache.truncate(3)
    s = cache.stats()
    assert s.live_bytes == 3 * 3 * batch * H * D * _itemsize(cache) * 2


def test_live_bytes_counts_shared_blocks_once():
    """After reorder_batch repeats a row, its blocks are shared (copy-on-write):
    their bytes are live once, whatever the number of rows reading them."""
    cache = KVCache(1, H, D, max_seq_len=64, block_size=4, dtype="float32")
    unit = H * D * 4 * 2                         # one token slot, keys and values
    k, v = real_kv(15)
    x, y = k[:, :, :12], v[:, :, :12]
    cache.update(0, x, y, 12)                    # blocks 0..2 full
    cache.reorder_batch([0, 0, 0])
    assert cache.stats().live_bytes == 12 * unit
    assert cache.stats().tokens_held == 12       # held positions (per layer)
    new = np.repeat(k[:, :, 100:101], 3, axis=0)
    cache.update(0, new, new, 13)                # position 12: a fresh block per row
    assert cache.stats().live_bytes == (12 + 3) * unit
    two = np.repeat(k[:, :, 200:202], 3, axis=0)
    two[1] += 1
    cache.update(0, two, two, 13)                # rewrites 11 (shared block 2) and 12
    assert cache.stats().live_bytes == (8 + 3 * 4 + 3) * unit
    exp = np.concatenate([np.repeat(x[:, :, :11], 3, 0), two.astype(np.float32)], axis=2)
    np.testing.assert_array_equal(cache.keys(0), exp)
    cache.reorder_batch([2])                     # back to one row: nothing shared
    assert cache.stats().live_bytes == 13 * unit
    assert 0 < cache.stats().memory_efficiency <= 1


def test_memory_efficiency_in_unit_interval():
    cache = KVCache(2, H, D, max_seq_len=128, block_size=16)
    s = cache.stats()
    assert s.memory_bytes > 0                   # metadata counts
    assert s.memory_efficiency == 0.0           # nothing held
    for n in (1, 15, 16, 17, 100, 128):
        cache.reset()
        _fill(cache, 0, n)
        _fill(cache, 1, n)
        s = cache.stats()
        assert 0.0 < s.memory_efficiency <= 1.0, (n, s.memory_efficiency)
        assert s.memory_efficiency == s.live_bytes / s.memory_bytes
        # blocks hold at least the live data
        assert s.memory_bytes >= s.live_bytes


def test_memory_follows_tokens_not_capacity():
    small = KVCache(1, H, D, max_seq_len=64, block_size=16)
    large = KVCache(1, H, D, max_seq_len=4096, block_size=16)
    empty_large = large.stats().memory_bytes
    for c in (small, large):
        _fill(c, 0, 40)
    block = 16 * H * D * 2 * 2
    # same data blocks; the large one only pays for its longer table
    assert large.stats().blocks == small.stats().blocks == 3
    assert large.stats().memory_bytes - small.stats().memory_bytes < block
    assert large.stats().memory_bytes - empty_large >= 3 * block


def test_memory_decreases_after_truncate_and_reset_beyond_spares():
    layers, bs = 2, 4
    cache = KVCache(layers, H, D, max_seq_len=256, block_size=bs)
    for layer in range(layers):
        _fill(cache, layer, 64)                 # 16 blocks each
    full = cache.stats()
    assert full.blocks == 2 * 16 and full.spare_blocks == 0
    cache.truncate(32)                          # 16 blocks released, at most 2 kept spare
    half = cache.stats()
    assert half.memory_bytes < full.memory_bytes
    assert half.spare_blocks <= layers
    assert half.blocks - half.spare_blocks == 2 * 8
    block_bytes = bs * H * D * 2 * 2
    assert full.memory_bytes - half.memory_bytes >= (16 - layers) * block_bytes
    # the spares are reused: appending back does not allocate more than needed
    _fill(cache, 0, 4)
    assert cache.stats().spare_blocks == half.spare_blocks - 1
    cache.reset()
    after_reset = cache.stats()
    assert after_reset.memory_bytes < half.memory_bytes
    assert after_reset.blocks == after_reset.spare_blocks <= layers
    assert after_reset.live_bytes == 0 and after_reset.tokens_held == 0
    # pure truncation inside one block frees nothing (the block is still used)
    _fill(cache, 0, 3)
    m = cache.stats().memory_bytes
    cache.truncate(1)
    assert cache.stats().memory_bytes == m


def test_memory_decreases_after_deep_truncate_of_wrapped_layer():
    """Spec: memory_bytes decreases after a truncation beyond the spares
    (memory follows the tokens held).  Found: a layer whose ring has wrapped
    releases no block on truncation unless it is truncated into its sinks, so
    a 1024-token ring truncated down to 24 held tokens keeps all 65 blocks."""
    cache = KVCache(1, H, D, max_seq_len=1024, block_size=16, sink_tokens=4)
    k, v = real_kv(8)
    x, y = np.tile(k, (1, 1, 3, 1))[:, :, :3000], np.tile(v, (1, 1, 3, 1))[:, :, :3000]
    cache.update(0, x, y, 3000)
    before = cache.stats()
    cache.truncate(2000)                    # holds 0..3 and 1980..1999: 24 tokens
    assert cache.held(0) == 24
    np.testing.assert_array_equal(cache.keys(0), x[:, :, np.r_[0:4, 1980:2000]])
    after = cache.stats()
    block_bytes = 16 * H * D * 2 * 2
    # 3 blocks hold those tokens, 1 more may be kept spare
    assert after.memory_bytes <= before.memory_bytes - (before.blocks - 4) * block_bytes


def test_memory_efficiency_at_most_one_after_beam_expansion():
    """Spec: memory_efficiency = live/memory is in (0, 1] (slack shows as a
    value below 1).  Found: after reorder_batch repeats a row, rows share
    blocks (copy-on-write) but live_bytes counts every row, so the ratio
    exceeds 1."""
    cache = KVCache(1, 8, 128, max_seq_len=512, block_size=64, dtype="float32")
    x = np.ones((1, 8, 512, 128), np.float32)
    cache.update(0, x, x, 512)
    assert 0.0 < cache.stats().memory_efficiency <= 1.0
    cache.reorder_batch([0, 0, 0, 0])           # beam expansion: 4 rows share the blocks
    np.testing.assert_array_equal(cache.keys(0), np.repeat(x, 4, axis=0))
    s = cache.stats()
    assert 0.0 < s.memory_efficiency <= 1.0, (s.live_bytes, s.memory_bytes)


# ------------------------------------------------------------ intervals

def test_delta_api():
    cache = KVCache(2, H, D, max_seq_len=16, block_size=4)
    _fill(cache, 0, 10)
    cache.keys(0)
    before = cache.stats()
    _fill(cache, 0, 10, offset=10)          # 4 evicted
    _fill(cache, 1, 3)
    cache.values(0)
    cache.keys(1)
    cache.truncate(2, layer_idx=1)
    after = cache.stats()
    d = after - before
    assert isinstance(d, CacheStats)
    assert d.hits == 16 + 3
    assert d.misses == 0
    assert d.evictions == 4
    assert d.tokens_written == 10 + 3
    assert d.truncations == 1
    assert d.growths == 0 and d.growth_bytes == 0 and d.growth_seconds == 0.0
    assert d.hit_rate == 1.0
    # gauges come from `after`
    assert d.memory_bytes == after.memory_bytes and d.live_bytes == after.live_bytes
    assert d.tokens_held == after.tokens_held == 16 + 2
    assert d.per_layer[0]["hits"] == 16 and d.per_layer[1]["hits"] == 3
    assert d.per_layer[0]["evictions"] == 4 and d.per_layer[1]["truncations"] == 1
    # a nothing-happened interval is all zero counters
    z = cache.stats() - cache.stats()
    assert (z.hits, z.evictions, z.updates, z.tokens_written, z.truncations) == (0,) * 5
    with pytest.raises(TypeError):
        after - 1


def test_reset_stats_zeroes_counters_keeps_gauges():
    cache = KVCache(2, H, D, max_seq_len=16, block_size=4)
    cache.enable_dynamic_growth(GrowthStrategy.linear(4), max_capacity=20)
    _fill(cache, 0, 30)                      # grows to 20 then evicts 10
    cache.keys(0)
    cache.truncate(25)
    s = cache.stats()
    assert s.growths == 1 and s.evictions == 10 and s.hits == 20 and s.truncations == 1
    cache.reset_stats()
    z = cache.stats()
    for name in ("hits", "misses", "evictions", "growths", "growth_bytes", "updates",
                 "tokens_written", "truncations"):
        assert getattr(z, name) == 0, name
    assert z.growth_seconds == 0.0 and z.hit_rate == 0.0
    assert all(v == 0 for p in z.per_layer for v in p.values())
    assert (z.memory_bytes, z.live_bytes, z.blocks, z.tokens_held, z.capacity_tokens) == (
        s.memory_bytes, s.live_bytes, s.blocks, s.tokens_held, s.capacity_tokens)
    cache.keys(0)                            # counting resumes
    assert cache.stats().hits == 15


def test_reset_keeps_counters():
    cache = KVCache(1, H, D, max_seq_len=8, block_size=4)
    _fill(cache, 0, 12)
    cache.keys(0)
    s = cache.stats()
    cache.reset()
    r = cache.stats()
    assert (r.hits, r.evictions, r.updates, r.tokens_written) == (
        s.hits, s.evictions, s.updates, s.tokens_written)
    assert r.tokens_held == 0 and r.live_bytes == 0
    assert cache.seq_len(0) == 0 and cache.positions(0).size == 0


def test_metrics_off_counts_nothing_but_works():
    cache = KVCache(2, H, D, max_seq_len=16, block_size=4, sink_tokens=1, metrics=False)
    assert cache.metrics_enabled is False
    k, v = real_kv(29)
    cache.update(0, k[:, :, :40], v[:, :, :40], 40)
    cache.update(1, k[:, :, :10], v[:, :, :10], 10)
    cache.update(1, None, None, 4)
    keys = cache.keys(0)
    cache.values(1)
    s = cache.stats()
    for name in ("hits", "misses", "evictions", "growths", "updates", "tokens_written",
                 "truncations"):
        assert getattr(s, name) == 0, name
    assert s.hit_rate == 0.0
    # still correct, and gauges still measured
    pos = np.r_[0, 25:40]
    np.testing.assert_array_equal(cache.positions(0), pos)
    np.testing.assert_array_equal(keys, k[:, :, pos])
    np.testing.assert_array_equal(cache.values(1), v[:, :, :4])
    assert s.live_bytes == (16 + 4) * H * D * 2 * 2
    assert 0 < s.memory_efficiency <= 1


def test_metrics_off_counts_no_growth():
    """Spec: metrics=False keeps every counter of stats() at zero.  Found:
    growth events are still counted (growths, growth_bytes, growth_seconds)."""
    cache = KVCache(1, 1, 4, max_seq_len=8, block_size=4, metrics=False)
    cache.enable_dynamic_growth()
    x = np.ones((1, 1, 16, 4), np.float16)
    cache.update(0, x, x, 16)
    assert cache.capacity(0) >= 16               # it did grow
    s = cache.stats()
    assert (s.growths, s.growth_bytes, s.growth_seconds) == (0, 0, 0.0)


# --------------------------------------------------------------- growth

def test_growth_counted_and_logged(caplog):
    cache = KVCache(2, H, D, max_seq_len=16, block_size=8, batch_size=2)
    cache.enable_dynamic_growth(GrowthStrategy.exponential(2.0))
    with caplog.at_level(logging.INFO, logger="kvcache"):
        _fill(cache, 1, 16)                       # fits: no growth
        assert cache.stats().growths == 0
        _fill(cache, 1, 1)                        # 16 -> int(16 * 2) + 1 = 33 -> 40 (blocks)
        _fill(cache, 1, 20)                       # 37 fits in 40
        assert cache.stats().growths == 1
        _fill(cache, 1, 10)                       # 47: 40 -> 81 -> 88
    s = cache.stats()
    assert cache.capacity(1) == 88 and cache.capacity(0) == 16
    assert s.growths == 2
    token_bytes = 2 * 2 * H * D * 2              # k and v, batch 2, float16
    assert s.growth_bytes == (88 - 16) * token_bytes
    assert s.growth_seconds > 0.0
    assert s.evictions == 0
    records = [r for r in caplog.records if r.name == "kvcache"]
    assert len(records) == 2
    assert all(r.levelno == logging.INFO for r in records)
    msgs = [r.getMessage() for r in records]
    assert "layer 1" in msgs[0] and "16 -> 40" in msgs[0]
    assert "40 -> 88" in msgs[1]


def test_no_growth_no_log(caplog):
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8)
    with caplog.at_level(logging.DEBUG, logger="kvcache"):
        _fill(cache, 0, 40)                       # ring, growth not enabled
    assert not [r for r in caplog.records if r.name == "kvcache" and r.levelno >= logging.INFO]
    assert cache.stats().growths == 0


def test_stats_rendering():
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8)
    _fill(cache, 0, 20)
    cache.keys(0)
    s = cache.stats()
    d = s.as_dict()
    assert d["hits"] == 16 and d["evictions"] == 4 and d["hit_rate"] == 1.0
    assert "per_layer" not in d
    assert d["memory_efficiency"] == s.memory_efficiency
    table = s.table()
    assert "hit rate" in table and "100.0%" in table and "evictions" in table


# -------------------------------------------------------------- threads

def _layer_script(layer, steps, rng_seed):
    """A deterministic op list for one layer: big appends (GIL released),
    decode steps, rewrites, truncations and reads."""
    rng = np.random.default_rng(rng_seed)
    ops = []
    n = 0
    for _ in range(steps):
        r = rng.random()
        if r < 0.45:
            t = int(rng.integers(1, 96))
            ops.append(("append", t))
            n += t
        elif r < 0.6:
            ops.append(("decode", 1))
            n += 1
        elif r < 0.7 and n > 4:
            back = int(rng.integers(1, 4))
            ops.append(("rewrite", back))       # truncating rewrite of the last 2 kept
            n -= back
        elif r < 0.75 and n > 0:
            back = int(rng.integers(0, 30))
            n = max(0, n - back)
            ops.append(("truncate", n))
        else:
            ops.append(("read", 0))
    return ops


def _run_script(cache, layer, ops, data_seed, out):
    rng = np.random.default_rng(data_seed)
    b, h, d = cache.batch_size, cache.num_kv_heads, cache.head_dim
    reads = []
    for op, arg in ops:
        n = cache.seq_len(layer)
        if op in ("append", "decode"):
            k = rng.standard_normal((b, h, arg, d), dtype=np.float32)
            cache.update(layer, k, -k, n + arg)
        elif op == "rewrite":
            # the window (696 positions) is far longer than what is rewritten
            t = min(2, n - arg)
            k = rng.standard_normal((b, h, t, d), dtype=np.float32)
            cache.update(layer, k, -k, n - arg)
        elif op == "truncate":
            cache.truncate(arg, layer_idx=layer)
        else:
            reads.append(float(cache.keys(layer).sum()) + float(cache.values(layer).sum()))
    out[layer] = reads


@pytest.mark.parametrize("round_", range(3))
def test_threads_on_different_layers_match_serial_run(round_):
    layers, steps = 4, 300
    kw = dict(num_layers=layers, num_kv_heads=4, head_dim=64, max_seq_len=700, block_size=16,
              sink_tokens=4, dtype="float32", batch_size=1)
    scripts = [_layer_script(i, steps, 1000 * round_ + i) for i in range(layers)]

    threaded = KVCache(**kw)
    results_t = {}
    barrier = threading.Barrier(layers)
    errors = []

    def worker(i):
        try:
            barrier.wait()
            _run_script(threaded, i, scripts[i], 7 + i, results_t)
        except BaseException as exc:        # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(layers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors

    serial = KVCache(**kw)
    results_s = {}
    for i in range(layers):
        _run_script(serial, i, scripts[i], 7 + i, results_s)

    st, ss = threaded.stats(), serial.stats()
    for name in ("hits", "misses", "evictions", "updates", "tokens_written", "truncations",
                 "tokens_held", "live_bytes", "capacity_tokens"):
        assert getattr(st, name) == getattr(ss, name), name
    assert st.per_layer == ss.per_layer
    assert ss.evictions > 0 and ss.hits > 0       # the scripts did reach the ring
    for i in range(layers):
        assert results_t[i] == results_s[i], i
        assert threaded.seq_len(i) == serial.seq_len(i)
        np.testing.assert_array_equal(threaded.positions(i), serial.positions(i))
        np.testing.assert_array_equal(threaded.keys(i), serial.keys(i))
        np.testing.assert_array_equal(threaded.values(i), serial.values(i))
