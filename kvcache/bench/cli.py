"""``python -m kvcache bench``: the options, the run, the three tables, --json.

The sections run in a fixed order (growth first: its subprocesses then
start before this one holds gigabytes); each adds its result to the JSON
under its name and its rows to its table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from . import attention, compression, growth, hf_caches, metrics, prefetch, update
from .common import Settings, machine
from .table import ATTENTION, BASELINES, MAIN, render

__all__ = ["main", "SECTIONS"]

# Each table and the sections whose rows it holds, in print order.
TABLES = ((MAIN, (update, growth, metrics)),
          (ATTENTION, (attention, prefetch)),
          (BASELINES, (hf_caches, compression)))
SECTIONS = tuple(m.NAME for _, mods in TABLES for m in mods)
_RUN_ORDER = (growth, update, metrics, attention, prefetch, hf_caches, compression)


def _parse_contexts(text: str) -> list[int]:
    try:
        vals = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--contexts wants integers like 128,4096: {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError("--contexts wants positive integers")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvcache.bench",
        description="Benchmark kvcache against numpy, torch, transformers and blosc2 "
                    "baselines measured in the same run (SmolLM2-135M shape) and print "
                    "the tables.")
    p.add_argument("--json", metavar="PATH", help="also write every measured number to PATH")
    p.add_argument("--quick", action="store_true",
                   help="fewer steps and tokens (a few seconds; for smoke tests)")
    p.add_argument("--contexts", type=_parse_contexts, default=None, metavar="N,N,...",
                   help="contexts of the update rows (default 128,4096,65536), of the "
                        "attention and prefetch rows (default 4096,32768) and of the "
                        "transformers rows (default 1024,4096)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens decoded by the growth rows (default 100000; --quick 20000)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="decode steps per context for kvcache/prealloc (default 3000; "
                        "--quick 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--kv-data", metavar="PATH", default=None,
                   help="the real K/V of the compression section (default $KVCACHE_KV_DATA, "
                        "else the trimmed copy shipped in kvcache/bench/data)")
    return p


def settings(args: argparse.Namespace) -> Settings:
    quick, steps = args.quick, args.steps or (300 if args.quick else 3000)
    tokens = args.tokens or (20_000 if quick else 100_000)
    return Settings(
        quick=quick, progress=not args.no_progress,
        contexts=args.contexts or update.CONTEXTS,
        attention_contexts=args.contexts or attention.CONTEXTS,
        steps=steps, tokens=tokens,
        concat_budget_s=0.3 if quick else 3.0,
        concat_tokens=min(tokens, 512 if quick else 2048),
        metrics_steps=2000 if quick else 20000,
        transformers_contexts=args.contexts or hf_caches.CONTEXTS,
        transformers_steps=min(steps, 64 if quick else 512),
        transformers_budget_s=2.0 if quick else 15.0,
        compression_reps=3 if quick else 15,
        kv_data=args.kv_data or str(compression.default_kv_data()))


def _meta(s: Settings, sections: set[str]) -> dict:
    meta = machine(s.quick)
    meta["settings"] = {
        "contexts": s.contexts, "attention_contexts": s.attention_contexts,
        "steps": s.steps, "tokens": s.tokens, "concat_budget_s": s.concat_budget_s,
        "concat_tokens": s.concat_tokens, "concat_window": update.CONCAT_WINDOW,
        "metrics_steps": s.metrics_steps, "growth_start": growth.GROWTH_START,
        "growth_factor": growth.GROWTH_FACTOR,
        "transformers_contexts": s.transformers_contexts,
        "transformers_steps": s.transformers_steps,
        "transformers_budget_s": s.transformers_budget_s,
        "compression_reps": s.compression_reps, "kv_data": s.kv_data}
    meta["reference_context"] = s.contexts[0] if update.NAME in sections else None
    meta["sections"] = sorted(sections)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(None if argv is None else list(argv))
    s = settings(args)
    if s.tokens < 1 or s.steps < 1:
        p.error("--tokens and --steps must be >= 1")
    sections = {name.strip() for name in args.sections.split(",") if name.strip()}
    unknown = sections - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")

    t_all = time.perf_counter()
    meta = _meta(s, sections)
    res: dict = {"meta": meta}
    for mod in _RUN_ORDER:
        if mod.NAME in sections:
            res[mod.NAME] = mod.run(s, meta)
    meta["wall_s"] = time.perf_counter() - t_all

    printed = False
    for table, mods in TABLES:
        rows = [r for m in mods for r in m.rows(res)]
        res[table.key] = {"headers": table.headers, "rows": rows}
        if rows:
            if printed:
                print()
            notes = [m.note(res, meta) for m in mods if m.NAME in sections]
            print(render(table, rows, meta, notes))
            printed = True
    print(f"(total {meta['wall_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        sys.stderr.write(f"[kvcache.bench] wrote {args.json}\n")
    return 0
