"""Compression figures on the real SmolLM2 K/V (tests/data): docs/compression.md's table.

    python tools/compression_report.py [--json PATH]

* memory: a 30-layer cache of SmolLM2-135M's shape at 4,096 tokens (the six
  stored layers repeated, their 1,492 tokens tiled), residual 128, first 4
  positions exact: the drop of stats().memory_bytes (everything the cache
  allocated, metadata included) after compress_old_entries(0);
* error: per stored layer, the relative Frobenius and max-abs error of keys()
  and values() against the original, after compressing all eligible blocks;
* speed: encode (the compression pass of compress_old_entries, without its
  final hand-back of freed memory to the OS) and decode (keys()+values() of
  a fully compressed cache) throughput in GB/s of full-precision bytes, one
  core;
* lossless: the ratio beside blosc2's shuffle+LZ4 on the same bytes, when
  blosc2 is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from kvcache import CompressionStats, CompressionStrategy, KVCache

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_kv_prose.npz"
LAYERS = (0, 1, 8, 15, 22, 29)
STRATEGIES = ("fp16", "int8", "int4", "lossless", "adaptive")


def _rel(a, b) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def memory_drop(data, dtype: str, strategy: str, tokens: int = 4096) -> float:
    cache = KVCache(30, 3, 64, max_seq_len=tokens, dtype=dtype, compression=strategy)
    for layer in range(30):
        name = LAYERS[layer % len(LAYERS)]
        reps = -(-tokens // data[f"k_L{name}"].shape[1])
        k = np.tile(data[f"k_L{name}"], (1, reps, 1))[None, :, :tokens]
        v = np.tile(data[f"v_L{name}"], (1, reps, 1))[None, :, :tokens]
        cache.update(layer, k, v, tokens)
    before = cache.stats().memory_bytes
    cache.compress_old_entries(0)
    return 1.0 - cache.stats().memory_bytes / before


def errors(data, dtype: str, strategy: str):
    rows = {}
    for name in LAYERS:
        k = data[f"k_L{name}"][None].astype(dtype)
        v = data[f"v_L{name}"][None].astype(dtype)
        cache = KVCache(1, 3, 64, max_seq_len=2048, dtype=dtype, compression=strategy)
        cache.update(0, k, v, k.shape[2])
        st = cache.compress_old_entries(0)
        kk, vv = cache.keys(0), cache.values(0)
        rows[name] = {
            "k_rel": _rel(kk, k), "v_rel": _rel(vv, v),
            "k_maxabs": float(np.abs(kk.astype(np.float64) - k).max()),
            "v_maxabs": float(np.abs(vv.astype(np.float64) - v).max()),
            "ratio": st.compression_ratio, "chosen": sorted(st.by_strategy),
        }
    return rows


def speed(data, dtype: str, strategy: str, reps: int = 7):
    k = np.concatenate([data[f"k_L{n}"] for n in LAYERS], 1)[None].astype(dtype)
    v = np.concatenate([data[f"v_L{n}"] for n in LAYERS], 1)[None].astype(dtype)
    n = k.shape[2]
    enc, dec = [], []
    for _ in range(reps):
        cache = KVCache(1, 3, 64, max_seq_len=n, dtype=dtype, compression=strategy,
                        residual_tokens=0, keep_first=0)
        cache.update(0, k, v, n)
        t0 = time.perf_counter()
        results = cache._compress(int(CompressionStrategy.coerce(strategy)), 0, 0, math.inf,
                                  cache.error_budget)
        seconds = time.perf_counter() - t0
        st = CompressionStats.from_results(results, seconds)
        if not st.blocks:
            return None
        enc.append(st.bytes_before / seconds / 1e9)
        t0 = time.perf_counter()
        cache.keys(0)
        cache.values(0)
        dec.append(st.bytes_before / (time.perf_counter() - t0) / 1e9)
    return {"encode_GBps": float(np.median(enc)), "decode_GBps": float(np.median(dec))}


def blosc2_ratio(data) -> float | None:
    try:
        import blosc2
    except ImportError:
        return None
    raw = np.concatenate([data[f"k_L{n}"] for n in LAYERS] + [data[f"v_L{n}"] for n in LAYERS])
    total = packed = 0
    for block in np.array_split(raw.reshape(-1), raw.size // (64 * 64 * 3 * 2)):
        b = np.ascontiguousarray(block).tobytes()
        total += len(b)
        packed += len(blosc2.compress(b, typesize=2, clevel=5, filter=blosc2.Filter.SHUFFLE,
                                      codec=blosc2.Codec.LZ4))
    return total / packed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    data = dict(np.load(DATA))
    out = {"memory": {}, "errors": {}, "speed": {}, "blosc2_lossless_ratio": blosc2_ratio(data)}
    for dtype in ("float16", "float32"):
        for s in STRATEGIES:
            if s == "fp16" and dtype == "float16":
                continue
            key = f"{dtype}/{s}"
            out["memory"][key] = memory_drop(data, dtype, s)
            out["errors"][key] = errors(data, dtype, s)
            out["speed"][key] = speed(data, dtype, s)
    print("memory drop at 4,096 tokens, 30 layers, residual 128 (stats().memory_bytes):")
    for key, drop in out["memory"].items():
        sp = out["speed"][key]
        sp_txt = (f"encode {sp['encode_GBps']:.2f} GB/s, decode {sp['decode_GBps']:.2f} GB/s"
                  if sp else "")
        print(f"  {key:18s} {drop:7.1%}   {sp_txt}")
    print("per-layer error (rel Frobenius K / V, max-abs K / V) and ratio:")
    for key, rows in out["errors"].items():
        for name, r in rows.items():
            print(f"  {key:18s} L{name:<2d} K {r['k_rel']:.4f} V {r['v_rel']:.4f}  "
                  f"maxabs K {r['k_maxabs']:.4f} V {r['v_maxabs']:.4f}  ratio {r['ratio']:.2f}"
                  f"  {','.join(r['chosen'])}")
    print(f"blosc2 shuffle+LZ4 ratio on the same float16 bytes: {out['blosc2_lossless_ratio']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
