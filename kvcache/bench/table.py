"""The one table renderer of ``kvcache bench`` and the three tables it prints.

Every section turns its result into rows of strings (``rows(res)`` in its
module, formatted with ``fmt``); ``render`` lays any table out: the intro
lines, a rule, the headers, the rows with a rule between groups, the notes of
the sections that ran.  The tables differ only in the data below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..cache import DEFAULT_BLOCK_SIZE
from .common import BATCH, DTYPE, HEAD_DIM, HEADS, LAYERS, Q_HEADS

Row = list[str]


# ------------------------------------------------------------- formatting


def fmt(x, unit: str = "") -> str:
    """A figure as a table cell: "x" a ratio (2.50x), "%" a signed percent,
    "r" three decimals; None or not finite: "-"."""
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


def ratio(base, kv) -> float | None:
    """base / kv, None where either is missing or kv is zero."""
    if base is None or kv is None or not kv:
        return None
    return base / kv


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


# --------------------------------------------------------------- renderer


@dataclass(frozen=True)
class Table:
    """One printed table: its key in the JSON, its headers, the columns set
    flush right, the lines above it (from the run's meta) and how rows group
    (a rule between groups)."""

    key: str
    headers: list[str]
    right: frozenset[int]
    intro: Callable[[dict], list[str]]
    group: Callable[[Row], str] = field(default=lambda r: r[0])
    shown_headers: Callable[[dict], list[str]] | None = None


def render(table: Table, rows: list[Row], meta: dict, notes: list[str]) -> str:
    headers = table.shown_headers(meta) if table.shown_headers else table.headers
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Row) -> str:
        return "  ".join(c.rjust(w) if i in table.right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(headers))
    out = [*table.intro(meta), rule, line(headers), rule]
    prev = None
    for r in rows:
        if prev is not None and table.group(r) != prev:
            out.append(rule)
        out.append(line(r))
        prev = table.group(r)
    out.append(rule)
    return "\n".join(out + [n for n in notes if n])


# ----------------------------------------------------------------- tables


def _main_intro(meta: dict) -> list[str]:
    return [(f"kvcache {meta['kvcache_version']} benchmark: SmolLM2-135M shape ({LAYERS} "
             f"layers, {HEADS} KV heads, head_dim {HEAD_DIM}, batch {BATCH}, {DTYPE}), block "
             f"{DEFAULT_BLOCK_SIZE}; {meta['cpu_count']} CPUs; python {meta['python']}, "
             f"numpy {meta['numpy']}{'; QUICK' if meta['quick'] else ''}"),
            ("times per call of time.perf_counter_ns (its own overhead, "
             f"~{meta['timer_overhead_ns']:.0f} ns, included); ratios = baseline / kvcache "
             "(> 1: kvcache faster or smaller)")]


def _main_headers(meta: dict) -> list[str]:
    ref = meta.get("reference_context")
    return MAIN.headers[:7] + [f"kv t/t({ref})" if ref is not None else MAIN.headers[7]] \
        + MAIN.headers[8:]


def _attention_intro(meta: dict) -> list[str]:
    caches = ", ".join(f"{k} {v}" for k, v in meta.get("cpu_caches", {}).items())
    return [(f"kvcache {meta['kvcache_version']} attention: SmolLM2-135M attention shape "
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
             "time(variant) / time(prefetch=False) (< 1: prefetch helps).")]


def _baselines_intro(meta: dict) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("library_versions", {}).items())
    return [(f"kvcache {meta['kvcache_version']} against other libraries (same run)"
             + (f": {versions}" if versions else "") + ("; QUICK" if meta["quick"] else "")),
            ("vs baseline: > 1 means kvcache is better: baseline time / kvcache time, baseline "
             "memory / kvcache memory, kvcache ratio or GB/s / baseline's.")]


# update, growth and metrics
MAIN = Table("table",
             ["section", "case", "kvcache", "numpy concat", "numpy prealloc", "vs concat",
              "vs prealloc", "kv t/t(ref)", "note"],
             frozenset({2, 3, 4, 5, 6, 7}), _main_intro, shown_headers=_main_headers)
# attention and prefetch; a prefetch group is one context and layout
ATTENTION = Table("attention_table",
                  ["section", "case", "median us", "vs numpy", "GB/s", "of roofline", "ratio",
                   "note"],
                  frozenset({2, 3, 4, 5, 6}), _attention_intro,
                  group=lambda r: r[0] if r[0] != "prefetch" else r[1].split(",")[0])
# transformers and compression: kvcache against other libraries
BASELINES = Table("baselines_table",
                  ["section", "case", "kvcache", "baseline", "baseline value", "vs baseline",
                   "note"],
                  frozenset({2, 4, 5}), _baselines_intro)
