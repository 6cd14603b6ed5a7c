"""One subsystem a file: no source file in kvcache/, src/ or include/ is over
800 lines (import cycles are checked by tests/test_import_graph.py)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 800
SUFFIXES = (".py", ".pyx", ".pxi", ".pxd", ".pyi", ".c", ".h")


def test_no_source_file_over_800_lines():
    files = [p for d in ("kvcache", "src", "include") for p in (ROOT / d).rglob("*")
             if p.suffix in SUFFIXES and p.name != "_core.c"]    # _core.c: Cython's output
    assert files, "the source tree is not beside the tests"
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
