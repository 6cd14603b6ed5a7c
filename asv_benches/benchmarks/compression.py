"""Compressed tiers on the real SmolLM2-135M K/V (``tests/data/smollm2_kv_prose.npz``).

The data holds keys and values of 6 layers (0, 1, 8, 15, 22, 29), float16
``[3 heads, 1492 tokens, 64]``.  A SmolLM2-shaped cache of 30 layers is
filled with them, layer ``i`` taking stored layer ``i % 6``: 1,492 tokens per
layer, of which ``compress_old_entries(0)`` compresses the 21 whole blocks
below the residual window (128 tokens), 1,344 tokens per layer.

* ``Compression``: one ``compress_old_entries(0)`` on a freshly filled cache
  (setup builds it; asv_runner re-runs setup before every timed call, and
  ``number = 1`` keeps older runners at one call per setup), what it achieves
  (``track_ratio``, ``track_memory_drop``), what it costs in accuracy
  (``track_error_k``/``track_error_v``: relative Frobenius error of
  ``keys()``/``values()`` against the data written, all 30 layers, the
  uncompressed residual tokens included) and the process's peak RSS.
* ``Decode``: ``keys()`` and ``values()`` of every layer of a compressed cache
  (what an attention step reads back), ``"none"`` being the uncompressed
  baseline.

``python tools/compression_report.py`` prints the same figures as one table.
"""

import functools
import os
from pathlib import Path

import numpy as np

from kvcache import KVCache

from ._common import HEAD_DIM, HEADS, LAYERS

DATA = Path(os.environ.get(
    "KVCACHE_KV_DATA",
    Path(__file__).resolve().parents[2] / "tests" / "data" / "smollm2_kv_prose.npz"))
DATA_LAYERS = (0, 1, 8, 15, 22, 29)
RESIDUAL = 128


@functools.lru_cache(maxsize=1)
def _real():
    """[(k, v)] of the stored layers, float16 [1, 3, 1492, 64] (read-only)."""
    if not DATA.exists():
        raise NotImplementedError(f"real K/V data not found at {DATA}")   # asv: skipped
    with np.load(DATA) as d:
        out = []
        for layer in DATA_LAYERS:
            k, v = d[f"k_L{layer}"][None], d[f"v_L{layer}"][None]
            k.flags.writeable = False
            v.flags.writeable = False
            out.append((k, v))
    return out


@functools.lru_cache(maxsize=2)
def _data(dtype):
    """Per cache layer, the (k, v) written to it, in the cache dtype."""
    real = [(k.astype(dtype), v.astype(dtype)) for k, v in _real()]
    return [real[i % len(real)] for i in range(LAYERS)]


def _filled(strategy, dtype):
    """A 30-layer cache holding the real data (~1.5K tokens per layer)."""
    data = _data(dtype)
    tokens = data[0][0].shape[2]
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=2048, dtype=dtype,
                    compression=None if strategy == "none" else strategy,
                    residual_tokens=RESIDUAL)
    for i, (k, v) in enumerate(data):
        cache.update(i, k, v, tokens)
    return cache


def _rel_error(cache, dtype, which):
    """Relative Frobenius error of keys() (0) or values() (1), all layers."""
    num = den = 0.0
    for i, kv in enumerate(_data(dtype)):
        x = kv[which].astype(np.float64)
        got = (cache.keys(i) if which == 0 else cache.values(i)).astype(np.float64)
        num += float(np.sum((got - x) ** 2))
        den += float(np.sum(x * x))
    return (num / den) ** 0.5


class Compression:
    params = [
        # strategy: the tier compress_old_entries moves the old blocks to.
        # fp16: float32 -> float16 (nothing to do in a float16 cache);
        # int8: per token and 64 channels; int4: KIVI (keys per channel,
        # values per 32 channels); lossless: byte shuffle + lz4 (most real
        # float16 blocks do not shrink and stay raw); adaptive: per block the
        # first of int4, int8, fp16 within 10 % error, else lossless
        ["fp16", "int8", "int4", "lossless", "adaptive"],
        # dtype: the cache's storage dtype (the float16 data is exact in
        # float32, so float32 shows the tiers against a 4-byte original)
        ["float16", "float32"],
    ]
    param_names = ["strategy", "dtype"]
    timeout = 300
    number = 1              # one compress per freshly filled cache

    def setup(self, strategy, dtype):
        self.cache = _filled(strategy, dtype)

    def teardown(self, strategy, dtype):
        del self.cache

    def time_compress(self, strategy, dtype):
        self.cache.compress_old_entries(0)

    def peakmem_compress(self, strategy, dtype):
        self.cache.compress_old_entries(0)

    def track_ratio(self, strategy, dtype):
        """bytes_before / bytes_after of the blocks tried (raw blocks count 1:1)."""
        return self.cache.compress_old_entries(0).compression_ratio

    track_ratio.unit = "ratio"

    def track_memory_drop(self, strategy, dtype):
        """1 - memory_bytes after / before: the share of the whole cache's
        memory (metadata and residual blocks included) that compression frees."""
        before = self.cache.stats().memory_bytes
        self.cache.compress_old_entries(0)
        return 1.0 - self.cache.stats().memory_bytes / before

    track_memory_drop.unit = "fraction"

    def track_error_k(self, strategy, dtype):
        self.cache.compress_old_entries(0)
        return _rel_error(self.cache, dtype, 0)

    track_error_k.unit = "relative"

    def track_error_v(self, strategy, dtype):
        self.cache.compress_old_entries(0)
        return _rel_error(self.cache, dtype, 1)

    track_error_v.unit = "relative"


_COMPRESSED = {}


def _compressed(strategy, dtype):
    """A filled and compressed cache, built once per process and parameters
    (reads do not change it, so every sample may reuse it)."""
    key = (strategy, dtype)
    if key not in _COMPRESSED:
        _COMPRESSED.clear()
        cache = _filled(strategy, dtype)
        if strategy != "none":
            cache.compress_old_entries(0)
        _COMPRESSED[key] = cache
    return _COMPRESSED[key]


class Decode:
    params = [
        # strategy: the tier of the cache's old blocks ("none": nothing
        # compressed, every read a hit: the baseline the others decode against)
        ["none", "fp16", "int8", "int4", "lossless", "adaptive"],
        # dtype: the cache's storage dtype
        ["float16", "float32"],
    ]
    param_names = ["strategy", "dtype"]
    timeout = 300

    def setup(self, strategy, dtype):
        self.cache = _compressed(strategy, dtype)

    def time_keys_values(self, strategy, dtype):
        """keys() and values() of all 30 layers (1,344 of 1,492 tokens each decoded)."""
        cache = self.cache
        for i in range(LAYERS):
            cache.keys(i)
            cache.values(i)
