"""The two named end-to-end scenarios, on real SmolLM2 K/V tensors."""

import numpy as np
import pytest
from kvhelpers import DATA_HEAD_DIM, DATA_HEADS, real_kv
from reference import RefCache

from kvcache import KVCache

LAYERS4 = (0, 1, 8, 15)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("block_size", [None, 4, 16])
@pytest.mark.parametrize("mode", ["one_at_a_time", "one_chunk"])
def test_prefill_32_then_append_16(mode, block_size, dtype):
    cache = KVCache(4, DATA_HEADS, DATA_HEAD_DIM, max_seq_len=256, dtype=dtype,
                    block_size=block_size)
    data = [real_kv(layer) for layer in LAYERS4]
    for i, (k, v) in enumerate(data):
        cache.update(i, k[:, :, :32], v[:, :, :32], 32)
        assert cache.seq_len(i) == 32
    for i, (k, v) in enumerate(data):
        if mode == "one_at_a_time":
            for p in range(32, 48):
                cache.update(i, k[:, :, p:p + 1], v[:, :, p:p + 1], p + 1)
                assert cache.seq_len(i) == p + 1
        else:
            cache.update(i, k[:, :, 32:48], v[:, :, 32:48], 48)
    for i, (k, v) in enumerate(data):
        assert cache.seq_len(i) == 48
        keys, values = cache.keys(i), cache.values(i)
        assert keys.shape == (1, DATA_HEADS, 48, DATA_HEAD_DIM)
        assert values.shape == (1, DATA_HEADS, 48, DATA_HEAD_DIM)
        assert keys.dtype == np.dtype(dtype) and values.dtype == np.dtype(dtype)
        # float16 data into a float32 cache is exact, so both compare exactly.
        np.testing.assert_array_equal(keys, k[:, :, :48].astype(dtype))
        np.testing.assert_array_equal(values, v[:, :, :48].astype(dtype))
        np.testing.assert_array_equal(cache.positions(i), np.arange(48))
        assert cache.positions(i).dtype == np.int64
        assert cache.capacity(i) == 256
    # the layers really are distinct (a mix-up between layers would show here)
    assert not np.array_equal(cache.keys(0), cache.keys(1))
    s = cache.stats()
    assert s.evictions == 0
    assert s.tokens_written == 4 * 48
    assert s.tokens_held == 4 * 48


def test_prefill_then_append_returns_copies():
    """keys()/values() are fresh copies: later writes do not change them."""
    k, v = real_kv(15)
    cache = KVCache(1, DATA_HEADS, DATA_HEAD_DIM, max_seq_len=64, block_size=8)
    cache.update(0, k[:, :, :32], v[:, :, :32], 32)
    first = cache.keys(0)
    first[...] = 0                       # writing to the copy does not touch the cache
    np.testing.assert_array_equal(cache.keys(0), k[:, :, :32])
    before = cache.keys(0)
    cache.update(0, v[:, :, :32], k[:, :, :32], 32)     # overwrite everything
    np.testing.assert_array_equal(before, k[:, :, :32])
    np.testing.assert_array_equal(cache.keys(0), v[:, :, :32])


@pytest.mark.parametrize("chunks", ["decode", "prefill_then_decode", "one_big_write", "mixed"])
@pytest.mark.parametrize("sinks,cap,block_size",
                         [(4, 64, 16), (1, 40, 16), (3, 32, 1), (0, 48, 64), (2, 37, 8)])
def test_ring_overflow_keeps_sinks(chunks, sinks, cap, block_size):
    layers = (15, 22)
    total = 300
    cache = KVCache(len(layers), DATA_HEADS, DATA_HEAD_DIM, max_seq_len=cap,
                    block_size=block_size, sink_tokens=sinks)
    data = [real_kv(layer) for layer in layers]
    rng = np.random.default_rng(sum(map(ord, chunks)) + cap)
    for i, (k, v) in enumerate(data):
        if chunks == "decode":
            bounds = list(range(total + 1))
        elif chunks == "prefill_then_decode":
            bounds = [0, cap - 3] + list(range(cap - 2, total + 1))
        elif chunks == "one_big_write":
            bounds = [0, total]
        else:
            cuts = sorted(set(rng.integers(1, total, size=25).tolist()))
            bounds = [0] + cuts + [total]
        for a, b in zip(bounds, bounds[1:]):
            cache.update(i, k[:, :, a:b], v[:, :, a:b], b)
    window = cap - sinks
    expected_pos = np.concatenate([np.arange(sinks), np.arange(total - window, total)])
    for i, (k, v) in enumerate(data):
        assert cache.seq_len(i) == total
        assert cache.capacity(i) == cap
        pos = cache.positions(i)
        assert pos.dtype == np.int64
        np.testing.assert_array_equal(pos, expected_pos)
        assert cache.held(i) == cap
        np.testing.assert_array_equal(cache.keys(i), k[:, :, expected_pos])
        np.testing.assert_array_equal(cache.values(i), v[:, :, expected_pos])
        # the sinks really are the first tokens (attention sink at position 0)
        np.testing.assert_array_equal(cache.keys(i)[:, :, :sinks], k[:, :, :sinks])
    s = cache.stats()
    assert s.evictions == len(layers) * (total - cap)
    for per in s.per_layer:
        assert per["evictions"] == total - cap
    assert s.truncations == 0


def test_ring_overflow_then_rewrite_and_truncate():
    """After wrapping: rewrite the newest tokens, truncate into the window, append again."""
    k, v = real_kv(22)
    S, cap = 2, 24
    cache = KVCache(1, DATA_HEADS, DATA_HEAD_DIM, max_seq_len=cap, block_size=4, sink_tokens=S)
    ref = RefCache(1, DATA_HEADS, DATA_HEAD_DIM, max_seq_len=cap, block_size=4, sink_tokens=S)

    def both(*args):
        cache.update(*args)
        ref.update(*args)
        np.testing.assert_array_equal(cache.positions(0), ref.positions(0))
        np.testing.assert_array_equal(cache.keys(0), ref.keys(0))
        np.testing.assert_array_equal(cache.values(0), ref.values(0))

    both(0, k[:, :, :100], v[:, :, :100], 100)
    # overwrite the last 5 (in the window) with other real tokens
    both(0, k[:, :, 500:505], v[:, :, 500:505], 100)
    # truncate to 90, rewriting 88 and 89
    both(0, k[:, :, 600:602], v[:, :, 600:602], 90)
    assert cache.seq_len(0) == 90
    # truncation keeps the window's start (lo = 100 - 22 = 78): positions 78..89
    np.testing.assert_array_equal(cache.positions(0), np.r_[0:S, 78:90])
    # pure truncate into the window, then grow the sequence again
    both(0, None, None, 80)
    np.testing.assert_array_equal(cache.positions(0), np.r_[0:S, 78:80])
    both(0, k[:, :, 80:130], v[:, :, 80:130], 130)
    np.testing.assert_array_equal(cache.positions(0), np.r_[0:S, 130 - (cap - S):130])
    # positions S..107 are gone: rewriting one of them is an IndexError
    with pytest.raises(IndexError):
        cache.update(0, k[:, :, :1], v[:, :, :1], 100)
    assert cache.stats().evictions == ref.evictions
