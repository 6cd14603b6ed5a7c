"""One-token update of one layer (keys and values) at a given context:
kvcache against the two ways a numpy cache appends, concatenation (as Hugging
Face's DynamicCache does with torch.cat) and slice assignment into
preallocated buffers (as its StaticCache does).

These are the figures of ``python -m kvcache bench --sections update``,
taken by the same code: ``setup_cache`` runs the bench's own update section
(``kvcache.bench.update.bench_update``) once per context, and each
``track_update`` reports one of its medians, in seconds per call.  So the
dashboard and the bench command cannot measure different things:

* every layer of a 30-layer cache prefilled to ``context`` tokens (setup,
  untimed), then ``STEPS`` decode steps of one token into each layer;
* every call timed on its own with ``time.perf_counter_ns`` (its ~50-90 ns
  overhead included, as in the bench's table), the figure the median over
  all of them (STEPS x 30 calls), nothing of asv's own calling code or of
  any setup inside the timed region;
* kvcache and the preallocated buffers call by call interleaved; the
  concatenation restarts from ``context`` every 64 tokens and has a time
  budget (``CONCAT_BUDGET_S``).

asv's ``time_`` benchmarks cannot measure this: asv_runner re-runs setup
before every sample and times one call per sample (``--quick``: one sample
in all), so a sub-microsecond update read 2-3 us there, mostly asv's call
overhead and the first call after setup.  A track benchmark runs once per
``asv run`` (``--quick`` or not) and its value is the bench's median.
"""

from kvcache.bench.update import bench_update

from ._common import grid

# quick profile: no 65536 (1.5 GiB per 30-layer cache), and --quick's steps
CONTEXTS = grid([128, 4096, 65536], [128, 4096])
STEPS = grid(3000, 300)                 # kvcache bench's --steps: default, --quick
CONCAT_BUDGET_S = grid(3.0, 0.3)        # kvcache bench's concatenation budget
IMPLS = ["kvcache", "numpy_concat", "numpy_prealloc"]
DTYPES = ["float16", "float32"]


def _median_s(result, impl):
    return result[impl]["median_ns"] / 1e9


class Update:
    params = [
        # context: tokens every layer holds before the decode steps;
        # quick profile: no 65536
        CONTEXTS,
        # impl: "kvcache" = KVCache.update; "numpy_concat" = np.concatenate of
        # K and of V (DynamicCache-like); "numpy_prealloc" = slice assignment
        # into preallocated K and V buffers (StaticCache-like)
        IMPLS,
    ]
    param_names = ["context", "impl"]
    unit = "seconds"
    timeout = 600

    def setup_cache(self):
        """The bench's update section, every context (kvcache bench --sections update)."""
        return {c: bench_update(c, STEPS, CONCAT_BUDGET_S, progress=False) for c in CONTEXTS}

    def track_update(self, results, context, impl):
        """Median time of one token appended to one layer (K and V)."""
        return _median_s(results[context], impl)


class UpdateDtype:
    """kvcache's one-token update by storage dtype (input of the same dtype),
    through the same bench code with the dtype given."""

    params = [
        # context: as in Update
        CONTEXTS,
        # dtype: storage dtype of the cache, and of the k/v given to it
        DTYPES,
    ]
    param_names = ["context", "dtype"]
    unit = "seconds"
    timeout = 600

    def setup_cache(self):
        return {(c, d): bench_update(c, STEPS, CONCAT_BUDGET_S, progress=False,
                                     impls=("kvcache",), dtype=d)
                for c in CONTEXTS for d in DTYPES}

    def track_update(self, results, context, dtype):
        """Median time of one token appended to one layer (K and V)."""
        return _median_s(results[(context, dtype)], "kvcache")
