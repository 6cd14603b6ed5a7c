"""The bench harness sits on top of the library, never inside it.

``kvcache.bench`` imports the library; no library module may import it,
directly or through others, at module level or inside a function, and no
import cycle may run through it, nor anywhere else in ``kvcache/``.  Read
from the sources by ``tools/import_cycles.py``, and checked at run time:
importing every library module loads no ``kvcache.bench`` module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kvhelpers import tool_module

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "import_cycles.py"


@pytest.fixture(scope="module")
def ic():
    return tool_module("import_cycles")


def test_no_library_module_reaches_bench(ic):
    assert ic.reaching(ic.graph(ROOT / "kvcache"), "kvcache.bench") == {}


def test_no_import_cycle_anywhere(ic):
    assert ic.cycles(ic.graph(ROOT / "kvcache")) == []


def test_the_tool_sees_function_level_cycles_and_reaches(ic, tmp_path):
    """A package with a cycle made by a function-level import and a library
    module that imports its bench: both reported, exit status 1."""
    pkg = tmp_path / "pkg"
    (pkg / "bench").mkdir(parents=True)
    files = {"__init__.py": "from .a import x\n",
             "a.py": "x = 1\ndef f():\n    from .b import y\n",
             "b.py": "from . import a\ny = 2\n",
             "stats.py": "def g():\n    from .bench import table\n",
             "bench/__init__.py": "", "bench/table.py": "from ..a import x\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    g = ic.graph(pkg)
    assert ic.cycles(g) == [["pkg.a", "pkg.b"]]
    assert ic.reaching(g, "pkg.bench") == {"pkg.stats": ["pkg.bench", "pkg.bench.table"]}
    assert ic.main([str(pkg)]) == 1


def test_importing_the_library_loads_no_bench_module():
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import kvcache

        def walk(pkg):       # not pkgutil.walk_packages: it imports every package
            for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
                if m.name in ("kvcache.bench", "kvcache.__main__"):
                    continue
                try:
                    mod = importlib.import_module(m.name)
                except ImportError as exc:        # an optional dependency (torch ...)
                    print("skipped", m.name, exc, file=sys.stderr)
                    continue
                if m.ispkg:
                    walk(mod)

        walk(kvcache)
        print(json.dumps(sorted(n for n in sys.modules if n.startswith("kvcache."))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    loaded = json.loads(out.stdout)
    assert "kvcache.cache" in loaded and "kvcache.integrations.models" in loaded
    assert [n for n in loaded if n.startswith("kvcache.bench")] == [], out.stderr
