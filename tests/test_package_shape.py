"""The package's shape, as the architecture promises it (checked on the
source tree shipped beside the tests):

* no import cycle among kvcache's modules, counting imports made inside
  functions too (a cycle hidden in a function still couples two modules);
* the library never imports its command-line tools (demo, bench);
* no source file in kvcache/ or src/ over 800 lines (one subsystem a file).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "kvcache"
TOOLS = ("kvcache.bench", "kvcache.demo", "kvcache.demo_model", "kvcache.__main__")
MAX_LINES = 800

pytestmark = pytest.mark.skipif(not PKG.is_dir(), reason="needs the source tree")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    for pyx in PKG.rglob("*.pyx"):          # the core imports Python modules too
        mods[_module_name(pyx)] = pyx
    return mods


def _imports(name: str, path: Path, known: set) -> set:
    """kvcache modules `name` imports anywhere in its source."""
    if path.suffix == ".pyx":               # Cython: read its Python-level imports
        lines = [line.strip() for p in [path, *path.parent.glob("*.pxi")]
                 for line in p.read_text().splitlines()]
        found = set()
        for line in lines:
            if line.startswith(("from kvcache", "import kvcache")):
                target = line.split()[1]
                sub = line.split()[3] if line.startswith("from") else None
                found.add(f"{target}.{sub}" if f"{target}.{sub}" in known else target)
        return found & known
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for f in found:
        while f and f not in known:
            f = f.rpartition(".")[0]
        if f and f != name:
            out.add(f)
    return out


def _graph() -> dict[str, set]:
    mods = _modules()
    known = set(mods)
    # `import kvcache.x` runs kvcache/__init__ first: that edge is implied, not a cycle
    return {m: _imports(m, p, known) - {"kvcache"} for m, p in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_library_never_imports_its_tools():
    graph = _graph()
    for m, deps in graph.items():
        if m.startswith(TOOLS):
            continue
        bad = {d for d in deps if d.startswith(TOOLS)}
        assert not bad, f"{m} imports the command-line tools {sorted(bad)}"


def test_no_source_file_over_800_lines():
    files = [p for p in PKG.rglob("*") if p.suffix in (".py", ".pyx", ".pxi", ".pxd", ".pyi")]
    files += [p for p in (ROOT / "src").glob("*") if p.suffix in (".c", ".h")]
    files += [p for p in (ROOT / "include").glob("*.h")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
