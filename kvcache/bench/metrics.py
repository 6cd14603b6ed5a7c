"""The ``metrics`` section: what the counters of ``stats()`` cost.

One 30-layer decode step with ``metrics=True`` against ``metrics=False``,
the two caches alternating step by step (which runs first swaps every
step) to cancel drift.  asv's ``metrics`` benchmarks call ``bench_metrics``
itself and report its medians.
"""

from __future__ import annotations

import array
import gc

import numpy as np

from .common import LAYERS, PC, Progress, isolated, prefilled, summary, token
from .table import Row, fmt

NAME = "metrics"
CONTEXT = 1024
WINDOW = 2048                  # steps decoded before both caches go back to CONTEXT


def bench_metrics(reps: int, ctx: int, progress: bool) -> dict:
    """``reps`` steps of each cache at ``ctx`` (+ up to ``WINDOW``) tokens."""
    rng = np.random.default_rng(2)
    pre = token(rng, ctx)
    k, v = token(rng), token(rng)
    caches = {m: prefilled(ctx, ctx + WINDOW, pre, pre, metrics=m) for m in (True, False)}
    # Warm-up, untimed: one window of appends and the truncation back, so that
    # the timed steps reuse blocks already faulted in (a steady state in which
    # the counters are the only difference), as every later window does.
    for n in range(ctx + 1, ctx + WINDOW + 1):
        for c in caches.values():
            for layer in range(LAYERS):
                c.update(layer, k, v, n)
    for c in caches.values():
        c.truncate(ctx)
        c.reset_stats()
    upd_on, upd_off = caches[True].update, caches[False].update
    on, off = array.array("q"), array.array("q")
    pc = PC
    layers = range(LAYERS)
    n = ctx
    prog = Progress(f"metrics: {reps:,} 30-layer steps each, on/off alternating", reps,
                    progress)
    gc.disable()
    try:
        for r in range(reps):
            if n - ctx == WINDOW:                  # back to ctx (untimed, both alike)
                for c in caches.values():
                    c.truncate(ctx)
                n = ctx
            n += 1
            # Alternate which runs first so drift and cache warmth cancel.
            (first, first_ts), (second, second_ts) = (
                ((upd_on, on), (upd_off, off)) if r & 1 else ((upd_off, off), (upd_on, on)))
            t0 = pc()
            for layer in layers:
                first(layer, k, v, n)
            t1 = pc()
            for layer in layers:
                second(layer, k, v, n)
            t2 = pc()
            first_ts.append(t1 - t0)
            second_ts.append(t2 - t1)
            if not r & 255:
                prog.update(r)
    finally:
        gc.enable()
    prog.close()
    assert caches[True].stats().updates > 0 and caches[False].stats().updates == 0
    s_on, s_off = summary(on), summary(off)
    diff = np.asarray(on, dtype=np.float64) - np.asarray(off, dtype=np.float64)
    return {"context": ctx, "steps": reps, "metrics_on": s_on, "metrics_off": s_off,
            "overhead_pct": 100.0 * (s_on["median_ns"] / s_off["median_ns"] - 1.0),
            "paired_diff_median_ns": float(np.median(diff)),
            "paired_overhead_pct": 100.0 * float(np.median(diff)) / s_off["median_ns"]}


def run(settings, meta: dict) -> dict:
    # In a fresh process: after the update section freed gigabytes in this
    # one, the metrics=True steps read a few percent slower than in a fresh
    # process (where asv runs them), a difference of heap state, not of the
    # counters.
    return isolated(bench_metrics, settings.metrics_steps, CONTEXT, settings.progress)


def rows(res: dict) -> list[Row]:
    m = res.get(NAME)
    if not m:
        return []
    return [
        [NAME, "30-layer step median ns, metrics=True", fmt(m["metrics_on"]["median_ns"]),
         "", "", "", "", "", f"{m['steps']:,} steps each, alternating, ctx {m['context']:,}"],
        [NAME, "30-layer step median ns, metrics=False", fmt(m["metrics_off"]["median_ns"]),
         "", "", "", "", "", ""],
        [NAME, "overhead of metrics", fmt(m["overhead_pct"], "%"), "", "", "", "", "",
         (f"paired median difference {m['paired_diff_median_ns']:+,.0f} ns"
          f" ({m['paired_overhead_pct']:+.1f}%)")]]


def note(res: dict, meta: dict) -> str:
    return ""
