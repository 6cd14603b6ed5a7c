"""The ``update`` section: one-token update of one layer (keys and values).

At each context, kvcache (``KVCache.update``) against a numpy
``np.concatenate`` append (a DynamicCache-like cache) and slice assignment
into preallocated numpy buffers (a StaticCache-like cache), each call timed
on its own with ``time.perf_counter_ns`` (so each figure includes the
timer's overhead, printed in the table's header).  kvcache and the
preallocated buffers decode ``steps`` tokens into all 30 layers from the
context, call by call interleaved (kvcache first on every other call) so
that machine drift hits both alike.  Concatenation costs O(context) per
call, so it gets a time budget and restarts from the context every
``CONCAT_WINDOW`` tokens (untimed) to stay near it.

asv's ``update`` benchmarks call ``bench_update`` itself and report its
medians, so the dashboard and this table are one measurement.
"""

from __future__ import annotations

import array
import gc
import time

import numpy as np

from .common import DTYPE, LAYERS, PC, Progress, concat_step, prefilled, summary, token
from .table import Row, fmt, ratio

NAME = "update"
CONTEXTS = [128, 4096, 65536]
CONCAT_WINDOW = 64             # concatenation restarts from the context every this many tokens
IMPLS = ("kvcache", "numpy_prealloc", "numpy_concat")


def _decode_interleaved(ctx: int, steps: int, pre: np.ndarray, k: np.ndarray, v: np.ndarray,
                        dtype: str, progress: bool) -> tuple[array.array, array.array]:
    """kvcache and preallocated buffers, both prefilled to ctx, decoding
    ``steps`` tokens into every layer, call by call interleaved."""
    cache = prefilled(ctx, ctx + steps, pre, pre, dtype=dtype)
    # np.zeros: untouched pages are faulted in on first write, like the fresh
    # blocks kvcache takes from malloc (a StaticCache's torch.zeros behaves alike).
    shape = (*pre.shape[:2], ctx + steps, pre.shape[3])
    kbufs = [np.zeros(shape, dtype) for _ in range(LAYERS)]
    vbufs = [np.zeros(shape, dtype) for _ in range(LAYERS)]
    for kb, vb in zip(kbufs, vbufs):
        kb[:, :, :ctx] = pre
        vb[:, :, :ctx] = pre
    upd = cache.update
    pc = PC
    kv_ts, pa_ts = array.array("q"), array.array("q")
    kv_ap, pa_ap = kv_ts.append, pa_ts.append
    prog = Progress(f"update ctx={ctx:,}: kvcache + prealloc, {steps:,} steps x {LAYERS} "
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
    return kv_ts, pa_ts


def _decode_concat(ctx: int, steps: int, budget_s: float, pre: np.ndarray, k: np.ndarray,
                   v: np.ndarray, progress: bool) -> tuple[array.array, int]:
    """Concatenation (DynamicCache-like): O(context) per call, time-budgeted."""
    ks: list[np.ndarray] = [pre] * LAYERS      # shared until the first append copies
    vs: list[np.ndarray] = [pre] * LAYERS
    cc_ts = array.array("q")
    prog = Progress(f"update ctx={ctx:,}: numpy concat (budget {budget_s:g} s)", steps,
                    progress)
    t_start = time.perf_counter()
    done = w = 0
    gc.disable()
    try:
        while done < steps and (done < 2 or time.perf_counter() - t_start < budget_s):
            if w == CONCAT_WINDOW:                 # back to ctx (untimed)
                ks = [pre] * LAYERS
                vs = [pre] * LAYERS
                w = 0
            concat_step(ks, vs, k, v, cc_ts.append)
            done += 1
            w += 1
            prog.update(done)
    finally:
        gc.enable()
    prog.close(f"({done} steps)")
    del ks, vs
    gc.collect()
    return cc_ts, done


def bench_update(ctx: int, steps: int, concat_budget_s: float, progress: bool,
                 impls: tuple[str, ...] = IMPLS, dtype: str = DTYPE) -> dict:
    """One context: kvcache vs preallocated numpy (interleaved), then numpy
    concatenation.  ``impls`` without "numpy_concat" skips the concatenation;
    kvcache and the preallocated buffers are always timed together (the
    interleaving is the measurement).  ``dtype``: the storage dtype of all of
    them and of the tokens written."""
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"impls must be among {IMPLS}, got {sorted(unknown)}")
    rng = np.random.default_rng(ctx)
    pre = token(rng, ctx, dtype)
    k, v = token(rng, dtype=dtype), token(rng, dtype=dtype)
    out = {"context": ctx, "dtype": dtype, "concat_window": CONCAT_WINDOW}
    if {"kvcache", "numpy_prealloc"} & set(impls):
        kv_ts, pa_ts = _decode_interleaved(ctx, steps, pre, k, v, dtype, progress)
        out.update(kvcache=summary(kv_ts), numpy_prealloc=summary(pa_ts),
                   kvcache_prealloc_steps=steps)
    if "numpy_concat" in impls:
        cc_ts, done = _decode_concat(ctx, steps, concat_budget_s, pre, k, v, progress)
        out.update(numpy_concat=summary(cc_ts), concat_steps=done)
    return out


def run(settings, meta: dict) -> list[dict]:
    """Every context of the run, with the ratios of the table."""
    res = [bench_update(c, settings.steps, settings.concat_budget_s, settings.progress)
           for c in settings.contexts]
    ref = res[0]["kvcache"]["median_ns"]
    for u in res:
        kv = u["kvcache"]["median_ns"]
        u["speedup_vs_concat"] = u["numpy_concat"]["median_ns"] / kv
        u["speedup_vs_prealloc"] = u["numpy_prealloc"]["median_ns"] / kv
        u["kvcache_time_over_reference"] = kv / ref
    return res


def rows(res: dict) -> list[Row]:
    out: list[Row] = []
    upd = res.get(NAME, [])
    ref = upd[0]["kvcache"]["median_ns"] if upd else None
    for u in upd:
        kv, cc, pa = u["kvcache"], u["numpy_concat"], u["numpy_prealloc"]
        for stat, label in (("median_ns", "median ns"), ("p99_ns", "p99 ns")):
            first = stat == "median_ns"
            out.append([
                NAME, f"ctx {u['context']:,} {label}", fmt(kv[stat]), fmt(cc[stat]),
                fmt(pa[stat]), fmt(ratio(cc[stat], kv[stat]), "x"),
                fmt(ratio(pa[stat], kv[stat]), "x"),
                fmt(ratio(kv[stat], ref), "r") if first else "",
                f"{kv['n']:,} kv/prealloc calls, {cc['n']:,} concat" if first else ""])
    return out


def note(res: dict, meta: dict) -> str:
    ref = meta.get("reference_context")
    if ref is None:
        return ""
    return (f"update: one layer's K and V, one token. kv t/t({ref}): kvcache's median "
            f"over its median at ctx {ref:,}. kvcache and prealloc decode "
            "continuously from ctx, interleaved; concat restarts from ctx every "
            f"{CONCAT_WINDOW} tokens (untimed).")
