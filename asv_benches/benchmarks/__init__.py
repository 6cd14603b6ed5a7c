"""airspeed velocity benchmarks of kvcache (SmolLM2-135M shape).

Run from ``asv_benches/``: ``asv run --python=same --quick`` (the installed,
editable kvcache; ``asv machine --yes`` once first), or ``asv run`` to build
commits in virtualenvs.  ``python -m kvcache.bench`` prints the same
comparisons as ratios in one table.

How the timings are taken
-------------------------
* Data is built in ``setup``.  asv_runner (0.3 here) re-runs ``setup``
  before every sample of a benchmark that has one and then times a single
  call per sample (``number`` resolves to 1).  Older asv_runners run
  ``setup`` once per sample and then time many calls.  The ``time_``
  benchmarks are written to be right under both: each call appends at the
  next position, and a headroom of ``HEADROOM`` tokens is rolled back
  (amortised, once every ``HEADROOM`` calls) when used up.
* A single timed call includes asv's own call overhead (~0.1 us), so the
  sub-microsecond kvcache figures are best compared with each other and with
  the numpy baselines of the same run, not read as absolute costs.
"""
