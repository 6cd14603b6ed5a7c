"""What every section of ``kvcache bench`` shares: the cache shape, the
timing primitives, the progress line, the fills and the machine's facts.

Nothing here measures a section; the section modules do, and the asv
benchmarks (``asv_benches/benchmarks/``) call those same section functions,
so the two report the same statistic of the same loop.
"""

from __future__ import annotations

import array
import gc
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import __version__
from ..cache import DEFAULT_BLOCK_SIZE, KVCache

# SmolLM2-135M's cache: 30 layers, 3 KV heads, head_dim 64, batch 1, float16;
# its attention has 9 query heads over the 3 KV heads.
LAYERS, HEADS, HEAD_DIM, BATCH, DTYPE = 30, 3, 64, 1, "float16"
Q_HEADS = 9
GROUP = Q_HEADS // HEADS
TOKEN_BYTES = 2 * BATCH * HEADS * HEAD_DIM * np.dtype(DTYPE).itemsize   # K and V, one token

# Every figure is a time.perf_counter_ns difference around one call (or one
# block of calls): integer nanoseconds, no float rounding at 0.3 us.
PC = time.perf_counter_ns


# --------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """What one run measures, from the command line (``cli.settings``): each
    section's ``run(settings, meta)`` reads its own fields."""

    quick: bool
    progress: bool
    contexts: list[int]                  # update
    attention_contexts: list[int]        # attention, prefetch
    steps: int                           # update: kvcache/prealloc decode steps
    tokens: int                          # growth: tokens decoded
    concat_budget_s: float               # update: numpy concatenation's time budget
    concat_tokens: int                   # growth: tokens of the concatenation run
    metrics_steps: int
    transformers_contexts: list[int]
    transformers_steps: int
    transformers_budget_s: float
    compression_reps: int
    kv_data: str                         # compression: the real K/V (.npz)


# ----------------------------------------------------------------- timing


def summary(ns: Sequence[int]) -> dict[str, float | None]:
    """Median, percentiles, extremes, mean and total of per-call times (ns)."""
    a = np.asarray(ns, dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median_ns": None, "p99_ns": None, "p999_ns": None, "min_ns": None,
                "max_ns": None, "mean_ns": None, "total_s": 0.0}
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {"n": int(a.size), "median_ns": float(p50), "p99_ns": float(p99),
            "p999_ns": float(p999), "min_ns": float(a.min()), "max_ns": float(a.max()),
            "mean_ns": float(a.mean()), "total_s": float(a.sum() / 1e9)}


def us(stats: dict, stat: str) -> float | None:
    """One statistic of a ``summary`` in microseconds (None stays None)."""
    x = stats.get(stat)
    return None if x is None else x / 1e3


def timer_overhead_ns(n: int = 20000) -> float:
    """Median of two back-to-back ``PC()`` reads: what every figure includes."""
    pc = PC
    d = array.array("q")
    for _ in range(n):
        t0 = pc()
        t1 = pc()
        d.append(t1 - t0)
    return float(np.median(d))


def time_rounds(fns: dict[str, Callable[[], object]], calls: int, rounds: int,
                prog: Progress,
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
    pc = PC
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


def concat_step(ks: list[np.ndarray], vs: list[np.ndarray], k: np.ndarray, v: np.ndarray,
                ap: Callable[[int], object]) -> None:
    """One decode step of a concatenating cache (DynamicCache-like: torch.cat
    per update): every layer's K and V grown by ``np.concatenate`` (allocate,
    copy, the old array dropped), each layer's pair timed into ``ap``."""
    cat, pc = np.concatenate, PC
    for layer in range(len(ks)):
        t0 = pc()
        ks[layer] = cat((ks[layer], k), axis=2)
        vs[layer] = cat((vs[layer], v), axis=2)
        t1 = pc()
        ap(t1 - t0)


class OneThread:
    """numpy's BLAS (through threadpoolctl, when installed) and torch (when
    given) limited to one thread while timing: kvcache's kernels run on one
    core, and on a shared 2-core machine a second BLAS thread mostly waits
    for a busy core."""

    def __init__(self, torch=None) -> None:
        self.torch, self.limits, self.torch_threads = torch, None, None
        self.note = ""

    def __enter__(self) -> OneThread:
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


class Progress:
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


def isolated(fn: Callable[..., dict], *args) -> dict:
    """``fn(*args)`` in a fresh interpreter, so that neither its RSS nor its
    timings depend on what ran before in this one (a heap that held gigabytes
    a section ago); in this process where subprocesses are unavailable."""
    try:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # fn pickles by its module's name (a section module, never __main__)
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            out = ex.submit(fn, *args).result()
        out["isolated"] = True
        return out
    except (OSError, ImportError, NotImplementedError) as exc:   # no subprocesses here
        sys.stderr.write(f"[kvcache.bench] running in process ({exc})\n")
        out = fn(*args)
        out["isolated"] = False
        return out


# ------------------------------------------------------------------ fills


def token(rng: np.random.Generator, t: int = 1, dtype: str = DTYPE) -> np.ndarray:
    """``t`` tokens of random K (or V): [batch, heads, t, head_dim]."""
    return rng.standard_normal((BATCH, HEADS, t, HEAD_DIM), dtype=np.float32).astype(dtype)


def prefilled(ctx: int, capacity: int, pre_k: np.ndarray, pre_v: np.ndarray,
              layers: int = LAYERS, dtype: str = DTYPE, **kwargs) -> KVCache:
    """A cache of ``capacity`` tokens whose every layer holds ``pre_k``/``pre_v``
    (``ctx`` tokens, one update each: a layer's blocks allocated one after
    another); ``kwargs`` go to ``KVCache`` (``metrics``, ``residual_tokens`` ...)."""
    cache = KVCache(layers, HEADS, HEAD_DIM, max_seq_len=capacity, batch_size=BATCH,
                    dtype=dtype, overflow="error", **kwargs)
    for layer in range(layers):
        cache.update(layer, pre_k, pre_v, ctx)
    return cache


def fill_contiguous(ctx: int, pre_k: np.ndarray, pre_v: np.ndarray) -> KVCache:
    """30 layers, each filled by one update: a layer's blocks are allocated
    one after another.  (The prefetch section's contiguous layout; asv's
    Prefetch benchmark builds the same.)"""
    return prefilled(ctx, ctx, pre_k, pre_v)


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


# --------------------------------------------------------------- machine


def cpu_caches() -> dict[str, str]:
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


def machine(quick: bool) -> dict:
    """The run's facts every table's header reads: versions, machine, shape."""
    return {"kvcache_version": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "quick": quick,
            "shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM,
                      "batch": BATCH, "dtype": DTYPE, "block_size": DEFAULT_BLOCK_SIZE},
            "timer_overhead_ns": timer_overhead_ns()}


def kernel_facts() -> dict:
    """The attention kernels this build and CPU offer, the CPU's caches and
    the compiled core's file (which build was measured)."""
    from .. import _core
    out = {"attention_backends": _core.available_backends(), "cpu_caches": cpu_caches()}
    try:
        st = os.stat(_core.__file__)
        out["core_build"] = {"file": os.path.basename(_core.__file__), "bytes": st.st_size,
                             "mtime": st.st_mtime}
    except (OSError, TypeError):
        pass
    return out


# ------------------------------------------------------ optional packages

NOT_INSTALLED = "not installed"


def missing(exc: BaseException) -> str:
    """The status of a comparison whose package did not import."""
    name = getattr(exc, "name", None)
    return f"{NOT_INSTALLED} ({name or exc})"
