"""Benchmarks of kvcache against numpy baselines measured in the same run.

Run ``python -m kvcache.bench`` (30-40 s on 2 cores; ``--quick``: under 10 s) or
``python -m kvcache bench``.  Every figure is printed as ONE table; ``--json
PATH`` also writes every measured number.  The cache shape is SmolLM2-135M's:
30 layers, 3 KV heads, head_dim 64, batch 1, float16.

Three sections:

update
    One-token update of one layer (keys and values) at a given context,
    timed call by call with ``time.perf_counter_ns`` (so each figure includes
    the timer's own overhead, printed in the header).  kvcache (``update``)
    against a numpy ``np.concatenate`` append (a DynamicCache-like cache) and
    slice assignment into preallocated numpy buffers (a StaticCache-like
    cache).  kvcache and the preallocated buffers decode ``--steps`` tokens
    from the context, call by call interleaved (kvcache first on every other
    call) so that machine drift hits both alike.  Concatenation costs
    O(context) per call, so it gets a time budget and restarts from the
    context every 64 tokens (untimed) to stay near it.
growth
    Decode ``--tokens`` tokens one at a time into 30 layers starting from a
    capacity of 1024 tokens with exponential growth x1.5: slowest single
    update, p99, growth events, peak memory over final live bytes, peak RSS
    increase.  Baselines: numpy buffers regrown x1.5 with a copy (same
    capacities as kvcache, same 30 layers and tokens) and numpy concatenation
    (30 layers, only 2,048 tokens: at 100K tokens it would copy ~100 TB).  Each
    run happens in a fresh process so that its RSS is its own.
metrics
    One 30-layer decode step with ``metrics=True`` against ``metrics=False``,
    the two caches alternating step by step (ABBA) to cancel drift.

Ratios ("vs concat", "vs prealloc") are baseline / kvcache: above 1 means
kvcache is faster or smaller.  Only medians and ratios are meaningful on a
shared machine; single maxima are noisy by nature.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Callable

import numpy as np

from . import __version__
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .growth import GrowthStrategy

__all__ = ["main"]

# SmolLM2-135M
LAYERS, HEADS, HEAD_DIM, BATCH, DTYPE = 30, 3, 64, 1, "float16"
TOKEN_BYTES = 2 * BATCH * HEADS * HEAD_DIM * np.dtype(DTYPE).itemsize   # K and V, one token

GROWTH_START = 1024            # initial capacity of the growth runs
GROWTH_FACTOR = 1.5
CONCAT_WINDOW = 64             # concatenation restarts from the context every this many tokens

_PC = time.perf_counter_ns


# ----------------------------------------------------------------- helpers


class _Progress:
    """A one-line progress indicator on stderr (plain lines when not a tty)."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label, self.total, self.enabled = label, max(1, total), enabled
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        if enabled:
            self._write(f"{label} ...", final=not self.tty)

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K[kvcache.bench] " + text + ("\n" if final else ""))
        else:
            sys.stderr.write("[kvcache.bench] " + text + "\n")
        sys.stderr.flush()

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last >= (0.2 if self.tty else 10.0):
            self.last = now
            self._write(f"{self.label}: {100.0 * done / self.total:3.0f}% "
                        f"({now - self.t0:.1f} s)", final=False)

    def close(self, extra: str = "") -> None:
        if self.enabled:
            self._write(f"{self.label}: done in {time.perf_counter() - self.t0:.1f} s"
                        + (f" {extra}" if extra else ""), final=True)


def _summary(ns: Sequence[int]) -> dict[str, float | None]:
    a = np.asarray(ns, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median_ns": None, "p99_ns": None, "p999_ns": None, "min_ns": None,
                "max_ns": None, "mean_ns": None, "total_s": 0.0}
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"n": int(a.size), "median_ns": float(p50), "p99_ns": float(p99),
            "p999_ns": float(p999), "min_ns": float(a.min()), "max_ns": float(a.max()),
            "mean_ns": float(a.mean()), "total_s": float(a.sum() / 1e9)}


def _us(summary: dict, stat: str) -> float | None:
    x = summary.get(stat)
    return None if x is None else x / 1e3


def _timer_overhead_ns(n: int = 20000) -> float:
    pc = _PC
    d = array.array("q")
    for _ in range(n):
        t0 = pc()
        t1 = pc()
        d.append(t1 - t0)
    return float(np.median(d))


def _proc_status_kib(*keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssPeak:
    """Peak RSS increase over a section, from /proc/self/status VmHWM (bytes)."""

    def __enter__(self) -> _RssPeak:
        gc.collect()
        self.ok = _reset_peak_rss()
        self.before = _proc_status_kib("VmRSS").get("VmRSS")
        self.increase: int | None = None
        return self

    def __exit__(self, *exc) -> None:
        hwm = _proc_status_kib("VmHWM").get("VmHWM")
        if self.ok and hwm is not None and self.before is not None:
            self.increase = (hwm - self.before) * 1024


def _token(rng: np.random.Generator, t: int = 1) -> np.ndarray:
    return rng.standard_normal((BATCH, HEADS, t, HEAD_DIM), dtype=np.float32).astype(DTYPE)


# ------------------------------------------------------------------ update


def _bench_update(ctx: int, steps: int, concat_budget_s: float, progress: bool) -> dict:
    """kvcache vs preallocated numpy (interleaved), then numpy concatenation."""
    rng = np.random.default_rng(ctx)
    pre = _token(rng, ctx)
    k, v = _token(rng), _token(rng)
    pc = _PC

    # -- kvcache and preallocated buffers, both prefilled to ctx
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx + steps, batch_size=BATCH,
                    dtype=DTYPE, overflow="error")
    for layer in range(LAYERS):
        cache.update(layer, pre, pre, ctx)
    # np.zeros: untouched pages are faulted in on first write, like the fresh
    # blocks kvcache takes from malloc (a StaticCache's torch.zeros behaves alike).
    kbufs = [np.zeros((BATCH, HEADS, ctx + steps, HEAD_DIM), DTYPE) for _ in range(LAYERS)]
    vbufs = [np.zeros((BATCH, HEADS, ctx + steps, HEAD_DIM), DTYPE) for _ in range(LAYERS)]
    for kb, vb in zip(kbufs, vbufs):
        kb[:, :, :ctx] = pre
        vb[:, :, :ctx] = pre
    upd = cache.update
    kv_ts, pa_ts = array.array("q"), array.array("q")
    kv_ap, pa_ap = kv_ts.append, pa_ts.append
    prog = _Progress(f"update ctx={ctx:,}: kvcache + prealloc, {steps:,} steps x {LAYERS} "
                     "layers", steps, progress)
    gc.disable()
    try:
        for s in range(steps):
            n = ctx + s + 1
            i = n - 1
            for layer in range(LAYERS):
                kb = kbufs[layer]
                vb = vbufs[layer]
                if (s + layer) & 1:
                    t0 = pc()
                    upd(layer, k, v, n)
                    t1 = pc()
                    t2 = pc()
                    kb[:, :, i:n] = k
                    vb[:, :, i:n] = v
                    t3 = pc()
                else:
                    t2 = pc()
                    kb[:, :, i:n] = k
                    vb[:, :, i:n] = v
                    t3 = pc()
                    t0 = pc()
                    upd(layer, k, v, n)
                    t1 = pc()
                kv_ap(t1 - t0)
                pa_ap(t3 - t2)
            if not s & 63:
                prog.update(s)
    finally:
        gc.enable()
    prog.close()
    # Sanity: both hold what they were given (not timed).
    last = ctx + steps - 1
    assert cache.seq_len(LAYERS - 1) == ctx + steps
    assert np.array_equal(cache.keys(LAYERS - 1)[:, :, last], k[:, :, 0])
    assert np.array_equal(cache.values(0)[:, :, ctx - 1], pre[:, :, ctx - 1])
    assert np.array_equal(vbufs[0][:, :, last], v[:, :, 0])
    del cache, kbufs, vbufs, upd
    gc.collect()

    # -- concatenation (DynamicCache-like): O(context) per call, time-budgeted
    ks: list[np.ndarray] = [pre] * LAYERS      # shared until the first append copies
    vs: list[np.ndarray] = [pre] * LAYERS
    cc_ts = array.array("q")
    cc_ap = cc_ts.append
    cat = np.concatenate
    prog = _Progress(f"update ctx={ctx:,}: numpy concat (budget {concat_budget_s:g} s)",
                     steps, progress)
    t_start = time.perf_counter()
    done = w = 0
    gc.disable()
    try:
        while done < steps and (done < 2 or time.perf_counter() - t_start < concat_budget_s):
            if w == CONCAT_WINDOW:                 # back to ctx (untimed)
                ks = [pre] * LAYERS
                vs = [pre] * LAYERS
                w = 0
            for layer in range(LAYERS):
                t0 = pc()
                ks[layer] = cat((ks[layer], k), axis=2)
                vs[layer] = cat((vs[layer], v), axis=2)
                t1 = pc()
                cc_ap(t1 - t0)
            done += 1
            w += 1
            prog.update(done)
    finally:
        gc.enable()
    prog.close(f"({done} steps)")
    del ks, vs
    gc.collect()
    return {"context": ctx, "kvcache": _summary(kv_ts), "numpy_prealloc": _summary(pa_ts),
            "numpy_concat": _summary(cc_ts), "kvcache_prealloc_steps": steps,
            "concat_steps": done, "concat_window": CONCAT_WINDOW}


# ------------------------------------------------------------------ growth
# Each runs in a fresh process (see _isolated) so that VmHWM is its own.


def _growth_kvcache(tokens: int, layers: int, progress: bool) -> dict:
    rng = np.random.default_rng(1)
    k, v = _token(rng), _token(rng)
    cache = KVCache(layers, HEADS, HEAD_DIM, max_seq_len=GROWTH_START, batch_size=BATCH,
                    dtype=DTYPE, overflow="error")
    cache.enable_dynamic_growth(GrowthStrategy.exponential(GROWTH_FACTOR))
    upd = cache.update
    pc = _PC
    ts = array.array("q")
    ap = ts.append
    growth_ts = array.array("q")
    growth_steps: list[int] = []
    next_cap = cache.capacity(0)
    bs = cache.block_size
    peak_mem = cache.stats().memory_bytes
    prog = _Progress(f"growth: kvcache, {layers} layers x {tokens:,} tokens", tokens, progress)
    with _RssPeak() as rss:
        gc.disable()
        try:
            for n in range(1, tokens + 1):
                for layer in range(layers):
                    t0 = pc()
                    upd(layer, k, v, n)
                    t1 = pc()
                    ap(t1 - t0)
                grew = n > next_cap
                if grew:
                    growth_ts.extend(ts[-layers:])
                    growth_steps.append(n)
                    next_cap = cache.capacity(0)
                # In an append-only decode memory changes only when a token
                # opens a block or a layer grows: sample exactly those steps.
                if grew or n % bs == 1:
                    peak_mem = max(peak_mem, cache.stats().memory_bytes)
                if not n & 1023:
                    prog.update(n)
        finally:
            gc.enable()
    st = cache.stats()
    peak_mem = max(peak_mem, st.memory_bytes)
    prog.close()
    assert st.tokens_held == layers * tokens and st.evictions == 0
    all_ns = np.frombuffer(ts, dtype=np.int64)
    slow = int(np.argmax(all_ns))
    steady = np.ones(all_ns.size, dtype=bool)
    for g in growth_steps:
        steady[(g - 1) * layers:g * layers] = False
    return {"impl": "kvcache", "layers": layers, "tokens": tokens,
            "calls": _summary(ts), "growth_calls": _summary(growth_ts),
            "steady_calls": _summary(all_ns[steady]),
            "slowest_call_token": slow // layers + 1,
            "slowest_call_was_growth": not bool(steady[slow]), "growth_steps": growth_steps,
            "growth_events": st.growths, "growth_events_per_layer": st.growths // layers,
            "growth_seconds": st.growth_seconds, "final_capacity": cache.capacity(0),
            "peak_memory_bytes": peak_mem, "final_memory_bytes": st.memory_bytes,
            "final_live_bytes": st.live_bytes,
            "peak_memory_over_live": peak_mem / st.live_bytes,
            "rss_increase_bytes": rss.increase,
            "rss_increase_over_live": (rss.increase / st.live_bytes
                                       if rss.increase is not None else None)}


def _growth_numpy_regrow(tokens: int, layers: int, progress: bool) -> dict:
    """numpy buffers grown like a vector: x1.5 (kvcache's capacities), copying."""
    rng = np.random.default_rng(1)
    k, v = _token(rng), _token(rng)
    strategy = GrowthStrategy.exponential(GROWTH_FACTOR)
    half = TOKEN_BYTES // 2
    kbufs = [np.empty((BATCH, HEADS, GROWTH_START, HEAD_DIM), DTYPE) for _ in range(layers)]
    vbufs = [np.empty((BATCH, HEADS, GROWTH_START, HEAD_DIM), DTYPE) for _ in range(layers)]
    caps = [GROWTH_START] * layers
    alloc = peak = 2 * layers * GROWTH_START * half      # bytes of the buffers (accounted)
    pc = _PC
    ts = array.array("q")
    ap = ts.append
    growth_ts = array.array("q")
    events = 0
    empty = np.empty
    prog = _Progress(f"growth: numpy regrow x{GROWTH_FACTOR:g}, {layers} layers x "
                     f"{tokens:,} tokens", tokens, progress)
    with _RssPeak() as rss:
        gc.disable()
        try:
            for n in range(1, tokens + 1):
                i = n - 1
                for layer in range(layers):
                    t0 = pc()
                    if n > caps[layer]:
                        cap = strategy.next_capacity(caps[layer], n, DEFAULT_BLOCK_SIZE)
                        # K then V, each old buffer freed before the next
                        # allocation: the transient is one half of one layer.
                        nk = empty((BATCH, HEADS, cap, HEAD_DIM), DTYPE)
                        nk[:, :, :i] = kbufs[layer][:, :, :i]
                        kbufs[layer] = nk
                        nv = empty((BATCH, HEADS, cap, HEAD_DIM), DTYPE)
                        nv[:, :, :i] = vbufs[layer][:, :, :i]
                        vbufs[layer] = nv
                        nk[:, :, i:n] = k
                        nv[:, :, i:n] = v
                        t1 = pc()
                        ap(t1 - t0)
                        growth_ts.append(t1 - t0)
                        peak = max(peak, alloc + cap * half)     # bookkeeping, untimed
                        alloc += 2 * (cap - caps[layer]) * half
                        caps[layer] = cap
                        events += 1
                        continue
                    kb = kbufs[layer]
                    vb = vbufs[layer]
                    kb[:, :, i:n] = k
                    vb[:, :, i:n] = v
                    t1 = pc()
                    ap(t1 - t0)
                if not n & 1023:
                    prog.update(n)
        finally:
            gc.enable()
    prog.close()
    live = layers * tokens * TOKEN_BYTES
    assert np.array_equal(kbufs[-1][:, :, tokens - 1], k[:, :, 0])
    return {"impl": "numpy_regrow", "layers": layers, "tokens": tokens,
            "calls": _summary(ts), "growth_calls": _summary(growth_ts),
            "growth_events": events, "growth_events_per_layer": events // layers,
            "final_capacity": caps[0], "peak_memory_bytes": peak,
            "final_memory_bytes": alloc, "final_live_bytes": live,
            "peak_memory_over_live": peak / live, "rss_increase_bytes": rss.increase,
            "rss_increase_over_live": (rss.increase / live
                                       if rss.increase is not None else None)}


def _growth_numpy_concat(tokens: int, layers: int, progress: bool) -> dict:
    """DynamicCache-like: every append concatenates (allocate, copy, free old)."""
    rng = np.random.default_rng(1)
    k, v = _token(rng), _token(rng)
    half = TOKEN_BYTES // 2
    empty = np.empty((BATCH, HEADS, 0, HEAD_DIM), DTYPE)
    ks = [empty] * layers
    vs = [empty] * layers
    cat = np.concatenate
    pc = _PC
    ts = array.array("q")
    ap = ts.append
    prog = _Progress(f"growth: numpy concat, {layers} layer(s) x {tokens:,} tokens", tokens,
                     progress)
    with _RssPeak() as rss:
        gc.disable()
        try:
            for n in range(1, tokens + 1):
                for layer in range(layers):
                    t0 = pc()
                    ks[layer] = cat((ks[layer], k), axis=2)
                    vs[layer] = cat((vs[layer], v), axis=2)
                    t1 = pc()
                    ap(t1 - t0)
                if not n & 255:
                    prog.update(n)
        finally:
            gc.enable()
    prog.close()
    live = layers * tokens * TOKEN_BYTES
    # Accounted peak, at the last call: the other layers' K and V, this
    # layer's old K and V, and the new K (then old K is freed before new V).
    peak = ((layers - 1) * tokens * 2 + 2 * (tokens - 1) + tokens) * half
    return {"impl": "numpy_concat", "layers": layers, "tokens": tokens,
            "calls": _summary(ts), "growth_calls": _summary(ts), "growth_events": layers * tokens,
            "growth_events_per_layer": tokens, "peak_memory_bytes": peak,
            "final_memory_bytes": live, "final_live_bytes": live,
            "peak_memory_over_live": peak / live, "rss_increase_bytes": rss.increase,
            "rss_increase_over_live": (rss.increase / live
                                       if rss.increase is not None else None)}


def _isolated(fn: Callable[..., dict], *args) -> dict:
    """Run fn in a fresh interpreter (its own RSS); in process if that fails."""
    try:
        import importlib
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # by module name, so that it pickles even when run as __main__ (-m)
        target = getattr(importlib.import_module("kvcache.bench"), fn.__name__)
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            out = ex.submit(target, *args).result()
        out["isolated"] = True
        return out
    except (OSError, ImportError, NotImplementedError) as exc:   # no subprocesses here
        sys.stderr.write(f"[kvcache.bench] running in process ({exc})\n")
        out = fn(*args)
        out["isolated"] = False
        return out


# ----------------------------------------------------------------- metrics


def _bench_metrics(reps: int, ctx: int, progress: bool) -> dict:
    rng = np.random.default_rng(2)
    pre = _token(rng, ctx)
    k, v = _token(rng), _token(rng)
    window = 2048
    caches = {}
    for m in (True, False):
        c = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx + window, batch_size=BATCH,
                    dtype=DTYPE, overflow="error", metrics=m)
        for layer in range(LAYERS):
            c.update(layer, pre, pre, ctx)
        caches[m] = c
    # Warm-up, untimed: one window of appends and the truncation back, so that
    # the timed steps reuse blocks already faulted in (a steady state in which
    # the counters are the only difference), as every later window does.
    for n in range(ctx + 1, ctx + window + 1):
        for c in caches.values():
            for layer in range(LAYERS):
                c.update(layer, k, v, n)
    for c in caches.values():
        c.truncate(ctx)
        c.reset_stats()
    upd_on, upd_off = caches[True].update, caches[False].update
    on, off = array.array("q"), array.array("q")
    pc = _PC
    layers = range(LAYERS)
    n = ctx
    prog = _Progress(f"metrics: {reps:,} 30-layer steps each, on/off alternating", reps,
                     progress)
    gc.disable()
    try:
        for r in range(reps):
            if n - ctx == window:                  # back to ctx (untimed, both alike)
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
    s_on, s_off = _summary(on), _summary(off)
    diff = np.asarray(on, dtype=np.float64) - np.asarray(off, dtype=np.float64)
    return {"context": ctx, "steps": reps, "metrics_on": s_on, "metrics_off": s_off,
            "overhead_pct": 100.0 * (s_on["median_ns"] / s_off["median_ns"] - 1.0),
            "paired_diff_median_ns": float(np.median(diff)),
            "paired_overhead_pct": 100.0 * float(np.median(diff)) / s_off["median_ns"]}


# ------------------------------------------------------------------- table


def _fmt(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if unit == "x":
        return f"{x:.2f}x" if x < 100 else f"{x:,.0f}x"
    if unit == "%":
        return f"{x:+.1f}%"
    if unit == "r":
        return f"{x:.3f}"
    if isinstance(x, float):
        return f"{x:,.1f}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}"


def _ratio(base, kv) -> float | None:
    if base is None or kv is None or not kv:
        return None
    return base / kv


def _build_rows(res: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    upd = res.get("update", [])
    ref = upd[0]["kvcache"]["median_ns"] if upd else None
    for u in upd:
        kv, cc, pa = u["kvcache"], u["numpy_concat"], u["numpy_prealloc"]
        for stat, label in (("median_ns", "median ns"), ("p99_ns", "p99 ns")):
            first = stat == "median_ns"
            rows.append([
                "update", f"ctx {u['context']:,} {label}", _fmt(kv[stat]), _fmt(cc[stat]),
                _fmt(pa[stat]), _fmt(_ratio(cc[stat], kv[stat]), "x"),
                _fmt(_ratio(pa[stat], kv[stat]), "x"),
                _fmt(_ratio(kv[stat], ref), "r") if first else "",
                f"{kv['n']:,} kv/prealloc calls, {cc['n']:,} concat" if first else ""])
    g = res.get("growth")
    if g:
        kv, cc, rg = g["kvcache"], g["numpy_concat"], g["numpy_regrow"]
        rows.append(["growth", (f"{kv['layers']} layers x {kv['tokens']:,} tokens, from "
                                f"{GROWTH_START}"), "", "", "", "", "", "",
                     "prealloc column: numpy regrown x1.5 (copy), same layers/tokens"])
        for stat, label in (("max_ns", "slowest update us"), ("p999_ns", "p99.9 update us"),
                            ("p99_ns", "p99 update us"), ("median_ns", "median update us")):
            a, b, c = _us(kv["calls"], stat), _us(cc["calls"], stat), _us(rg["calls"], stat)
            rows.append(["growth", label, _fmt(a), _fmt(b), _fmt(c), "", _fmt(_ratio(c, a), "x"),
                         "", (f"concat: {cc['layers']} layers x {cc['tokens']:,} tokens only"
                              if stat == "max_ns" else "")])
        a, c = _us(kv["growth_calls"], "max_ns"), _us(rg["growth_calls"], "max_ns")
        med = _us(kv["growth_calls"], "median_ns")
        rows.append(["growth", "slowest growth-event update us", _fmt(a), "", _fmt(c), "",
                     _fmt(_ratio(c, a), "x"), "",
                     f"kvcache growth events: median {_fmt(med)} us"])
        rows.append(["growth", "slowest other update us", _fmt(_us(kv["steady_calls"], "max_ns")),
                     "", "", "", "", "",
                     (f"kvcache slowest call: token {kv['slowest_call_token']:,} "
                      f"({'a growth event' if kv['slowest_call_was_growth'] else 'no growth'})")])
        rows.append(["growth", "total update time s", f"{kv['calls']['total_s']:.2f}",
                     f"{cc['calls']['total_s']:.2f}", f"{rg['calls']['total_s']:.2f}", "",
                     _fmt(_ratio(rg["calls"]["total_s"], kv["calls"]["total_s"]), "x"), "",
                     "sum of the timed calls"])
        rows.append(["growth", "growth events (all layers)", _fmt(kv["growth_events"]),
                     _fmt(cc["growth_events"]), _fmt(rg["growth_events"]), "", "", "",
                     f"per layer: {kv['growth_events_per_layer']}; concat: every token"])
        rows.append(["growth", "peak memory / final live",
                     _fmt(kv["peak_memory_over_live"], "r"), _fmt(cc["peak_memory_over_live"], "r"),
                     _fmt(rg["peak_memory_over_live"], "r"), "",
                     _fmt(_ratio(rg["peak_memory_over_live"], kv["peak_memory_over_live"]), "x"),
                     "", "kvcache: max stats().memory_bytes; numpy: array bytes"])
        rows.append(["growth", "peak RSS increase / final live",
                     _fmt(kv["rss_increase_over_live"], "r"),
                     _fmt(cc["rss_increase_over_live"], "r"),
                     _fmt(rg["rss_increase_over_live"], "r"), "", "", "",
                     f"VmHWM; kvcache final live {kv['final_live_bytes'] / 2**20:,.0f} MiB"])
    m = res.get("metrics")
    if m:
        rows.append(["metrics", "30-layer step median ns, metrics=True",
                     _fmt(m["metrics_on"]["median_ns"]), "", "", "", "", "",
                     f"{m['steps']:,} steps each, alternating, ctx {m['context']:,}"])
        rows.append(["metrics", "30-layer step median ns, metrics=False",
                     _fmt(m["metrics_off"]["median_ns"]), "", "", "", "", "", ""])
        rows.append(["metrics", "overhead of metrics", _fmt(m["overhead_pct"], "%"), "", "", "",
                     "", "", (f"paired median difference {m['paired_diff_median_ns']:+,.0f} ns"
                              f" ({m['paired_overhead_pct']:+.1f}%)")])
    return rows


HEADERS = ["section", "case", "kvcache", "numpy concat", "numpy prealloc", "vs concat",
           "vs prealloc", "kv t/t(ref)", "note"]


def _render(rows: list[list[str]], meta: dict) -> str:
    ref = meta.get("reference_context")
    headers = HEADERS[:7] + [f"kv t/t({ref})" if ref is not None else HEADERS[7]] + HEADERS[8:]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    right = {2, 3, 4, 5, 6, 7}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(headers))
    out = [(f"kvcache {meta['kvcache_version']} benchmark: SmolLM2-135M shape ({LAYERS} "
            f"layers, {HEADS} KV heads, head_dim {HEAD_DIM}, batch {BATCH}, {DTYPE}), block "
            f"{DEFAULT_BLOCK_SIZE}; {meta['cpu_count']} CPUs; python {meta['python']}, "
            f"numpy {meta['numpy']}{'; QUICK' if meta['quick'] else ''}"),
           ("times per call of time.perf_counter_ns (its own overhead, "
            f"~{meta['timer_overhead_ns']:.0f} ns, included); ratios = baseline / kvcache "
            "(> 1: kvcache faster or smaller)"),
           rule, line(headers), rule]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append(rule)
        out.append(line(r))
        prev = r[0]
    out.append(rule)
    if ref is not None:
        out.append(f"update: one layer's K and V, one token. kv t/t({ref}): kvcache's median "
                   f"over its median at ctx {ref:,}. kvcache and prealloc decode "
                   "continuously from ctx, interleaved; concat restarts from ctx every "
                   f"{CONCAT_WINDOW} tokens (untimed).")
    if "growth" in meta.get("sections", ()):
        out.append("growth: slowest calls are single events, noisy on a shared machine. "
                   "concat peak is one layer's transient copy over all layers' data.")
    return "\n".join(out)


# -------------------------------------------------------------------- main


def _parse_contexts(text: str) -> list[int]:
    try:
        vals = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--contexts wants integers like 128,4096: {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("--contexts wants positive integers")
    return vals


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kvcache.bench",
        description="Benchmark kvcache against numpy baselines measured in the same run "
                    "(SmolLM2-135M shape) and print one table.")
    p.add_argument("--json", metavar="PATH", help="also write every measured number to PATH")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and tokens (a few seconds; for smoke tests)")
    p.add_argument("--contexts", type=_parse_contexts, default=[128, 4096, 65536],
                   metavar="N,N,...", help="contexts of the update rows (default 128,4096,65536)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens decoded by the growth rows (default 100000; --quick 20000)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="decode steps per context for kvcache/prealloc (default 3000; "
                        "--quick 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--sections", default="update,growth,metrics",
                   help="comma-separated subset of update,growth,metrics")
    args = p.parse_args(None if argv is None else list(argv))
    quick = args.quick
    steps = args.steps or (300 if quick else 3000)
    tokens = args.tokens or (20_000 if quick else 100_000)
    if tokens < 1 or steps < 1:
        p.error("--tokens and --steps must be >= 1")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"update", "growth", "metrics"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    progress = not args.no_progress
    concat_budget = 0.3 if quick else 3.0
    concat_tokens = min(tokens, 512 if quick else 2048)
    metric_reps = 2000 if quick else 20000

    t_all = time.perf_counter()
    meta = {"kvcache_version": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "quick": quick,
            "shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM,
                      "batch": BATCH, "dtype": DTYPE, "block_size": DEFAULT_BLOCK_SIZE},
            "timer_overhead_ns": _timer_overhead_ns(),
            "settings": {"contexts": args.contexts, "steps": steps, "tokens": tokens,
                         "concat_budget_s": concat_budget, "concat_tokens": concat_tokens,
                         "concat_window": CONCAT_WINDOW, "metrics_steps": metric_reps,
                         "growth_start": GROWTH_START, "growth_factor": GROWTH_FACTOR},
            "reference_context": args.contexts[0] if "update" in sections else None,
            "sections": sorted(sections)}
    res: dict = {"meta": meta}
    # Growth first: its subprocesses then start before this one holds gigabytes.
    if "growth" in sections:
        res["growth"] = {
            "kvcache": _isolated(_growth_kvcache, tokens, LAYERS, progress),
            "numpy_regrow": _isolated(_growth_numpy_regrow, tokens, LAYERS, progress),
            "numpy_concat": _isolated(_growth_numpy_concat, concat_tokens, LAYERS, progress),
        }
    if "update" in sections:
        res["update"] = [_bench_update(c, steps, concat_budget, progress) for c in args.contexts]
        ref = res["update"][0]["kvcache"]["median_ns"]
        for u in res["update"]:
            kv = u["kvcache"]["median_ns"]
            u["speedup_vs_concat"] = u["numpy_concat"]["median_ns"] / kv
            u["speedup_vs_prealloc"] = u["numpy_prealloc"]["median_ns"] / kv
            u["kvcache_time_over_reference"] = kv / ref
    if "metrics" in sections:
        res["metrics"] = _bench_metrics(metric_reps, 1024, progress)
    meta["wall_s"] = time.perf_counter() - t_all
    rows = _build_rows(res)
    res["table"] = {"headers": HEADERS, "rows": rows}
    print(_render(rows, meta))
    print(f"(total {meta['wall_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        sys.stderr.write(f"[kvcache.bench] wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
