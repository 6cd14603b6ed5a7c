"""The ``attention`` section: one decode query against one layer.

9 query heads over the 3 KV heads, one query token, at each context:
numpy on float32 K/V materialized once, untimed (numpy's best case: matmul,
einsum and a per-head loop, the fastest being the "vs numpy" base), torch's
``scaled_dot_product_attention`` on the same float32 data (when torch
imports), ``KVCache.attention`` per available kernel backend on the float16
store and with the best backend on INT8 and INT4 stores (every whole block
quantized), and one core's read bandwidth (``np.max`` and ``np.sum`` over a
float32 view of a buffer the size of the float16 K+V; the faster is the
roofline).  Every variant is timed in blocks of repeated calls, the variants
taking turns block by block (``time_rounds``); numpy's BLAS (with
threadpoolctl) and torch run one thread, as the kernel does.  GB/s counts
the bytes each variant reads.
"""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np

from .common import (
    BATCH,
    GROUP,
    HEAD_DIM,
    HEADS,
    Q_HEADS,
    TOKEN_BYTES,
    OneThread,
    Progress,
    kernel_facts,
    prefilled,
    summary,
    time_rounds,
    token,
)
from .table import Row, fmt, mib

NAME = "attention"
CONTEXTS = [4096, 32768]


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def _rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def bench_attention(ctx: int, calls: int, rounds: int, progress: bool) -> dict:
    """One decode query (9 heads over 3 KV heads) against one layer of ctx
    tokens: numpy, torch and kvcache per backend and tier, and the read
    bandwidth of one core over the same bytes."""
    from .. import _core
    try:
        import torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
    except ImportError as exc:
        torch, torch_note = None, f"torch not importable ({exc})"
    rng = np.random.default_rng(ctx + 7)
    pre_k, pre_v = token(rng, ctx), token(rng, ctx)
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
    f16 = prefilled(ctx, ctx, pre_k, pre_v, layers=1)
    caches["float16"] = f16
    tier_bytes = {"float16": f16.stats().live_bytes}
    for tier in ("int8", "int4"):
        c = prefilled(ctx, ctx, pre_k, pre_v, layers=1, residual_tokens=0, keep_first=0)
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

    prog = Progress(f"attention ctx={ctx:,}: {len(fns)} variants x {rounds} rounds x "
                     f"{calls} calls", rounds, progress)
    try:
        with OneThread(torch) as one:
            ts = time_rounds(fns, calls, rounds, prog, prepare)
    finally:
        _core.set_backend(None)
    prog.close()
    res = {name: summary(t) for name, t in ts.items()}
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


def rows(res: dict) -> list[Row]:
    out: list[Row] = []
    for a in res.get(NAME, []):
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
                note.append(f"{mib(v['bytes'])} held")
                if name.split()[1] != "float16":
                    note.append("every whole block in the tier (keep_first=0, residual 0)")
            elif name.startswith("read bw"):
                note.append(f"float32 view of a {mib(v['bytes'])} buffer (the float16 K+V's size)")
                if name == roof_name:
                    note.append("the roofline")
            if v["note"]:
                note.append(v["note"])
            t = v["times"]["median_ns"]
            out.append(["attention", f"ctx {ctx:,} {name}", fmt(t / 1e3),
                        "" if name.startswith("read bw") else fmt(v["speedup_vs_numpy"], "x"),
                        f"{v['gb_per_s']:.1f}", f"{v['fraction_of_roofline']:.2f}",
                        fmt(v["time_over_float16"], "r"), "; ".join(note)])
        if a.get("torch_note"):
            out.append(["attention", f"ctx {ctx:,} torch sdpa", "-", "", "", "", "",
                        f"skipped: {a['torch_note']}"])
    return out


def run(settings, meta: dict) -> list[dict]:
    """Every attention context; blocks of ``calls`` timed calls per variant,
    ``rounds`` rounds (see ``time_rounds``)."""
    meta.update(kernel_facts())
    quick = settings.quick
    res = [bench_attention(c, 4 if quick else (12 if c <= 8192 else 6), 3 if quick else 8,
                           settings.progress) for c in settings.attention_contexts]
    meta["attention_threads"] = res[0]["threads"]
    return res


def note(res: dict, meta: dict) -> str:
    return ("attention: each variant timed in blocks of repeated calls (its data as warm "
            "as it stays), the variants taking turns block by block; threads: "
            f"{meta.get('attention_threads', '?')} (kvcache's kernel runs on one).")
