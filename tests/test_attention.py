"""KVCache.attention and KVCache.prefetch, and the kernel backends behind them.

The yardstick is tests/attention_reference.py: softmax(q . K^T * scale) . V
in float64 numpy, grouped-query, causal by absolute position.

* Full tiers: the reference runs on the written arrays, at positions
  computed here (independently of the cache).
* Compressed tiers: the reference runs on the dequantized values the cache
  holds, so only the kernel's float32 rounding is measured (1e-5).  A float32
  store's keys()/values() are those values; a float16 store's round them to
  float16 (the kernel reads the float32 dequantization, not that), so there
  a float32 "twin" built from the same float16-exact data supplies them (it
  holds the same codes, scales and zeros: checked bit for bit after rounding).
* Real SmolLM2 K/V and queries: the tiers are held to accuracy floors against
  the original float16 K/V.

Every runnable backend is exercised (``set_backend``), and each must agree
with the scalar one.  keys()/values() count their reads as hits: the
accounting tests take counters around attention() calls only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from attention_reference import reference_attention, rel_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvcache
from kvcache import KVCache, _core

try:
    import lz4  # noqa: F401

    HAVE_LZ4 = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_LZ4 = False

DATA_DIR = Path(__file__).resolve().parent / "data"
KV_FILE = DATA_DIR / "smollm2_kv_prose.npz"
Q_FILE = DATA_DIR / "smollm2_q_prose.npz"

TOL = 1e-5            # kernel vs float64 reference, same stored values
TOL_BACKENDS = 1e-6   # any backend vs the scalar one
TOL_PROPERTY = 2e-5   # hypothesis configurations (dequantized reference)
REAL_FLOORS = {"float16": 1e-5, "float32": 1e-5, "int8": 1e-2, "int4": 6e-2}


def _api(name):
    """The top-level re-export when there is one, else the core's function."""
    return getattr(kvcache, name, None) or getattr(_core, name)


COMPILED = list(_core.compiled_backends())
AVAILABLE = list(_core.available_backends())
PREFETCH_BUILTIN = bool(_core.cpu_features().get("prefetch_builtin"))
LOSSLESS = pytest.param("lossless", marks=pytest.mark.skipif(not HAVE_LZ4,
                                                             reason="lossless needs lz4"))


# ---------------------------------------------------------------- helpers

def _use_backend(name):
    """Generator for the backend fixtures: run on kernel variant `name`
    (skipped where this CPU cannot run it), then restore the one before."""
    if name not in AVAILABLE:
        pytest.skip(f"backend {name!r} is compiled but this CPU/OS cannot run it "
                    f"(available: {AVAILABLE})")
    prev = _core.backend()
    assert _core.set_backend(name) == name
    assert _core.backend() == name
    try:
        yield name
    finally:
        _core.set_backend(prev)


@pytest.fixture(params=COMPILED)
def backend(request):
    """Run the test on one compiled kernel variant."""
    yield from _use_backend(request.param)


@pytest.fixture(params=[b for b in COMPILED if b != "scalar"])
def simd_backend(request):
    """Like `backend`, over the variants other than the scalar yardstick."""
    yield from _use_backend(request.param)


@pytest.fixture(autouse=True)
def _backend_restored():
    """Every test leaves the backend as it found it."""
    before = _core.backend()
    yield
    after = _core.backend()
    if after != before:          # repair first so one leak does not cascade
        _core.set_backend(before)
    assert after == before, f"test leaked backend {after!r} (was {before!r})"


def randn(g: np.random.Generator, shape, dtype="float32") -> np.ndarray:
    return g.standard_normal(shape).astype(dtype)


def write(cache, layer, k, v, chunk=None, start=0):
    """Append k/v [B, H, t, D] to `layer` (whose length is `start`) in chunks."""
    t = k.shape[2]
    chunk = chunk or t
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        cache.update(layer, k[:, :, s:e], v[:, :, s:e], start + e)


def ring_positions(n: int, max_seq_len: int, sinks: int) -> np.ndarray:
    """Positions a ring of capacity max_seq_len with `sinks` sinks holds after n writes."""
    if n <= max_seq_len:
        return np.arange(n)
    return np.concatenate([np.arange(sinks), np.arange(n - (max_seq_len - sinks), n)])


def ref_on_cache(cache, layer, q, scale=None):
    """Reference over what the cache reads back (dequantized tiers included)."""
    return reference_attention(q, cache.keys(layer), cache.values(layer),
                               cache.positions(layer), cache.seq_len(layer), scale)


def layer_counters(cache, layer=0) -> dict:
    return dict(cache.stats().per_layer[layer])


def _contents(cache) -> list:
    return [dict(keys=cache.keys(i), values=cache.values(i), positions=cache.positions(i),
                 seq_len=cache.seq_len(i), held=cache.held(i), capacity=cache.capacity(i),
                 tiers=cache.block_tiers(i)) for i in range(cache.num_layers)]


def _all_counters(cache) -> dict:
    s = cache.stats()
    d = s.as_dict()
    d["per_layer"] = [dict(x) for x in s.per_layer]
    return d


@contextmanager
def unchanged(cache, allow=()):
    """The block leaves the cache's contents and every counter and gauge as
    they were (but the counters named in `allow`).  Contents are read
    before the counters are taken, so those reads do not count."""
    before = _contents(cache)
    c0 = _all_counters(cache)
    yield
    c1 = _all_counters(cache)
    for c in (c0, c1):
        for key in allow:
            c.pop(key, None)
            for pl in c["per_layer"]:
                pl.pop(key, None)
    assert c1 == c0
    after = _contents(cache)
    for i, (a, b) in enumerate(zip(before, after)):
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (i, key)
                assert np.array_equal(a[key], b[key], equal_nan=True), (i, key)
            else:
                assert a[key] == b[key], (i, key)


def tiers_used(cache, layer=0) -> set:
    return {t for row in cache.block_tiers(layer) for t in row if t is not None}


# ------------------------------------------- 1. every backend vs reference

def _cases():
    cases = []
    # The grid: store dtype x GQA group x t_q x batch.
    for dtype in ("float32", "float16"):
        for group in (1, 3, 4):
            for t_q in (1, 5):
                for batch in (1, 3):
                    cases.append(dict(id=f"grid-{dtype}-g{group}-tq{t_q}-b{batch}",
                                      dtype=dtype, group=group, t_q=t_q, batch=batch,
                                      n=150, chunk=37 if batch == 3 else None))
    # Head sizes: 80 is not a multiple of the widest vectors (a narrower
    # kernel takes it), 6 and 7 take the scalar fallback.
    for dim in (64, 128, 80, 6, 7):
        for dtype in ("float32", "float16"):
            cases.append(dict(id=f"dim{dim}-{dtype}", dtype=dtype, dim=dim, group=2, t_q=3,
                              block=16, n=100))
    # Block sizes; 512 is longer than the kernel's longest run (256).
    for block in (16, 64, 256, 512):
        for dtype in ("float32", "float16"):
            cases.append(dict(id=f"block{block}-{dtype}", dtype=dtype, block=block, n=700,
                              max_seq_len=1024, group=2, t_q=2, chunk=300))
    # A ring with sinks after it wrapped: one token at a time, and in chunks.
    for dtype in ("float32", "float16"):
        for t_q in (1, 4):
            cases.append(dict(id=f"ring-1by1-{dtype}-tq{t_q}", dtype=dtype, ring=True,
                              max_seq_len=100, sinks=4, n=350, chunk=1, block=16, t_q=t_q,
                              group=2))
        cases.append(dict(id=f"ring-chunks-{dtype}", dtype=dtype, ring=True, max_seq_len=100,
                          sinks=4, n=333, chunk=7, block=32, t_q=3, group=3, batch=2))
        cases.append(dict(id=f"ring-nosink-{dtype}", dtype=dtype, ring=True, max_seq_len=64,
                          sinks=0, n=201, chunk=5, block=16, t_q=2, group=1))
        # More queries than the window holds: early queries see only the
        # sinks (or, without sinks, nothing: zeros).
        for sinks in (0, 4):
            cases.append(dict(id=f"ring-tq-beyond-window-s{sinks}-{dtype}", dtype=dtype,
                              ring=True, max_seq_len=12, sinks=sinks, n=100, chunk=5,
                              block=16, t_q=20, group=2))
        cases.append(dict(id=f"truncate-{dtype}", dtype=dtype, n=300, truncate=170, t_q=3,
                          group=2, batch=2))
        cases.append(dict(id=f"truncate-append-{dtype}", dtype=dtype, n=300, truncate=130,
                          append=50, t_q=4, group=2, block=32))
        cases.append(dict(id=f"reorder-{dtype}", dtype=dtype, n=200, batch=3,
                          reorder=[2, 0, 2, 1], t_q=2, group=2))
        cases.append(dict(id=f"reorder-append-{dtype}", dtype=dtype, n=200, batch=3,
                          reorder=[1, 1, 0], append=9, t_q=1, group=2))
    for scale in (0.3, np.float32(2.0), 1, np.float64(0.01)):
        cases.append(dict(id=f"scale-{type(scale).__name__}-{float(scale)}", dtype="float32",
                          n=120, t_q=2, group=2, scale=scale))
    return cases


CASES = _cases()


def build_case(case, g):
    """(cache, k, v, positions, seq_len): the written K/V of what the cache
    must hold, computed without asking the cache."""
    dtype = case["dtype"]
    heads, dim = case.get("heads", 2), case.get("dim", 64)
    batch, n = case.get("batch", 1), case["n"]
    ring = case.get("ring", False)
    msl = case.get("max_seq_len", 512)
    sinks = case.get("sinks", 0)
    cache = KVCache(1, heads, dim, max_seq_len=msl, batch_size=batch, dtype=dtype,
                    block_size=case.get("block", 64), sink_tokens=sinks,
                    overflow="ring" if ring else "error")
    k = randn(g, (batch, heads, n, dim), dtype)
    v = randn(g, (batch, heads, n, dim), dtype)
    write(cache, 0, k, v, case.get("chunk"))
    pos = ring_positions(n, msl, sinks) if ring else np.arange(n)
    if "truncate" in case:
        m = case["truncate"]
        cache.truncate(m)
        k, v, n, pos = k[:, :, :m], v[:, :, :m], m, np.arange(m)
    if "reorder" in case:
        idx = np.asarray(case["reorder"])
        cache.reorder_batch(idx)
        k, v = k[idx], v[idx]
        batch = len(idx)
    if "append" in case:
        a = case["append"]
        k2 = randn(g, (batch, heads, a, dim), dtype)
        v2 = randn(g, (batch, heads, a, dim), dtype)
        write(cache, 0, k2, v2, start=n)
        k, v = np.concatenate([k, k2], 2), np.concatenate([v, v2], 2)
        n += a
        pos = np.arange(n)
    return cache, k[:, :, pos], v[:, :, pos], pos, n


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_matches_reference(backend, case):
    g = np.random.default_rng(zlib.crc32(case["id"].encode()))
    cache, k, v, pos, n = build_case(case, g)
    assert np.array_equal(cache.positions(0), pos)
    assert cache.seq_len(0) == n
    heads, dim = k.shape[1], k.shape[3]
    q = randn(g, (k.shape[0], heads * case.get("group", 1), case.get("t_q", 1), dim))
    scale = case.get("scale")
    out = cache.attention(0, q, scale) if scale is not None else cache.attention(0, q)
    assert out.dtype == np.float32 and out.shape == q.shape
    ref = reference_attention(q, k, v, pos, n, scale)
    err = rel_error(out, ref)
    assert err <= TOL, (backend, case["id"], err)


def test_rows_heads_and_queries_are_independent(backend):
    """Each batch row, query head and query reads its own data: permuting
    query heads within a KV group permutes the output, a batch row's output
    does not depend on the other rows' queries."""
    g = np.random.default_rng(11)
    cache = KVCache(1, 2, 32, max_seq_len=256, batch_size=2, dtype="float32", block_size=16)
    k, v = randn(g, (2, 2, 90, 32)), randn(g, (2, 2, 90, 32))
    write(cache, 0, k, v)
    q = randn(g, (2, 6, 3, 32))
    out = cache.attention(0, q)
    perm = [2, 0, 1, 5, 3, 4]             # within each group of 3
    assert rel_error(cache.attention(0, q[:, perm]), out[:, perm]) <= 1e-6
    q2 = q.copy()
    q2[1] = randn(g, q2[1].shape)
    assert np.array_equal(cache.attention(0, q2)[0], out[0])


def test_query_seeing_no_key_gives_zeros(backend):
    """A ring without sinks that dropped everything before a query's
    position: that query attends to nothing and its output is 0."""
    g = np.random.default_rng(13)
    cache = KVCache(1, 1, 8, max_seq_len=16, block_size=16, dtype="float32")
    k, v = randn(g, (1, 1, 64, 8)), randn(g, (1, 1, 64, 8))
    write(cache, 0, k, v, chunk=8)
    assert np.array_equal(cache.positions(0), np.arange(48, 64))
    q = randn(g, (1, 2, 24, 8))                       # positions 40..63
    out = cache.attention(0, q)
    assert np.array_equal(out[:, :, :8], np.zeros_like(out[:, :, :8]))
    assert np.isfinite(out).all() and (np.abs(out[:, :, 8:]).sum(-1) > 0).all()
    assert rel_error(out, reference_attention(q, k[:, :, 48:], v[:, :, 48:],
                                              np.arange(48, 64), 64)) <= TOL


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_out_argument(backend, dtype):
    g = np.random.default_rng(5)
    cache = KVCache(1, 2, 64, max_seq_len=256, batch_size=2, dtype=dtype, block_size=32)
    k, v = randn(g, (2, 2, 100, 64), dtype), randn(g, (2, 2, 100, 64), dtype)
    write(cache, 0, k, v)
    q = randn(g, (2, 4, 3, 64))
    dest = np.full(q.shape, 7.0, dtype=np.float32)
    res = cache.attention(0, q, out=dest)
    assert res is dest
    assert rel_error(dest, reference_attention(q, k, v, np.arange(100), 100)) <= TOL
    assert np.array_equal(dest, cache.attention(0, q))
    # out= with an explicit scale
    res = cache.attention(0, q, 0.5, out=dest)
    assert res is dest
    assert rel_error(dest, reference_attention(q, k, v, np.arange(100), 100, 0.5)) <= TOL


@pytest.mark.parametrize("qdtype", ["float16", "float64"])
def test_query_dtypes(backend, qdtype):
    """float16 and float64 queries work and match the float32 query's result
    (the kernel takes q in float32: float64 rounds to it first)."""
    g = np.random.default_rng(8)
    cache = KVCache(1, 2, 64, max_seq_len=256, dtype="float32", block_size=32)
    k, v = randn(g, (1, 2, 120, 64)), randn(g, (1, 2, 120, 64))
    write(cache, 0, k, v)
    q = randn(g, (1, 4, 2, 64), qdtype)
    out = cache.attention(0, q)
    assert out.dtype == np.float32
    assert rel_error(out, reference_attention(q, k, v, np.arange(120), 120)) <= TOL
    assert np.array_equal(out, cache.attention(0, q.astype(np.float32)))


def test_non_contiguous_query(backend):
    g = np.random.default_rng(9)
    cache = KVCache(1, 2, 32, max_seq_len=256, dtype="float16", block_size=16)
    k, v = randn(g, (1, 2, 70, 32), "float16"), randn(g, (1, 2, 70, 32), "float16")
    write(cache, 0, k, v)
    big = randn(g, (1, 4, 3, 64), "float64")
    q = big[..., ::2]                                   # strided
    assert not q.flags.c_contiguous
    qt = np.ascontiguousarray(randn(g, (1, 3, 4, 32))).transpose(0, 2, 1, 3)  # [1, 4, 3, 32]
    assert not qt.flags.c_contiguous
    for qq in (q, qt):
        out = cache.attention(0, qq)
        assert rel_error(out, reference_attention(qq, k, v, np.arange(70), 70)) <= TOL
        assert np.array_equal(out, cache.attention(0, np.ascontiguousarray(qq)))


def test_causal_rows_match_shorter_cache(backend):
    """Query i of a t_q-query call sees exactly the cache cut at its own
    position: it equals a one-query call on a copy truncated there."""
    g = np.random.default_rng(12)
    k, v = randn(g, (1, 2, 150, 32)), randn(g, (1, 2, 150, 32))
    q = randn(g, (1, 4, 5, 32))
    full = KVCache(1, 2, 32, max_seq_len=256, dtype="float32", block_size=16)
    write(full, 0, k, v)
    out = full.attention(0, q)
    for i in range(5):
        short = KVCache(1, 2, 32, max_seq_len=256, dtype="float32", block_size=16)
        write(short, 0, k[:, :, :146 + i], v[:, :, :146 + i])
        one = short.attention(0, q[:, :, i:i + 1])
        assert rel_error(out[:, :, i:i + 1], one) <= 1e-6, i


# --------------------------------------------- 2. backends vs the scalar one

EQ_TIERS = ["float16", "float32", "int8", "int4", "fp16", LOSSLESS]


def tier_data(g, *, heads=2, dim=64, n=300, batch=2, extra=100, lossless=False):
    """float16-exact K/V for build_tiered: (k, v, k_extra, v_extra) float32."""
    def gen(t):
        k = g.standard_normal((batch, heads, t, dim))
        # A per-channel offset in the values gives quantization ranges to use.
        v = g.standard_normal((batch, heads, t, dim)) + np.linspace(-2, 2, dim)
        if lossless:   # low mantissa bits zero: the codec has something to shrink
            k, v = np.round(k * 8) / 8, np.round(v * 8) / 8
        return k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    return gen(n) + gen(extra)


def build_tiered(tier, data, *, dtype=None, block=64, keep_first=None, mixed=False):
    """A one-layer cache holding `data` (see tier_data) with its blocks
    compressed to `tier`: a store dtype for full tiers; "fp16" implies a
    float32 store; other tiers a float16 store unless `dtype` says.  With
    `mixed`, more tokens follow the compression (a full tail)."""
    k, v, k2, v2 = data
    if tier in ("float16", "float32"):
        dtype, strategy = tier, None
    else:
        dtype = dtype or ("float32" if tier == "fp16" else "float16")
        strategy = tier
    batch, heads, n, dim = k.shape
    cache = KVCache(1, heads, dim, max_seq_len=1024, batch_size=batch, dtype=dtype,
                    block_size=block, residual_tokens=0, keep_first=keep_first)
    write(cache, 0, k.astype(dtype), v.astype(dtype), chunk=77)
    if strategy is not None:
        done = cache.compress_old_entries(0, strategy=strategy)
        assert done.blocks > 0, (tier, done)
    if mixed:
        write(cache, 0, k2.astype(dtype), v2.astype(dtype), start=n)
    return cache


def dequantized_reference(cache, make_twin, q, scale=None, layer=0):
    """The reference over what the cache holds, at float32 precision.

    A float32 store's keys()/values() are the dequantized values the kernel
    reads.  A float16 store's round them to float16 (the kernel attends on
    float32 dequantized INT8/INT4 values, not on those), so there the values
    come from `make_twin("float32")`: the same float16-exact data in a
    float32 store, which holds the same codes, scales and zeros (checked:
    same tiers, and its contents round to the float16 store's bit for bit).
    """
    keys, values = cache.keys(layer), cache.values(layer)
    if cache.dtype == np.float16 and tiers_used(cache, layer) & {"int8", "int4"}:
        twin = make_twin("float32")
        assert twin.block_tiers(layer) == cache.block_tiers(layer)
        assert np.array_equal(twin.positions(layer), cache.positions(layer))
        tk, tv = twin.keys(layer), twin.values(layer)
        assert np.array_equal(tk.astype(np.float16), keys)
        assert np.array_equal(tv.astype(np.float16), values)
        keys, values = tk, tv
    return reference_attention(q, keys, values, cache.positions(layer), cache.seq_len(layer),
                               scale)


@pytest.mark.parametrize("t_q", [1, 4])
@pytest.mark.parametrize("tier", EQ_TIERS)
@pytest.mark.parametrize("geom", [dict(heads=2, dim=64, group=2), dict(heads=1, dim=128, group=4),
                                  dict(heads=3, dim=80, group=3)],
                         ids=["h2d64g2", "h1d128g4", "h3d80g3"])
def test_backend_equals_scalar(simd_backend, tier, t_q, geom):
    backend = simd_backend
    g = np.random.default_rng(21)
    data = tier_data(g, heads=geom["heads"], dim=geom["dim"], lossless=tier == "lossless")
    cache = build_tiered(tier, data, mixed=True)
    q = randn(g, (2, geom["heads"] * geom["group"], t_q, geom["dim"]))
    got = cache.attention(0, q)
    _core.set_backend("scalar")
    want = cache.attention(0, q)
    _core.set_backend(backend)
    assert np.array_equal(cache.attention(0, q), got)     # deterministic
    err = rel_error(got, want)
    assert err <= TOL_BACKENDS, (backend, tier, t_q, err)


# ------------------------------------------- 3. compressed tiers vs dequantized


@pytest.mark.parametrize("mixed", [False, True], ids=["all", "mixed"])
@pytest.mark.parametrize("keep_first", [0, 8, None], ids=["kf0", "kf8", "kfdefault"])
@pytest.mark.parametrize(("tier", "dtype"), [
    pytest.param(t, d, marks=pytest.mark.skipif(t == "lossless" and not HAVE_LZ4,
                                                reason="lossless needs lz4"))
    for t in ("int8", "int4", "fp16", "lossless", "adaptive") for d in ("float16", "float32")
    if not (t == "fp16" and d == "float16")])        # FP16 is a float32 store's tier
def test_compressed_matches_dequantized(backend, tier, dtype, keep_first, mixed):
    g = np.random.default_rng(31)
    data = tier_data(g, lossless=tier == "lossless")
    kw = dict(keep_first=keep_first, mixed=mixed, block=32)
    cache = build_tiered(tier, data, dtype=dtype, **kw)
    tiers = tiers_used(cache)
    assert tiers - {"full"}, tiers                   # something is compressed
    if mixed:
        assert "full" in tiers
    q = randn(g, (2, 4, 3, 64))
    out = cache.attention(0, q)
    ref = dequantized_reference(cache, lambda dt: build_tiered(tier, data, dtype=dt, **kw), q)
    err = rel_error(out, ref)
    assert err <= TOL, (backend, tier, dtype, keep_first, mixed, err)


def _multi_tier(dtype, data, keep_first, steps):
    """One layer holding a block tier per strategy of `steps` and a full
    tail: write, compress, write more, compress with the next strategy..."""
    k, v = data
    n = k.shape[2]
    cache = KVCache(1, k.shape[1], k.shape[3], max_seq_len=1024, batch_size=k.shape[0],
                    dtype=dtype, block_size=32, residual_tokens=0, keep_first=keep_first)
    cuts = np.linspace(0, n - 50, len(steps) + 1).astype(int)
    cuts[1:] = (cuts[1:] // 32) * 32
    for (a, b), strategy in zip(zip(cuts[:-1], cuts[1:]), steps):
        write(cache, 0, k[:, :, a:b].astype(dtype), v[:, :, a:b].astype(dtype), start=a)
        cache.compress_old_entries(0, strategy=strategy)
    write(cache, 0, k[:, :, cuts[-1]:].astype(dtype), v[:, :, cuts[-1]:].astype(dtype),
          start=cuts[-1])
    return cache


@pytest.mark.parametrize("keep_first", [0, 8], ids=["kf0", "kf8"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mixed_tiers_in_one_layer(backend, dtype, keep_first):
    g = np.random.default_rng(32)
    k = (np.round(g.standard_normal((2, 2, 500, 64)) * 8) / 8).astype(np.float16)
    v = (np.round(g.standard_normal((2, 2, 500, 64)) * 8) / 8).astype(np.float16)
    data = (k.astype(np.float32), v.astype(np.float32))
    steps = ["int8", "int4"] + (["lossless"] if HAVE_LZ4 else []) + (
        ["fp16"] if dtype == "float32" else [])
    cache = _multi_tier(dtype, data, keep_first, steps)
    assert tiers_used(cache) == {"full", *steps}
    for t_q in (1, 5):
        q = randn(g, (2, 6, t_q, 64))
        ref = dequantized_reference(cache, lambda dt: _multi_tier(dt, data, keep_first, steps),
                                    q)
        err = rel_error(cache.attention(0, q), ref)
        assert err <= TOL, (backend, dtype, t_q, err)


@pytest.mark.parametrize("budget", [0.0, 0.02, 0.10, 0.5])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_adaptive_real_data(backend, dtype, budget):
    """ADAPTIVE's choice per block (real data: a sink-heavy layer)."""
    k, v = _real(15)
    q = _real_q(15)

    def make(dt):
        cache = KVCache(1, 3, 64, max_seq_len=2048, dtype=dt, block_size=64,
                        residual_tokens=100, compression="adaptive", error_budget=budget)
        write(cache, 0, k.astype(dt), v.astype(dt), chunk=500)
        cache.compress_old_entries(0)
        return cache

    cache = make(dtype)
    if dtype == "float32":
        assert tiers_used(cache) - {"full"}
    err = rel_error(cache.attention(0, q), dequantized_reference(cache, make, q))
    assert err <= TOL, (budget, tiers_used(cache), err)


@pytest.mark.skipif(not HAVE_LZ4, reason="lossless needs lz4")
def test_lossless_many_blocks_shared_rows(backend):
    """More LOSSLESS blocks than one decode pass takes (8), some shared by
    several batch rows after reorder_batch."""
    g = np.random.default_rng(34)
    k = (np.round(g.standard_normal((2, 2, 400, 32)) * 8) / 8).astype(np.float16)
    v = (np.round(g.standard_normal((2, 2, 400, 32)) * 8) / 8).astype(np.float16)
    cache = KVCache(1, 2, 32, max_seq_len=512, batch_size=2, block_size=16, residual_tokens=0,
                    keep_first=3)
    write(cache, 0, k, v, chunk=50)
    cache.compress_old_entries(0, strategy="lossless")
    assert sum(t == "lossless" for t in cache.block_tiers(0)[0]) == 25
    cache.reorder_batch([1, 0, 1])
    k, v = k[[1, 0, 1]], v[[1, 0, 1]]
    assert np.array_equal(cache.keys(0), k) and np.array_equal(cache.values(0), v)
    for t_q in (1, 6):
        q = randn(g, (3, 4, t_q, 32))
        out = cache.attention(0, q)
        assert rel_error(out, reference_attention(q, k, v, np.arange(400), 400)) <= TOL
        assert np.array_equal(out[0], cache.attention(0, q[[0, 1, 0]])[2])


@pytest.mark.parametrize("tier", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_compressed_ring_with_sinks(backend, dtype, tier):
    g = np.random.default_rng(33)
    k = g.standard_normal((1, 2, 350, 32)).astype(np.float16)
    v = g.standard_normal((1, 2, 350, 32)).astype(np.float16)

    def make(dt):
        cache = KVCache(1, 2, 32, max_seq_len=100, sink_tokens=4, block_size=16,
                        dtype=dt, residual_tokens=0)
        write(cache, 0, k.astype(dt), v.astype(dt), chunk=3)
        cache.compress_old_entries(0, strategy=tier)
        return cache

    cache = make(dtype)
    assert tier in tiers_used(cache)
    assert np.array_equal(cache.positions(0), ring_positions(350, 100, 4))
    for t_q in (1, 3):
        q = randn(g, (1, 4, t_q, 32))
        err = rel_error(cache.attention(0, q), dequantized_reference(cache, make, q))
        assert err <= TOL, (dtype, tier, t_q, err)


# ----------------------------------------------------- 4. real-data floors

def _layers_in_both():
    if not (KV_FILE.exists() and Q_FILE.exists()):
        return []
    with np.load(KV_FILE) as kv, np.load(Q_FILE) as qd:
        ks = {int(n[3:]) for n in kv.files if n.startswith("k_L")}
        qs = {int(n[3:]) for n in qd.files if n.startswith("q_L")}
    return sorted(ks & qs)


REAL_LAYERS = _layers_in_both()


def _real(layer):
    with np.load(KV_FILE) as d:
        return d[f"k_L{layer}"][None], d[f"v_L{layer}"][None]


def _real_q(layer):
    with np.load(Q_FILE) as d:
        return d[f"q_L{layer}"][None]


def test_real_data_present():
    assert {0, 1, 8, 15} <= set(REAL_LAYERS), REAL_LAYERS


@pytest.mark.parametrize("store", list(REAL_FLOORS))
@pytest.mark.parametrize("layer", REAL_LAYERS)
def test_real_data_floors(backend, layer, store):
    k, v = _real(layer)                      # [1, 3, 1492, 64] float16
    q = _real_q(layer)                       # [1, 9, 16, 64] float32
    n = k.shape[2]
    dtype = "float32" if store == "float32" else "float16"
    strategy = store if store in ("int8", "int4") else None
    cache = KVCache(1, 3, 64, max_seq_len=2048, dtype=dtype, residual_tokens=0)
    write(cache, 0, k.astype(dtype), v.astype(dtype))
    if strategy:
        cache.compress_old_entries(0, strategy=strategy)
        assert strategy in tiers_used(cache)
    out = cache.attention(0, q)
    ref = reference_attention(q, k, v, np.arange(n), n, 1 / 8)
    err = rel_error(out, ref)
    assert err <= REAL_FLOORS[store], f"layer {layer} {store} ({backend}): rel error {err:.3g}"


# ------------------------------------------------- 5. hits / misses accounting

def test_hits_full_cache():
    g = np.random.default_rng(41)
    cache = KVCache(2, 2, 32, max_seq_len=64, sink_tokens=4, batch_size=3, block_size=16)
    write(cache, 0, randn(g, (3, 2, 150, 32), "float16"), randn(g, (3, 2, 150, 32), "float16"),
          chunk=10)
    write(cache, 1, randn(g, (3, 2, 40, 32), "float16"), randn(g, (3, 2, 40, 32), "float16"))
    held = cache.held(0)
    assert held == 64
    for layer, t_q in ((0, 1), (0, 4), (1, 2)):
        before = cache.stats()
        cache.attention(layer, randn(g, (3, 4, t_q, 32)))
        after = cache.stats()
        d = after - before
        assert d.hits == cache.held(layer) * 3, (layer, t_q, d.hits)
        assert d.misses == 0
        assert d.per_layer[layer]["hits"] == cache.held(layer) * 3
        assert d.per_layer[1 - layer]["hits"] == 0


@pytest.mark.parametrize("tier", ["int8", "int4", LOSSLESS])
def test_misses_compressed(tier):
    g = np.random.default_rng(42)
    data = tier_data(g, n=300, batch=2, lossless=tier == "lossless")
    cache = build_tiered(tier, data, block=64, mixed=True)   # 400 tokens
    tiers = cache.block_tiers(0)
    pos = cache.positions(0)
    bs = cache.block_size
    compressed = [sum(tiers[r][p // bs] != "full" for p in pos) for r in range(2)]
    assert 0 < compressed[0] < len(pos)
    before = cache.stats()
    cache.attention(0, randn(g, (2, 4, 2, 64)))
    d = cache.stats() - before
    assert d.misses == sum(compressed)
    assert d.hits == 2 * len(pos) - sum(compressed)


def test_metrics_off_counts_nothing():
    g = np.random.default_rng(43)
    cache = KVCache(1, 2, 32, max_seq_len=512, block_size=16, metrics=False, residual_tokens=0)
    write(cache, 0, randn(g, (1, 2, 300, 32), "float16"), randn(g, (1, 2, 300, 32), "float16"))
    cache.compress_old_entries(0, strategy="int8")
    cache.attention(0, randn(g, (1, 2, 2, 32)))
    cache.attention(0, randn(g, (1, 2, 1, 32)), prefetch=True)
    cache.prefetch(0, 300)
    s = cache.stats()
    assert s.hits == 0 and s.misses == 0
    pl = s.per_layer[0]
    assert pl["hits"] == pl["misses"] == pl["prefetches"] == pl["prefetch_bytes"] == 0


# -------------------------------------------------------------- 6. prefetch

def _filled(g, *, n=300, heads=2, dim=64, block=64, dtype="float16", layers=1, msl=1024):
    cache = KVCache(layers, heads, dim, max_seq_len=msl, dtype=dtype, block_size=block)
    write(cache, 0, randn(g, (1, heads, n, dim), dtype), randn(g, (1, heads, n, dim), dtype))
    return cache


def _scattered(g, *, n=300, heads=2, dim=64, block=16):
    """Layer 0 of a two-layer cache filled a block at a time, in turn with
    layer 1: its consecutive blocks are never next to each other in memory,
    whatever state earlier tests left the heap in (blocks taken back to back
    from a fresh heap would all "follow" each other, and nothing is hinted)."""
    cache = KVCache(2, heads, dim, max_seq_len=1024, dtype="float16", block_size=block)
    k, v = randn(g, (1, heads, n, dim), "float16"), randn(g, (1, heads, n, dim), "float16")
    for start in range(0, n, block):
        end = min(n, start + block)
        for layer in (0, 1):
            cache.update(layer, k[:, :, start:end], v[:, :, start:end], end)
    return cache


def test_kernel_prefetch_counted():
    g = np.random.default_rng(51)
    cache = _scattered(g, n=300, block=16)
    q = randn(g, (1, 4, 1, 64))
    c0 = layer_counters(cache)
    out_on = cache.attention(0, q, prefetch=True)
    c1 = layer_counters(cache)
    out_off = cache.attention(0, q, prefetch=False)
    c2 = layer_counters(cache)
    if PREFETCH_BUILTIN:
        assert c1["prefetches"] > c0["prefetches"]
    assert c2["prefetches"] == c1["prefetches"]            # prefetch=False issues none
    assert c2["prefetch_bytes"] == c1["prefetch_bytes"]
    for c in (c0, c1, c2):
        assert c["prefetch_bytes"] == 64 * c["prefetches"]
    assert np.array_equal(out_on, out_off)                 # hints never change results
    # The same call hints the same lines every time.
    cache.attention(0, q, prefetch=True)
    c3 = layer_counters(cache)
    assert c3["prefetches"] - c2["prefetches"] == c1["prefetches"] - c0["prefetches"]
    # Off by default (it measured no faster on the machines we have).
    cache.attention(0, q)
    assert layer_counters(cache)["prefetches"] == c3["prefetches"]


def test_kernel_prefetch_single_run_issues_none():
    """One run (a layer inside one block): there is no next run to hint."""
    g = np.random.default_rng(52)
    cache = _filled(g, n=20, block=64)
    before = layer_counters(cache)
    cache.attention(0, randn(g, (1, 2, 1, 64)), prefetch=True)
    assert layer_counters(cache)["prefetches"] == before["prefetches"]


@pytest.mark.parametrize("tier", ["int8", "int4", "fp16", LOSSLESS])
def test_prefetch_on_off_bit_identical_compressed(backend, tier):
    g = np.random.default_rng(53)
    cache = build_tiered(tier, tier_data(g, lossless=tier == "lossless"), mixed=True)
    q = randn(g, (2, 4, 3, 64))
    assert np.array_equal(cache.attention(0, q, prefetch=True),
                          cache.attention(0, q, prefetch=False))


def test_stats_prefetch_totals():
    """stats().prefetches / prefetch_bytes total the per-layer counters."""
    g = np.random.default_rng(54)
    cache = _filled(g, n=300, block=16, layers=2)
    s0 = cache.stats()
    cache.attention(0, randn(g, (1, 4, 1, 64)))
    nbytes = cache.prefetch(0, 300)
    s = cache.stats()
    assert hasattr(s, "prefetches") and hasattr(s, "prefetch_bytes"), \
        "CacheStats has no prefetches/prefetch_bytes fields"
    assert s.prefetches == sum(pl["prefetches"] for pl in s.per_layer)
    assert s.prefetch_bytes == sum(pl["prefetch_bytes"] for pl in s.per_layer)
    assert s.prefetch_bytes == 64 * s.prefetches
    if PREFETCH_BUILTIN:
        assert s.prefetches > 0
    d = s - s0                                           # counters subtract
    assert d.prefetch_bytes == s.prefetch_bytes - s0.prefetch_bytes >= nbytes
    assert d.prefetches == s.prefetches - s0.prefetches
    cache.reset_stats()
    s = cache.stats()
    assert s.prefetches == s.prefetch_bytes == 0


def test_explicit_prefetch():
    g = np.random.default_rng(55)
    cache = _filled(g, n=300, layers=2)
    with unchanged(cache, allow=("prefetches", "prefetch_bytes")):
        c0 = layer_counters(cache)
        nbytes = cache.prefetch(0, 300)
        assert isinstance(nbytes, int)
        assert nbytes % 64 == 0
        if PREFETCH_BUILTIN:
            assert nbytes > 0
        c1 = layer_counters(cache)
        assert c1["prefetch_bytes"] - c0["prefetch_bytes"] == nbytes
        assert c1["prefetches"] - c0["prefetches"] == nbytes // 64
        assert c1["hits"] == c0["hits"] and c1["misses"] == c0["misses"]
        assert cache.prefetch(0, 0) == 0
        assert cache.prefetch(1, 0) == 0                      # empty layer
        assert cache.prefetch(1, 100) == 0
        assert cache.prefetch(0, 10**9) == cache.prefetch(0, 300)    # clamped to the length
        assert cache.prefetch(0, 10) <= cache.prefetch(0, 300)
        assert layer_counters(cache, 1)["prefetches"] == 0


def test_explicit_prefetch_is_bounded():
    g = np.random.default_rng(56)
    # 8 heads x 128 x float32: 8 KiB per position (K and V), 4 MiB in the layer.
    cache = _filled(g, n=500, heads=8, dim=128, dtype="float32")
    nbytes = cache.prefetch(0, 500)
    assert nbytes % 64 == 0
    assert nbytes <= 512 * 1024 + 128, nbytes
    if PREFETCH_BUILTIN:
        assert nbytes >= 256 * 1024, nbytes


def test_explicit_prefetch_compressed_and_ring():
    g = np.random.default_rng(57)
    for tier in ("int8", "int4"):
        cache = build_tiered(tier, tier_data(g), mixed=True)
        nbytes = cache.prefetch(0, cache.seq_len(0))
        assert nbytes % 64 == 0 and nbytes <= 512 * 1024 + 128
    ring = KVCache(1, 2, 32, max_seq_len=64, sink_tokens=4, block_size=16)
    write(ring, 0, randn(g, (1, 2, 200, 32), "float16"), randn(g, (1, 2, 200, 32), "float16"),
          chunk=9)
    assert ring.prefetch(0, 200) % 64 == 0


@pytest.mark.parametrize("args, exc", [
    ((0, -1), ValueError),
    ((1, 10), IndexError),
    ((-1, 10), IndexError),
    ((0, 1.5), TypeError),
], ids=["negative-seq_len", "layer-too-big", "layer-negative", "float-seq_len"])
def test_explicit_prefetch_bad_args(args, exc):
    g = np.random.default_rng(58)
    cache = _filled(g, n=100)
    with unchanged(cache), pytest.raises(exc):
        cache.prefetch(*args)


# ------------------------------------------------------------ 7. bad input

def _bad_cases():
    B, D = 2, 16
    f32 = np.float32

    def q(shape=(B, 4, 1, D), dtype=f32):
        return np.zeros(shape, dtype=dtype)

    def ro_out():
        a = np.zeros((B, 4, 1, D), f32)
        a.flags.writeable = False
        return a

    return [
        ("q-3d", dict(q=q((B, 4, D))), ValueError),
        ("q-5d", dict(q=q((B, 4, 1, 1, D))), ValueError),
        ("q-wrong-batch", dict(q=q((B + 1, 4, 1, D))), ValueError),
        ("q-wrong-head_dim", dict(q=q((B, 4, 1, D + 1))), ValueError),
        ("q-heads-not-multiple", dict(q=q((B, 3, 1, D))), ValueError),
        ("q-zero-heads", dict(q=q((B, 0, 1, D))), ValueError),
        ("t_q-zero", dict(q=q((B, 4, 0, D))), ValueError),
        ("t_q-beyond-seq_len", dict(q=q((B, 4, 41, D))), ValueError),
        ("q-int", dict(q=q(dtype=np.int32)), TypeError),
        ("q-int8", dict(q=q(dtype=np.int8)), TypeError),
        ("q-complex", dict(q=q(dtype=np.complex64)), TypeError),
        ("q-bool", dict(q=q(dtype=bool)), TypeError),
        ("q-object", dict(q=q(dtype=object)), TypeError),
        ("layer-too-big", dict(layer=3), IndexError),
        ("layer-negative", dict(layer=-1), IndexError),
        ("layer-empty", dict(layer=2), ValueError),
        ("scale-nan", dict(scale=float("nan")), ValueError),
        ("scale-inf", dict(scale=float("inf")), ValueError),
        ("scale-np-neg-inf", dict(scale=np.float32(-np.inf)), ValueError),
        ("scale-str", dict(scale="0.5"), TypeError),
        ("scale-bool", dict(scale=True), TypeError),
        ("scale-np-bool", dict(scale=np.bool_(True)), TypeError),
        ("scale-complex", dict(scale=1j), TypeError),
        ("scale-np-complex", dict(scale=np.complex128(1 + 2j)), TypeError),
        ("out-float64", dict(out=np.zeros((B, 4, 1, D), np.float64)), TypeError),
        ("out-float16", dict(out=np.zeros((B, 4, 1, D), np.float16)), TypeError),
        ("out-list", dict(out=[[0.0]]), TypeError),
        ("out-wrong-shape", dict(out=np.zeros((B, 4, 2, D), f32)), ValueError),
        ("out-non-contiguous", dict(out=np.zeros((B, 4, 1, 2 * D), f32)[..., ::2]), ValueError),
        ("out-fortran", dict(out=np.asfortranarray(np.zeros((B, 4, 1, D), f32))), ValueError),
        ("out-read-only", dict(out=ro_out()), ValueError),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("kw, exc", [(c[1], c[2]) for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input(kw, exc):
    g = np.random.default_rng(61)
    cache = KVCache(3, 2, 16, max_seq_len=128, batch_size=2, block_size=16, residual_tokens=0,
                    dtype="float32")
    for layer in (0, 1):
        write(cache, layer, randn(g, (2, 2, 40, 16), "float16"),
              randn(g, (2, 2, 40, 16), "float16"))
    cache.compress_old_entries(0, strategy="int8")        # layer 1 stays partly full
    args = dict(layer=1, q=np.zeros((2, 4, 1, 16), np.float32), scale=None, out=None)
    args.update(kw)
    out_before = args["out"].copy() if isinstance(args["out"], np.ndarray) else None
    with unchanged(cache), pytest.raises(exc):
        cache.attention(args["layer"], args["q"], args["scale"], out=args["out"])
    if out_before is not None:
        assert np.array_equal(args["out"], out_before, equal_nan=True)   # out untouched
    # The cache still answers.
    q = randn(g, (2, 4, 2, 16))
    assert rel_error(cache.attention(1, q), ref_on_cache(cache, 1, q)) <= TOL


def test_attention_on_list_query():
    g = np.random.default_rng(62)
    cache = KVCache(1, 1, 4, max_seq_len=64, dtype="float32", block_size=16)
    k, v = randn(g, (1, 1, 10, 4)), randn(g, (1, 1, 10, 4))
    write(cache, 0, k, v)
    q = randn(g, (1, 2, 1, 4), "float64")
    out = cache.attention(0, q.tolist())
    assert rel_error(out, reference_attention(q, k, v, np.arange(10), 10)) <= TOL


# -------------------------------------------------------- 8. property test

def _examples():
    return max(10, settings().max_examples // 2)


@st.composite
def configs(draw):
    heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([4, 8, 16, 32, 64]))
    block = draw(st.sampled_from([16, 32, 64]))
    dtype = draw(st.sampled_from(["float16", "float32"]))
    length = draw(st.integers(1, 300))
    t_q = draw(st.integers(1, min(4, length)))
    ring = draw(st.booleans())
    if ring:
        sinks = draw(st.integers(0, 4))
        msl = draw(st.integers(max(8, sinks + 1), 128))
    else:
        sinks, msl = 0, 512
    strategies = [None, "int8", "int4"] + (["lossless"] if HAVE_LZ4 else [])
    if dtype == "float32":
        strategies.append("fp16")
    strategy = draw(st.sampled_from(strategies))
    residual = draw(st.sampled_from([0, 16]))
    keep_first = draw(st.sampled_from([0, 2, None]))
    batch = draw(st.integers(1, 2))
    max_chunk = draw(st.sampled_from([1, 7, 64, 300]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(heads=heads, group=group, dim=dim, block=block, dtype=dtype, length=length,
                t_q=t_q, ring=ring, sinks=sinks, msl=msl, strategy=strategy,
                residual=residual, keep_first=keep_first, batch=batch, max_chunk=max_chunk,
                seed=seed)


@settings(max_examples=_examples(), suppress_health_check=[HealthCheck.too_slow],
          deadline=None)
@given(cfg=configs())
def test_property_matches_reference(cfg):
    g = np.random.default_rng(cfg["seed"])
    B, H, D, n = cfg["batch"], cfg["heads"], cfg["dim"], cfg["length"]
    # float16-exact data, so that a float32 twin holds the same codes.
    k = g.standard_normal((B, H, n, D)).astype(np.float16)
    v = g.standard_normal((B, H, n, D)).astype(np.float16)
    cuts = [0]
    while cuts[-1] < n:
        cuts.append(min(n, cuts[-1] + int(g.integers(1, cfg["max_chunk"] + 1))))

    def make(dtype):
        cache = KVCache(1, H, D, max_seq_len=cfg["msl"], batch_size=B, dtype=dtype,
                        block_size=cfg["block"], sink_tokens=cfg["sinks"],
                        overflow="ring" if cfg["ring"] else "error",
                        residual_tokens=cfg["residual"], keep_first=cfg["keep_first"])
        for s, e in zip(cuts[:-1], cuts[1:]):
            cache.update(0, k[:, :, s:e].astype(dtype), v[:, :, s:e].astype(dtype), e)
        if cfg["strategy"]:
            cache.compress_old_entries(0, strategy=cfg["strategy"])
        return cache

    cache = make(cfg["dtype"])
    pos = ring_positions(n, cfg["msl"], cfg["sinks"]) if cfg["ring"] else np.arange(n)
    assert np.array_equal(cache.positions(0), pos)
    if cfg["strategy"] is None:      # full tiers: exactly what was written
        assert np.array_equal(cache.keys(0), k[:, :, pos].astype(cfg["dtype"]))
        assert np.array_equal(cache.values(0), v[:, :, pos].astype(cfg["dtype"]))
    q = randn(g, (B, H * cfg["group"], cfg["t_q"], D))
    out = cache.attention(0, q)
    assert out.shape == q.shape and out.dtype == np.float32
    ref = dequantized_reference(cache, make, q)
    err = rel_error(out, ref)
    assert err <= TOL_PROPERTY, (cfg, tiers_used(cache), err)
    # Prefetch hints change nothing; the scalar kernel meets the same bound.
    # (Not TOL_BACKENDS against `out`: over a few hundred tokens whose
    # weighted sum cancels, float32 rounding alone reaches ~1e-6 relative,
    # e.g. 9.8e-7 scalar vs 2.5e-7 avx512 against the float64 reference.)
    assert np.array_equal(cache.attention(0, q, prefetch=False), out)
    prev = _core.backend()
    if prev != "scalar":
        _core.set_backend("scalar")
        try:
            scalar = cache.attention(0, q)
        finally:
            _core.set_backend(prev)
        err = rel_error(scalar, ref)
        assert err <= TOL_PROPERTY, (cfg, "scalar", err)


# ---------------------------------------------------------------- 9. threads

def test_threads():
    g = np.random.default_rng(91)
    L, B, H, D, CALLS = 4, 2, 2, 64, 50
    cache = KVCache(L, H, D, max_seq_len=512, batch_size=B, block_size=32, residual_tokens=0)
    for layer in range(L):
        write(cache, layer, randn(g, (B, H, 100 + 50 * layer, D), "float16"),
              randn(g, (B, H, 100 + 50 * layer, D), "float16"))
    cache.compress_old_entries(0, strategy="int8")
    write(cache, 0, randn(g, (B, H, 40, D), "float16"), randn(g, (B, H, 40, D), "float16"),
          start=100)
    write(cache, 1, randn(g, (B, H, 40, D), "float16"), randn(g, (B, H, 40, D), "float16"),
          start=150)
    qs = [randn(g, (B, 2 * H, 1 + layer % 3, D)) for layer in range(L)]
    q_same = randn(g, (B, 2 * H, 2, D))
    serial = [cache.attention(layer, qs[layer]) for layer in range(L)]
    serial_same = cache.attention(0, q_same)
    before = cache.stats()
    per_call = []
    for layer in range(L):        # hits/misses/prefetches of one call, per layer
        b = cache.stats().per_layer[layer]
        cache.attention(layer, qs[layer])
        a = cache.stats().per_layer[layer]
        per_call.append({k: a[k] - b[k] for k in ("hits", "misses", "prefetches")})
    before = cache.stats()

    start = threading.Barrier(L + 1)
    bad, errors = [], []

    def work(layer, q, want):
        try:
            start.wait()
            for i in range(CALLS):
                got = cache.attention(layer, q)
                if not np.array_equal(got, want):
                    bad.append((layer, i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(layer, qs[layer], serial[layer]))
               for layer in range(L)]
    threads.append(threading.Thread(target=work, args=(0, q_same, serial_same)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not bad, bad[:10]
    d = cache.stats() - before
    for layer in range(L):
        calls = CALLS * (2 if layer == 0 else 1)
        held = cache.held(layer) * B
        pl = d.per_layer[layer]
        assert pl["hits"] + pl["misses"] == calls * held, (layer, pl)
        assert pl["hits"] == calls * per_call[layer]["hits"], (layer, pl)
        assert pl["misses"] == calls * per_call[layer]["misses"], (layer, pl)
    assert d.per_layer[0]["misses"] > 0
    for layer in range(1, L):
        assert d.per_layer[layer]["prefetches"] == CALLS * per_call[layer]["prefetches"]


# --------------------------------------------------------- 10. NaN / inf

def test_nan_value_propagates_to_rows_reading_it(backend):
    """Behaviour: a NaN stored in a value makes the output of every query
    that attends to it NaN (in that value's channel at least); other KV
    heads and other batch rows are untouched; nothing crashes."""
    g = np.random.default_rng(101)
    cache = KVCache(1, 2, 8, max_seq_len=64, batch_size=2, block_size=16, dtype="float32")
    k, v = randn(g, (2, 2, 20, 8)), randn(g, (2, 2, 20, 8))
    v[0, 0, 10, 3] = np.nan
    write(cache, 0, k, v)
    q = randn(g, (2, 4, 1, 8))                      # group 2: q heads 0, 1 read kv head 0
    out = cache.attention(0, q)
    assert np.isnan(out[0, 0:2, 0, 3]).all()
    finite = np.ones(out.shape, bool)
    finite[0, 0:2] = False
    assert np.isfinite(out[finite]).all()
    ref = reference_attention(q, k, v, np.arange(20), 20)
    assert rel_error(out[1], ref[1]) <= TOL
    assert rel_error(out[0, 2:], ref[0, 2:]) <= TOL


def test_nan_key_poisons_only_queries_that_see_it(backend):
    g = np.random.default_rng(102)
    cache = KVCache(1, 1, 8, max_seq_len=64, block_size=16, dtype="float32")
    k, v = randn(g, (1, 1, 20, 8)), randn(g, (1, 1, 20, 8))
    k[0, 0, 10, 5] = np.nan
    write(cache, 0, k, v)
    q = randn(g, (1, 1, 20, 8))                     # positions 0..19
    out = cache.attention(0, q)
    assert np.isnan(out[0, 0, 10:]).any(axis=-1).all()
    assert np.isfinite(out[0, 0, :10]).all()
    ref = reference_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], np.arange(10), 10)
    assert rel_error(out[:, :, :10], ref) <= TOL


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("bad_pos", [10, 18], ids=["same-block", "later-block"])
def test_non_finite_future_value_does_not_leak_into_earlier_queries(backend, bad, bad_pos):
    """Causality: query i depends only on positions <= its own, so a
    non-finite value stored at a later position must not reach it."""
    g = np.random.default_rng(103)
    cache = KVCache(1, 1, 8, max_seq_len=64, block_size=16, dtype="float32")
    k, v = randn(g, (1, 1, 20, 8)), randn(g, (1, 1, 20, 8))
    v[0, 0, bad_pos, 3] = bad
    write(cache, 0, k, v)
    q = randn(g, (1, 1, 20, 8))                     # positions 0..19
    out = cache.attention(0, q)
    early = out[0, 0, :bad_pos]
    assert np.isfinite(early).all(), (
        f"rows {np.where(~np.isfinite(early).all(-1))[0].tolist()} (positions < {bad_pos}) "
        f"are non-finite")
    ref = reference_attention(q[:, :, :bad_pos], k[:, :, :bad_pos], v[:, :, :bad_pos],
                              np.arange(bad_pos), bad_pos)
    assert rel_error(out[:, :, :bad_pos], ref) <= TOL


# ------------------------------------------------------------ backend API

def test_backend_lists():
    compiled, available = _api("compiled_backends")(), _api("available_backends")()
    assert compiled and available
    assert "scalar" in available and available[-1] == "scalar"
    assert set(available) <= set(compiled)
    assert [b for b in compiled if b in available] == available      # same order
    assert _api("backend")() in available
    feats = _api("cpu_features")()
    assert isinstance(feats, dict) and all(isinstance(x, bool) for x in feats.values())
    for key in ("avx2_fma_f16c", "avx512", "neon", "prefetch_builtin"):
        assert key in feats
    if "avx512" in available:
        assert feats["avx512"] and feats["os_saves_zmm"]
    if "avx2" in available:
        assert feats["avx2_fma_f16c"] and feats["os_saves_ymm"]
    if "neon" in available:
        assert feats["neon"]


def test_set_backend():
    backend, set_backend = _api("backend"), _api("set_backend")
    available = _api("available_backends")()
    prev = backend()
    try:
        for name in available:
            assert set_backend(name) == name
            assert backend() == name
        assert set_backend(None) == available[0]
        assert backend() == available[0]
        assert set_backend() == available[0]
        cur = backend()
        for bad in ("nonesuch", "", "AVX2 ", "Scalar"):
            with pytest.raises(ValueError):
                set_backend(bad)
            assert backend() == cur
        for bad in (3, b"scalar", ["scalar"], 1.0):
            with pytest.raises(TypeError):
                set_backend(bad)
            assert backend() == cur
        for name in set(_api("compiled_backends")()) - set(available):
            with pytest.raises(ValueError, match="cannot run"):
                set_backend(name)
            assert backend() == cur
    finally:
        set_backend(prev)


def test_top_level_reexports():
    names = ("backend", "set_backend", "available_backends", "compiled_backends",
             "cpu_features")
    for n in names:
        assert getattr(kvcache, n) is getattr(_core, n), n
    assert _api("backend")() == _core.backend()


def test_show_runtime(capsys):
    kvcache.show_runtime()
    text = capsys.readouterr().out
    assert _core.backend() in text
    d = kvcache.runtime_info()
    assert d["attention_backend"] == _core.backend()
    assert d["available_backends"] == _core.available_backends()
    assert d["compiled_backends"] == _core.compiled_backends()


_CHILD = """
import json, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import kvcache._core as c
print(json.dumps(dict(backend=c.backend(), available=c.available_backends(),
      warnings=[[x.category.__name__, str(x.message)] for x in w])))
"""


def _child(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items()
           if k not in ("KVCACHE_BACKEND", "KVCACHE_DISABLE_SIMD")}
    env.update(env_vars)
    r = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_env_default(tmp_path):
    r = _child(tmp_path)
    assert r["backend"] == r["available"][0]
    assert not [w for w in r["warnings"] if "KVCACHE" in w[1]]


def test_env_disable_simd(tmp_path):
    r = _child(tmp_path, KVCACHE_DISABLE_SIMD="1", KVCACHE_BACKEND=AVAILABLE[0])
    assert r["backend"] == "scalar"
    assert not r["warnings"]


@pytest.mark.parametrize("name", AVAILABLE)
def test_env_backend(tmp_path, name):
    r = _child(tmp_path, KVCACHE_BACKEND=name.upper())
    assert r["backend"] == name
    assert not r["warnings"]


def test_env_unknown_backend_warns(tmp_path):
    r = _child(tmp_path, KVCACHE_BACKEND="nonesuch")
    assert r["backend"] == r["available"][0]
    warns = [w for w in r["warnings"] if w[0] == "RuntimeWarning"]
    assert warns and "nonesuch" in warns[0][1], r["warnings"]


def test_env_unrunnable_backend_warns(tmp_path):
    unrunnable = sorted(set(COMPILED) - set(AVAILABLE))
    if not unrunnable:
        pytest.skip("every compiled backend runs on this CPU")
    r = _child(tmp_path, KVCACHE_BACKEND=unrunnable[0])
    assert r["backend"] == r["available"][0]
    assert [w for w in r["warnings"] if w[0] == "RuntimeWarning"], r["warnings"]
