"""Per-update latency of a decode loop with automatic compression on and off.

    python tools/auto_compress_latency.py [--tokens 4096]

30 layers of SmolLM2-135M's shape, one-token updates from position 1 to
--tokens, float16; compression none, then INT8 and INT4 with
auto_compress=True, synchronous (a block is encoded on the update that moves
it out of the 128-token residual window) and with background=True (a worker
thread encodes it).  Prints median, p99, p99.9 and max per update.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

from kvcache import KVCache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    layers, heads, dim = 30, 3, 64
    rng = np.random.default_rng(0)
    pool = [rng.standard_normal((1, heads, 1, dim)).astype(np.float16) for _ in range(16)]
    for mode in ("none", "int8", "int4", "int8 background", "int4 background"):
        tier = mode.split()[0]
        cache = KVCache(layers, heads, dim, max_seq_len=args.tokens,
                        compression=None if tier == "none" else tier,
                        auto_compress=tier != "none", background="background" in mode)
        clock = time.perf_counter_ns
        lat = np.empty(args.tokens * layers, np.int64)
        i = 0
        gc.disable()
        try:
            for m in range(1, args.tokens + 1):
                k = pool[m % 16]
                for layer in range(layers):
                    t0 = clock()
                    cache.update(layer, k, k, m)
                    lat[i] = clock() - t0
                    i += 1
        finally:
            gc.enable()
        cache.wait_for_compression()
        s = cache.stats()
        print(f"{mode:16s} median {np.median(lat) / 1e3:.2f} us  "
              f"p99 {np.percentile(lat, 99) / 1e3:.1f} us  "
              f"p99.9 {np.percentile(lat, 99.9) / 1e3:.1f} us  max {lat.max() / 1e3:.0f} us  "
              f"compressed blocks {s.compressed_blocks}  memory {s.memory_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
