"""``python -m kvcache demo``: a decode loop with SmolLM2-135M's shapes.

Prefills a prompt, decodes tokens one at a time through every layer (as an
inference loop calls the cache), reads K/V back periodically (as attention
would), and prints per-update latency, memory and the cache's counters.
The K/V are random: this shows the cache's behaviour, not a model's output.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .cache import KVCache
from .growth import GrowthStrategy


def _progress(done: int, total: int, start: float, stream=sys.stderr) -> None:
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width)
    rate = done / max(time.perf_counter() - start, 1e-9)
    stream.write(f"\r  decode [{bar:<{width}}] {done}/{total} tokens ({rate:,.0f} tok/s)")
    if done == total:
        stream.write("\n")
    stream.flush()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m kvcache demo", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30, help="transformer layers (30)")
    p.add_argument("--heads", type=int, default=3, help="KV heads (3)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (64)")
    p.add_argument("--batch", type=int, default=1, help="batch rows (1)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens to prefill (512)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens to decode (2048)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--window", type=int, default=None,
                   help="max_seq_len: a ring of this many tokens (default: prompt + tokens, "
                        "or the prompt when growing)")
    p.add_argument("--sinks", type=int, default=0, help="attention-sink tokens kept by the ring")
    p.add_argument("--growth", choices=("none", "exponential", "linear", "adaptive"),
                   default="none", help="grow capacity instead of evicting")
    p.add_argument("--compression", default="none",
                   choices=("none", "fp16", "int8", "int4", "lossless", "adaptive"),
                   help="compress blocks automatically as they leave the residual window")
    p.add_argument("--residual", type=int, default=128,
                   help="recent tokens kept at full precision when compressing (128)")
    p.add_argument("--read-every", type=int, default=64,
                   help="read every layer's K and V back every N tokens (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .demo_model import add_arguments
    add_arguments(p)
    return p


def run(args: argparse.Namespace, out=None) -> KVCache:
    # sys.stdout looked up per call (not bound at import: callers redirect it)
    out = out if out is not None else sys.stdout
    rng = np.random.default_rng(args.seed)
    total = args.prompt + args.tokens
    if args.window is not None:
        window = args.window
    elif args.growth != "none":
        window = max(args.prompt, 64)       # start small and let growth do the rest
    else:
        window = total
    compress = args.compression != "none"
    cache = KVCache(args.layers, args.heads, args.head_dim, max_seq_len=window,
                    batch_size=args.batch, dtype=args.dtype, sink_tokens=args.sinks,
                    compression=args.compression if compress else None,
                    residual_tokens=args.residual, auto_compress=compress)
    if args.growth != "none":
        strategy = {"exponential": GrowthStrategy.exponential(1.5),
                    "linear": GrowthStrategy.linear(1024),
                    "adaptive": GrowthStrategy.adaptive()}[args.growth]
        cache.enable_dynamic_growth(strategy)
    shape = (args.batch, args.heads, 1, args.head_dim)
    out.write(f"{cache!r}\n")
    if args.prompt:
        pk = rng.standard_normal((args.batch, args.heads, args.prompt, args.head_dim))
        pk = pk.astype(args.dtype)
        t0 = time.perf_counter()
        for layer in range(args.layers):
            cache.update(layer, pk, pk, args.prompt)
        out.write(f"prefill: {args.prompt} tokens x {args.layers} layers in "
                  f"{(time.perf_counter() - t0) * 1e3:.2f} ms\n")
    # A pool of token vectors reused round-robin keeps data generation out
    # of the timed loop.
    pool = [rng.standard_normal(shape).astype(args.dtype) for _ in range(16)]
    lat = np.empty(args.tokens * args.layers, dtype=np.int64)
    clock = time.perf_counter_ns
    start = time.perf_counter()
    i = 0
    for step in range(args.tokens):
        seq = args.prompt + step + 1
        k = pool[step % 16]
        v = pool[(step + 7) % 16]
        for layer in range(args.layers):
            t0 = clock()
            cache.update(layer, k, v, seq)
            lat[i] = clock() - t0
            i += 1
        if args.read_every and (step + 1) % args.read_every == 0:
            for layer in range(args.layers):
                cache.keys(layer)
                cache.values(layer)
        if not args.quiet and (step % 256 == 0 or step + 1 == args.tokens):
            _progress(step + 1, args.tokens, start)
    elapsed = time.perf_counter() - start
    out.write(report(cache, lat, elapsed, args.tokens) + "\n")
    return cache


def report(cache: KVCache, lat_ns: np.ndarray, elapsed: float, tokens: int) -> str:
    s = cache.stats()
    rows: list[tuple] = []
    if lat_ns.size:
        rows += [("update latency median", f"{np.median(lat_ns) / 1e3:.3f} us"),
                 ("update latency p99", f"{np.percentile(lat_ns, 99) / 1e3:.3f} us"),
                 ("update latency max", f"{lat_ns.max() / 1e3:.3f} us")]
    rows += [("decode throughput", f"{tokens / elapsed if elapsed else 0:,.0f} tokens/s "
              f"(all layers)"),
             ("seq_len / held / capacity",
              f"{cache.seq_len(0):,} / {cache.held(0):,} / {cache.capacity(0):,} (layer 0)")]
    width = max(len(k) for k, _ in rows)
    head = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"{head}\n{s.table()}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        from .demo_model import run_model
        return run_model(args)
    run(args)
    return 0
