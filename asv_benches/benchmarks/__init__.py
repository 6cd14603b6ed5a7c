"""airspeed velocity benchmarks of kvcache (SmolLM2-135M shape).

Run from ``asv_benches/``: ``asv run --python=same --quick`` (the installed,
editable kvcache; ``asv machine --yes`` once first), or ``asv run`` to build
commits in virtualenvs.  ``python -m kvcache bench`` prints the same
comparisons as ratios in its tables.

How the timings are taken
-------------------------
* The figures that ``python -m kvcache bench`` also prints (``update``,
  ``metrics``) are taken by the bench's own code: a ``setup_cache`` runs the
  bench section (``kvcache.bench.update.bench_update``,
  ``kvcache.bench.metrics.bench_metrics``) and ``track_`` benchmarks report
  its medians (seconds per call), so the dashboard and the command agree by
  construction.  asv's ``time_`` benchmarks cannot: asv_runner (0.3 here)
  re-runs ``setup`` before every sample and times a single call per sample
  (``--quick``: one sample), which for a sub-microsecond call is mostly
  asv's own call overhead and the first call after setup.
* The other ``time_`` benchmarks time calls of microseconds or more
  (attention, save/load), where that overhead is small; data is built in
  ``setup`` (once per process, see ``_common.built``).
"""
