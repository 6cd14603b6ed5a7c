"""One-token update of one layer (keys and values) at a given context.

kvcache against the two ways a numpy cache appends: concatenation (as Hugging
Face's DynamicCache does with torch.cat) and slice assignment into
preallocated buffers (as its StaticCache does).

Context, capacity, and what one timed call is:

* The layer holds ``context`` tokens, then one more is written at position
  ``context`` (it opens a new 64-token block): that is the starting length
  ``base = context + 1``.
* setup resets to ``base`` (kvcache: ``truncate``, which returns the blocks
  past it to the pool; numpy: back to that index) and makes ``WARMUP`` (200)
  calls, so that the first timed call appends position ``context + 201``,
  with warm caches, in the middle of a block whose first page is in memory.
  A single timed call (what asv_runner 0.3 times, re-running setup before
  each sample) is thus the steady append of a decode loop, not the 1-in-64
  call that also takes a block from malloc, nor the 1-in-32 that faults in a
  page: ``python -m kvcache.bench`` shows those in its p99.
* When many calls are timed per sample (older asv_runners), kvcache and the
  preallocated buffers keep appending, and after ``HEADROOM`` (4096) tokens
  roll back to ``base``, amortised over 4096 calls.  Rolling back with
  ``truncate`` rather than overwriting one position in place keeps the block
  allocations of real appends in that measurement.
* Concatenation builds a new ``context + 2``-token array per call and drops
  it, so its context stays put (a real DynamicCache keeps the new array and
  frees the old one: the same allocate, copy and free).
* The data is built by the first setup of a process and reused by the next
  ones (see ``_common.built``).

The cache has all 30 layers but only layer 0 is filled and updated: layers are
independent, and filling all 30 would take 1.5 GiB at 65536 tokens.
"""

import numpy as np

from kvcache import KVCache

from ._common import BATCH, HEAD_DIM, HEADROOM, HEADS, LAYERS, built, grid, prefill, token, warm


def _kvcache(context, dtype):
    """(step, reset): append one token to layer 0 of a cache at `context`."""
    pre, k, v = prefill(context, dtype), token(dtype, 1), token(dtype, 2)
    base = context + 1
    limit = base + HEADROOM
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=limit, batch_size=BATCH,
                    dtype=dtype, overflow="error")
    cache.update(0, pre, pre, context)
    cache.update(0, k, v, base)            # opens the block of position `context`
    upd = cache.update
    n = base

    def step():
        nonlocal n
        n += 1
        if n > limit:                       # headroom used: roll back (1 call in HEADROOM)
            cache.truncate(base, 0)
            n = base + 1
        upd(0, k, v, n)

    def reset():
        nonlocal n
        cache.truncate(base, 0)
        n = base

    return step, reset


def _concat(context):
    pre, k, v = prefill(context), token(seed=1), token(seed=2)
    cat = np.concatenate
    K = cat((pre, k), axis=2)              # context + 1 tokens, like the others
    V = cat((pre, v), axis=2)

    def step():
        cat((K, k), axis=2)
        cat((V, v), axis=2)

    return step, lambda: None


def _prealloc(context):
    pre, k, v = prefill(context), token(seed=1), token(seed=2)
    base = context + 1
    limit = base + HEADROOM
    # np.zeros: pages past the context are faulted in on first write, as
    # kvcache's freshly malloc'ed blocks are (torch.zeros behaves alike).
    kb = np.zeros((BATCH, HEADS, limit, HEAD_DIM), pre.dtype)
    vb = np.zeros((BATCH, HEADS, limit, HEAD_DIM), pre.dtype)
    kb[:, :, :context] = pre
    vb[:, :, :context] = pre
    kb[:, :, context:base] = k
    vb[:, :, context:base] = v
    n = base

    def step():
        nonlocal n
        n += 1
        if n > limit:                       # headroom used: roll back (1 call in HEADROOM)
            n = base + 1
        kb[:, :, n - 1:n] = k
        vb[:, :, n - 1:n] = v

    def reset():
        nonlocal n
        n = base

    return step, reset


CONTEXTS = grid([128, 4096, 65536], [128, 4096])

_BUILDERS = {
    "kvcache": lambda context: _kvcache(context, "float16"),
    "numpy_concat": _concat,
    "numpy_prealloc": _prealloc,
}


class Update:
    params = [
        # context: tokens the layer holds before the timed calls (plus the
        # ones setup writes, see the module docstring); quick profile: no 65536
        CONTEXTS,
        # impl: "kvcache" = KVCache.update; "numpy_concat" = np.concatenate of
        # K and of V (DynamicCache-like); "numpy_prealloc" = slice assignment
        # into preallocated K and V buffers (StaticCache-like)
        ["kvcache", "numpy_concat", "numpy_prealloc"],
    ]
    param_names = ["context", "impl"]
    timeout = 120

    def setup(self, context, impl):
        step, reset = built(("Update", context, impl), lambda: _BUILDERS[impl](context))
        reset()
        # concatenation costs up to 50 ms a call: 3 warm-up calls
        self.step = warm(step, 3 if impl == "numpy_concat" else None)

    def teardown(self, context, impl):
        del self.step

    def time_update(self, context, impl):
        """One token appended to one layer (K and V)."""
        self.step()


class UpdateDtype:
    """kvcache's one-token update by storage dtype (input of the same dtype)."""

    params = [
        # context: as in Update
        CONTEXTS,
        # dtype: storage dtype of the cache, and of the k/v given to it
        ["float16", "float32"],
    ]
    param_names = ["context", "dtype"]
    timeout = 120

    def setup(self, context, dtype):
        step, reset = built(("UpdateDtype", context, dtype), lambda: _kvcache(context, dtype))
        reset()
        self.step = warm(step)

    def teardown(self, context, dtype):
        del self.step

    def time_update(self, context, dtype):
        """One token appended to one layer (K and V)."""
        self.step()
