"""Shape and data shared by the benchmark modules (no benchmarks here).

Profiles: ``KVCACHE_ASV_PROFILE=quick`` shrinks the parameter grids (the
largest contexts left out, a shorter growth decode) so that ``asv run
--quick`` smoke-tests every benchmark in a couple of minutes
(``tools/asv_smoke.sh``, CI); unset or ``full``: the grids as written.
asv hands its environment variables down to the benchmark processes, so the
discovery and the runs see the same profile.
"""

import functools
import os

import numpy as np

PROFILE = os.environ.get("KVCACHE_ASV_PROFILE", "full")
if PROFILE not in ("full", "quick"):
    raise ValueError(f"KVCACHE_ASV_PROFILE must be 'full' or 'quick', got {PROFILE!r}")
QUICK = PROFILE == "quick"


def grid(full, quick):
    """``full`` in the full profile, ``quick`` in the quick one."""
    return quick if QUICK else full

# SmolLM2-135M
LAYERS = 30
HEADS = 3
HEAD_DIM = 64
BATCH = 1
DTYPE = "float16"

_BUILT = {}


def built(key, build):
    """``build()``'s result, made once per process and key.

    asv_runner re-runs setup before every sample; rebuilding a 65536-token
    context each time would stream ~100 MB through the CPU caches right before
    the timed call, which then measures cache misses of asv's own calling code
    (several microseconds) rather than the call.  So setup builds the data
    the first time and afterwards only resets it (cheap: a truncate).  One key
    at a time: a new key drops the previous data.
    """
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = build()
    return _BUILT[key]


@functools.lru_cache(maxsize=4)
def prefill(context, dtype=DTYPE):
    """[batch, heads, context, head_dim] of random values (read-only, cached)."""
    rng = np.random.default_rng(context)
    a = rng.standard_normal((BATCH, HEADS, context, HEAD_DIM), dtype=np.float32).astype(dtype)
    a.flags.writeable = False
    return a


def token(dtype=DTYPE, seed=0):
    """One token's keys (or values): [batch, heads, 1, head_dim]."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, HEADS, 1, HEAD_DIM), dtype=np.float32).astype(dtype)
