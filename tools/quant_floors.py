#!/usr/bin/env python
"""Check the compressed tiers' error and memory floors on real SmolLM2 K/V.

Uses the plain-numpy reference (tests/quant_reference.py), not the compiled
kernels: this validates the *formulas*.  Data: tests/data/smollm2_kv_prose.npz
(keys/values of layers 0, 1, 8, 15, 22, 29; [3 heads, 1492 tokens, 64], float16)
and tests/data/smollm2_q_prose.npz (queries of the last 16 positions).

Reports
  1. per layer, INT8 and INT4 relative Frobenius and max-abs error of the
     reconstructed keys and values (every full block of 64 tokens quantized);
     floors INT8 <= 1 %, INT4 <= 12 %, keys and values, every layer;
  2. LOSSLESS ratio and what ADAPTIVE picks, per layer;
  3. attention output error with the model's own queries (cache-like: only the
     blocks a cache would compress are quantized), vs a float64 reference;
  4. memory of a 4096-token SmolLM2-shaped cache; floors INT8 >= 44 % and
     INT4 >= 66 % on float16, FP16 >= 47 % and INT8 >= 70 % on float32;
  5. for any missed floor, by how much, and alternatives that would meet it.

Usage:  python tools/quant_floors.py [--block-size 64] [--group8 64] [--group4 32]
                                     [--budget 0.10] [--no-causal]
Exit status 1 when a floor is missed (the report says which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import quant_reference as qr  # noqa: E402

DATA = ROOT / "tests" / "data"
LAYERS = (0, 1, 8, 15, 22, 29)
ERROR_FLOORS = {"int8": 0.01, "int4": 0.12}
MEMORY_FLOORS = {("float16", "int8"): 44.0, ("float16", "int4"): 66.0,
                 ("float32", "fp16"): 47.0, ("float32", "int8"): 70.0}
# The cache the memory floors are stated for: SmolLM2-135M's shape.
MODEL = dict(layers=30, heads=3, head_dim=64, tokens=4096, sinks=4, recent=128)
Q_HEADS, Q_LEN, SCALE = 9, 16, 1.0 / 8.0


# ------------------------------------------------------------------ helpers

def load():
    kv = np.load(DATA / "smollm2_kv_prose.npz")
    qs = np.load(DATA / "smollm2_q_prose.npz")
    return ({i: (kv[f"k_L{i}"], kv[f"v_L{i}"]) for i in LAYERS},
            {i: qs[f"q_L{i}"] for i in LAYERS})


def compressible(start: int, B: int, n: int, sinks: int, recent: int) -> bool:
    """A cache compresses a block only when it is full and every position in it
    is >= sinks and < n - recent."""
    return start + B <= n and start >= sinks and start + B <= n - recent


def quantize_layer(k, v, tier, B, g8, g4, select):
    """Keys/values of one layer with every full block for which ``select(start)``
    holds replaced by its reconstruction in ``tier`` (cache dtype = k.dtype)."""
    kr, vr = k.copy(), v.copy()
    n = k.shape[1]
    for start in range(0, n - B + 1, B):
        if not select(start):
            continue
        block = np.stack([k[:, start:start + B], v[:, start:start + B]])
        rec = qr.reconstruct(block, tier, k.dtype, g8, g4)
        kr[:, start:start + B], vr[:, start:start + B] = rec[0], rec[1]
    return kr, vr


def max_abs(a, b) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def attention(q, k, v, causal: bool):
    """softmax(q k^T / 8) v in float64; query head h reads KV head h // 3;
    the 16 queries are the last 16 positions (causal: each sees positions <= its own)."""
    qh = q.astype(np.float64)                        # [9, 16, 64]
    group = Q_HEADS // k.shape[0]
    kh = k.astype(np.float64)[np.arange(Q_HEADS) // group]   # [9, N, 64]
    vh = v.astype(np.float64)[np.arange(Q_HEADS) // group]
    n = k.shape[1]
    s = np.einsum("hqd,hnd->hqn", qh, kh) * SCALE
    if causal:
        qpos = np.arange(n - q.shape[1], n)[:, None]
        s = np.where(np.arange(n)[None, :] <= qpos, s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hqn,hnd->hqd", p, vh)


def cache_bytes(tier, dtype, B, g8, g4, layers, heads, head_dim, tokens, sinks, recent):
    """(bytes, uncompressed bytes, compressed blocks, blocks) of a cache holding
    ``tokens`` positions per layer."""
    itemsize = np.dtype(dtype).itemsize
    full = qr.full_nbytes(heads, B, head_dim, itemsize)
    comp = full if tier == "full" else qr.payload_nbytes(tier, heads, B, head_dim,
                                                         itemsize, g8, g4)
    nblocks = -(-tokens // B)
    ncomp = sum(compressible(b * B, B, tokens, sinks, recent) for b in range(nblocks))
    # a partial last block is allocated whole (blocks are allocated on first write)
    per_layer = ncomp * comp + (nblocks - ncomp) * full
    return layers * per_layer, layers * nblocks * full, ncomp, nblocks


def drop_pct(tier, dtype, B, g8, g4, **model) -> Fraction:
    used, base, _, _ = cache_bytes(tier, dtype, B, g8, g4, **model)
    return Fraction(100) * (1 - Fraction(used, base))


def table(header, rows, title):
    cols = [header] + [[str(c) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = "  ".join("-" * w for w in width)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, width)))
    print(line)
    for r in cols[1:]:
        print("  ".join(c.ljust(w) if i == 0 or header[i] in ("", "note") else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, width))).rstrip())


def pct(x: float, nd: int = 3) -> str:
    return f"{100 * x:.{nd}f}%"


# ------------------------------------------------------------------- report

def error_floors(kv, B, g8, g4, misses):
    rows, worst = [], {}
    for L in LAYERS:
        k, v = kv[L]
        nfull = (k.shape[1] // B) * B
        for tier in ("int8", "int4"):
            kr, vr = quantize_layer(k, v, tier, B, g8, g4, lambda s: True)
            ek = qr.relative_error(k[:, :nfull], kr[:, :nfull])
            ev = qr.relative_error(v[:, :nfull], vr[:, :nfull])
            blk = [max(qr.relative_error(k[:, s:s + B], kr[:, s:s + B]),
                       qr.relative_error(v[:, s:s + B], vr[:, s:s + B]))
                   for s in range(0, nfull, B)]
            floor = ERROR_FLOORS[tier]
            ok = ek <= floor and ev <= floor
            if not ok:
                misses.append(f"L{L} {tier}: K {pct(ek)} V {pct(ev)} > floor {pct(floor, 0)} "
                              f"(by {pct(max(ek, ev) - floor)})")
            worst[(L, tier)] = max(blk)
            rows.append([f"L{L}", tier.upper(), pct(ek), f"{max_abs(k, kr):.4g}",
                         pct(ev), f"{max_abs(v, vr):.4g}", pct(max(blk)),
                         f"<= {pct(floor, 0)}", "ok" if ok else "MISS"])
    table(["layer", "tier", "K rel", "K maxabs", "V rel", "V maxabs", "worst block",
           "floor", ""], rows,
          f"1. Reconstruction error per layer (float16 cache; every full block of {B} tokens "
          f"quantized: {nfull} of {k.shape[1]} tokens; G8={min(g8, 64)}, G4={min(g4, 64)}; "
          "rel = relative Frobenius over the layer, worst block = max over blocks of "
          "max(K, V))")
    return worst


def _picks(d) -> str:
    return " ".join(f"{t}:{d[t]}" for t in ("int4", "int8", "fp16", "lossless") if t in d)


def lossless_adaptive(kv, B, g8, g4, budget):
    rows = []
    for L in LAYERS:
        k, v = kv[L]
        raw = stored = nraw = 0
        picks16, picks32 = {}, {}
        for s in range(0, k.shape[1] - B + 1, B):
            block = np.stack([k[:, s:s + B], v[:, s:s + B]])
            flag, data = qr.encode_lossless(block)
            assert np.array_equal(qr.decode_lossless((flag, data), block.dtype, block.shape)
                                  .view(np.uint16), block.view(np.uint16))
            raw += block.nbytes
            stored += len(data)
            nraw += flag
            t16, _ = qr.choose_adaptive(block, np.float16, budget, g8, g4)
            picks16[t16] = picks16.get(t16, 0) + 1
            b32 = block.astype(np.float32)
            t32, _ = qr.choose_adaptive(b32, np.float32, budget, g8, g4)
            picks32[t32] = picks32.get(t32, 0) + 1
        rows.append([f"L{L}", f"{raw / stored:.3f}", f"{nraw}/{raw // block.nbytes}",
                     _picks(picks16), _picks(picks32)])
    table(["layer", "lossless ratio", "stored raw", f"adaptive f16 (budget {budget:g})",
           f"adaptive f32 (budget {budget:g})"], rows,
          "2. LOSSLESS (byte shuffle + lz4 block; ratio = raw bytes / stored bytes, float16 "
          "blocks) and ADAPTIVE picks per full block")


def attention_errors(kv, qs, B, g8, g4, causal):
    rows = []
    n = next(iter(kv.values()))[0].shape[1]
    sel = lambda s: compressible(s, B, n, MODEL["sinks"], MODEL["recent"])  # noqa: E731
    ncomp = sum(sel(s) for s in range(0, n - B + 1, B))
    kept = n - ncomp * B
    for L in LAYERS:
        k, v = kv[L]
        ref = attention(qs[L], k, v, causal)
        row = [f"L{L}"]
        for tier in ("int8", "int4"):
            kr, vr = quantize_layer(k, v, tier, B, g8, g4, sel)
            out = attention(qs[L], kr, vr, causal)
            row += [pct(qr.relative_error(ref, out)), f"{max_abs(ref, out):.3g}"]
        rows.append(row)
    table(["layer", "INT8 rel", "INT8 maxabs", "INT4 rel", "INT4 maxabs"], rows,
          f"3. Attention output error vs float64 on the uncompressed cache ({Q_HEADS} query "
          f"heads x {Q_LEN} queries, scale 1/8, {'causal' if causal else 'no mask'}); "
          f"{ncomp} of {n // B} full blocks compressed (positions {B}..{B + ncomp * B - 1}), "
          f"{kept} tokens full precision (first block, holding the {MODEL['sinks']} sinks, "
          f"and the blocks reaching into the last {MODEL['recent']})")


def memory(B, g8, g4, misses):
    rows = []
    for dtype, tier in (("float16", "fp16"), ("float16", "int8"), ("float16", "int4"),
                        ("float32", "fp16"), ("float32", "int8"), ("float32", "int4")):
        used, base, ncomp, nblocks = cache_bytes(tier, dtype, B, g8, g4, **MODEL)
        d = drop_pct(tier, dtype, B, g8, g4, **MODEL)
        floor = MEMORY_FLOORS.get((dtype, tier))
        verdict = ""
        if floor is not None:
            verdict = "ok" if d >= floor else "MISS"
            if d < floor:
                misses.append(f"memory {tier.upper()} on {dtype}: drop {float(d):.4f}% < "
                              f"{floor:g}% (short by {float(floor - d):.4f} points, "
                              f"{used - int(base * (1 - Fraction(floor) / 100))} bytes)")
        per_block = qr.payload_nbytes(tier, MODEL["heads"], B, MODEL["head_dim"],
                                      np.dtype(dtype).itemsize, g8, g4)
        full = qr.full_nbytes(MODEL["heads"], B, MODEL["head_dim"], np.dtype(dtype).itemsize)
        rows.append([dtype, tier.upper(), f"{per_block}/{full}", f"{ncomp}/{nblocks}",
                     f"{used:,}", f"{base:,}", f"{float(d):.3f}%",
                     f">= {floor:g}%" if floor is not None else "-", verdict])
    m = MODEL
    table(["cache", "tier", "block bytes", "compressed", "bytes", "uncompressed", "drop",
           "floor", ""], rows,
          f"4. Memory: {m['tokens']}-token cache, {m['layers']} layers x {m['heads']} KV heads x "
          f"head_dim {m['head_dim']}, blocks of {B}; a block is compressed only if all its "
          f"positions are >= {m['sinks']} and < {m['tokens']} - {m['recent']}")


def group4_sensitivity(kv, B, g8):
    """Informational: INT4 error margin and memory against the value group size."""
    rows = []
    for g4 in (16, 32, 64):
        ek = ev = 0.0
        for L in LAYERS:
            k, v = kv[L]
            nfull = (k.shape[1] // B) * B
            kr, vr = quantize_layer(k, v, "int4", B, g8, g4, lambda s: True)
            ek = max(ek, qr.relative_error(k[:, :nfull], kr[:, :nfull]))
            ev = max(ev, qr.relative_error(v[:, :nfull], vr[:, :nfull]))
        rows.append([f"G4={g4}", pct(ek), pct(ev),
                     f"{float(drop_pct('int4', 'float16', B, g8, g4, **MODEL)):.3f}%",
                     f"{float(drop_pct('int4', 'float32', B, g8, g4, **MODEL)):.3f}%"])
    table(["INT4 group4", "worst layer K rel", "worst layer V rel", "drop f16 (>= 66%)",
           "drop f32"], rows, "6. INT4 value group size (informational; spec default G4=32)")


def alternatives(kv, B, g8, g4):
    """What would meet the memory floors that the spec'd layout misses."""
    print("\n5. Alternatives for missed memory floors (same tier formulas unless noted)")
    cases = [(dt, t) for (dt, t), f in MEMORY_FLOORS.items()
             if drop_pct(t, dt, B, g8, g4, **MODEL) < f]
    if not cases:
        print("   none needed: every memory floor is met")
        return
    for dtype, tier in cases:
        floor = MEMORY_FLOORS[(dtype, tier)]
        rows = []

        def add(label, d, note="", rows=rows, floor=floor):
            rows.append([label, f"{float(d):.3f}%", "ok" if d >= floor else "MISS", note])

        add(f"as specified (B={B}, recent {MODEL['recent']}, sinks {MODEL['sinks']})",
            drop_pct(tier, dtype, B, g8, g4, **MODEL))
        for b in (16, 32, 128):
            if b != B:
                add(f"block_size {b}", drop_pct(tier, dtype, b, g8, g4, **MODEL),
                    "per-token groups: payload per token unchanged")
        for r in (64, 96):
            add(f"recent window {r} tokens", drop_pct(tier, dtype, B, g8, g4,
                                                     **{**MODEL, "recent": r}))
        # sinks kept in a side buffer so the first block can be compressed
        used, base, ncomp, nblocks = cache_bytes(tier, dtype, B, g8, g4,
                                                 **{**MODEL, "sinks": 0})
        side = MODEL["layers"] * MODEL["sinks"] * 2 * MODEL["heads"] * MODEL["head_dim"] \
            * np.dtype(dtype).itemsize
        add("sinks in a 4-token full-precision side buffer, first block compressed",
            Fraction(100) * (1 - Fraction(used + side, base)), "layout change")
        add(f"group8 {g8 * 2} (G8 = min(group8, D) stays {min(g8, MODEL['head_dim'])})",
            drop_pct(tier, dtype, B, g8 * 2, g4, **MODEL), "cannot help: G8 is capped at D")
        # scales+zeros stored per token for K and V is what INT8 pays over 1 byte/value
        H, D = MODEL["heads"], MODEL["head_dim"]
        ctx = [t for t in (6144, 8192) if t != MODEL["tokens"]]
        for t in ctx:
            add(f"context {t} tokens (same rule)", drop_pct(tier, dtype, B, g8, g4,
                                                             **{**MODEL, "tokens": t}),
                "the floor is stated at 4096")
        per = qr.payload_nbytes(tier, H, B, D, np.dtype(dtype).itemsize, g8, g4)
        table(["variant", "drop", f">= {floor:g}%", "note"], rows,
              f"   {tier.upper()} on {dtype} (payload {per} B per block of {B} tokens)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--group8", type=int, default=qr.DEFAULT_GROUP8)
    ap.add_argument("--group4", type=int, default=qr.DEFAULT_GROUP4)
    ap.add_argument("--budget", type=float, default=qr.DEFAULT_ERROR_BUDGET)
    ap.add_argument("--no-causal", action="store_true",
                    help="let every query see all 1492 positions (no causal mask)")
    a = ap.parse_args(argv)
    B, g8, g4 = a.block_size, a.group8, a.group4
    kv, qs = load()
    misses: list[str] = []
    error_floors(kv, B, g8, g4, misses)
    lossless_adaptive(kv, B, g8, g4, a.budget)
    attention_errors(kv, qs, B, g8, g4, not a.no_causal)
    memory(B, g8, g4, misses)
    alternatives(kv, B, g8, g4)
    group4_sensitivity(kv, B, g8)
    print("\nSummary: " + ("every floor met" if not misses else
                           f"{len(misses)} floor(s) missed"))
    for m in misses:
        print(f"  MISSED {m}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
