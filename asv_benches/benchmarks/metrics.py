"""Cost of the cache's counters: a 30-layer decode step, metrics on and off.

The figures of ``python -m kvcache bench --sections metrics``, taken by the
same code: ``setup_cache`` runs the bench's metrics section
(``kvcache.bench.metrics.bench_metrics``: two caches of 30 layers at 1,024
tokens, one with ``metrics=True``, decoding step by step in alternation so
that drift hits both alike, every step timed with ``time.perf_counter_ns``)
and the track benchmarks report its medians and their difference.  (asv's
``time_`` benchmarks timed one step after each setup, the two settings in
separate processes: a 2% difference read as 80%.)
"""

from kvcache.bench.metrics import CONTEXT, bench_metrics

from ._common import grid

STEPS = grid(20000, 2000)               # kvcache bench's metrics steps: default, --quick


class _BenchMetrics:
    """The bench's metrics section, run once for both classes below (asv
    keys a setup_cache by the function's place, and they inherit this one)."""

    timeout = 600

    def setup_cache(self):
        return bench_metrics(STEPS, CONTEXT, progress=False)


class MetricsOverhead(_BenchMetrics):
    params = [
        # metrics: KVCache(metrics=...): keep the counters of stats() or not
        [True, False],
    ]
    param_names = ["metrics"]
    unit = "seconds"

    def track_decode_step(self, result, metrics):
        """Median time of one token appended to each of the 30 layers."""
        return result["metrics_on" if metrics else "metrics_off"]["median_ns"] / 1e9


class MetricsCost(_BenchMetrics):
    unit = "percent"

    def track_overhead_percent(self, result):
        """metrics=True's median step over metrics=False's, minus one, in percent."""
        return result["overhead_pct"]
