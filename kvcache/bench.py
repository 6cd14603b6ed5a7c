"""Benchmarks of kvcache against numpy baselines measured in the same run.

Run ``python -m kvcache.bench`` or ``python -m kvcache bench`` (``--quick``
for a smoke run).  The update, growth and metrics figures are printed as ONE
table, the attention and prefetch figures as a second one (its own columns),
the comparisons with other libraries (transformers and compression) as a
third; ``--json PATH`` also writes every measured number.  The cache shape is
SmolLM2-135M's: 30 layers, 3 KV heads, head_dim 64, batch 1, float16
(attention: 9 query heads over the 3 KV heads, one query token).

Seven sections (the last two live in ``kvcache.bench_external``; where their
optional package is missing they are reported as "not installed"):

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
attention
    One decode query against one layer of each ``--contexts`` (default 4,096
    and 32,768 tokens): numpy on float32 K/V materialized once, untimed
    (numpy's best case: matmul, einsum and a per-head loop, the fastest being
    the "vs numpy" base), torch's ``scaled_dot_product_attention`` on the same
    float32 data (when torch imports), ``KVCache.attention`` per available
    kernel backend on the float16 store and with the best backend on INT8 and
    INT4 stores (every whole block quantized), and one core's read bandwidth
    (``np.max`` and ``np.sum`` over a float32 view of a buffer the size of the
    float16 K+V; the faster is the roofline).  Every variant is timed in
    blocks of repeated calls, the variants taking turns block by block;
    numpy's BLAS (with threadpoolctl) and torch run one thread, as the kernel
    does.  GB/s counts the bytes each variant reads.
prefetch
    ``attention(prefetch=True)`` against ``prefetch=False`` on a 30-layer
    cache per context, with contiguous blocks (each layer filled by one
    update) and fragmented ones (lockstep token-by-token fill, random layer
    order per block, truncate to half and refill): one layer called
    repeatedly (on/off alternating ABBA) and 30-layer steps (each layer cold;
    also with ``cache.prefetch(next layer)`` before each call).  Ratios are
    medians of the paired time ratios; the counters per call are
    ``stats().per_layer[i]["prefetches"]``/``["prefetch_bytes"]``.
transformers
    ``KVCache.update`` and ``TransformersKVCache`` against transformers'
    ``DynamicCache``, ``StaticCache`` and ``QuantizedCache`` (quanto):
    one layer's one-token update per context (default 1,024 and 4,096) and
    the memory held at that context, 30 layers.
compression
    kvcache's LOSSLESS tier (lz4, zstd) against blosc2 (shuffle/bitshuffle
    with LZ4/ZSTD) on the real SmolLM2 K/V (``--kv-data``): ratio and
    encode/decode GB/s, one core.

Ratios ("vs concat", "vs prealloc", "vs numpy", "vs baseline") are baseline /
kvcache: above 1 means kvcache is faster or smaller (for compression ratios
and GB/s, kvcache / baseline: above 1 means kvcache compresses more or is
faster); the attention table's "ratio" column is
a time ratio (below 1: faster).  Only medians and ratios are meaningful on a
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
SECTIONS = ("update", "growth", "metrics", "attention", "prefetch", "transformers",
            "compression")

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


# --------------------------------------------------------------- attention

Q_HEADS = 9                    # SmolLM2-135M's query heads (3 per KV head)
GROUP = Q_HEADS // HEADS
ATTN_CONTEXTS = [4096, 32768]


class _OneThread:
    """numpy's BLAS (through threadpoolctl, when installed) and torch (when
    imported) limited to one thread while timing: kvcache's kernel runs on
    one core, and on a shared 2-core machine a second BLAS thread mostly
    waits for a busy core."""

    def __init__(self, torch=None) -> None:
        self.torch, self.limits, self.torch_threads = torch, None, None
        self.note = ""

    def __enter__(self) -> _OneThread:
        try:
            from threadpoolctl import threadpool_limits
            self.limits = threadpool_limits(1)
            self.note = "numpy BLAS 1 thread"
        except ImportError:
            self.note = "threadpoolctl not installed: numpy BLAS threads as configured"
        if self.torch is not None:
            self.torch_threads = self.torch.get_num_threads()
            self.torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.limits is not None:
            self.limits.restore_original_limits()
        if self.torch is not None:
            self.torch.set_num_threads(self.torch_threads)


def _time_rounds(fns: dict[str, Callable[[], object]], calls: int, rounds: int,
                 prog: _Progress,
                 prepare: dict[str, Callable[[], object]] | None = None
                 ) -> dict[str, array.array]:
    """Per function, ``rounds`` blocks of ``calls`` timed calls, each block
    after ``prepare[name]()`` (if any) and one untimed call.  The functions
    take turns block by block in an order rotated every round, so that drift
    hits all alike; within a block a function's data stays in whatever cache
    level holds it, as in a loop calling it repeatedly."""
    prepare = prepare or {}
    names = list(fns)
    ts = {name: array.array("q") for name in names}
    pc = _PC
    gc.disable()
    try:
        for r in range(rounds):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                fn, ap = fns[name], ts[name].append
                if name in prepare:
                    prepare[name]()
                fn()
                for _ in range(calls):
                    t0 = pc()
                    fn()
                    t1 = pc()
                    ap(t1 - t0)
            prog.update(r + 1)
    finally:
        gc.enable()
    return ts


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _bench_attention(ctx: int, calls: int, rounds: int, progress: bool) -> dict:
    """One decode query (9 heads over 3 KV heads) against one layer of ctx
    tokens: numpy, torch and kvcache per backend and tier, and the read
    bandwidth of one core over the same bytes."""
    from . import _core
    try:
        import torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
    except ImportError as exc:
        torch, torch_note = None, f"torch not importable ({exc})"
    rng = np.random.default_rng(ctx + 7)
    pre_k = rng.standard_normal((BATCH, HEADS, ctx, HEAD_DIM), dtype=np.float32).astype(DTYPE)
    pre_v = rng.standard_normal((BATCH, HEADS, ctx, HEAD_DIM), dtype=np.float32).astype(DTYPE)
    q = rng.standard_normal((BATCH, Q_HEADS, 1, HEAD_DIM), dtype=np.float32)
    scale = 1.0 / np.sqrt(HEAD_DIM)
    f16_bytes = pre_k.nbytes + pre_v.nbytes

    # -- numpy: materialized float32 K/V, made once, untimed (its best case)
    k32 = np.ascontiguousarray(pre_k[0], dtype=np.float32)          # [3, ctx, 64]
    v32 = np.ascontiguousarray(pre_v[0], dtype=np.float32)
    kt32 = k32.transpose(0, 2, 1)                                     # a view BLAS reads as is
    qg = (q[0, :, 0] * np.float32(scale)).reshape(HEADS, GROUP, HEAD_DIM)   # [3, 3, 64]
    f32_bytes = k32.nbytes + v32.nbytes
    # float64 reference of the same (float16) data, for the error column
    k64, v64 = pre_k[0].astype(np.float64), pre_v[0].astype(np.float64)
    s64 = np.einsum("hgd,hnd->hgn", qg.astype(np.float64), k64)
    ref = np.einsum("hgn,hnd->hgd", _softmax_rows(s64), v64)
    del k64, v64, s64

    def np_matmul():
        return _softmax_rows(qg @ kt32) @ v32

    def np_einsum():
        return np.einsum("hgn,hnd->hgd",
                         _softmax_rows(np.einsum("hgd,hnd->hgn", qg, k32)), v32)

    def np_per_head():
        out = np.empty((HEADS, GROUP, HEAD_DIM), np.float32)
        for h in range(HEADS):
            out[h] = _softmax_rows(qg[h] @ kt32[h]) @ v32[h]
        return out

    fns: dict[str, Callable[[], object]] = {
        "numpy matmul": np_matmul, "numpy einsum": np_einsum, "numpy per-head": np_per_head}
    byte_count = {"numpy matmul": f32_bytes, "numpy einsum": f32_bytes,
                  "numpy per-head": f32_bytes}
    notes: dict[str, str] = {}

    # -- torch SDPA on the same float32 data
    if torch is not None:
        tq = torch.from_numpy(q)
        tk, tv = torch.from_numpy(k32[None]), torch.from_numpy(v32[None])
        try:
            with torch.inference_mode():
                sdpa(tq, tk, tv, enable_gqa=True)
            torch_note = "enable_gqa=True"

            def torch_sdpa():
                with torch.inference_mode():
                    return sdpa(tq, tk, tv, enable_gqa=True)
        except (TypeError, RuntimeError):       # torch < 2.5: repeat the heads (untimed)
            tk = tk.repeat_interleave(GROUP, dim=1)
            tv = tv.repeat_interleave(GROUP, dim=1)
            torch_note = "KV heads repeated x3 (untimed; no enable_gqa)"

            def torch_sdpa():
                with torch.inference_mode():
                    return sdpa(tq, tk, tv)
        fns["torch sdpa"] = torch_sdpa
        byte_count["torch sdpa"] = f32_bytes
        notes["torch sdpa"] = f"torch {torch.__version__}, {torch_note}, 1 thread"

    # -- kvcache: float16 per backend, INT8/INT4 with the best one
    caches = {}
    f16 = KVCache(1, HEADS, HEAD_DIM, max_seq_len=ctx, batch_size=BATCH, dtype=DTYPE,
                  overflow="error")
    f16.update(0, pre_k, pre_v, ctx)
    caches["float16"] = f16
    tier_bytes = {"float16": f16.stats().live_bytes}
    for tier in ("int8", "int4"):
        c = KVCache(1, HEADS, HEAD_DIM, max_seq_len=ctx, batch_size=BATCH, dtype=DTYPE,
                    overflow="error", residual_tokens=0, keep_first=0)
        c.update(0, pre_k, pre_v, ctx)
        st = c.compress_old_entries(0, strategy=tier)
        # Whole blocks only: a partial last block stays float16.
        whole = ctx // c.block_size * c.block_size
        assert st.tokens == whole, st
        caches[tier] = c
        tier_bytes[tier] = st.bytes_after + (ctx - whole) * TOKEN_BYTES
    backends = _core.available_backends()
    best = backends[0]
    out = np.empty((BATCH, Q_HEADS, 1, HEAD_DIM), np.float32)
    kv_names = []
    for b in backends:
        kv_names.append((f"kvcache float16 {b}", "float16", b))
    for tier in ("int8", "int4"):
        kv_names.append((f"kvcache {tier} {best}", tier, best))
    for name, tier, _b in kv_names:
        byte_count[name] = tier_bytes[tier]

    def kv_fn(cache):
        att = cache.attention
        return lambda: att(0, q, out=out)

    def backend_setter(b):
        return lambda: _core.set_backend(b)

    prepare: dict[str, Callable[[], object]] = {}
    for name, tier, b in kv_names:
        fns[name] = kv_fn(caches[tier])
        prepare[name] = backend_setter(b)

    # -- one core's read bandwidth over the float16 K+V's byte size
    buf = np.empty(f16_bytes, np.uint8)
    buf[:] = 1
    view = buf.view(np.float32)
    fns["read bw np.max"] = lambda: np.max(view)
    fns["read bw np.sum"] = lambda: np.sum(view)
    byte_count["read bw np.max"] = byte_count["read bw np.sum"] = f16_bytes

    # Errors (untimed), each against the float64 reference
    errors = {}
    try:
        for name, fn in fns.items():
            if name.startswith("read bw"):
                continue
            if name in prepare:
                prepare[name]()
            r = fn()
            r = r.numpy() if hasattr(r, "numpy") else np.asarray(r)
            errors[name] = _rel_err(r[0, :, 0] if r.ndim == 4 else r, ref)
    finally:
        _core.set_backend(None)

    prog = _Progress(f"attention ctx={ctx:,}: {len(fns)} variants x {rounds} rounds x "
                     f"{calls} calls", rounds, progress)
    try:
        with _OneThread(torch) as one:
            ts = _time_rounds(fns, calls, rounds, prog, prepare)
    finally:
        _core.set_backend(None)
    prog.close()
    res = {name: _summary(t) for name, t in ts.items()}
    bw = {name: byte_count[name] / res[name]["median_ns"] for name in fns}   # bytes/ns = GB/s
    roof = max(bw["read bw np.max"], bw["read bw np.sum"])
    np_best = min(("numpy matmul", "numpy einsum", "numpy per-head"),
                  key=lambda n: res[n]["median_ns"])
    t_np = res[np_best]["median_ns"]
    t_f16 = res[f"kvcache float16 {best}"]["median_ns"]
    variants = {}
    for name in fns:
        t = res[name]["median_ns"]
        variants[name] = {
            "times": res[name], "bytes": byte_count[name], "gb_per_s": bw[name],
            "fraction_of_roofline": bw[name] / roof, "speedup_vs_numpy": t_np / t,
            "rel_error_vs_float64": errors.get(name),
            "time_over_float16": (t / t_f16 if name.startswith("kvcache") and
                                  name.split()[1] in ("int8", "int4") else None),
            "note": notes.get(name, "")}
    del caches, f16, buf
    gc.collect()
    return {"context": ctx, "q_heads": Q_HEADS, "kv_heads": HEADS, "head_dim": HEAD_DIM,
            "float16_bytes": f16_bytes, "float32_bytes": f32_bytes, "tier_bytes": tier_bytes,
            "backends": backends, "best_backend": best, "numpy_best": np_best,
            "roofline_gb_per_s": roof, "threads": one.note + (", torch 1 thread"
                                                            if torch is not None else ""),
            "torch": None if torch is None else torch.__version__,
            "torch_note": None if torch is not None else torch_note,
            "calls_per_round": calls, "rounds": rounds, "variants": variants}


# ---------------------------------------------------------------- prefetch


def fill_contiguous(ctx: int, pre_k: np.ndarray, pre_v: np.ndarray) -> KVCache:
    """30 layers, each filled by one update: a layer's blocks are allocated
    one after another.  (The prefetch section's contiguous layout; asv's
    Prefetch benchmark builds the same.)"""
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx, batch_size=BATCH, dtype=DTYPE,
                    overflow="error")
    for layer in range(LAYERS):
        cache.update(layer, pre_k, pre_v, ctx)
    return cache


def fill_fragmented(ctx: int, pre_k: np.ndarray, pre_v: np.ndarray,
                     rng: np.random.Generator) -> KVCache:
    """30 layers whose blocks lie scattered through the heap: the first
    4,096 tokens one at a time in lockstep (a layer's consecutive blocks 30
    blocks apart), the rest block by block with the layers in a fresh random
    order per block; then every layer is truncated to half (blocks freed
    back to malloc) and refilled block by block in random layer order, so
    the upper half reuses holes left by any layer."""
    cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx, batch_size=BATCH, dtype=DTYPE,
                    overflow="error")
    upd, bs = cache.update, cache.block_size
    lock = min(ctx, 4096)
    for n in range(1, lock + 1):
        k, v = pre_k[:, :, n - 1:n], pre_v[:, :, n - 1:n]
        for layer in range(LAYERS):
            upd(layer, k, v, n)

    def blocks(start: int) -> None:
        for n0 in range(start, ctx, bs):
            n1 = min(ctx, n0 + bs)
            k, v = pre_k[:, :, n0:n1], pre_v[:, :, n0:n1]
            for layer in rng.permutation(LAYERS):
                upd(int(layer), k, v, n1)

    blocks(lock)
    half = (ctx // 2) // bs * bs
    for layer in rng.permutation(LAYERS):
        cache.truncate(half, int(layer))
    blocks(half)
    return cache


def _prefetch_stats(cache: KVCache, q: np.ndarray, ctx: int) -> dict:
    """Counters of one attention call with and without prefetch, and what
    cache.prefetch() hints (layer 0)."""
    out = {}
    for pf in (True, False):
        cache.reset_stats()
        cache.attention(0, q, prefetch=pf)
        pl = cache.stats().per_layer[0]
        out[f"prefetch_{pf}"] = {"prefetches": pl["prefetches"],
                                 "prefetch_bytes": pl["prefetch_bytes"]}
    cache.reset_stats()
    out["explicit_prefetch_bytes"] = cache.prefetch(0, ctx)
    cache.reset_stats()
    return out


def _prefetch_layout(cache: KVCache, q: np.ndarray, ctx: int, label: str, pairs: int,
                     steps: int, progress: bool) -> dict:
    """The on/off pairs on layer 0 and the 30-layer steps of one cache."""
    out = np.empty((BATCH, Q_HEADS, 1, HEAD_DIM), np.float32)
    att, hint = cache.attention, cache.prefetch
    pc = _PC
    layers = range(LAYERS)
    ref_out = att(0, q)

    def one(pf: bool) -> None:
        att(0, q, out=out, prefetch=pf)

    def step(mode: str) -> None:
        if mode == "explicit":
            for layer in layers:
                if layer + 1 < LAYERS:
                    hint(layer + 1, ctx)
                att(layer, q, out=out, prefetch=True)
        else:
            pf = mode == "on"
            for layer in layers:
                att(layer, q, out=out, prefetch=pf)

    prog = _Progress(f"{label}: {pairs} on/off pairs, {steps} x 3 30-layer steps",
                     pairs + steps, progress)
    single = {True: array.array("q"), False: array.array("q")}
    modes = ("on", "off", "explicit")
    step_ts = {m: array.array("q") for m in modes}
    one(True)
    one(False)
    gc.disable()
    try:
        for i in range(pairs):
            # ABBA: off, on, on, off, off, on ... so that drift and the
            # warmth left by the previous call cancel.
            for pf in ((True, False) if i & 1 else (False, True)):
                t0 = pc()
                one(pf)
                t1 = pc()
                single[pf].append(t1 - t0)
            if not i & 15:
                prog.update(i)
        for i in range(steps):
            for j in range(3):
                m = modes[(i + j) % 3]
                t0 = pc()
                step(m)
                t1 = pc()
                step_ts[m].append(t1 - t0)
            prog.update(pairs + i + 1)
    finally:
        gc.enable()
    prog.close()
    assert np.allclose(out, att(LAYERS - 1, q), rtol=0, atol=1e-6)
    assert np.allclose(ref_out, att(0, q, prefetch=False), rtol=0, atol=1e-6)
    on = np.asarray(single[True], np.float64)
    off = np.asarray(single[False], np.float64)
    s_on, s_off, s_ex = (np.asarray(step_ts[m], np.float64) for m in modes)
    return {
        "one_layer": {"prefetch_on": _summary(single[True]),
                      "prefetch_off": _summary(single[False]), "pairs": pairs,
                      "median_paired_ratio": float(np.median(on / off)),
                      "ratio_of_medians": float(np.median(on) / np.median(off))},
        "layer_steps": {"prefetch_on": _summary(step_ts["on"]),
                        "prefetch_off": _summary(step_ts["off"]),
                        "explicit": _summary(step_ts["explicit"]), "steps": steps,
                        "median_paired_ratio": float(np.median(s_on / s_off)),
                        "explicit_median_paired_ratio": float(np.median(s_ex / s_off)),
                        "ratio_of_medians": float(np.median(s_on) / np.median(s_off)),
                        "explicit_ratio_of_medians": float(np.median(s_ex) /
                                                           np.median(s_off))}}


def _bench_prefetch(ctx: int, pairs: int, steps: int, progress: bool) -> dict:
    """attention(prefetch=True) against prefetch=False on two layouts: one
    layer called repeatedly (its K/V warm in cache as far as it fits), and
    30-layer steps (every layer in turn, as a decode step reads them: each
    layer's K/V cold), the latter also with cache.prefetch(next layer) before
    each call.  One layout at a time is built (and freed after)."""
    from . import _core
    rng = np.random.default_rng(ctx + 11)
    pre_k = rng.standard_normal((BATCH, HEADS, ctx, HEAD_DIM), dtype=np.float32).astype(DTYPE)
    pre_v = rng.standard_normal((BATCH, HEADS, ctx, HEAD_DIM), dtype=np.float32).astype(DTYPE)
    q = rng.standard_normal((BATCH, Q_HEADS, 1, HEAD_DIM), dtype=np.float32)
    results = {}
    for layout in ("contiguous", "fragmented"):
        t_build = time.perf_counter()
        cache = (fill_contiguous(ctx, pre_k, pre_v) if layout == "contiguous" else
                 fill_fragmented(ctx, pre_k, pre_v, rng))
        t_build = time.perf_counter() - t_build
        assert np.array_equal(cache.keys(LAYERS - 1), pre_k)
        assert np.array_equal(cache.values(0), pre_v)
        counters = _prefetch_stats(cache, q, ctx)
        r = _prefetch_layout(cache, q, ctx, f"prefetch ctx={ctx:,} {layout} (built in "
                             f"{t_build:.1f} s)", pairs, steps, progress)
        results[layout] = {"build_s": t_build, "counters": counters, **r}
        del cache
        gc.collect()
    return {"context": ctx, "layers": LAYERS,
            "float16_bytes_per_layer": pre_k.nbytes + pre_v.nbytes,
            "backend": _core.backend(), "layouts": results}


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


def _grouped(rows, line, rule, key=lambda r: r[0]) -> list[str]:
    """The table's body: each row through ``line``, a ``rule`` between groups
    of rows (a change of ``key``) and after the last."""
    out, prev = [], None
    for r in rows:
        if prev is not None and key(r) != prev:
            out.append(rule)
        out.append(line(r))
        prev = key(r)
    return out + [rule]


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
    out += _grouped(rows, line, rule)
    if ref is not None:
        out.append(f"update: one layer's K and V, one token. kv t/t({ref}): kvcache's median "
                   f"over its median at ctx {ref:,}. kvcache and prealloc decode "
                   "continuously from ctx, interleaved; concat restarts from ctx every "
                   f"{CONCAT_WINDOW} tokens (untimed).")
    if "growth" in meta.get("sections", ()):
        out.append("growth: slowest calls are single events, noisy on a shared machine. "
                   "concat peak is one layer's transient copy over all layers' data.")
    return "\n".join(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _build_attention_rows(res: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    for a in res.get("attention", []):
        ctx = a["context"]
        roof_name = max(("read bw np.max", "read bw np.sum"),
                        key=lambda n: a["variants"][n]["gb_per_s"])
        for name, v in a["variants"].items():
            note = []
            if v["rel_error_vs_float64"] is not None:
                note.append(f"rel err {v['rel_error_vs_float64']:.1e}")
            if name.startswith("numpy"):
                note.append("float32 K/V materialized (untimed)")
                if name == a["numpy_best"]:
                    note.append("fastest numpy: the 'vs numpy' base")
            elif name.startswith("kvcache"):
                note.append(f"{_mib(v['bytes'])} held")
                if name.split()[1] != "float16":
                    note.append("every whole block in the tier (keep_first=0, residual 0)")
            elif name.startswith("read bw"):
                note.append(f"float32 view of a {_mib(v['bytes'])} buffer (the float16 K+V's size)")
                if name == roof_name:
                    note.append("the roofline")
            if v["note"]:
                note.append(v["note"])
            t = v["times"]["median_ns"]
            rows.append(["attention", f"ctx {ctx:,} {name}", _fmt(t / 1e3),
                         "" if name.startswith("read bw") else _fmt(v["speedup_vs_numpy"], "x"),
                         f"{v['gb_per_s']:.1f}", f"{v['fraction_of_roofline']:.2f}",
                         _fmt(v["time_over_float16"], "r"), "; ".join(note)])
        if a.get("torch_note"):
            rows.append(["attention", f"ctx {ctx:,} torch sdpa", "-", "", "", "", "",
                         f"skipped: {a['torch_note']}"])
    for p in res.get("prefetch", []):
        ctx, nbytes = p["context"], p["float16_bytes_per_layer"]
        for layout, r in p["layouts"].items():
            c = r["counters"]
            on, off = c["prefetch_True"], c["prefetch_False"]
            one, st = r["one_layer"], r["layer_steps"]
            base = f"ctx {ctx:,} {layout}"
            t_on, t_off = one["prefetch_on"]["median_ns"], one["prefetch_off"]["median_ns"]
            rows.append(["prefetch", f"{base}, 1 layer repeated, prefetch=True",
                         _fmt(t_on / 1e3), "", f"{nbytes / t_on:.1f}", "",
                         _fmt(one["median_paired_ratio"], "r"),
                         (f"{one['pairs']} ABBA pairs; per call {on['prefetches']:,} lines "
                          f"({_mib(on['prefetch_bytes'])}) hinted, prefetch=False "
                          f"{off['prefetches']:,}")])
            rows.append(["prefetch", f"{base}, 1 layer repeated, prefetch=False",
                         _fmt(t_off / 1e3), "", f"{nbytes / t_off:.1f}", "", "",
                         f"ratio of medians on/off {one['ratio_of_medians']:.3f}"])
            per = LAYERS
            for key, label, ratio, rom in (
                    ("prefetch_on", "prefetch=True", st["median_paired_ratio"],
                     st["ratio_of_medians"]),
                    ("prefetch_off", "prefetch=False", None, None),
                    ("explicit", "prefetch=True + cache.prefetch(next)",
                     st["explicit_median_paired_ratio"], st["explicit_ratio_of_medians"])):
                t = st[key]["median_ns"] / per
                note = ""
                if key == "prefetch_on":
                    note = (f"{st['steps']} steps per variant, rotated; "
                            f"ratio of medians {rom:.3f}; built in {r['build_s']:.1f} s")
                elif key == "explicit":
                    note = (f"ratio of medians {rom:.3f}; cache.prefetch() hints "
                            f"{_mib(c['explicit_prefetch_bytes'])}")
                rows.append(["prefetch", f"{base}, 30-layer step / 30, {label}", _fmt(t / 1e3),
                             "", f"{nbytes / t:.1f}", "", _fmt(ratio, "r"), note])
    return rows


ATTN_HEADERS = ["section", "case", "median us", "vs numpy", "GB/s", "of roofline", "ratio",
                "note"]


def _cpu_caches() -> dict[str, str]:
    """L1d/L2/L3 sizes from sysfs (Linux), e.g. {"L2": "1024K"}; {} elsewhere."""
    out: dict[str, str] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(base, d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, d, "size")) as f:
                size = f.read().strip()
            if kind != "Instruction":
                out[f"L{level}" + ("d" if level == "1" else "")] = size
    except OSError:
        pass
    return out


def _render_attention(rows: list[list[str]], meta: dict) -> str:
    headers = ATTN_HEADERS
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(headers))
    caches = ", ".join(f"{k} {v}" for k, v in meta.get("cpu_caches", {}).items())
    out = [(f"kvcache {meta['kvcache_version']} attention: SmolLM2-135M attention shape "
            f"({Q_HEADS} query heads over {HEADS} KV heads, head_dim {HEAD_DIM}, batch "
            f"{BATCH}, one query token), {DTYPE} store, block {DEFAULT_BLOCK_SIZE}; one core; "
            f"backends {meta.get('attention_backends')}"
            + (f"; CPU caches {caches}" if caches else "")
            + ("; QUICK" if meta["quick"] else "")),
           ("median us: median of time.perf_counter_ns per call.  vs numpy: fastest numpy "
            "median / median.  GB/s: bytes read (K+V held: float16, INT8/INT4 payload; "
            "numpy/torch: float32) / median."),
           ("of roofline: GB/s over the faster of np.max/np.sum over a buffer of the float16 "
            "K+V's size (one core, same cache level as repeated calls).  ratio: attention = "
            "time / time(float16, best backend); prefetch = median over alternating pairs of "
            "time(variant) / time(prefetch=False) (< 1: prefetch helps)."),
           rule, line(headers), rule]
    out += _grouped(rows, line, rule,
                    key=lambda r: r[0] if r[0] != "prefetch" else r[1].split(",")[0])
    if "attention" in meta.get("sections", ()):
        out.append("attention: each variant timed in blocks of repeated calls (its data as warm "
                   "as it stays), the variants taking turns block by block; threads: "
                   f"{meta.get('attention_threads', '?')} (kvcache's kernel runs on one).")
    if "prefetch" in meta.get("sections", ()):
        out.append("prefetch: 30 layers per cache. '1 layer repeated': layer 0 called "
                   "again and again (warm as far as it fits in cache); '30-layer step': every "
                   "layer in turn as a decode step reads them (each layer cold). contiguous: "
                   "each layer filled by one update; fragmented: lockstep token-by-token fill, "
                   "random layer order per block, truncate to half and refill.")
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
        description="Benchmark kvcache against numpy, torch, transformers and blosc2 "
                    "baselines measured in the same run (SmolLM2-135M shape) and print "
                    "the tables.")
    p.add_argument("--json", metavar="PATH", help="also write every measured number to PATH")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and tokens (a few seconds; for smoke tests)")
    p.add_argument("--contexts", type=_parse_contexts, default=None, metavar="N,N,...",
                   help="contexts of the update rows (default 128,4096,65536), of the "
                        "attention and prefetch rows (default 4096,32768) and of the "
                        "transformers rows (default 1024,4096)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens decoded by the growth rows (default 100000; --quick 20000)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="decode steps per context for kvcache/prealloc (default 3000; "
                        "--quick 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--kv-data", metavar="PATH", default=None,
                   help="the real K/V of the compression section (default $KVCACHE_KV_DATA, "
                        "else tests/data/smollm2_kv_prose.npz of the checkout)")
    args = p.parse_args(None if argv is None else list(argv))
    quick = args.quick
    steps = args.steps or (300 if quick else 3000)
    tokens = args.tokens or (20_000 if quick else 100_000)
    if tokens < 1 or steps < 1:
        p.error("--tokens and --steps must be >= 1")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    progress = not args.no_progress
    concat_budget = 0.3 if quick else 3.0
    concat_tokens = min(tokens, 512 if quick else 2048)
    metric_reps = 2000 if quick else 20000
    update_contexts = args.contexts or [128, 4096, 65536]
    attn_contexts = args.contexts or ATTN_CONTEXTS
    from . import bench_external as ext
    hf_contexts = args.contexts or ext.HF_CONTEXTS
    hf_steps = min(steps, 64 if quick else 512)
    hf_budget = 2.0 if quick else 15.0
    compression_reps = 3 if quick else 15
    kv_data = args.kv_data or str(ext.default_kv_data())

    t_all = time.perf_counter()
    meta = {"kvcache_version": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "quick": quick,
            "shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM,
                      "batch": BATCH, "dtype": DTYPE, "block_size": DEFAULT_BLOCK_SIZE},
            "timer_overhead_ns": _timer_overhead_ns(),
            "settings": {"contexts": update_contexts, "attention_contexts": attn_contexts,
                         "steps": steps, "tokens": tokens,
                         "concat_budget_s": concat_budget, "concat_tokens": concat_tokens,
                         "concat_window": CONCAT_WINDOW, "metrics_steps": metric_reps,
                         "growth_start": GROWTH_START, "growth_factor": GROWTH_FACTOR,
                         "transformers_contexts": hf_contexts,
                         "transformers_steps": hf_steps,
                         "transformers_budget_s": hf_budget,
                         "compression_reps": compression_reps, "kv_data": kv_data},
            "reference_context": update_contexts[0] if "update" in sections else None,
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
        res["update"] = [_bench_update(c, steps, concat_budget, progress)
                         for c in update_contexts]
        ref = res["update"][0]["kvcache"]["median_ns"]
        for u in res["update"]:
            kv = u["kvcache"]["median_ns"]
            u["speedup_vs_concat"] = u["numpy_concat"]["median_ns"] / kv
            u["speedup_vs_prealloc"] = u["numpy_prealloc"]["median_ns"] / kv
            u["kvcache_time_over_reference"] = kv / ref
    if "metrics" in sections:
        res["metrics"] = _bench_metrics(metric_reps, 1024, progress)
    if sections & {"attention", "prefetch"}:
        from . import _core
        meta["attention_backends"] = _core.available_backends()
        meta["cpu_caches"] = _cpu_caches()
        try:
            st = os.stat(_core.__file__)
            meta["core_build"] = {"file": os.path.basename(_core.__file__),
                                  "bytes": st.st_size, "mtime": st.st_mtime}
        except (OSError, TypeError):
            pass
    if "attention" in sections:
        # Blocks of `calls` timed calls per variant, `rounds` rounds (see _time_rounds).
        res["attention"] = [
            _bench_attention(c, 4 if quick else (12 if c <= 8192 else 6),
                             3 if quick else 8, progress) for c in attn_contexts]
        meta["attention_threads"] = res["attention"][0]["threads"]
    if "prefetch" in sections:
        res["prefetch"] = [
            _bench_prefetch(c, 16 if quick else (100 if c <= 8192 else 40),
                            3 if quick else (30 if c <= 8192 else 10), progress)
            for c in attn_contexts]
    if "transformers" in sections:
        res["transformers"] = [ext.bench_transformers(c, hf_steps, hf_budget, progress)
                               for c in hf_contexts]
        ok = [t for t in res["transformers"] if t["status"] == "ok"]
        if ok:
            meta.setdefault("library_versions", {}).update(
                torch=ok[0]["torch"], transformers=ok[0]["transformers"],
                **({"optimum-quanto": ok[0]["quantized"]["optimum_quanto"]}
                   if "optimum_quanto" in ok[0]["quantized"] else {}))
    if "compression" in sections:
        res["compression"] = ext.bench_compression(kv_data, compression_reps, progress)
        if res["compression"].get("blosc2_version"):
            meta.setdefault("library_versions", {})["blosc2"] = (
                res["compression"]["blosc2_version"])
    meta["wall_s"] = time.perf_counter() - t_all
    rows = _build_rows(res)
    res["table"] = {"headers": HEADERS, "rows": rows}
    if rows:
        print(_render(rows, meta))
    attn_rows = _build_attention_rows(res)
    res["attention_table"] = {"headers": ATTN_HEADERS, "rows": attn_rows}
    if attn_rows:
        if rows:
            print()
        print(_render_attention(attn_rows, meta))
    ext_rows = ext.build_rows(res)
    res["baselines_table"] = {"headers": ext.HEADERS, "rows": ext_rows}
    if ext_rows:
        if rows or attn_rows:
            print()
        print(ext.render(ext_rows, meta))
    print(f"(total {meta['wall_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        sys.stderr.write(f"[kvcache.bench] wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
