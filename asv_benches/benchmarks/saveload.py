"""Saving and loading a cache (KVCache.save / KVCache.load).

A 30-layer SmolLM2-shaped cache at 4,096 tokens, stored full or compressed,
written to a temporary directory and read back.  ``save`` includes its
fsyncs (the price of a crash-safe file), so it measures the disk as much as
the code; ``track_`` numbers give the file's size per token.  The numpy
baseline saves and loads the same keys and values with ``np.save``/``np.load``
(no fsync, no checksums).
"""

import os
import shutil
import tempfile

import numpy as np

from kvcache import KVCache

from ._common import BATCH, HEAD_DIM, HEADS, LAYERS, built, prefill

CONTEXT = 4096


def _build(tier):
    pre = prefill(CONTEXT)
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=CONTEXT, batch_size=BATCH,
                    compression=None if tier == "none" else tier, residual_tokens=128)
    for layer in range(LAYERS):
        cache.update(layer, pre, pre, CONTEXT)
    if tier != "none":
        cache.compress_old_entries(0)
    return cache


class SaveLoad:
    params = [
        # tier: how old blocks are stored ("none": full-precision float16)
        ["none", "INT8", "INT4", "LOSSLESS"],
        # mmap: KVCache.load(mmap=...): read() the file or map it
        [False, True],
    ]
    param_names = ["tier", "mmap"]
    timeout = 300

    def setup(self, tier, mmap):
        self.cache = built(("SaveLoad", tier), lambda: _build(tier))
        self.dir = tempfile.mkdtemp(prefix="kvcache-asv-")
        self.path = os.path.join(self.dir, "cache.kvc")
        self.cache.save(self.path)

    def teardown(self, tier, mmap):
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_save(self, tier, mmap):
        self.cache.save(self.path)

    def time_load(self, tier, mmap):
        KVCache.load(self.path, mmap=mmap)

    def peakmem_load(self, tier, mmap):
        KVCache.load(self.path, mmap=mmap)

    def track_bytes_per_token(self, tier, mmap):
        return os.path.getsize(self.path) / (CONTEXT * LAYERS)

    track_bytes_per_token.unit = "bytes"


class SaveLoadNumpy:
    """Baseline: the same keys and values through np.save / np.load."""

    timeout = 300

    def setup(self):
        cache = built(("SaveLoad", "none"), lambda: _build("none"))
        self.arrays = [(cache.keys(i), cache.values(i)) for i in range(LAYERS)]
        self.dir = tempfile.mkdtemp(prefix="kvcache-asv-")
        self.path = os.path.join(self.dir, "cache.npy")
        self.time_save()

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_save(self):
        with open(self.path, "wb") as f:
            for k, v in self.arrays:
                np.save(f, k)
                np.save(f, v)

    def time_load(self):
        with open(self.path, "rb") as f:
            for _ in range(2 * LAYERS):
                np.load(f)
