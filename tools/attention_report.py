"""Accuracy of KVCache.attention on the real SmolLM2 data (tests/data): docs/attention.md's table.

    python tools/attention_report.py [--json PATH]

For every layer stored in both ``smollm2_kv_prose.npz`` (keys and values,
float16 [3, 1492, 64]) and ``smollm2_q_prose.npz`` (the model's queries for
the last 16 positions, float32 [9, 16, 64]), one cache layer holds the 1,492
tokens and ``attention()`` answers the 16 queries (causal, grouped-query,
scale 1/8).  Each output is compared with a float64 numpy reference on the
original data (``tests/attention_reference.py``):

* rel err: relative Frobenius error ``||out - ref|| / ||ref||``, per kernel
  backend this CPU runs;
* max |b - scalar|: the largest absolute difference between backend ``b``'s
  output and the scalar kernel's on the same cache.

Storage tiers: float32 and float16 caches (the data is float16, so both hold
it exactly: the error is the kernel's arithmetic); INT8 and INT4 with every
whole block quantized (``residual_tokens=0, keep_first=0``: 1,472 of the
1,492 tokens; the partial last block, 20 tokens, stays float16 as the cache
keeps it); and the same with the first 4 positions kept exact
(``keep_first=4``, the default: layers 15 and 22 put ~40% of their attention
on position 0).  The "all" row pools the layers
(errors of the concatenated outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from attention_reference import reference_attention  # noqa: E402

from kvcache import KVCache, _core  # noqa: E402

KV_DATA = ROOT / "tests" / "data" / "smollm2_kv_prose.npz"
Q_DATA = ROOT / "tests" / "data" / "smollm2_q_prose.npz"

# (label, cache dtype, compression strategy or None, keep_first)
STORES = (
    ("float32", "float32", None, 0),
    ("float16", "float16", None, 0),
    ("INT8", "float16", "int8", 0),
    ("INT4", "float16", "int4", 0),
    ("INT8 keep_first=4", "float16", "int8", 4),
    ("INT4 keep_first=4", "float16", "int4", 4),
)


def _layers(kv, qd) -> list[int]:
    ks = {int(n[3:]) for n in kv.files if n.startswith("k_L")}
    vs = {int(n[3:]) for n in kv.files if n.startswith("v_L")}
    qs = {int(n[3:]) for n in qd.files if n.startswith("q_L")}
    return sorted(ks & vs & qs)


def _outputs(k, v, q, dtype, strategy, keep_first, backends):
    """attention() of one layer's cache, per backend."""
    n = k.shape[2]
    cache = KVCache(1, k.shape[1], k.shape[3], max_seq_len=n, dtype=dtype, overflow="error",
                    residual_tokens=0, keep_first=keep_first)
    cache.update(0, k.astype(dtype), v.astype(dtype), n)
    if strategy is not None:
        st = cache.compress_old_entries(0, strategy=strategy)
        assert st.tokens == n // cache.block_size * cache.block_size, st
    out = {}
    try:
        for b in backends:
            _core.set_backend(b)
            out[b] = cache.attention(0, q).astype(np.float64)
    finally:
        _core.set_backend(None)
    return out


def measure() -> dict:
    backends = _core.available_backends()
    others = [b for b in backends if b != "scalar"]
    res = {"backends": backends, "rows": []}
    with np.load(KV_DATA) as kv, np.load(Q_DATA) as qd:
        layers = _layers(kv, qd)
        data = {L: (kv[f"k_L{L}"][None], kv[f"v_L{L}"][None], qd[f"q_L{L}"][None])
                for L in layers}
    refs = {}
    for L, (k, v, q) in data.items():
        n = k.shape[2]
        refs[L] = reference_attention(q, k, v, np.arange(n), n)
    res["layers"] = layers
    for label, dtype, strategy, keep_first in STORES:
        pooled = {b: [0.0, 0.0] for b in backends}
        pooled_diff = {b: 0.0 for b in others}
        for L in layers:
            k, v, q = data[L]
            ref = refs[L]
            outs = _outputs(k, v, q, dtype, strategy, keep_first, backends)
            row = {"store": label, "layer": L, "rel_error": {}, "max_abs_vs_scalar": {}}
            den = float(np.sum(ref * ref))
            for b, o in outs.items():
                num = float(np.sum((o - ref) ** 2))
                row["rel_error"][b] = (num / den) ** 0.5
                pooled[b][0] += num
                pooled[b][1] += den
            for b in others:
                d = float(np.abs(outs[b] - outs["scalar"]).max()) if "scalar" in outs else None
                row["max_abs_vs_scalar"][b] = d
                if d is not None:
                    pooled_diff[b] = max(pooled_diff[b], d)
            res["rows"].append(row)
        res["rows"].append({"store": label, "layer": "all",
                            "rel_error": {b: (a / d) ** 0.5 for b, (a, d) in pooled.items()},
                            "max_abs_vs_scalar": ({b: pooled_diff[b] for b in others}
                                                  if "scalar" in backends else
                                                  {b: None for b in others})})
    return res


def _e(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def render(res: dict) -> str:
    backends = res["backends"]
    others = [b for b in backends if b != "scalar"]
    head = (["store", "layer"] + [f"rel err {b}" for b in backends]
            + [f"max \\|{b} − scalar\\|" for b in others])
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|"]
    for r in res["rows"]:
        layer = "all" if r["layer"] == "all" else f"{r['layer']}"
        cells = ([r["store"], f"**{layer}**" if layer == "all" else layer]
                 + [_e(r["rel_error"].get(b)) for b in backends]
                 + [_e(r["max_abs_vs_scalar"].get(b)) for b in others])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    args = p.parse_args(argv)
    res = measure()
    print(f"attention() accuracy on the real SmolLM2-135M data: layers {res['layers']}, "
          f"1,492 tokens, 16 queries (causal), 9 query heads over 3 KV heads; "
          f"reference float64 numpy; backends {res['backends']} "
          f"(default {_core.backend()})\n")
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
