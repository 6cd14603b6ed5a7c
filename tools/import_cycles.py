"""Import cycles inside a Python package, and who reaches its bench package.

    python tools/import_cycles.py [kvcache]

Reads the sources (nothing is imported): every ``import`` and ``from ...
import`` of every module, at module level or inside a function, including
the Python-level imports of ``.pyx``/``.pxi`` files (not ``cimport``).  An
edge runs from a module to each module of the package it imports; importing
``a.b`` counts as importing package ``a`` too, except a module's own
ancestors (Python initialises those before it, whatever it imports).
Prints the cycles (strongly connected groups of two or more modules) and the
library modules from which ``<package>.bench`` can be reached; exits 1 if
there is either, else 0.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

_PY_IMPORT = re.compile(r"\s*(from \S+ import |import )")


def _source(path: Path) -> str:
    text = path.read_text()
    if path.suffix in (".pyx", ".pxi"):
        # Cython: keep the one-line Python imports, which parse as Python
        text = "\n".join(line.strip() for line in text.splitlines()
                         if _PY_IMPORT.match(line) and "cimport" not in line
                         and not line.rstrip().endswith(("(", "\\")))
    return text


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxi"):
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        try:
            tree = ast.parse(_source(path))
        except SyntaxError:
            tree = ast.Module(body=[], type_ignores=[])
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                pkg = base[:len(base) - node.level + 1] if node.level else []
                m = ".".join(pkg + ([node.module] if node.module else []))
                subs = [f"{m}.{a.name}" for a in node.names if f"{m}.{a.name}" in mods]
                deps.update(subs)
                if len(subs) < len(node.names):      # names that are attributes of m
                    deps.add(m)
        for d in list(deps):                         # importing a.b.c imports a and a.b
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts)))
        g[name] = {d for d in deps if d in mods and d != name
                   and not name.startswith(d + ".")}
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def reaching(g: dict[str, set[str]], target: str) -> dict[str, list[str]]:
    """Modules outside ``target`` (and the command line) from which it is reachable."""
    out = {}
    for m in g:
        if m == target or m.startswith(target + ".") or m.endswith(".__main__"):
            continue
        seen: set[str] = set()
        todo = [m]
        while todo:
            for d in g[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        hit = sorted(d for d in seen if d == target or d.startswith(target + "."))
        if hit:
            out[m] = hit
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "kvcache").resolve()
    g = graph(root)
    found = cycles(g)
    bench = reaching(g, f"{root.name}.bench")
    for c in found:
        print("cycle:", " <-> ".join(c))
    for m, hit in bench.items():
        print(f"{m} reaches {', '.join(hit)}")
    if not found and not bench:
        print(f"{root.name}: {len(g)} modules, no import cycle, none reaches {root.name}.bench")
    return 1 if found or bench else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
