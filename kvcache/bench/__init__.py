"""``kvcache bench``: kvcache against numpy, torch, transformers and blosc2
baselines measured in the same run, on SmolLM2-135M's cache shape (30
layers, 3 KV heads, head_dim 64, batch 1, float16; attention: 9 query heads
over the 3 KV heads, one query token).

Run ``python -m kvcache bench`` (or ``kvcache bench``, ``python -m
kvcache.bench``; ``--quick`` for a smoke run, ``--help`` for the options).
The update, growth and metrics figures are printed as one table, the
attention and prefetch figures as a second, the comparisons with other
libraries (transformers, compression) as a third; ``--json PATH`` also
writes every measured number.  Sections whose optional package is missing
are reported as "not installed", never dropped.

Layout: ``common`` (shape, timing, fills, machine facts, ``Settings``),
one module per section (``update``, ``growth``, ``metrics``, ``attention``,
``prefetch``, ``hf_caches`` for the transformers section, ``compression``),
each with ``run(settings, meta)``, ``rows(res)`` and ``note(res, meta)``;
``table`` (the one renderer and the three tables); ``cli`` (options, run,
print).  The asv benchmarks in ``asv_benches/`` call the sections' own
measuring functions (``update.bench_update``, ``metrics.bench_metrics``), so
the dashboard and this command report one measurement.

Ratios ("vs concat", "vs prealloc", "vs numpy", "vs baseline") are baseline /
kvcache: above 1 means kvcache is faster or smaller (for compression ratios
and GB/s, kvcache / baseline: above 1 means kvcache compresses more or is
faster); the attention table's "ratio" column is a time ratio (below 1:
faster).  Only medians and ratios are meaningful on a shared machine;
single maxima are noisy by nature.

The library never imports this package; it imports the library.
"""
