"""The ``prefetch`` section: ``attention(prefetch=True)`` against ``prefetch=False``.

On a 30-layer cache per context, with contiguous blocks (each layer filled
by one update) and fragmented ones (lockstep token-by-token fill, random
layer order per block, truncate to half and refill; see ``common``): one
layer called repeatedly (on/off alternating ABBA) and 30-layer steps (each
layer cold; also with ``cache.prefetch(next layer)`` before each call).
Ratios are medians of the paired time ratios; the counters per call are
``stats().per_layer[i]["prefetches"]``/``["prefetch_bytes"]``.
"""

from __future__ import annotations

import array
import gc
import time

import numpy as np

from ..cache import KVCache
from .common import (
    BATCH,
    HEAD_DIM,
    LAYERS,
    PC,
    Q_HEADS,
    Progress,
    fill_contiguous,
    fill_fragmented,
    kernel_facts,
    summary,
    token,
)
from .table import Row, fmt, mib

NAME = "prefetch"


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
    pc = PC
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

    prog = Progress(f"{label}: {pairs} on/off pairs, {steps} x 3 30-layer steps",
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
        "one_layer": {"prefetch_on": summary(single[True]),
                      "prefetch_off": summary(single[False]), "pairs": pairs,
                      "median_paired_ratio": float(np.median(on / off)),
                      "ratio_of_medians": float(np.median(on) / np.median(off))},
        "layer_steps": {"prefetch_on": summary(step_ts["on"]),
                        "prefetch_off": summary(step_ts["off"]),
                        "explicit": summary(step_ts["explicit"]), "steps": steps,
                        "median_paired_ratio": float(np.median(s_on / s_off)),
                        "explicit_median_paired_ratio": float(np.median(s_ex / s_off)),
                        "ratio_of_medians": float(np.median(s_on) / np.median(s_off)),
                        "explicit_ratio_of_medians": float(np.median(s_ex) /
                                                           np.median(s_off))}}


def bench_prefetch(ctx: int, pairs: int, steps: int, progress: bool) -> dict:
    """attention(prefetch=True) against prefetch=False on two layouts: one
    layer called repeatedly (its K/V warm in cache as far as it fits), and
    30-layer steps (every layer in turn, as a decode step reads them: each
    layer's K/V cold), the latter also with cache.prefetch(next layer) before
    each call.  One layout at a time is built (and freed after)."""
    from .. import _core
    rng = np.random.default_rng(ctx + 11)
    pre_k, pre_v = token(rng, ctx), token(rng, ctx)
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


def rows(res: dict) -> list[Row]:
    out: list[Row] = []
    for p in res.get(NAME, []):
        ctx, nbytes = p["context"], p["float16_bytes_per_layer"]
        for layout, r in p["layouts"].items():
            c = r["counters"]
            on, off = c["prefetch_True"], c["prefetch_False"]
            one, st = r["one_layer"], r["layer_steps"]
            base = f"ctx {ctx:,} {layout}"
            t_on, t_off = one["prefetch_on"]["median_ns"], one["prefetch_off"]["median_ns"]
            out.append(["prefetch", f"{base}, 1 layer repeated, prefetch=True",
                        fmt(t_on / 1e3), "", f"{nbytes / t_on:.1f}", "",
                        fmt(one["median_paired_ratio"], "r"),
                        (f"{one['pairs']} ABBA pairs; per call {on['prefetches']:,} lines "
                         f"({mib(on['prefetch_bytes'])}) hinted, prefetch=False "
                         f"{off['prefetches']:,}")])
            out.append(["prefetch", f"{base}, 1 layer repeated, prefetch=False",
                        fmt(t_off / 1e3), "", f"{nbytes / t_off:.1f}", "", "",
                        f"ratio of medians on/off {one['ratio_of_medians']:.3f}"])
            per = LAYERS
            for key, label, paired, rom in (
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
                            f"{mib(c['explicit_prefetch_bytes'])}")
                out.append(["prefetch", f"{base}, 30-layer step / 30, {label}", fmt(t / 1e3),
                            "", f"{nbytes / t:.1f}", "", fmt(paired, "r"), note])
    return out


def run(settings, meta: dict) -> list[dict]:
    meta.update(kernel_facts())
    quick = settings.quick
    return [bench_prefetch(c, 16 if quick else (100 if c <= 8192 else 40),
                           3 if quick else (30 if c <= 8192 else 10), settings.progress)
            for c in settings.attention_contexts]


def note(res: dict, meta: dict) -> str:
    return ("prefetch: 30 layers per cache. '1 layer repeated': layer 0 called "
            "again and again (warm as far as it fits in cache); '30-layer step': every "
            "layer in turn as a decode step reads them (each layer cold). contiguous: "
            "each layer filled by one update; fragmented: lockstep token-by-token fill, "
            "random layer order per block, truncate to half and refill.")
