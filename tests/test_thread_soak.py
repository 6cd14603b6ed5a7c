"""Thread soak: several threads share ONE KVCache, each owning its own layers.

Per configuration (``CONFIGS``), 4 threads each own 2 of the cache's 8 layers
and, for a bounded time, run a seeded random mix of calls on them: appends,
in-place overwrites, truncating rewrites, pure truncations (``update`` with
``None`` and ``truncate(layer_idx=...)``), writes that must fail (a hole, a
bad layer index, an evicted position, a full layer), per-layer compression,
``keys``/``values``/``positions`` reads, ``attention``, ``prefetch`` and
``stats()``.  The KVCache docstring allows calls on *different* layers to run
concurrently; nothing here runs two calls on the same layer at once except
reads (phase 2) and the cache's own background compressor.

Each thread checks as it goes, against a plain-numpy reference of each of its
layers (tests/reference.py): the exception type of every call, positions and
lengths exactly, contents within the compressed tier's error, and its layers'
counters in every ``stats()`` it reads.  Each thread logs its calls and their
results.  Afterwards every log is replayed serially on a fresh cache of the
same configuration and the results must be equal:

* deterministic configurations (no background worker): every read, every
  attention output and every compression result bit for bit (the codecs and
  the kernel are deterministic and a layer's block layout depends only on its
  own calls), and the final contents, block tiers, counters and gauges;
* with the background compressor, which blocks are compressed when a read
  happens depends on timing: reads are checked in the thread instead, and
  ``background-int8-append`` (lengths only grow, so no block is ever written
  after it could have been compressed) must still end bit-identical to the
  serial run with synchronous automatic compression.

Counters that are not per layer are left out: ``growths``/``growth_bytes`` and
``auto_compression_stats`` are checked by the deterministic race tests at the
end of this module (they lost increments before a lock guarded them);
``prefetches`` count cache lines, which
depend on where the allocator put a compressed payload, so they are checked
against the sum of what ``prefetch()`` returned instead.

Phase 2 (``int8-ring``): every thread reads every layer (keys, values,
attention, prefetch, positions, stats; so several read one layer at once)
while another thread runs ``compress_old_entries`` over the whole cache; each
read must be the layer's state before or after the compression, position by
position, and the read counters must add up.

Run longer: ``KVCACHE_SOAK_SECONDS=60 pytest tests/test_thread_soak.py``
(seconds of concurrent calls per configuration; default 0.6).
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
from attention_reference import reference_attention, rel_error
from quant_reference import decode_int8, encode_int8
from reference import RefCache

from kvcache import GrowthStrategy, KVCache, _core

SECONDS = float(os.environ.get("KVCACHE_SOAK_SECONDS", "0.6"))
MIN_OPS = 120                  # per thread, however slow the machine
THREADS, LAYERS_PER_THREAD = 4, 2
LAYERS = THREADS * LAYERS_PER_THREAD
HEADS, DIM, BATCH, BLOCK = 4, 64, 2, 16
Q_HEADS = 2 * HEADS
RESIDUAL = 32
# With HEADS * DIM * BATCH float16 = 1 KiB per key position, writes of more
# than 32 tokens and reads of more than 64 copy without the GIL.

# INT8 stores a token's group of 64 channels as codes of (max - min) / 255
# (0.02 to 0.03 for this data) with float16 scale and zero point: at most
# about half a step per quantization, and a block written again after it was
# compressed is quantized again.  0.1 is a few of those steps; a lost or
# misplaced token is off by O(1).
INT8_ABS = 0.1
# Attention over INT8 blocks against the float64 reference on the exact
# values: measured up to 9e-3 on this data (median 6e-3 once most blocks are
# compressed); 1e-5 where nothing was compressed.
ATTN_INT8_REL = 3e-2


@dataclass(frozen=True)
class Soak:
    name: str
    cache_kw: dict
    mix: dict                       # call kind -> weight
    owner_tiers: tuple = ()         # tiers of the owner's per-layer compression
    growth: bool = False
    deterministic: bool = True      # the serial replay must repeat every result
    max_len: int | None = None      # lengths only grow, up to this
    compressible: float = 0.0       # share of writes with low-entropy (LZ4-able) data
    seed: int = 0
    phase2: bool = False


FULL_MIX = dict(append=30, overwrite=8, rewrite=8, cut=4, truncate=3, hole=1, evicted=1,
                bad_layer=1, keys=6, values=6, positions=3, attention=10, stats=4, prefetch=2)

CONFIGS = [
    # The owner compresses its own layers (INT8, or LOSSLESS on the share of
    # data that shrinks) with what compress_old_entries runs per layer; a ring
    # with sinks wraps, so writes land in compressed blocks and evict.
    Soak("int8-ring", dict(max_seq_len=256, sink_tokens=4, compression="int8"),
         {**FULL_MIX, "compress": 5}, owner_tiers=(_core.TIER_INT8, _core.TIER_INT8,
                                                   _core.TIER_LOSSLESS),
         compressible=0.5, seed=1, phase2=True),
    # Automatic compression on the update path; layers grow (linear, up to a
    # cap) and then fail with CacheFullError.
    Soak("auto-int8-growth", dict(max_seq_len=128, overflow="error", compression="int8",
                                  auto_compress=True),
         FULL_MIX, growth=True, seed=2),
    # The background worker compresses while the owners write and read.
    Soak("background-int8-append", dict(max_seq_len=2048, compression="int8",
                                        auto_compress=True, background=True),
         dict(append=30, overwrite=8, hole=1, bad_layer=1, keys=6, values=6, positions=3,
              attention=10, stats=4, prefetch=2),
         deterministic=False, max_len=640, seed=3),
    Soak("background-int8-ring", dict(max_seq_len=256, sink_tokens=4, compression="int8",
                                      auto_compress=True, background=True),
         FULL_MIX, deterministic=False, seed=4),
]

WRITES = ("update", "cut", "truncate", "bad_layer")


def _owned(tid: int) -> list[int]:
    return [tid + THREADS * i for i in range(LAYERS_PER_THREAD)]


def _make_cache(cfg: Soak, background: bool | None = None) -> KVCache:
    kw = dict(batch_size=BATCH, block_size=BLOCK, residual_tokens=RESIDUAL, **cfg.cache_kw)
    if background is not None:
        kw["background"] = background
    cache = KVCache(LAYERS, HEADS, DIM, **kw)
    if cfg.growth:
        cache.enable_dynamic_growth(GrowthStrategy.linear(64), max_capacity=512)
    return cache


class LayerRef(RefCache):
    """The reference for one layer (its counters are that layer's), counting
    updates as the cache does (every update() that returns; truncate() only
    when it drops something)."""

    def __init__(self, cfg: Soak) -> None:
        kw = {k: v for k, v in cfg.cache_kw.items()
              if k in ("max_seq_len", "sink_tokens", "overflow")}
        super().__init__(1, HEADS, DIM, batch_size=BATCH, block_size=BLOCK, **kw)
        self.updates = 0
        if cfg.growth:
            self.enable_dynamic_growth(GrowthStrategy.linear(64), max_capacity=512)

    def update(self, layer_idx, k, v, seq_len) -> None:
        super().update(layer_idx, k, v, seq_len)
        self.updates += 1


def _tokens(cfg: Soak, seed: int, t: int):
    g = np.random.default_rng(seed)
    shape = (BATCH, HEADS, t, DIM)
    if g.random() < cfg.compressible:            # quarter steps: LZ4 shrinks them
        k, v = g.integers(-8, 8, shape) / 4, g.integers(-8, 8, shape) / 4
    else:
        k, v = g.standard_normal(shape), g.standard_normal(shape)
    return k.astype(np.float16), v.astype(np.float16)


def _query(seed: int, t_q: int):
    return np.random.default_rng(seed).standard_normal((BATCH, Q_HEADS, t_q, DIM)).astype(
        np.float32)


def _digest(a: np.ndarray) -> tuple:
    return a.shape, str(a.dtype), hashlib.blake2b(a.tobytes(), digest_size=16).hexdigest()


# ------------------------------------------------------------- the calls

def _next_op(rng, cfg: Soak, layer: int, ref: LayerRef) -> tuple:
    """A call on `layer`, drawn from the mix, given the layer's state."""
    kinds = list(cfg.mix)
    w = np.array([cfg.mix[k] for k in kinds], dtype=float)
    kind = kinds[rng.choice(len(kinds), p=w / w.sum())]
    n = ref.seq_len(0)
    seed = int(rng.integers(2**62))
    if kind == "append" and cfg.max_len is not None and n + 64 > cfg.max_len:
        kind = "overwrite"                       # lengths stop growing
    if kind == "append":
        t = int(rng.integers(1, 65))
        return ("update", layer, t, n + t, seed)
    if kind == "overwrite":
        # In place; with growing lengths only positions still in the residual
        # window (never eligible for compression) are written again.
        top = min(n, RESIDUAL if cfg.max_len is not None else 48)
        if top == 0:
            return ("positions", layer)
        t = int(rng.integers(1, top + 1))
        return ("update", layer, t, n, seed)
    if kind == "rewrite":                        # truncate, rewriting the last t
        m = max(0, n - int(rng.integers(1, 120)))
        t = int(rng.integers(0, min(m, 40) + 1))
        return ("update", layer, t, m, seed)
    if kind == "cut":
        return ("cut", layer, max(0, n - int(rng.integers(0, 120))))
    if kind == "truncate":
        return ("truncate", layer, max(0, n - int(rng.integers(-5, 120))))
    lo = ref.layers[0].lo
    if kind == "evicted" and lo > ref.sinks + 4:
        # Truncate to lo and rewrite the t positions before it: evicted ones.
        return ("update", layer, int(rng.integers(1, 5)), lo, seed)
    if kind in ("hole", "evicted"):
        t = int(rng.integers(1, 5))
        return ("update", layer, t, n + t + int(rng.integers(1, 4)), seed)
    if kind == "bad_layer":
        bad = [LAYERS, -1, 2**70, -(2**70)][int(rng.integers(4))]
        return ("bad_layer", layer, bad, seed)
    if kind == "compress":
        return ("compress", layer, cfg.owner_tiers[int(rng.integers(len(cfg.owner_tiers)))])
    if kind == "attention":
        return ("attention", layer, int(rng.integers(1, 5)), seed)
    if kind == "prefetch":
        return ("prefetch", layer, int(rng.integers(0, n + 2)))
    return (kind, layer)                         # keys, values, positions, stats


def _call(cache: KVCache, cfg: Soak, op: tuple):
    """Run `op` on the cache; return its result in comparable form."""
    kind, layer = op[0], op[1]
    if kind == "update":
        _, _, t, m, seed = op
        k, v = _tokens(cfg, seed, t)
        cache.update(layer, k, v, m)
        return None
    if kind == "cut":
        cache.update(layer, None, None, op[2])
        return None
    if kind == "truncate":
        cache.truncate(op[2], layer_idx=layer)
        return None
    if kind == "bad_layer":
        k, v = _tokens(cfg, op[3], 1)
        cache.update(op[2], k, v, 1)
        return None
    if kind == "compress":
        res = cache._compress(op[2], cache.residual_tokens, cache.keep_first, math.inf,
                              cache.error_budget, (layer,))
        return tuple(tuple(r) for r in res)
    if kind in ("keys", "values"):
        return getattr(cache, kind)(layer)
    if kind == "positions":
        return (cache.positions(layer), cache.seq_len(layer), cache.held(layer),
                cache.capacity(layer))
    if kind == "attention":
        return cache.attention(layer, _query(op[3], op[2]))
    if kind == "prefetch":
        return cache.prefetch(layer, op[2])
    if kind == "stats":
        return dict(cache.stats().per_layer[layer])
    raise AssertionError(op)


def _ref_write(ref: LayerRef, cfg: Soak, op: tuple) -> None:
    kind = op[0]
    if kind == "update":
        _, _, t, m, seed = op
        k, v = _tokens(cfg, seed, t)
        ref.update(0, k, v, m)
    elif kind == "cut":
        ref.update(0, None, None, op[2])
    elif kind == "truncate":
        ref.truncate(op[2], 0)
    elif kind == "bad_layer":
        raise IndexError("not a layer of the cache")


def _ref_counters(ref: LayerRef) -> dict:
    return dict(updates=ref.updates, tokens_written=ref.tokens_written,
                evictions=ref.evictions, truncations=ref.truncations)


def _int8(x: np.ndarray) -> np.ndarray:
    """What INT8 returns for float16 tokens [..., DIM] (per token and group)."""
    return decode_int8(*encode_int8(x), np.float16)


def _check_read(cfg: Soak, got: np.ndarray, exact: np.ndarray, positions, keep_first: int,
                where: str) -> None:
    assert got.shape == exact.shape and got.dtype == exact.dtype, where
    if cfg.max_len is not None:
        # Lengths only grow: each token is exact or INT8 of its exact value
        # (quantized once), and the residual window and the first keep_first
        # positions are exact.
        same = (got == exact).all(axis=(0, 1, 3))
        quant = (got == _int8(exact)).all(axis=(0, 1, 3))
        assert (same | quant).all(), (where, np.flatnonzero(~(same | quant))[:10])
        n = positions[-1] + 1 if len(positions) else 0
        exact_pos = (positions >= n - RESIDUAL) | (positions < keep_first)
        assert same[exact_pos].all(), (where, "a position that stays exact was compressed")
    else:
        err = float(np.max(np.abs(got.astype(np.float32) - exact.astype(np.float32)),
                        initial=0.0))
        assert err <= INT8_ABS, (where, err)


@dataclass
class Expect:
    """What a layer's counters must be, from the calls made on it."""
    reads: int = 0              # token reads: hits + misses
    prefetch_bytes: int = 0


@dataclass
class ThreadLog:
    tid: int
    ops: list = field(default_factory=list)      # (op, result)
    refs: dict = field(default_factory=dict)     # layer -> LayerRef
    expect: dict = field(default_factory=dict)   # layer -> Expect
    kinds: Counter = field(default_factory=Counter)
    max_err: float = 0.0


def _step(cache: KVCache, cfg: Soak, op: tuple, log: ThreadLog):
    """One call, checked against the reference; returns what the log keeps."""
    kind, layer = op[0], op[1]
    ref, exp = log.refs[layer], log.expect[layer]
    where = f"thread {log.tid} call {len(log.ops)} {op[:4]}"
    if kind in WRITES:
        try:
            _ref_write(ref, cfg, op)
        except Exception as exc:        # the reference validates before it changes
            want = type(exc)
        else:
            want = None
        try:
            _call(cache, cfg, op)
        except Exception as exc:
            assert type(exc) is want, (where, repr(exc), want)
            log.kinds[f"{kind}:{type(exc).__name__}"] += 1
            return ("raise", type(exc).__name__)
        assert want is None, (where, f"accepted; the reference raised {want.__name__}")
        log.kinds[kind] += 1
        return None
    n, held = ref.seq_len(0), ref.held(0)
    if kind == "attention" and not 1 <= op[2] <= n:
        with pytest.raises(ValueError):
            _call(cache, cfg, op)
        log.kinds["attention:ValueError"] += 1
        return ("raise", "ValueError")
    got = _call(cache, cfg, op)
    log.kinds[kind] += 1
    if kind in ("keys", "values"):
        exp.reads += held * BATCH
        exact = getattr(ref, kind)(0)
        _check_read(cfg, got, exact, ref.positions(0), cache.keep_first, where)
        if cfg.max_len is None:
            log.max_err = max(log.max_err, float(np.max(
                np.abs(got.astype(np.float32) - exact.astype(np.float32)), initial=0.0)))
        return _digest(got)
    if kind == "positions":
        pos, seq_len, n_held, cap = got
        assert np.array_equal(pos, ref.positions(0)), where
        assert (seq_len, n_held, cap) == (n, held, ref.capacity(0)), where
        return None
    if kind == "attention":
        exp.reads += held * BATCH
        q = _query(op[3], op[2])
        want = reference_attention(q, ref.keys(0), ref.values(0), ref.positions(0), n)
        err = rel_error(got, want)
        assert err <= ATTN_INT8_REL, (where, err)
        return _digest(got)
    if kind == "prefetch":
        assert got >= 0 and got % 64 == 0, (where, got)
        exp.prefetch_bytes += got
        return None
    if kind == "stats":
        for key, val in _ref_counters(ref).items():
            assert got[key] == val, (where, key, got[key], val)
        assert got["hits"] + got["misses"] == exp.reads, (where, got, exp.reads)
        assert got["prefetch_bytes"] == exp.prefetch_bytes == 64 * got["prefetches"], where
        return {k: got[k] for k in ("hits", "misses")}
    if kind == "compress":
        # Nobody else touches this layer: nothing is skipped as busy or dropped.
        assert not [r for r in got if r[0] in ("busy", "dropped")], (where, got)
        return got
    raise AssertionError(op)


# --------------------------------------------------------------- runners

def _run_threads(targets, timeout: float) -> list:
    """Start the targets together; return the failures (tracebacks)."""
    failures: list = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException:           # noqa: B036 - reported by the test
                failures.append(traceback.format_exc())
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)            # hand the GIL over often: more interleavings
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
    finally:
        sys.setswitchinterval(old)
    hung = [t for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} threads still running after {timeout} s (a deadlock?)"
    return failures


def _soak(cache: KVCache, cfg: Soak) -> list[ThreadLog]:
    logs = []
    for tid in range(THREADS):
        log = ThreadLog(tid)
        for layer in _owned(tid):
            log.refs[layer] = LayerRef(cfg)
            log.expect[layer] = Expect()
        logs.append(log)
    deadline = []

    def worker(log: ThreadLog):
        def run():
            rng = np.random.default_rng([cfg.seed, log.tid])
            layers = _owned(log.tid)
            while len(log.ops) < MIN_OPS or time.monotonic() < deadline[0]:
                layer = layers[int(rng.integers(len(layers)))]
                op = _next_op(rng, cfg, layer, log.refs[layer])
                log.ops.append((op, _step(cache, cfg, op, log)))
        return run

    deadline.append(time.monotonic() + SECONDS)
    failures = _run_threads([worker(log) for log in logs], timeout=120 + 10 * SECONDS)
    assert not failures, "\n".join(failures)
    return logs


def _replay(cfg: Soak, logs: list[ThreadLog]) -> KVCache:
    """The logs, one thread after the other, on a fresh cache without a
    background worker; every result compared with the logged one."""
    cache = _make_cache(cfg, background=False)
    for log in logs:
        for i, (op, logged) in enumerate(log.ops):
            where = f"replay of thread {log.tid} call {i} {op[:4]}"
            try:
                got = _call(cache, cfg, op)
            except Exception as exc:
                assert logged == ("raise", type(exc).__name__), (where, repr(exc), logged)
                continue
            assert not (isinstance(logged, tuple) and logged[:1] == ("raise",)), (where, logged)
            kind = op[0]
            if kind in ("keys", "values", "attention"):
                if cfg.deterministic:
                    assert _digest(got) == logged, where
            elif kind == "stats":
                if cfg.deterministic:
                    assert {k: got[k] for k in logged} == logged, (where, got, logged)
                else:
                    assert got["hits"] + got["misses"] == sum(logged.values()), where
            elif kind == "compress":
                assert got == logged, (where, got, logged)
    return cache


def _layer_state(cache: KVCache, layer: int) -> dict:
    return dict(keys=cache.keys(layer), values=cache.values(layer),
                positions=cache.positions(layer), seq_len=cache.seq_len(layer),
                held=cache.held(layer), capacity=cache.capacity(layer),
                tiers=cache.block_tiers(layer))


PER_LAYER_EXACT = ("updates", "tokens_written", "evictions", "truncations")
GAUGES = ("live_bytes", "compressed_blocks", "compressed_bytes", "tokens_held",
          "capacity_tokens")


def _check_counters(cache: KVCache, logs: list[ThreadLog]) -> None:
    s = cache.stats()
    for log in logs:
        for layer, ref in log.refs.items():
            pl, exp = s.per_layer[layer], log.expect[layer]
            for key, val in _ref_counters(ref).items():
                assert pl[key] == val, (layer, key, pl[key], val)
            assert pl["hits"] + pl["misses"] == exp.reads, (layer, pl, exp)
            assert pl["prefetch_bytes"] == exp.prefetch_bytes == 64 * pl["prefetches"], layer
    for key in PER_LAYER_EXACT + ("hits", "misses", "prefetches"):
        assert getattr(s, key) == sum(pl[key] for pl in s.per_layer), key


def _compare_final(cache: KVCache, serial: KVCache, cfg: Soak, logs: list[ThreadLog],
                   same_content: bool) -> None:
    s, r = cache.stats(), serial.stats()
    for layer in range(LAYERS):
        a, b = s.per_layer[layer], r.per_layer[layer]
        for key in PER_LAYER_EXACT:
            assert a[key] == b[key], (layer, key)
        assert a["hits"] + a["misses"] == b["hits"] + b["misses"], layer
        if cfg.deterministic:
            assert (a["hits"], a["misses"]) == (b["hits"], b["misses"]), layer
    if same_content:
        for key in GAUGES:
            assert getattr(s, key) == getattr(r, key), (key, getattr(s, key), getattr(r, key))
        assert s.blocks - s.spare_blocks == r.blocks - r.spare_blocks
    for log in logs:
        for layer, ref in log.refs.items():
            x, y = _layer_state(cache, layer), _layer_state(serial, layer)
            assert np.array_equal(x["positions"], ref.positions(0)), layer
            for key in ("seq_len", "held", "capacity"):
                assert x[key] == y[key] == getattr(ref, key)(0), (layer, key)
            if same_content:
                assert x["tiers"] == y["tiers"], layer
                for key in ("keys", "values"):
                    assert np.array_equal(x[key], y[key]), (layer, key)
            else:
                for key in ("keys", "values"):
                    _check_read(cfg, x[key], getattr(ref, key)(0), ref.positions(0),
                                cache.keep_first, f"final layer {layer} {key}")


def _check_coverage(cfg: Soak, cache: KVCache, logs: list[ThreadLog]) -> None:
    """The run did what it is meant to exercise (not vacuous)."""
    done = sum((log.kinds for log in logs), Counter())
    for kind in cfg.mix:
        name = {"append": "update", "overwrite": "update", "rewrite": "update",
                "hole": "update:ValueError", "evicted": "update:IndexError",
                "bad_layer": "bad_layer:IndexError"}.get(kind, kind)
        if kind == "evicted" and not cfg.cache_kw.get("sink_tokens"):
            continue                     # no ring: it was a hole
        assert done[name] > 0, (kind, done)
    s = cache.stats()
    assert s.compressed_blocks > 0 or any(
        r[0] not in ("raw", "busy", "dropped") for log in logs for op, res in log.ops
        if op[0] == "compress" for r in res), "nothing was ever compressed"
    if cfg.cache_kw.get("sink_tokens"):
        assert s.evictions > 0
    if cfg.growth:
        assert done["update:CacheFullError"] > 0, done
        assert max(cache.capacity(i) for i in range(LAYERS)) > cfg.cache_kw["max_seq_len"]
    if "compress" in cfg.mix:
        tiers = {t for i in range(LAYERS) for row in cache.block_tiers(i) for t in row}
        assert {"int8", "lossless"} <= tiers, tiers


# ----------------------------------------------------------------- phase 2

def _concurrent_reads(cache: KVCache, serial: KVCache, cfg: Soak) -> None:
    """Every thread reads every layer while another compresses the whole
    cache (INT8); each read is, position by position, the state before or
    after the compression.  `serial` (same contents) gives both states."""
    for i in range(LAYERS):              # no layer left empty or short by the soak
        if cache.seq_len(i) < 100:
            op = ("update", i, 100, cache.seq_len(i) + 100, 1000 + i)
            _call(cache, cfg, op)
            _call(serial, cfg, op)
    before = {i: (serial.keys(i), serial.values(i)) for i in range(LAYERS)}
    queries = {i: _query(100 + i, 1 + i % 3) for i in range(LAYERS)}
    attn = {i: serial.attention(i, queries[i]) for i in range(LAYERS)}
    serial.compress_old_entries(0, strategy="int8")
    after = {i: (serial.keys(i), serial.values(i)) for i in range(LAYERS)}
    assert any(not np.array_equal(before[i][0], after[i][0]) for i in range(LAYERS))
    positions = {i: serial.positions(i) for i in range(LAYERS)}
    c0 = cache.stats()
    reads, prefetched = Counter(), Counter()
    stop = threading.Event()
    compressed = []

    def reader(tid):
        def run():
            rng = np.random.default_rng([99, tid])
            count = 0
            while count < 40 or not stop.is_set():
                layer = int(rng.integers(LAYERS))
                which = int(rng.integers(5))
                held = cache.held(layer) * BATCH
                if which < 2:
                    got = (cache.keys if which == 0 else cache.values)(layer)
                    a, b = before[layer][which], after[layer][which]
                    ok = (got == a).all(axis=(0, 1, 3)) | (got == b).all(axis=(0, 1, 3))
                    assert ok.all(), (layer, which, np.flatnonzero(~ok)[:10])
                    reads[tid, layer] += held
                elif which == 2:
                    got = cache.attention(layer, queries[layer])
                    assert rel_error(got, attn[layer]) <= ATTN_INT8_REL, layer
                    reads[tid, layer] += held
                elif which == 3:
                    prefetched[tid, layer] += cache.prefetch(layer, cache.seq_len(layer))
                else:
                    assert np.array_equal(cache.positions(layer), positions[layer]), layer
                    s = cache.stats()
                    assert s.tokens_held == c0.tokens_held, layer
                    assert s.updates == c0.updates and s.evictions == c0.evictions
                count += 1
        return run

    def compressor():
        for _ in range(3):
            compressed.append(cache.compress_old_entries(0, strategy="int8", workers=2))
        stop.set()

    failures = _run_threads([reader(t) for t in range(THREADS)] + [compressor],
                            timeout=120 + 10 * SECONDS)
    assert not failures, "\n".join(failures)
    cache.compress_old_entries(0, strategy="int8")     # whatever a busy layer kept
    assert sum(s.blocks for s in compressed) > 0
    d = cache.stats() - c0
    for layer in range(LAYERS):
        want = sum(v for (_, lay), v in reads.items() if lay == layer)
        got = d.per_layer[layer]
        assert got["hits"] + got["misses"] == want, (layer, got, want)
        assert got["prefetch_bytes"] == sum(v for (_, lay), v in prefetched.items()
                                            if lay == layer), layer
        assert np.array_equal(cache.keys(layer), after[layer][0]), layer
        assert np.array_equal(cache.values(layer), after[layer][1]), layer
        assert cache.block_tiers(layer) == serial.block_tiers(layer), layer
        assert np.array_equal(cache.attention(layer, queries[layer]),
                              serial.attention(layer, queries[layer])), layer


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_soak(cfg: Soak):
    cache = _make_cache(cfg)
    try:
        logs = _soak(cache, cfg)
        cache.wait_for_compression()
        if cache._background is not None:
            assert not cache._background.errors, cache._background.errors
        assert not cache.auto_compression_errors, cache.auto_compression_errors
        _check_counters(cache, logs)
        _check_coverage(cfg, cache, logs)
        serial = _replay(cfg, logs)
        _compare_final(cache, serial, cfg, logs,
                       same_content=cfg.deterministic or cfg.max_len is not None)
        if cfg.phase2:
            _concurrent_reads(cache, serial, cfg)
    finally:
        cache.close()


def test_max_error_is_far_below_the_bound():
    """INT8_ABS is a bound, not a guess: the soak's worst INT8 error on its
    data stays well inside it (a lost or misplaced token would not)."""
    cfg = CONFIGS[0]
    cache = _make_cache(cfg)
    log = ThreadLog(0)
    for layer in _owned(0):
        log.refs[layer] = LayerRef(cfg)
        log.expect[layer] = Expect()
    rng = np.random.default_rng(7)
    for _ in range(400):
        layer = _owned(0)[int(rng.integers(LAYERS_PER_THREAD))]
        op = _next_op(rng, cfg, layer, log.refs[layer])
        log.ops.append((op, _step(cache, cfg, op, log)))
    assert 0 < log.max_err <= INT8_ABS / 2, log.max_err


# ------------------------------------------- known races (bugs, reported)

def _paused_at(funcname: str, entered: threading.Event, release: threading.Event):
    """A trace function for one thread: its first call of `funcname` waits for
    `release` (a thread switch there, made deterministic)."""
    state = {"done": False}

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == funcname and not state["done"]:
            state["done"] = True
            entered.set()
            release.wait(30)
        return None
    return tracer


def _race(cache, first, second, pause_in: str) -> None:
    """`first` runs on a thread that is paused inside `pause_in` while
    `second` runs on another one.  `first` is let go once `second` has
    finished or has been blocked for a second (a lock held by the paused
    thread makes it wait: that is the fix working, not a hang)."""
    entered, release = threading.Event(), threading.Event()
    errors = []

    def run():
        sys.settrace(_paused_at(pause_in, entered, release))
        try:
            first()
        except BaseException as exc:        # noqa: B036 - reported below
            errors.append(exc)
        finally:
            sys.settrace(None)

    def run_second():
        try:
            second()
        except BaseException as exc:        # noqa: B036 - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(30)
    t2 = threading.Thread(target=run_second)
    t2.start()
    t2.join(1.0)
    release.set()
    t.join(30)
    t2.join(30)
    assert not t.is_alive() and not t2.is_alive()
    assert not errors, errors


def test_growth_counters_of_concurrent_layers_add_up():
    cache = KVCache(2, 2, 8, max_seq_len=16, block_size=4, overflow="error")
    cache.enable_dynamic_growth(GrowthStrategy.linear(16))
    x = np.ones((1, 2, 20, 8), np.float16)
    _race(cache, lambda: cache.update(0, x, x, 20), lambda: cache.update(1, x, x, 20),
          pause_in="token_bytes")
    s = cache.stats()
    assert s.growths == 2
    assert s.growth_bytes == 2 * 16 * cache.token_bytes


def test_auto_compression_stats_of_concurrent_layers_add_up():
    cache = KVCache(2, 2, 8, max_seq_len=256, block_size=4, compression="int8",
                    residual_tokens=4, auto_compress=True)
    x = np.ones((1, 2, 16, 8), np.float16) * np.arange(8, dtype=np.float16)
    _race(cache, lambda: cache.update(0, x, x, 16), lambda: cache.update(1, x, x, 16),
          pause_in="__add__")
    # Per layer, blocks 1 and 2 left the residual window (block 0 holds keep_first).
    assert cache.stats().compressed_blocks == 4
    assert cache.auto_compression_stats.blocks == 4


_LOSSLESS_RACE = textwrap.dedent("""
    import threading
    import lz4.block
    import numpy as np
    from kvcache import KVCache

    cache = KVCache(1, 1, 64, max_seq_len=256, block_size=16, compression="lossless",
                    residual_tokens=0, keep_first=0, auto_compress=True, background=True)
    x = (np.arange(64 * 64) % 7).astype(np.float16).reshape(1, 1, 64, 64)  # LZ4 shrinks it
    cache.update(0, x, x, 64)
    cache.wait_for_compression()
    assert cache.block_tiers(0)[0][:4] == ["lossless"] * 4

    real, calls = lz4.block.decompress, [0]
    attempted = threading.Event()
    compress_layer = cache._compress_layer

    def traced_compress_layer(layer_idx):
        try:
            return compress_layer(layer_idx)
        finally:
            attempted.set()

    cache._compress_layer = traced_compress_layer

    def decompress(*args, **kwargs):
        # lz4 releases the GIL while it decodes; make the background worker
        # make an attempt on the layer at that moment, during the second
        # block's decode (a busy layer is then left alone and retried later:
        # waiting for the queue to empty would wait for this very update).
        calls[0] += 1
        if calls[0] == 2:
            cache._background.submit(0)
            assert attempted.wait(60)
        return real(*args, **kwargs)

    lz4.block.decompress = decompress
    y = -x[:, :, :24]
    cache.update(0, y, y, 40)     # rewrites positions 16..39: LOSSLESS blocks 1 and 2
    lz4.block.decompress = real
    assert np.array_equal(cache.keys(0)[:, :, 16:40], y)
    print("ok")
""")


def test_background_lossless_rewrite_survives_a_worker_pass(tmp_path):
    pytest.importorskip("lz4")
    # Outside the checkout: `python -c` puts the working directory first on
    # sys.path, where a regular install finds the unbuilt source tree.
    proc = subprocess.run([sys.executable, "-c", _LOSSLESS_RACE], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (
        proc.returncode, proc.stderr[-2000:])


def test_known_race_helpers_do_pause():
    """The pause used by the race tests does make the two calls overlap (so
    their passing means the counters are guarded, not that the helper stopped
    pausing)."""
    order = []
    cache = KVCache(2, 1, 4, max_seq_len=16)
    x = np.ones((1, 1, 1, 4), np.float16)

    def first():
        order.append("first starts")
        cache.stats()                    # paused as it enters stats()
        order.append("first ends")
    _race(cache, first, lambda: (order.append("second"), cache.update(1, x, x, 1)),
          pause_in="stats")
    assert order == ["first starts", "second", "first ends"], order
