"""Cost of the cache's counters: a 30-layer decode step, metrics on and off.

``python -m kvcache.bench`` measures the same thing with the two caches
alternating step by step, which is the better test of a difference of a few
percent; asv tracks each on its own over commits.  Set-up as in
``update.py``: 30 layers of 1024 tokens plus one (opening a block), reset to
that length and warmed up by ``WARMUP`` steps in setup, rolled back after
``HEADROOM`` steps when many are timed per sample.
"""

from kvcache import KVCache

from ._common import BATCH, HEAD_DIM, HEADROOM, HEADS, LAYERS, built, prefill, token, warm

CONTEXT = 1024


def _build(metrics):
    pre, k, v = prefill(CONTEXT), token(seed=1), token(seed=2)
    base = CONTEXT + 1
    limit = base + HEADROOM
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=limit, batch_size=BATCH,
                    overflow="error", metrics=metrics)
    for layer in range(LAYERS):
        cache.update(layer, pre, pre, CONTEXT)
        cache.update(layer, k, v, base)         # opens the block of position CONTEXT
    upd = cache.update
    layers = range(LAYERS)
    n = base

    def step():
        nonlocal n
        n += 1
        if n > limit:                           # headroom used: roll back (1 step in HEADROOM)
            cache.truncate(base)
            n = base + 1
        for layer in layers:
            upd(layer, k, v, n)

    def reset():
        nonlocal n
        cache.truncate(base)
        n = base

    return step, reset


class MetricsOverhead:
    params = [
        # metrics: KVCache(metrics=...): keep the counters of stats() or not
        [True, False],
    ]
    param_names = ["metrics"]
    timeout = 120

    def setup(self, metrics):
        step, reset = built(("MetricsOverhead", metrics), lambda: _build(metrics))
        reset()
        self.step = warm(step)

    def teardown(self, metrics):
        del self.step

    def time_decode_step(self, metrics):
        """One token appended to each of the 30 layers."""
        self.step()
