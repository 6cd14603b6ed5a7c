"""Compression hands memory back: memory_bytes *and* the process's RSS fall.

The hazard: freed full-precision blocks staying in the C allocator's heaps
(and worker threads allocating payloads from heaps of their own), so the
cache reports less memory while the process keeps it all.
"""

import sys

import numpy as np
import pytest

from kvcache import KVCache

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads VmRSS from /proc/self/status (Linux)")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.parametrize("workers", [1, 2])
def test_rss_falls_with_memory_bytes(workers):
    rng = np.random.default_rng(0)
    cache = KVCache(8, 3, 64, max_seq_len=8192, compression="int4")
    for layer in range(8):
        k = rng.standard_normal((1, 3, 8192, 64)).astype(np.float16)
        cache.update(layer, k, k, 8192)
    del k
    before_rss, before_mem = _rss_mib(), cache.stats().memory_bytes / 2**20
    cache.compress_old_entries(0, workers=workers)
    after_rss, after_mem = _rss_mib(), cache.stats().memory_bytes / 2**20
    freed = before_mem - after_mem                      # ~33 MiB of 48
    assert freed > 25
    assert before_rss - after_rss > 0.7 * freed, (before_rss, after_rss, freed)
