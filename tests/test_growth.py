"""Growth strategies (their arithmetic) and dynamic growth of the cache."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kvhelpers import DATA_HEAD_DIM, DATA_HEADS, DATA_LAYERS, real_kv
from reference import RefCache

from kvcache import CacheFullError, GrowthStrategy, KVCache
from kvcache.growth import Adaptive, Exponential, Linear

H, D = DATA_HEADS, DATA_HEAD_DIM


def long_kv(n):
    """n real tokens: every stored layer's sequence one after another, repeated."""
    ks, vs = zip(*(real_kv(i) for i in DATA_LAYERS))
    k, v = np.concatenate(ks, axis=2), np.concatenate(vs, axis=2)
    reps = -(-n // k.shape[2])
    return np.tile(k, (1, 1, reps, 1))[:, :, :n], np.tile(v, (1, 1, reps, 1))[:, :, :n]


# ------------------------------------------------------------ arithmetic

def test_exponential_math():
    s = GrowthStrategy.exponential(1.5)
    assert isinstance(s, Exponential) and s.factor == 1.5
    assert s.next_capacity(64, 65) == 97                      # int(64 * 1.5) + 1
    assert s.next_capacity(64, 65, block_size=64) == 128      # rounded up to whole blocks
    assert s.next_capacity(64, 65, block_size=1, layer_idx=3) == 97
    # repeated until it fits: 64 97 146 220 331 497 746 1120
    assert s.next_capacity(64, 1000) == 1120
    assert s.next_capacity(64, 1000, block_size=16) == 1120
    assert s.next_capacity(64, 1000, block_size=256) == 1280
    assert s.next_capacity(0, 5) == 7                         # 1 2 4 7
    assert s.next_capacity(64, 10) == 65                      # always grows by at least 1
    assert GrowthStrategy.exponential(2.0).next_capacity(100, 101) == 201
    assert GrowthStrategy.exponential(4).next_capacity(1000, 1001) == 4001
    assert GrowthStrategy.exponential().factor == 1.5


def test_linear_math():
    s = GrowthStrategy.linear(100)
    assert isinstance(s, Linear) and s.increment == 100
    assert s.next_capacity(64, 65) == 164
    assert s.next_capacity(64, 164) == 164
    assert s.next_capacity(64, 165) == 264
    assert s.next_capacity(64, 300) == 364                    # three increments
    assert s.next_capacity(64, 300, block_size=64) == 384
    assert s.next_capacity(64, 10) == 164                     # at least one increment
    assert GrowthStrategy.linear(1).next_capacity(7, 8) == 8


def test_adaptive_math_with_injected_clock():
    times = iter([0.0, 1.0, 1.0, 101.0, 0.0, 500.0])
    s = Adaptive(horizon_s=2.0, min_factor=1.125, max_factor=2.0, clock=lambda: next(times))
    # first growth of a layer: no rate yet -> max_factor
    assert s.next_capacity(300, 576, layer_idx=0) == 600
    # 1 s later, 64 tokens more: rate 64/s, wanted 640 + 2 * 64 = 768 = 1.5 x 512
    assert s.next_capacity(512, 640, layer_idx=0) == 768
    # no time passed: no rate can be measured -> max_factor
    assert s.next_capacity(768, 700, layer_idx=0) == 1536
    # 100 s later, 101 tokens more: slow -> min_factor (1.125 x 1536 = 1728)
    assert s.next_capacity(1536, 801, layer_idx=0) == 1728
    # another layer has its own history: its first growth uses max_factor
    assert s.next_capacity(100, 101, layer_idx=1) == 200
    # a fast burst is capped at max_factor (and rounded to blocks)
    assert s.next_capacity(1728, 100000, layer_idx=0, block_size=64) == 100032
    assert GrowthStrategy.adaptive().max_factor == 2.0


def test_adaptive_default_clock_is_real_time():
    s = GrowthStrategy.adaptive()
    assert s.next_capacity(100, 101) == 200
    assert 100 < s.next_capacity(200, 201) <= 400


@given(current=st.integers(0, 10**6), extra=st.integers(-10, 10**6),
       block=st.sampled_from([1, 2, 8, 64, 1024]),
       which=st.sampled_from(["exp1.1", "exp3", "lin1", "lin77", "ada"]))
def test_next_capacity_invariants(current, extra, block, which):
    s = {"exp1.1": GrowthStrategy.exponential(1.1), "exp3": GrowthStrategy.exponential(3.0),
         "lin1": GrowthStrategy.linear(1), "lin77": GrowthStrategy.linear(77),
         "ada": Adaptive(clock=itertools.count().__next__)}[which]
    needed = max(0, current + extra)
    cap = s.next_capacity(current, needed, block)
    assert isinstance(cap, int)
    assert cap >= needed and cap > current
    assert cap % block == 0
    assert cap - max(needed, current + 1) < max(block, 1) + 3 * max(current, needed) + 77


@pytest.mark.parametrize("make", [
    lambda: GrowthStrategy.exponential(1.0), lambda: GrowthStrategy.exponential(0.3),
    lambda: GrowthStrategy.exponential(float("nan")), lambda: GrowthStrategy.linear(0),
    lambda: GrowthStrategy.linear(-1), lambda: GrowthStrategy.linear(2.5),
    lambda: GrowthStrategy.adaptive(horizon_s=0.0), lambda: GrowthStrategy.adaptive(min_factor=1),
    lambda: GrowthStrategy.adaptive(min_factor=2.5, max_factor=2.0),
], ids=["exp1", "exp0.3", "expnan", "lin0", "lin-1", "lin2.5", "ada_h0", "ada_min1", "ada_min>max"])
def test_invalid_params_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


# --------------------------------------------------------- in the cache

def _strategies():
    return {
        "exponential": (GrowthStrategy.exponential(1.5), GrowthStrategy.exponential(1.5)),
        "linear": (GrowthStrategy.linear(700), GrowthStrategy.linear(700)),
        "adaptive": tuple(Adaptive(clock=itertools.count(0, 0.25).__next__) for _ in range(2)),
    }


@pytest.mark.parametrize("name", ["exponential", "linear", "adaptive"])
def test_growth_64_to_10k_keeps_contents_and_positions(name):
    total, bs = 10_000, 16
    s_cache, s_pred = _strategies()[name]
    k, v = long_kv(total)
    cache = KVCache(2, H, D, max_seq_len=64, block_size=bs, sink_tokens=4)
    cache.enable_dynamic_growth(s_cache)
    assert cache.growth_strategy is s_cache
    rng = np.random.default_rng(5)
    n, cap, expected_caps = 0, 64, []
    while n < total:
        t = min(total - n, int(rng.choice([1, 1, 1, 7, 64, 333])))
        if n + t > cap:
            cap = s_pred.next_capacity(cap, n + t, bs, 0)
            expected_caps.append(cap)
        cache.update(0, k[:, :, n:n + t], v[:, :, n:n + t], n + t)
        n += t
        assert cache.capacity(0) == cap
        if len(expected_caps) and rng.random() < 0.02:       # spot checks on the way
            np.testing.assert_array_equal(cache.keys(0), k[:, :, :n])
    assert cache.seq_len(0) == total
    assert cache.capacity(0) >= total and cache.capacity(0) % bs == 0
    np.testing.assert_array_equal(cache.positions(0), np.arange(total))
    np.testing.assert_array_equal(cache.keys(0), k)
    np.testing.assert_array_equal(cache.values(0), v)
    s = cache.stats()
    assert s.evictions == 0
    assert s.growths == len(expected_caps) > 0
    assert s.growth_bytes == (cap - 64) * 2 * H * D * 2
    assert cache.capacity(1) == 64 and cache.seq_len(1) == 0     # growth is per layer
    # memory follows the tokens, not the capacity bound
    assert s.memory_efficiency > 0.5


def test_one_big_write_grows_in_one_event():
    k, v = long_kv(1500)
    cache = KVCache(1, H, D, max_seq_len=64, block_size=32)
    cache.enable_dynamic_growth(GrowthStrategy.linear(100))
    cache.update(0, k, v, 1500)
    assert cache.capacity(0) == 1568            # 64 + 15 * 100 = 1564, rounded up to 32s
    np.testing.assert_array_equal(cache.keys(0), k)
    assert cache.stats().growths == 1


@pytest.mark.parametrize("sinks", [0, 2])
def test_max_capacity_then_ring(sinks):
    total, cap_max = 100, 40
    k, v = long_kv(total)
    cache = KVCache(1, H, D, max_seq_len=16, block_size=16, sink_tokens=sinks)
    cache.enable_dynamic_growth(GrowthStrategy.linear(16), max_capacity=cap_max)
    caps = []
    for p in range(total):
        cache.update(0, k[:, :, p:p + 1], v[:, :, p:p + 1], p + 1)
        caps.append(cache.capacity(0))
    # 16 -> 32 -> 40 (capped, not a block multiple), then the ring
    assert sorted(set(caps)) == [16, 32, 40]
    assert caps[16] == 32 and caps[32] == 40 and caps[-1] == 40
    window = cap_max - sinks
    pos = np.r_[0:sinks, total - window:total]
    np.testing.assert_array_equal(cache.positions(0), pos)
    np.testing.assert_array_equal(cache.keys(0), k[:, :, pos])
    np.testing.assert_array_equal(cache.values(0), v[:, :, pos])
    s = cache.stats()
    assert s.growths == 2
    assert s.evictions == total - cap_max
    # the ring has wrapped: growth cannot be enabled again until truncated
    with pytest.raises(ValueError):
        cache.enable_dynamic_growth(GrowthStrategy.linear(16))


def test_max_capacity_then_error():
    k, v = long_kv(60)
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8, overflow="error")
    cache.enable_dynamic_growth(GrowthStrategy.exponential(2.0), max_capacity=40)
    cache.update(0, k[:, :, :30], v[:, :, :30], 30)      # 16 -> 33 -> 40 (capped)
    assert cache.capacity(0) == 40
    cache.update(0, k[:, :, 30:40], v[:, :, 30:40], 40)  # exactly full
    with pytest.raises(CacheFullError):
        cache.update(0, k[:, :, 40:41], v[:, :, 40:41], 41)
    assert cache.seq_len(0) == 40 and cache.capacity(0) == 40
    np.testing.assert_array_equal(cache.keys(0), k[:, :, :40])
    assert cache.stats().growths == 1 and cache.stats().evictions == 0


def test_error_overflow_grows_instead_of_failing():
    k, v = long_kv(300)
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8, overflow="error")
    with pytest.raises(CacheFullError):
        cache.update(0, k[:, :, :17], v[:, :, :17], 17)
    cache.enable_dynamic_growth()
    cache.update(0, k, v, 300)
    np.testing.assert_array_equal(cache.keys(0), k)


def test_growth_attempt_that_cannot_fit_is_undone():
    """error overflow: growth up to max_capacity is not enough -> nothing changes."""
    k, v = long_kv(100)
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8, overflow="error")
    cache.enable_dynamic_growth(GrowthStrategy.linear(8), max_capacity=48)
    cache.update(0, k[:, :, :10], v[:, :, :10], 10)
    with pytest.raises(CacheFullError):
        cache.update(0, k[:, :, 10:60], v[:, :, 10:60], 60)
    assert cache.capacity(0) == 16 and cache.seq_len(0) == 10
    assert cache.stats().growths == 0
    cache.update(0, k[:, :, 10:48], v[:, :, 10:48], 48)
    assert cache.capacity(0) == 48
    np.testing.assert_array_equal(cache.keys(0), k[:, :, :48])


@pytest.mark.parametrize("sinks", [0, 3])
def test_enabling_growth_after_wrap_raises(sinks):
    k, v = long_kv(200)
    cache = KVCache(2, H, D, max_seq_len=32, block_size=8, sink_tokens=sinks)
    ref = RefCache(2, H, D, max_seq_len=32, block_size=8, sink_tokens=sinks)
    for c in (cache, ref):
        c.update(0, k[:, :, :10], v[:, :, :10], 10)
        c.update(1, k[:, :, :50], v[:, :, :50], 50)             # wrapped
    with pytest.raises(ValueError) as info:
        cache.enable_dynamic_growth()
    assert "50" in str(info.value) and "32" in str(info.value)
    assert cache.capacity(1) == 32
    # still a ring: the next write evicts rather than grows
    for c in (cache, ref):
        c.update(1, k[:, :, 50:51], v[:, :, 50:51], 51)
    assert cache.capacity(1) == 32 and cache.stats().growths == 0
    # truncating back to the capacity makes it linear again: growth is allowed
    for c in (cache, ref):
        c.truncate(30, layer_idx=1)
        c.enable_dynamic_growth(GrowthStrategy.linear(24))
        c.update(1, k[:, :, 100:150], v[:, :, 100:150], 80)       # positions 30..79
        c.update(0, k[:, :, 10:60], v[:, :, 10:60], 60)
    for i in range(2):
        assert cache.capacity(i) == ref.capacity(i)
        np.testing.assert_array_equal(cache.positions(i), ref.positions(i))
        np.testing.assert_array_equal(cache.keys(i), ref.keys(i))
        np.testing.assert_array_equal(cache.values(i), ref.values(i))
    assert cache.capacity(0) > 32


def test_reset_after_growth_returns_to_max_seq_len_and_allows_enabling():
    k, v = long_kv(200)
    cache = KVCache(1, H, D, max_seq_len=32, block_size=8)
    cache.update(0, k[:, :, :50], v[:, :, :50], 50)             # wrapped
    cache.reset()
    cache.enable_dynamic_growth(GrowthStrategy.exponential(2.0))
    cache.update(0, k[:, :, :200], v[:, :, :200], 200)
    assert cache.capacity(0) >= 200
    cache.reset()
    assert cache.capacity(0) == 32 and cache.seq_len(0) == 0
    cache.update(0, k[:, :, :20], v[:, :, :20], 20)
    np.testing.assert_array_equal(cache.keys(0), k[:, :, :20])


def test_disable_growth_then_ring_at_grown_capacity():
    k, v = long_kv(200)
    cache = KVCache(1, H, D, max_seq_len=16, block_size=8, sink_tokens=1)
    cache.enable_dynamic_growth(GrowthStrategy.linear(16))
    cache.update(0, k[:, :, :40], v[:, :, :40], 40)
    assert cache.capacity(0) == 48
    cache.disable_dynamic_growth()
    assert cache.growth_strategy is None
    cache.update(0, k[:, :, 40:100], v[:, :, 40:100], 100)
    assert cache.capacity(0) == 48
    pos = np.r_[0, 100 - 47:100]
    np.testing.assert_array_equal(cache.positions(0), pos)
    np.testing.assert_array_equal(cache.keys(0), k[:, :, pos])
    assert cache.stats().evictions == 100 - 48


def test_growth_bytes_after_reorder_batch_counts_current_rows():
    """growth_bytes: token bytes of capacity added.  Found: after reorder_batch
    changes the batch size, growth is still costed with the constructor's
    batch size."""
    cache = KVCache(1, 1, 4, max_seq_len=8, block_size=8, batch_size=1, dtype="float32")
    cache.enable_dynamic_growth(GrowthStrategy.linear(8))
    x = np.ones((1, 1, 8, 4), np.float32)
    cache.update(0, x, x, 8)
    cache.reorder_batch([0, 0, 0])                  # batch 3 from now on
    y = np.ones((3, 1, 1, 4), np.float32)
    cache.update(0, y, y, 9)                        # 8 -> 16
    assert cache.capacity(0) == 16
    token_bytes = 2 * 3 * 1 * 4 * 4                 # k and v, 3 rows, 1 head, 4 dims, float32
    assert cache.stats().growth_bytes == 8 * token_bytes


@pytest.mark.parametrize("name", ["exponential", "linear", "adaptive"])
def test_growth_matches_reference_with_truncations(name):
    """Growth interleaved with truncation and rewrites, against the reference."""
    s_cache, s_ref = _strategies()[name]
    k, v = long_kv(3000)
    kw = dict(max_seq_len=40, block_size=8, sink_tokens=2, batch_size=1)
    cache, ref = KVCache(2, H, D, **kw), RefCache(2, H, D, **kw)
    cache.enable_dynamic_growth(s_cache, max_capacity=2000)
    ref.enable_dynamic_growth(s_ref, max_capacity=2000)
    rng = np.random.default_rng(11)
    for step in range(150):
        layer = int(rng.integers(0, 2))
        n = ref.seq_len(layer)
        r = rng.random()
        if r < 0.7:
            t = int(rng.integers(1, 80))
            m = n + t
        elif r < 0.85:
            m = max(0, n - int(rng.integers(0, 50)))
            t = min(m, int(rng.integers(0, 5)))
        else:
            m, t = n, min(n, 3)
        src = int(rng.integers(0, 3000 - t))
        args = (layer, k[:, :, src:src + t], v[:, :, src:src + t], m)
        ref.update(*args)
        cache.update(*args)
        for i in range(2):
            assert cache.capacity(i) == ref.capacity(i), step
            assert cache.seq_len(i) == ref.seq_len(i), step
    for i in range(2):
        np.testing.assert_array_equal(cache.positions(i), ref.positions(i))
        np.testing.assert_array_equal(cache.keys(i), ref.keys(i))
        np.testing.assert_array_equal(cache.values(i), ref.values(i))
    s = cache.stats()
    assert s.growths == ref.growths > 0
    assert s.evictions == ref.evictions


def test_layer_that_wraps_under_growth_evicts_instead_of_growing():
    """Growth needs slot == position for every stored token (n after the
    truncation part <= capacity).  A layer whose window start already moved
    (it wrapped, then was truncated back) can pass capacity without needing
    room (held <= capacity) and then wraps: from then on it evicts, even with
    growth enabled and max_capacity far away."""
    k, v = long_kv(100)
    kw = dict(max_seq_len=16, block_size=4)
    cache, ref = KVCache(1, H, D, **kw), RefCache(1, H, D, **kw)
    steps = [("update", 0, 20), ("truncate", 10), ("grow",), ("update", 10, 17),
             ("update", 17, 21), ("update", 21, 30)]
    for step in steps:
        for c in (cache, ref):
            if step[0] == "update":
                a, b = step[1], step[2]
                c.update(0, k[:, :, a:b], v[:, :, a:b], b)
            elif step[0] == "truncate":
                c.truncate(step[1])
            else:
                c.enable_dynamic_growth(GrowthStrategy.linear(16))
        assert cache.capacity(0) == ref.capacity(0) == 16, step
        np.testing.assert_array_equal(cache.positions(0), ref.positions(0))
        np.testing.assert_array_equal(cache.keys(0), ref.keys(0))
    np.testing.assert_array_equal(cache.positions(0), np.arange(14, 30))
    np.testing.assert_array_equal(cache.values(0), v[:, :, 14:30])
    assert cache.stats().growths == 0
    assert cache.stats().evictions == ref.evictions == 4 + 10
    # truncating back to the capacity makes the layout linear again: it grows
    for c in (cache, ref):
        c.truncate(16)
        c.update(0, k[:, :, 16:40], v[:, :, 16:40], 40)
    assert cache.capacity(0) == ref.capacity(0) == 48
    np.testing.assert_array_equal(cache.positions(0), ref.positions(0))
    np.testing.assert_array_equal(cache.keys(0), ref.keys(0))
