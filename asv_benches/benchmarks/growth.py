"""A 100K-token decode (10K in the quick profile) with dynamic growth from a
capacity of 1024 tokens.

Growth never moves a stored token (it lengthens the block tables), so the
slowest single update should stay far below the cost of copying the cache,
and the memory held should follow the tokens, not the capacity.
"""

import array
import gc
import time

import numpy as np

from kvcache import GrowthStrategy, KVCache

from ._common import BATCH, HEAD_DIM, HEADS, grid, token

# quick profile: 10K tokens (still 6 growth events per layer from 1024)
TOKENS = grid(100_000, 10_000)
START = 1024          # initial capacity (max_seq_len)
FACTOR = 1.5


class Growth:
    params = [
        # layers: 1 = one layer (0.1 s per decode); 30 = the whole SmolLM2-135M
        # cache (2.2 GiB at 100K tokens, a few seconds per decode)
        [1, 30],
    ]
    param_names = ["layers"]
    timeout = 300
    rounds = 1

    def setup(self, layers):
        self.cache = KVCache(layers, HEADS, HEAD_DIM, max_seq_len=START, batch_size=BATCH,
                             overflow="error")
        self.cache.enable_dynamic_growth(GrowthStrategy.exponential(FACTOR))
        self.k, self.v = token(seed=1), token(seed=2)

    def teardown(self, layers):
        del self.cache
        gc.collect()

    def _timed_decode(self, layers):
        """Per-call times (ns) and the steps (tokens) at which the layers grew."""
        cache, k, v = self.cache, self.k, self.v
        upd = cache.update
        pc = time.perf_counter_ns
        ts = array.array("q")
        ap = ts.append
        grown = []
        next_cap = cache.capacity(0)
        gc.disable()
        try:
            for n in range(1, TOKENS + 1):
                for layer in range(layers):
                    t0 = pc()
                    upd(layer, k, v, n)
                    t1 = pc()
                    ap(t1 - t0)
                if n > next_cap:
                    grown.append(n)
                    next_cap = cache.capacity(0)
        finally:
            gc.enable()
        assert cache.stats().growths == len(grown) * layers > 0
        return np.frombuffer(ts, dtype=np.int64).reshape(TOKENS, layers), grown

    def track_slowest_update_us(self, layers):
        """The slowest single update call of the decode, growth events included."""
        ns, _ = self._timed_decode(layers)
        return float(ns.max()) / 1e3

    track_slowest_update_us.unit = "us"

    def track_slowest_growth_update_us(self, layers):
        """The slowest of the update calls that grew their layer."""
        ns, grown = self._timed_decode(layers)
        return float(ns[np.asarray(grown) - 1].max()) / 1e3

    track_slowest_growth_update_us.unit = "us"

    def track_peak_memory_ratio(self, layers):
        """max stats().memory_bytes over the decode / live_bytes at its end.

        In an append-only decode the memory changes only when a token opens a
        block or a layer grows, so those are the steps sampled.
        """
        cache, k, v = self.cache, self.k, self.v
        upd = cache.update
        bs = cache.block_size
        peak = cache.stats().memory_bytes
        next_cap = cache.capacity(0)
        for n in range(1, TOKENS + 1):
            for layer in range(layers):
                upd(layer, k, v, n)
            if n > next_cap or n % bs == 1:
                next_cap = cache.capacity(0)
                peak = max(peak, cache.stats().memory_bytes)
        st = cache.stats()
        return max(peak, st.memory_bytes) / st.live_bytes

    track_peak_memory_ratio.unit = "ratio"

    def peakmem_decode(self, layers):
        cache, k, v = self.cache, self.k, self.v
        upd = cache.update
        for n in range(1, TOKENS + 1):
            for layer in range(layers):
                upd(layer, k, v, n)
