"""Helpers shared by the test modules (importable: pyproject puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "smollm2_kv_prose.npz"
DATA_LAYERS = (0, 1, 8, 15, 22, 29)
DATA_TOKENS = 1492
DATA_HEADS = 3
DATA_HEAD_DIM = 64


@cache
def _load() -> dict[str, np.ndarray]:
    with np.load(DATA) as d:
        return {name: d[name] for name in d.files}


def real_kv(layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Real keys and values of a SmolLM2 layer, float16 [1, 3, 1492, 64] (read-only)."""
    d = _load()
    k, v = d[f"k_L{layer}"][None], d[f"v_L{layer}"][None]
    k.flags.writeable = False
    v.flags.writeable = False
    return k, v


def contents(cache) -> list:
    """Everything observable per layer (reads count as hits: take counters first)."""
    out = []
    for i in range(cache.num_layers):
        out.append(dict(keys=cache.keys(i), values=cache.values(i),
                        positions=cache.positions(i), seq_len=cache.seq_len(i),
                        capacity=cache.capacity(i), held=cache.held(i)))
    return out


def counters(cache) -> dict:
    s = cache.stats()
    d = s.as_dict()
    d["per_layer"] = [dict(x) for x in s.per_layer]
    return d


def assert_same_contents(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for key in ("seq_len", "capacity", "held"):
            assert x[key] == y[key], (i, key, x[key], y[key])
        for key in ("keys", "values", "positions"):
            assert x[key].dtype == y[key].dtype, (i, key)
            assert x[key].shape == y[key].shape, (i, key, x[key].shape, y[key].shape)
            assert np.array_equal(x[key], y[key], equal_nan=x[key].dtype.kind == "f"), (i, key)


def snapshot(cache) -> tuple:
    """(counters, contents), counters taken before the reads that count as hits."""
    c = counters(cache)
    return c, contents(cache)


def assert_unchanged(cache, before: tuple) -> None:
    """The cache is exactly as `before` (a snapshot taken right before a failed call)."""
    c_before, k_before = before
    # snapshot() read every layer after taking counters: account for those hits.
    c_now = counters(cache)
    reads = sum(2 * x["held"] * cache.batch_size for x in k_before)
    assert c_now["hits"] - c_before["hits"] == reads
    for key in c_before:
        if key in ("hits", "hit_rate", "per_layer", "memory_efficiency"):
            continue
        assert c_now[key] == c_before[key], (key, c_before[key], c_now[key])
    for i, (a, b) in enumerate(zip(c_before["per_layer"], c_now["per_layer"])):
        for key in a:
            if key != "hits":
                assert a[key] == b[key], (i, key, a[key], b[key])
    assert_same_contents(k_before, contents(cache))


def rand_kv(rng: np.random.Generator, batch: int, heads: int, t: int, head_dim: int,
            dtype="float16") -> tuple[np.ndarray, np.ndarray]:
    k = rng.standard_normal((batch, heads, t, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, heads, t, head_dim)).astype(dtype)
    return k, v


def layout(a: np.ndarray, how: str) -> np.ndarray:
    """The same logical array ``a`` in another memory layout.

    Only ``fortran`` and ``readonly`` apply to an array that is not 4-D or not
    numeric (the fuzzer's bad arguments); the others, and ``broadcast`` /
    ``unaligned`` where the shape or item size rules them out, return ``a``.
    """
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b
    if how not in ("c", "transposed", "neg_t", "neg_d", "strided", "swapped", "broadcast",
                   "unaligned"):
        raise AssertionError(how)
    if how == "c" or a.ndim != 4 or a.dtype.kind in "OUM":
        return a
    if how == "transposed":
        return np.ascontiguousarray(a.swapaxes(2, 3)).swapaxes(2, 3)
    if how == "neg_t":
        return np.ascontiguousarray(a[:, :, ::-1])[:, :, ::-1]
    if how == "neg_d":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if how == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if how == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if how == "broadcast" and a.shape[2] > 0:
        return np.broadcast_to(a[:, :, :1], a.shape)
    if how == "unaligned" and a.dtype.itemsize > 1:
        raw = np.zeros(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
        raw[...] = a
        return raw
    return a


def tool_module(name: str):
    """The script tools/<name>.py of the checkout, imported as a module."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
