"""reorder_batch: beam reorder / batch selection by moving refcounted table entries.

The hazard: rows that share blocks after a reorder must not see each other's
later writes (copy-on-write), and releasing old rows must not free blocks a
new row still uses.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache import KVCache


def _filled(batch=3, n=10, block_size=4, dtype="float32", **kw):
    rng = np.random.default_rng(0)
    c = KVCache(2, 2, 4, max_seq_len=64, block_size=block_size, batch_size=batch, dtype=dtype,
                **kw)
    K = rng.standard_normal((batch, 2, n, 4)).astype(dtype)
    V = rng.standard_normal((batch, 2, n, 4)).astype(dtype)
    for layer in range(2):
        c.update(layer, K, V, n)
    return c, K, V


def test_reorder_permutes_rows_without_copying_blocks():
    c, K, V = _filled()
    blocks = c.stats().blocks
    c.reorder_batch([2, 0, 1])
    assert np.array_equal(c.keys(0), K[[2, 0, 1]])
    assert np.array_equal(c.values(1), V[[2, 0, 1]])
    assert c.stats().blocks == blocks          # entries moved, no token copied


def test_repeated_rows_share_until_written():
    c, K, V = _filled()
    c.reorder_batch([1, 1, 1, 0])               # batch grows to 4 (beam expansion)
    assert c.batch_size == 4
    assert np.array_equal(c.keys(0), K[[1, 1, 1, 0]])
    in_use = lambda: c.stats().blocks - c.stats().spare_blocks  # noqa: E731
    before = in_use()
    new = np.arange(4 * 2 * 1 * 4, dtype=np.float32).reshape(4, 2, 1, 4)
    c.update(0, new, new, 11)                   # append: block 2 of rows 0-2 is shared
    exp = np.concatenate([K[[1, 1, 1, 0]], new], axis=2)
    assert np.array_equal(c.keys(0), exp)
    assert np.array_equal(c.keys(1), K[[1, 1, 1, 0]])   # other layer untouched
    assert in_use() > before                    # copy-on-write made private copies
    c.update(0, new[:, :, :, ::-1] + 1, new + 2, 5)   # rewrite position 4 in a shared block
    assert np.array_equal(c.keys(0)[:, :, 4], (new[:, :, :, ::-1] + 1)[:, :, 0])
    assert np.array_equal(c.keys(1), K[[1, 1, 1, 0]])


def test_select_subset_releases_unused_blocks():
    c, K, V = _filled(batch=4)
    full = c.stats().memory_bytes
    c.reorder_batch([3])
    assert c.batch_size == 1
    assert np.array_equal(c.keys(0), K[[3]])
    assert c.stats().memory_bytes < full


@pytest.mark.parametrize("bad, exc", [
    ([], ValueError), ([3], IndexError), ([-1], IndexError), ([[0, 1]], TypeError),
    ([0.5], TypeError), ("ab", TypeError), (None, TypeError),
])
def test_bad_indices_change_nothing(bad, exc):
    c, K, V = _filled()
    with pytest.raises(exc):
        c.reorder_batch(bad)
    assert c.batch_size == 3
    assert np.array_equal(c.keys(0), K) and np.array_equal(c.values(1), V)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.lists(st.integers(0, 7), min_size=1, max_size=4),
                              st.integers(0, 3)), min_size=1, max_size=6),
       block_size=st.sampled_from([1, 2, 4, 8]))
def test_reorder_then_write_matches_numpy(ops, block_size):
    rng = np.random.default_rng(1)
    c = KVCache(1, 1, 2, max_seq_len=12, block_size=block_size, batch_size=2, dtype="float32",
                sink_tokens=1)
    ref = rng.standard_normal((2, 1, 9, 2)).astype(np.float32)
    c.update(0, ref, ref, 9)
    n = 9
    for idx, t in ops:
        idx = [i % ref.shape[0] for i in idx]
        c.reorder_batch(idx)
        ref = ref[idx]
        new = rng.standard_normal((len(idx), 1, t, 2)).astype(np.float32)
        c.update(0, new, new, n + t)
        n += t
        ref = np.concatenate([ref, new], axis=2)
        pos = c.positions(0)
        assert np.array_equal(c.keys(0), ref[:, :, pos])
