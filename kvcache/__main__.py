"""Command line: ``python -m kvcache demo`` and ``python -m kvcache bench``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m kvcache {demo,bench} [options]

  demo    simulate a decode loop with SmolLM2-135M's shapes and print the cache's stats
          (--model smollm2: generate real text with the model, [hf] extra)
  bench   compare kvcache with numpy, torch, transformers and blosc2 baselines
          measured in the same run (those not installed are reported so)

'python -m kvcache COMMAND --help' lists each command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if command == "bench":
        from .bench.cli import main as bench_main
        return bench_main(rest) or 0
    print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
