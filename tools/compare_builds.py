"""Before/after figures of two kvcache builds, measured in one run.

    python tools/compare_builds.py /path/to/old/checkout /path/to/new/checkout

Each round runs one short measurement process per build, alternating, so
both see the same machine load; the table gives medians over the rounds and
the new/old ratio.  Each checkout must have its core built in place
(`python setup.py build_ext --inplace`).  Measured: a one-token update at
4K (per call, a loop of 4,000 calls), compress_old_entries INT8 of 4K x 30
layers, decode attention at 4K and 32K (float16, INT8), save and load of a
4K x 30-layer cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

PROBE = r'''
import json, os, sys, tempfile, time
import numpy as np
from kvcache import KVCache

def per_call(fn, n, repeat=7):
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(n); best.append((time.perf_counter() - t0) / n)
    return sorted(best)[len(best) // 2]

rng = np.random.default_rng(0)
out = {}
L, H, D = 30, 3, 64

# update: one token into a layer holding 4K (decode step), per call
c = KVCache(1, H, D, max_seq_len=8192 + 8000, dtype="float16")
x = rng.standard_normal((1, H, 4096, D)).astype(np.float16)
c.update(0, x, x, 4096)
t = rng.standard_normal((1, H, 1, D)).astype(np.float16)
state = {"n": 4096}
def upd(n):
    m = state["n"]
    for i in range(n):
        c.update(0, t, t, m + i + 1)
    state["n"] = m + n
    c.truncate(4096)
    state["n"] = 4096
out["update_4k_us"] = per_call(upd, 4000) * 1e6

# compress_old_entries INT8, 4K x 30 layers
def filled(layers, ctx, **kw):
    cc = KVCache(layers, H, D, max_seq_len=ctx, dtype="float16", **kw)
    kv = rng.standard_normal((1, H, ctx, D)).astype(np.float16)
    for li in range(layers):
        cc.update(li, kv, kv, ctx)
    return cc
times = []
for _ in range(5):
    cc = filled(L, 4096, compression="int8")
    t0 = time.perf_counter()
    cc.compress_old_entries()          # default workers, as tools/compress_time.py
    times.append(time.perf_counter() - t0)
out["compress_int8_4k_x30_ms"] = sorted(times)[2] * 1e3

# attention: one decode query, 9 query heads over 3 KV heads
q = rng.standard_normal((1, 9, 1, D)).astype(np.float32)
for ctx in (4096, 32768):
    for tier in ("none", "int8"):
        cc = filled(1, ctx, compression=None if tier == "none" else tier, residual_tokens=0)
        if tier != "none":
            cc.compress_old_entries(workers=1)
        res = np.empty((1, 9, 1, D), np.float32)
        n = 400 if ctx == 4096 else 60
        out[f"attention_{tier}_{ctx // 1024}k_us"] = per_call(
            lambda k: [cc.attention(0, q, out=res) for _ in range(k)], n, 5) * 1e6

# save/load, 4K x 30 layers float16
cc = filled(L, 4096)
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "c.kvc")
    s, l = [], []
    for _ in range(5):
        t0 = time.perf_counter(); cc.save(p); s.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); KVCache.load(p); l.append(time.perf_counter() - t0)
out["save_4k_x30_ms"] = sorted(s)[2] * 1e3
out["load_4k_x30_ms"] = sorted(l)[2] * 1e3
print(json.dumps(out))
'''


def measure(checkout: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    with tempfile.TemporaryDirectory() as cwd:       # never the source tree
        res = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=cwd,
                             capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    old, new = argv[:2]
    rounds = int(argv[2]) if len(argv) == 3 else 5
    runs: dict = {old: [], new: []}
    for r in range(rounds):
        for path in ((old, new) if r % 2 == 0 else (new, old)):
            runs[path].append(measure(path))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    print(f"{'figure':28s} {'old':>10s} {'new':>10s} {'new/old':>8s}")
    for key in runs[old][0]:
        a = statistics.median(x[key] for x in runs[old])
        b = statistics.median(x[key] for x in runs[new])
        print(f"{key:28s} {a:10.3f} {b:10.3f} {b / a:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
