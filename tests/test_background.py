"""Background compression: a worker thread compresses off the update path.

The hazards: the worker encoding a block while the decode loop rewrites or
truncates it (a lost write, a use-after-free), and a worker thread that keeps
its cache alive forever.
"""

import gc
import threading
import weakref

import numpy as np
import pytest

from kvcache import KVCache

LAYERS, HEADS, DIM = 3, 2, 16


def _decode(cache, tokens, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((tokens, 1, HEADS, 1, DIM)).astype(np.float16)
    for m in range(1, tokens + 1):
        for layer in range(LAYERS):
            cache.update(layer, data[m - 1], data[m - 1][:, :, :, ::-1], m)
    return data


@pytest.mark.parametrize("strategy", ["int8", "int4", "lossless"])
def test_background_matches_synchronous(strategy):
    kw = dict(max_seq_len=2048, block_size=16, compression=strategy, residual_tokens=32,
              auto_compress=True)
    sync = KVCache(LAYERS, HEADS, DIM, **kw)
    bg = KVCache(LAYERS, HEADS, DIM, background=True, **kw)
    _decode(sync, 600)
    _decode(bg, 600)
    bg.wait_for_compression()
    s_sync, s_bg = sync.stats(), bg.stats()
    assert s_bg.compressed_blocks == s_sync.compressed_blocks
    if strategy != "lossless":                     # random float16 does not shrink
        assert s_sync.compressed_blocks > 0
    assert s_bg.memory_bytes == s_sync.memory_bytes
    for layer in range(LAYERS):
        assert sync.block_tiers(layer) == bg.block_tiers(layer)
        assert np.array_equal(sync.keys(layer), bg.keys(layer))
        assert np.array_equal(sync.values(layer), bg.values(layer))
    assert bg.auto_compression_stats.blocks == sync.auto_compression_stats.blocks
    bg.close()


def test_writes_racing_the_worker_are_never_lost():
    """The main thread keeps rewriting and truncating old positions (the very
    blocks the worker is encoding); every write must read back exactly."""
    cache = KVCache(LAYERS, HEADS, DIM, max_seq_len=4096, block_size=16, compression="int8",
                    residual_tokens=16, auto_compress=True, background=True)
    rng = np.random.default_rng(1)
    n = 0
    for step in range(400):
        t = int(rng.integers(1, 24))
        for layer in range(LAYERS):
            k = rng.standard_normal((1, HEADS, t, DIM)).astype(np.float16)
            cache.update(layer, k, k, n + t)
        n += t
        if step % 7 == 3 and n > 64:
            # Rewrite an old stretch in place (likely being compressed now).
            pos = int(rng.integers(0, n - 40))
            w = rng.standard_normal((1, HEADS, 8, DIM)).astype(np.float16)
            for layer in range(LAYERS):
                cache.update(layer, w, w, pos + 8)           # truncate to pos+8, rewrite 8
                got = cache.keys(layer)[:, :, pos:pos + 8]
                assert np.array_equal(got, w), f"step {step} layer {layer}: write lost"
            n = pos + 8
    cache.wait_for_compression()
    s = cache.stats()
    assert s.compressed_blocks > 0
    for layer in range(LAYERS):
        assert cache.keys(layer).shape[2] == n
    # Accounting stays consistent: blocks in use plus spares are what memory counts.
    assert s.blocks >= s.compressed_blocks
    cache.close()


def test_readers_and_worker_concurrently():
    """Readers copy layers without the GIL while the worker compresses the
    same layers (the worker must not free a block a reader is copying).
    Readers and the decode loop do not share a layer at the same time, as
    the thread-safety contract asks."""
    cache = KVCache(LAYERS, HEADS, 64, max_seq_len=8192, block_size=64, compression="int4",
                    residual_tokens=64, auto_compress=True, background=True)
    rng = np.random.default_rng(2)
    for m in range(1, 2500):                      # queue plenty of work for the worker
        k = rng.standard_normal((1, HEADS, 1, 64)).astype(np.float16)
        for layer in range(LAYERS):
            cache.update(layer, k, k, m)
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                for layer in range(LAYERS):
                    assert cache.keys(layer).shape == (1, HEADS, 2499, 64)
                    cache.values(layer)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        # Race the readers against the worker for a while; a layer read
        # without pause is compressed once the reads pause (retries).
        done = threading.Thread(target=cache.wait_for_compression)
        done.start()
        done.join(timeout=1.0)
    finally:
        stop.set()
        for th in threads:
            th.join()
    cache.wait_for_compression()
    assert not errors
    assert cache.stats().compressed_blocks == LAYERS * ((2499 - 64) // 64)
    cache.close()


def test_worker_does_not_keep_the_cache_alive():
    cache = KVCache(1, 1, 8, max_seq_len=256, block_size=8, compression="int8",
                    residual_tokens=8, auto_compress=True, background=True)
    thread = cache._background._thread
    ref = weakref.ref(cache)
    del cache
    gc.collect()
    assert ref() is None
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_background_needs_auto_compress():
    with pytest.raises(ValueError, match="auto_compress"):
        KVCache(1, 1, 8, compression="int8", background=True)


def test_close_then_compression_runs_inline():
    cache = KVCache(1, 1, 8, max_seq_len=512, block_size=8, compression="int8",
                    residual_tokens=8, auto_compress=True, background=True)
    cache.close()
    x = np.ones((1, 1, 64, 8), np.float16)
    cache.update(0, x, x, 64)
    assert cache.stats().compressed_blocks == (64 - 8) // 8


def test_failing_automatic_compression_never_fails_the_update(monkeypatch, caplog):
    cache = KVCache(1, 1, 8, max_seq_len=512, block_size=8, compression="int8",
                    residual_tokens=8, auto_compress=True)

    def boom(*args, **kwargs):
        raise MemoryError("no memory for payloads")

    monkeypatch.setattr(cache, "_compress_layer", boom)
    x = np.ones((1, 1, 64, 8), np.float16)
    cache.update(0, x, x, 64)                     # committed despite the failure
    assert cache.seq_len(0) == 64
    assert np.array_equal(cache.keys(0), x)
    assert isinstance(cache.auto_compression_errors[0], MemoryError)
    assert "automatic compression of layer 0 failed" in caplog.text
