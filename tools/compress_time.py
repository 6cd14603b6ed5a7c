"""Time compress_old_entries(0) on a 4,096-token, 30-layer cache (SmolLM2's shape).

    python tools/compress_time.py [--strategy int8] [--reps 5]

The cache is filled from the real K/V in tests/data (the six stored layers
repeated, their 1,492 tokens tiled to 4,096), residual 128; prints the median
and minimum over --reps fresh caches for float16 and float32, with the
default worker threads and with one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from kvcache import KVCache

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_kv_prose.npz"
LAYERS = (0, 1, 8, 15, 22, 29)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="int8")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    data = np.load(DATA)
    for dtype in ("float16", "float32"):
        for workers in (None, 1):
            times = []
            for _ in range(args.reps):
                cache = KVCache(30, 3, 64, max_seq_len=4096, dtype=dtype,
                                compression=args.strategy)
                for layer in range(30):
                    name = LAYERS[layer % len(LAYERS)]
                    k = np.tile(data[f"k_L{name}"], (1, 3, 1))[None, :, :4096]
                    v = np.tile(data[f"v_L{name}"], (1, 3, 1))[None, :, :4096]
                    cache.update(layer, k, v, 4096)
                t0 = time.perf_counter()
                st = cache.compress_old_entries(0, workers=workers)
                times.append(time.perf_counter() - t0)
            print(f"{dtype} {args.strategy} workers={workers or 'default'}: median "
                  f"{np.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms "
                  f"({st.blocks} blocks, {st.bytes_before / 1e6:.1f} MB in)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
