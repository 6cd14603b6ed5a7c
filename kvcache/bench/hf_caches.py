"""The ``transformers`` section: kvcache against Hugging Face's caches.

Needs torch and transformers (QuantizedCache also optimum-quanto); where one
is missing the section is reported as "not installed" in the table and the
JSON, never dropped.

Hugging Face's ``DynamicCache`` (``torch.cat`` per update), ``StaticCache``
(``index_copy_`` into tensors preallocated for ``max_cache_len`` tokens) and
``QuantizedCache("quanto", nbits=4, residual_length=128)`` (dequantizes all
it holds at every update, requantizes every 128 tokens), built from a
``LlamaConfig`` of SmolLM2-135M's cache shape (30 layers, 3 KV heads,
head_dim 64), all float16, against ``KVCache.update`` and kvcache's
transformers cache (``TransformersKVCache`` with the ``"kvcache"`` attention:
it takes torch tensors and returns the new states only).  Each cache is
prefilled with the same ``ctx`` tokens per layer (one update each, untimed),
then all decode the same tokens: one token into each of the 30 layers per
step, the caches taking turns of 8 steps in an order rotated every round,
``torch.no_grad()`` (as ``generate()``), torch on one thread (as kvcache's
update).  Memory: the bytes each cache holds right after the prefill
(``ctx`` tokens, 30 layers): kvcache ``stats().memory_bytes``, transformers
the storage bytes of every tensor its layers hold (quanto: packed data,
scales and shifts).  Against ``QuantizedCache``'s memory, kvcache INT4 with
every whole block quantized (``residual_tokens=0``, ``keep_first=0``;
QuantizedCache quantizes its whole prefill too).
"""

from __future__ import annotations

import array
import gc
import time

import numpy as np

from .common import (
    DTYPE,
    HEAD_DIM,
    HEADS,
    LAYERS,
    NOT_INSTALLED,
    PC,
    Q_HEADS,
    OneThread,
    Progress,
    missing,
    prefilled,
    summary,
    token,
)
from .table import Row, fmt

NAME = "transformers"
CONTEXTS = [1024, 4096]
HF_RESIDUAL = 128              # QuantizedCache's residual_length (its default)
HF_NBITS = 4
HF_TURN = 8                    # decode steps per cache per turn (see _hf_time)

# Names of the implementations, in table order.
KV, KV_HF, DYN, STATIC, QUANT = ("kvcache", "TransformersKVCache", "DynamicCache",
                                 "StaticCache", "QuantizedCache")


# ------------------------------------------------------------------ measure


def _hf_config():
    """A LlamaConfig with SmolLM2-135M's cache-relevant fields (the caches
    read layers, KV heads and head_dim from it; no weights are made)."""
    from transformers import LlamaConfig
    return LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=Q_HEADS,
                       num_key_value_heads=HEADS, hidden_size=Q_HEADS * HEAD_DIM,
                       head_dim=HEAD_DIM, intermediate_size=1536, vocab_size=49152,
                       max_position_embeddings=8192)


def _storage_bytes(obj, seen: set) -> int:
    """Bytes of the storages behind a tensor (a plain one, or a quanto
    tensor subclass whose inner tensors ``__tensor_flatten__`` names), each
    storage counted once."""
    import torch
    if obj is None or not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_storage_bytes(getattr(obj, n), seen) for n in names)
    if obj.numel() == 0:
        return 0
    st = obj.untyped_storage()
    if st.data_ptr() in seen:
        return 0
    seen.add(st.data_ptr())
    return st.nbytes()


def _hf_cache_bytes(cache) -> int:
    seen: set = set()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _storage_bytes(getattr(layer, name, None), seen)
    return total


def _hf_time(impls: dict, k: np.ndarray, v: np.ndarray, tk, tv, ctx: int, steps: int,
             budget_s: float, prog: Progress) -> tuple[dict[str, array.array], int]:
    """Decode steps (one token into each of the 30 layers), the caches
    taking turns of ``HF_TURN`` steps each, in an order rotated every round,
    so that drift hits all alike.  Turns rather than call-by-call
    interleaving: a cache that streams megabytes per call (DynamicCache,
    QuantizedCache) would otherwise leave the next cache's data cold on
    every call, which costs a ~0.3 us update more than the update itself;
    here only the first step of a turn pays for it.  Stops after ``steps``
    steps (rounded up to whole turns) or ``budget_s`` seconds, at least one
    round."""
    names = list(impls)
    count = len(names)
    ts = {n: array.array("q") for n in names}
    pc = PC
    layers = range(LAYERS)
    t_start = time.perf_counter()
    done = rnd = 0
    gc.disable()
    try:
        while done < steps and (rnd == 0 or time.perf_counter() - t_start < budget_s):
            for j in range(count):
                name = names[(rnd + j) % count]
                kind, fn = impls[name]
                ap = ts[name].append
                for n in range(ctx + done + 1, ctx + done + HF_TURN + 1):
                    if kind == "kv":                # KVCache.update(layer, k, v, seq_len)
                        for layer in layers:
                            t0 = pc()
                            fn(layer, k, v, n)
                            t1 = pc()
                            ap(t1 - t0)
                    else:                           # Cache.update(k, v, layer)
                        for layer in layers:
                            t0 = pc()
                            fn(tk, tv, layer)
                            t1 = pc()
                            ap(t1 - t0)
            done += HF_TURN
            rnd += 1
            prog.update(done)
    finally:
        gc.enable()
    return ts, done


def bench_transformers(ctx: int, steps: int, budget_s: float, progress: bool) -> dict:
    """One context: update cost and memory of kvcache and transformers' caches."""
    try:
        import torch
        from transformers import DynamicCache, StaticCache
    except ImportError as exc:
        return {"context": ctx, "status": missing(exc)}
    import transformers

    from ..integrations.transformers import ATTN_IMPLEMENTATION, TransformersKVCache

    steps = -(-steps // HF_TURN) * HF_TURN          # whole turns
    cfg = _hf_config()
    kv_cfg = _hf_config()
    kv_cfg._attn_implementation = ATTN_IMPLEMENTATION    # update returns the new states only
    rng = np.random.default_rng(ctx + 5)
    pre = token(rng, ctx)
    k, v = token(rng), token(rng)
    tpre, tk, tv = (torch.from_numpy(a) for a in (pre, k, v))
    status: dict[str, str] = {}
    memory: dict[str, int] = {}
    impls: dict[str, tuple[str, object]] = {}
    caches: dict[str, object] = {}

    prog = Progress(f"transformers ctx={ctx:,}: prefill {LAYERS} layers of 5 caches", 5,
                     progress)
    with torch.no_grad():
        kv = prefilled(ctx, ctx + steps, pre, pre)
        memory[KV] = kv.stats().memory_bytes
        impls[KV] = ("kv", kv.update)
        caches[KV] = kv
        prog.update(1)

        # The caches speaking transformers' protocol, each made and prefilled
        # in turn (kvcache's own memory is measured above, by its stats).
        for done, (name, make) in enumerate((
                (KV_HF, lambda: TransformersKVCache(kv_cfg)),
                (DYN, lambda: DynamicCache(config=cfg)),
                (STATIC, lambda: StaticCache(config=cfg, max_cache_len=ctx + steps))), 2):
            cache = make()
            for layer in range(LAYERS):
                cache.update(tpre, tpre, layer)
            if name != KV_HF:
                memory[name] = _hf_cache_bytes(cache)
            impls[name] = ("hf", cache.update)
            caches[name] = cache
            prog.update(done)

        quant_prog = Progress("QuantizedCache prefill (optimum-quanto may compile its C++ "
                               "extension on first use, ~60 s once)", 1, progress)
        try:
            from transformers import QuantizedCache
            quant = QuantizedCache("quanto", cfg, nbits=HF_NBITS, residual_length=HF_RESIDUAL)
            for layer in range(LAYERS):
                quant.update(tpre, tpre, layer)
        except ImportError as exc:
            status[QUANT] = missing(exc)
            quant_prog.close("(not installed)")
        except Exception as exc:    # a third-party failure: reported in the table, not raised
            status[QUANT] = f"failed ({type(exc).__name__}: {exc})"[:200]
            quant_prog.close("(failed)")
        else:
            quant_prog.close()
            memory[QUANT] = _hf_cache_bytes(quant)
            impls[QUANT] = ("hf", quant.update)
            caches[QUANT] = quant
        prog.update(5)

        # kvcache INT4, every whole block quantized: QuantizedCache's state
        # after its prefill (memory only)
        if QUANT in impls:
            q4 = prefilled(ctx, ctx, pre, pre, residual_tokens=0, keep_first=0)
            q4.compress_old_entries(0, strategy="int4")
            memory["kvcache int4"] = q4.stats().memory_bytes
            del q4
        prog.close()
        gc.collect()

        prog = Progress(f"transformers ctx={ctx:,}: {len(impls)} caches x {LAYERS} layers, "
                         f"up to {steps:,} steps ({budget_s:g} s budget)", steps, progress)
        with OneThread(torch) as one:
            ts, done = _hf_time(impls, k, v, tk, tv, ctx, steps, budget_s, prog)
        prog.close(f"({done} steps)")

    # Sanity (untimed): every cache holds what it was given.
    last = ctx + done - 1
    assert kv.seq_len(LAYERS - 1) == ctx + done
    assert np.array_equal(kv.keys(0)[:, :, last], k[:, :, 0])
    assert caches[KV_HF].get_seq_length(LAYERS - 1) == ctx + done
    assert caches[DYN].get_seq_length(0) == ctx + done
    assert torch.equal(caches[DYN].layers[0].values[:, :, last], tv[:, :, 0])
    assert torch.equal(caches[STATIC].layers[LAYERS - 1].keys[:, :, last], tk[:, :, 0])
    if QUANT in caches:
        assert caches[QUANT].get_seq_length(0) == ctx + done
    residual = (caches[QUANT].layers[0].keys.shape[-2]
                if QUANT in caches and caches[QUANT].layers[0].keys.dim() == 4 else 0)
    del caches, impls, kv, cache
    gc.collect()

    times = {name: summary(t) for name, t in ts.items()}
    base = times[KV]["median_ns"]
    out = {"context": ctx, "status": "ok", "layers": LAYERS, "dtype": DTYPE,
           "steps": done, "steps_requested": steps, "budget_s": budget_s,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": one.note + ", torch 1 thread", "static_max_cache_len": ctx + steps,
           "quantized": {"backend": "quanto", "nbits": HF_NBITS,
                         "residual_length": HF_RESIDUAL, "residual_tokens_at_end": residual},
           "update": times, "memory_bytes": memory, "status_by_cache": status,
           "speedup_vs": {name: t["median_ns"] / base for name, t in times.items()
                          if name != KV}}
    if KV_HF in times:
        hf_t = times[KV_HF]["median_ns"]
        out["transformers_kvcache_speedup_vs"] = {
            name: times[name]["median_ns"] / hf_t for name in (DYN, STATIC, QUANT)
            if name in times}
    mem = {DYN: KV, STATIC: KV, QUANT: "kvcache int4"}
    out["memory_ratio_vs"] = {name: memory[name] / memory[kvname]
                              for name, kvname in mem.items() if name in memory}
    if QUANT in memory:
        import optimum.quanto as quanto
        out["quantized"]["optimum_quanto"] = getattr(quanto, "__version__", "?")
    return out


# -------------------------------------------------------------------- table


def _quanto_hint(status: str) -> str:
    return "pip install optimum-quanto" if status.startswith(NOT_INSTALLED) else ""


def _rows(t: dict) -> list[Row]:
    ctx = t["context"]
    if t["status"] != "ok":
        return [["transformers", f"ctx {ctx:,} update and memory", "-",
                 "DynamicCache, StaticCache, QuantizedCache", t["status"], "",
                 "pip install 'kvcache[hf]' (torch, transformers; QuantizedCache: "
                 "optimum-quanto)"]]
    out: list[Row] = []
    up, st = t["update"], t["status_by_cache"]

    def med(name):
        return up[name]["median_ns"]

    notes = {DYN: "torch.cat per update",
             STATIC: f"index_copy_; max_cache_len {t['static_max_cache_len']:,}",
             QUANT: (f"quanto int{HF_NBITS}, residual {HF_RESIDUAL}: dequantizes all it "
                     "holds per update")}
    for who, kv_name in ((KV, "KVCache.update"), (KV_HF, "TransformersKVCache")):
        for base in (DYN, STATIC, QUANT):
            case = f"ctx {ctx:,} update median ns, {kv_name}"
            if base not in up:
                out.append(["transformers", case, fmt(med(who)), base, st.get(base, "-"), "",
                            _quanto_hint(st.get(base, ""))])
                continue
            note = [notes[base], f"mean {fmt(up[base]['mean_ns'])} ns"]
            if who == KV and base == DYN:
                note.append(f"{t['steps']} steps x {t['layers']} layers each, in turns")
            if who == KV_HF and base == DYN:
                note.append("torch tensors in, 'kvcache' attention (returns the new states)")
            out.append(["transformers", case, fmt(med(who)), base, fmt(med(base)),
                        fmt(med(base) / med(who), "x"), "; ".join(note)])
    mem = t["memory_bytes"]
    for base, kvname, note in (
            (DYN, KV, "float16; kvcache: stats().memory_bytes"),
            (STATIC, KV, f"StaticCache preallocates {t['static_max_cache_len']:,} tokens"),
            (QUANT, "kvcache int4", "kvcache INT4 (every whole block) vs quanto int4 (all "
                                    "quantized at the prefill); packed data + scales")):
        case = f"ctx {ctx:,} memory MiB, {t['layers']} layers" + (
            ", int4" if base == QUANT else "")
        if base not in mem:
            out.append(["transformers", case, "-", base, st.get(base, "-"), "",
                        _quanto_hint(st.get(base, ""))])
            continue
        out.append(["transformers", case, f"{mem[kvname] / 2**20:,.2f}", base,
                    f"{mem[base] / 2**20:,.2f}", fmt(mem[base] / mem[kvname], "x"), note])
    return out


def rows(res: dict) -> list[Row]:
    return [r for t in res.get(NAME, []) for r in _rows(t)]


def run(settings, meta: dict) -> list[dict]:
    res = [bench_transformers(c, settings.transformers_steps, settings.transformers_budget_s,
                              settings.progress) for c in settings.transformers_contexts]
    ok = [t for t in res if t["status"] == "ok"]
    if ok:
        meta.setdefault("library_versions", {}).update(
            torch=ok[0]["torch"], transformers=ok[0]["transformers"],
            **({"optimum-quanto": ok[0]["quantized"]["optimum_quanto"]}
               if "optimum_quanto" in ok[0]["quantized"] else {}))
    return res


def note(res: dict, meta: dict) -> str:
    return ("transformers: one layer's update of one (1, 3, 1, 64) float16 token, "
            f"30 layers per step, the caches taking turns of {HF_TURN} steps; torch 1 "
            "thread, no_grad. Memory right after a prefill of ctx tokens.")
