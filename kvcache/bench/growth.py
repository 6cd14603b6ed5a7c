"""The ``growth`` section: a long decode into a cache that grows.

Decode ``tokens`` tokens one at a time into 30 layers starting from a
capacity of ``GROWTH_START`` tokens with exponential growth x1.5: slowest
single update, p99, growth events, peak memory over final live bytes, peak
RSS increase.  Baselines: numpy buffers regrown x1.5 with a copy (same
capacities as kvcache, same 30 layers and tokens) and numpy concatenation
(30 layers, fewer tokens: at 100K tokens it would copy ~100 TB).  Each run
happens in a fresh process (``isolated``) so that its RSS is its own.
"""

from __future__ import annotations

import array
import gc
from typing import Callable

import numpy as np

from ..cache import DEFAULT_BLOCK_SIZE, KVCache
from ..growth import GrowthStrategy
from .common import (
    BATCH,
    DTYPE,
    HEAD_DIM,
    HEADS,
    LAYERS,
    PC,
    TOKEN_BYTES,
    Progress,
    concat_step,
    isolated,
    summary,
    token,
    us,
)
from .table import Row, fmt, ratio

NAME = "growth"
GROWTH_START = 1024            # initial capacity of the growth runs
GROWTH_FACTOR = 1.5


# --------------------------------------------------------------- peak RSS


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


class RssPeak:
    """Peak RSS increase over a section, from /proc/self/status VmHWM (bytes)."""

    def __enter__(self) -> RssPeak:
        gc.collect()
        self.ok = _reset_peak_rss()
        self.before = _proc_status_kib("VmRSS").get("VmRSS")
        self.increase: int | None = None
        return self

    def __exit__(self, *exc) -> None:
        hwm = _proc_status_kib("VmHWM").get("VmHWM")
        if self.ok and hwm is not None and self.before is not None:
            self.increase = (hwm - self.before) * 1024


def _memory(peak: int, final: int, live: int, rss: RssPeak) -> dict:
    """The memory figures of one run: accounted peak and final bytes, live
    bytes, and the peak RSS increase, each also over the live bytes."""
    return {"peak_memory_bytes": peak, "final_memory_bytes": final, "final_live_bytes": live,
            "peak_memory_over_live": peak / live, "rss_increase_bytes": rss.increase,
            "rss_increase_over_live": (rss.increase / live
                                       if rss.increase is not None else None)}


# ------------------------------------------------------------------ runs
# Each runs in a fresh process (see isolated) so that VmHWM is its own.


def _decode(label: str, tokens: int, every: int, progress: bool,
            step: Callable[[int], None]) -> RssPeak:
    """``step(n)`` for n = 1 .. tokens (each step times its own calls), with
    the garbage collector off, progress every ``every + 1`` steps (a power
    of two minus one), and the peak RSS increase over the decode."""
    prog = Progress(label, tokens, progress)
    with RssPeak() as rss:
        gc.disable()
        try:
            for n in range(1, tokens + 1):
                step(n)
                if not n & every:
                    prog.update(n)
        finally:
            gc.enable()
    prog.close()
    return rss


def _growth_kvcache(tokens: int, layers: int, progress: bool) -> dict:
    rng = np.random.default_rng(1)
    k, v = token(rng), token(rng)
    cache = KVCache(layers, HEADS, HEAD_DIM, max_seq_len=GROWTH_START, batch_size=BATCH,
                    dtype=DTYPE, overflow="error")
    cache.enable_dynamic_growth(GrowthStrategy.exponential(GROWTH_FACTOR))
    upd = cache.update
    pc = PC
    ts = array.array("q")
    ap = ts.append
    growth_ts = array.array("q")
    growth_steps: list[int] = []
    next_cap = cache.capacity(0)
    bs = cache.block_size
    peak_mem = cache.stats().memory_bytes

    def step(n: int) -> None:
        nonlocal next_cap, peak_mem
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

    rss = _decode(f"growth: kvcache, {layers} layers x {tokens:,} tokens", tokens, 1023,
                  progress, step)
    st = cache.stats()
    peak_mem = max(peak_mem, st.memory_bytes)
    assert st.tokens_held == layers * tokens and st.evictions == 0
    all_ns = np.frombuffer(ts, dtype=np.int64)
    slow = int(np.argmax(all_ns))
    steady = np.ones(all_ns.size, dtype=bool)
    for g in growth_steps:
        steady[(g - 1) * layers:g * layers] = False
    return {"impl": "kvcache", "layers": layers, "tokens": tokens,
            "calls": summary(ts), "growth_calls": summary(growth_ts),
            "steady_calls": summary(all_ns[steady]),
            "slowest_call_token": slow // layers + 1,
            "slowest_call_was_growth": not bool(steady[slow]), "growth_steps": growth_steps,
            "growth_events": st.growths, "growth_events_per_layer": st.growths // layers,
            "growth_seconds": st.growth_seconds, "final_capacity": cache.capacity(0),
            **_memory(peak_mem, st.memory_bytes, st.live_bytes, rss)}


def _growth_numpy_regrow(tokens: int, layers: int, progress: bool) -> dict:
    """numpy buffers grown like a vector: x1.5 (kvcache's capacities), copying."""
    rng = np.random.default_rng(1)
    k, v = token(rng), token(rng)
    strategy = GrowthStrategy.exponential(GROWTH_FACTOR)
    half = TOKEN_BYTES // 2
    kbufs = [np.empty((BATCH, HEADS, GROWTH_START, HEAD_DIM), DTYPE) for _ in range(layers)]
    vbufs = [np.empty((BATCH, HEADS, GROWTH_START, HEAD_DIM), DTYPE) for _ in range(layers)]
    caps = [GROWTH_START] * layers
    alloc = peak = 2 * layers * GROWTH_START * half      # bytes of the buffers (accounted)
    pc = PC
    ts = array.array("q")
    ap = ts.append
    growth_ts = array.array("q")
    events = 0
    empty = np.empty

    def step(n: int) -> None:
        nonlocal alloc, peak, events
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

    rss = _decode(f"growth: numpy regrow x{GROWTH_FACTOR:g}, {layers} layers x {tokens:,} "
                  "tokens", tokens, 1023, progress, step)
    live = layers * tokens * TOKEN_BYTES
    assert np.array_equal(kbufs[-1][:, :, tokens - 1], k[:, :, 0])
    return {"impl": "numpy_regrow", "layers": layers, "tokens": tokens,
            "calls": summary(ts), "growth_calls": summary(growth_ts),
            "growth_events": events, "growth_events_per_layer": events // layers,
            "final_capacity": caps[0], **_memory(peak, alloc, live, rss)}


def _growth_numpy_concat(tokens: int, layers: int, progress: bool) -> dict:
    """DynamicCache-like: every append concatenates (allocate, copy, free old)."""
    rng = np.random.default_rng(1)
    k, v = token(rng), token(rng)
    half = TOKEN_BYTES // 2
    empty = np.empty((BATCH, HEADS, 0, HEAD_DIM), DTYPE)
    ks = [empty] * layers
    vs = [empty] * layers
    ts = array.array("q")
    rss = _decode(f"growth: numpy concat, {layers} layer(s) x {tokens:,} tokens", tokens, 255,
                  progress, lambda n: concat_step(ks, vs, k, v, ts.append))
    live = layers * tokens * TOKEN_BYTES
    # Accounted peak, at the last call: the other layers' K and V, this
    # layer's old K and V, and the new K (then old K is freed before new V).
    peak = ((layers - 1) * tokens * 2 + 2 * (tokens - 1) + tokens) * half
    return {"impl": "numpy_concat", "layers": layers, "tokens": tokens,
            "calls": summary(ts), "growth_calls": summary(ts), "growth_events": layers * tokens,
            "growth_events_per_layer": tokens, **_memory(peak, live, live, rss)}


# ------------------------------------------------------------------ table


def rows(res: dict) -> list[Row]:
    out: list[Row] = []
    g = res.get(NAME)
    if g:
        kv, cc, rg = g["kvcache"], g["numpy_concat"], g["numpy_regrow"]
        out.append(["growth", (f"{kv['layers']} layers x {kv['tokens']:,} tokens, from "
                               f"{GROWTH_START}"), "", "", "", "", "", "",
                    "prealloc column: numpy regrown x1.5 (copy), same layers/tokens"])
        for stat, label in (("max_ns", "slowest update us"), ("p999_ns", "p99.9 update us"),
                            ("p99_ns", "p99 update us"), ("median_ns", "median update us")):
            a, b, c = us(kv["calls"], stat), us(cc["calls"], stat), us(rg["calls"], stat)
            out.append(["growth", label, fmt(a), fmt(b), fmt(c), "", fmt(ratio(c, a), "x"),
                        "", (f"concat: {cc['layers']} layers x {cc['tokens']:,} tokens only"
                             if stat == "max_ns" else "")])
        a, c = us(kv["growth_calls"], "max_ns"), us(rg["growth_calls"], "max_ns")
        med = us(kv["growth_calls"], "median_ns")
        out.append(["growth", "slowest growth-event update us", fmt(a), "", fmt(c), "",
                    fmt(ratio(c, a), "x"), "",
                    f"kvcache growth events: median {fmt(med)} us"])
        out.append(["growth", "slowest other update us", fmt(us(kv["steady_calls"], "max_ns")),
                    "", "", "", "", "",
                    (f"kvcache slowest call: token {kv['slowest_call_token']:,} "
                     f"({'a growth event' if kv['slowest_call_was_growth'] else 'no growth'})")])
        out.append(["growth", "total update time s", f"{kv['calls']['total_s']:.2f}",
                    f"{cc['calls']['total_s']:.2f}", f"{rg['calls']['total_s']:.2f}", "",
                    fmt(ratio(rg["calls"]["total_s"], kv["calls"]["total_s"]), "x"), "",
                    "sum of the timed calls"])
        out.append(["growth", "growth events (all layers)", fmt(kv["growth_events"]),
                    fmt(cc["growth_events"]), fmt(rg["growth_events"]), "", "", "",
                    f"per layer: {kv['growth_events_per_layer']}; concat: every token"])
        out.append(["growth", "peak memory / final live",
                    fmt(kv["peak_memory_over_live"], "r"), fmt(cc["peak_memory_over_live"], "r"),
                    fmt(rg["peak_memory_over_live"], "r"), "",
                    fmt(ratio(rg["peak_memory_over_live"], kv["peak_memory_over_live"]), "x"),
                    "", "kvcache: max stats().memory_bytes; numpy: array bytes"])
        out.append(["growth", "peak RSS increase / final live",
                    fmt(kv["rss_increase_over_live"], "r"),
                    fmt(cc["rss_increase_over_live"], "r"),
                    fmt(rg["rss_increase_over_live"], "r"), "", "", "",
                    f"VmHWM; kvcache final live {kv['final_live_bytes'] / 2**20:,.0f} MiB"])
    return out


def run(settings, meta: dict) -> dict:
    """kvcache, numpy regrown and numpy concatenation, each in its own process."""
    return {"kvcache": isolated(_growth_kvcache, settings.tokens, LAYERS, settings.progress),
            "numpy_regrow": isolated(_growth_numpy_regrow, settings.tokens, LAYERS,
                                     settings.progress),
            "numpy_concat": isolated(_growth_numpy_concat, settings.concat_tokens, LAYERS,
                                     settings.progress)}


def note(res: dict, meta: dict) -> str:
    return ("growth: slowest calls are single events, noisy on a shared machine. "
            "concat peak is one layer's transient copy over all layers' data.")
