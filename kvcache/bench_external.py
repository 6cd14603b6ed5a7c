"""The ``transformers`` and ``compression`` sections of ``python -m kvcache bench``:
kvcache against other libraries' caches and codecs, measured in the same run.

Both depend on optional packages.  A section whose package is missing is
reported as "not installed" in the table and the JSON, never dropped.

transformers (torch + transformers; QuantizedCache also needs optimum-quanto)
    Hugging Face's ``DynamicCache`` (``torch.cat`` per update),
    ``StaticCache`` (``index_copy_`` into tensors preallocated for
    ``max_cache_len`` tokens) and ``QuantizedCache("quanto", nbits=4,
    residual_length=128)`` (dequantizes all it holds at every update,
    requantizes every 128 tokens), built from a ``LlamaConfig`` of
    SmolLM2-135M's cache shape (30 layers, 3 KV heads, head_dim 64), all
    float16, against ``KVCache.update`` and kvcache's transformers cache
    (``TransformersKVCache`` with the ``"kvcache"`` attention: it takes torch
    tensors and returns the new states only).  Each cache is prefilled with
    the same ``ctx`` tokens per layer (one update each, untimed), then all
    decode the same tokens: one token into each of the 30 layers per step,
    the caches taking turns of 8 steps in an order rotated every round,
    ``torch.no_grad()`` (as ``generate()``), torch on one thread (as
    kvcache's update).  Memory: the bytes each cache holds right after the
    prefill (``ctx`` tokens, 30 layers): kvcache ``stats().memory_bytes``,
    transformers the storage bytes of every tensor its layers hold (quanto:
    packed data, scales and shifts).  Against ``QuantizedCache``'s memory,
    kvcache INT4 with every whole block quantized (``residual_tokens=0``,
    ``keep_first=0``; QuantizedCache quantizes its whole prefill too).
compression (blosc2, where installed; the real SmolLM2 K/V of ``tests/data``)
    kvcache's LOSSLESS tier (byte shuffle + LZ4, or zstd with
    ``lossless_codec="zstd"``) against blosc2 on the same bytes: the six
    stored layers (1,492 tokens each, float16) in a 6-layer cache,
    ``compress_old_entries(0, workers=1)`` on every whole 64-token block
    (49,152 bytes of K then V); blosc2 compresses the same blocks one by one
    (the granularity a cache reads them back at), one thread, clevel 5, with
    SHUFFLE or BITSHUFFLE and LZ4 or ZSTD.  Ratio: bytes before / after (a
    kvcache block that would not shrink stays raw and counts 1:1).  Encode
    GB/s: full-precision bytes / time (kvcache: the whole public call, its
    block swap and hand-back of freed memory included); decode GB/s:
    ``keys()`` + ``values()`` of every layer (bytes returned / time) and
    blosc2 decompressing every block into one preallocated buffer.  Medians
    over repetitions; every round trip is checked bit-exact.
"""

from __future__ import annotations

import array
import gc
import os
import time
from pathlib import Path

import numpy as np

from .bench import (
    _PC,
    BATCH,
    DTYPE,
    HEAD_DIM,
    HEADS,
    LAYERS,
    Q_HEADS,
    _fmt,
    _grouped,
    _OneThread,
    _Progress,
    _summary,
    _token,
)
from .cache import KVCache

__all__ = ["bench_transformers", "bench_compression", "build_rows", "render", "HEADERS",
           "HF_CONTEXTS", "default_kv_data"]

HF_CONTEXTS = [1024, 4096]
HF_RESIDUAL = 128              # QuantizedCache's residual_length (its default)
HF_NBITS = 4
HF_TURN = 8                    # decode steps per cache per turn (see _hf_time)
NOT_INSTALLED = "not installed"

# Names of the transformers-section implementations, in table order.
KV, KV_HF, DYN, STATIC, QUANT = ("kvcache", "TransformersKVCache", "DynamicCache",
                                 "StaticCache", "QuantizedCache")


def _missing(exc: BaseException) -> str:
    name = getattr(exc, "name", None)
    return f"{NOT_INSTALLED} ({name or exc})"


# ------------------------------------------------------------ transformers


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
             budget_s: float, prog: _Progress) -> tuple[dict[str, array.array], int]:
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
    pc = _PC
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
        return {"context": ctx, "status": _missing(exc)}
    import transformers

    from .integrations.transformers import ATTN_IMPLEMENTATION, TransformersKVCache

    steps = -(-steps // HF_TURN) * HF_TURN          # whole turns
    cfg = _hf_config()
    kv_cfg = _hf_config()
    kv_cfg._attn_implementation = ATTN_IMPLEMENTATION    # update returns the new states only
    rng = np.random.default_rng(ctx + 5)
    pre = _token(rng, ctx)
    k, v = _token(rng), _token(rng)
    tpre, tk, tv = (torch.from_numpy(a) for a in (pre, k, v))
    status: dict[str, str] = {}
    memory: dict[str, int] = {}
    impls: dict[str, tuple[str, object]] = {}
    caches: dict[str, object] = {}

    prog = _Progress(f"transformers ctx={ctx:,}: prefill {LAYERS} layers of 5 caches", 5,
                     progress)
    with torch.no_grad():
        kv = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx + steps, batch_size=BATCH,
                     dtype=DTYPE, overflow="error")
        for layer in range(LAYERS):
            kv.update(layer, pre, pre, ctx)
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

        quant_prog = _Progress("QuantizedCache prefill (optimum-quanto may compile its C++ "
                               "extension on first use, ~60 s once)", 1, progress)
        try:
            from transformers import QuantizedCache
            quant = QuantizedCache("quanto", cfg, nbits=HF_NBITS, residual_length=HF_RESIDUAL)
            for layer in range(LAYERS):
                quant.update(tpre, tpre, layer)
        except ImportError as exc:
            status[QUANT] = _missing(exc)
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
            q4 = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=ctx, batch_size=BATCH,
                         dtype=DTYPE, overflow="error", residual_tokens=0, keep_first=0)
            for layer in range(LAYERS):
                q4.update(layer, pre, pre, ctx)
            q4.compress_old_entries(0, strategy="int4")
            memory["kvcache int4"] = q4.stats().memory_bytes
            del q4
        prog.close()
        gc.collect()

        prog = _Progress(f"transformers ctx={ctx:,}: {len(impls)} caches x {LAYERS} layers, "
                         f"up to {steps:,} steps ({budget_s:g} s budget)", steps, progress)
        with _OneThread(torch) as one:
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

    times = {name: _summary(t) for name, t in ts.items()}
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


# ------------------------------------------------------------- compression

DATA_LAYERS = (0, 1, 8, 15, 22, 29)
BLOSC2_SETTINGS = (("SHUFFLE", "LZ4"), ("SHUFFLE", "ZSTD"), ("BITSHUFFLE", "LZ4"),
                   ("BITSHUFFLE", "ZSTD"))
BLOSC2_CLEVEL = 5


def default_kv_data() -> Path:
    """$KVCACHE_KV_DATA, else tests/data/smollm2_kv_prose.npz of the checkout
    this package was imported from (absent in an installed wheel)."""
    env = os.environ.get("KVCACHE_KV_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm2_kv_prose.npz"


def _load_real(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(k, v)] per stored layer, float16 [1, 3, 1492, 64]."""
    with np.load(path) as d:
        return [(np.ascontiguousarray(d[f"k_L{i}"][None], dtype=DTYPE),
                 np.ascontiguousarray(d[f"v_L{i}"][None], dtype=DTYPE)) for i in DATA_LAYERS]


class _KvLossless:
    """kvcache LOSSLESS with one codec on every whole block of the stored
    layers: encode = ``compress_old_entries(0, workers=1)`` of a freshly
    filled cache (filling untimed); decode = ``keys()`` + ``values()`` of
    every layer of the last cache encoded."""

    def __init__(self, data, codec: str) -> None:
        self.data, self.codec = data, codec
        self.layers, self.tokens = len(data), data[0][0].shape[2]
        self.returned = sum(k.nbytes + v.nbytes for k, v in data)
        self.cache: KVCache | None = None
        self.stats = None

    def _cache(self, compression: str | None) -> KVCache:
        kw = ({"compression": compression, "lossless_codec": self.codec, "residual_tokens": 0,
               "keep_first": 0} if compression else {})
        c = KVCache(self.layers, HEADS, HEAD_DIM, max_seq_len=self.tokens, batch_size=BATCH,
                    dtype=DTYPE, **kw)
        for i, (k, v) in enumerate(self.data):
            c.update(i, k, v, self.tokens)
        return c

    def encode(self) -> float:
        """GB/s of one encode pass (full-precision bytes / time)."""
        self.cache = None
        cache = self._cache("lossless")
        gc.collect()
        t0 = time.perf_counter()
        st = cache.compress_old_entries(0, workers=1)
        t = time.perf_counter() - t0
        self.cache, self.stats = cache, st
        return st.bytes_before / t / 1e9

    def decode(self) -> float:
        """GB/s of keys() + values() of every layer (bytes returned / time)."""
        return _read_all(self.cache, self.layers, self.returned)

    def result(self, enc: list[float], dec: list[float], reps: int) -> dict:
        cache, st = self.cache, self.stats
        for i, (k, v) in enumerate(self.data):          # lossless: bit-exact (untimed)
            assert np.array_equal(cache.keys(i), k) and np.array_equal(cache.values(i), v)
        # The copy floor: keys() + values() of the same data uncompressed.
        plain = self._cache(None)
        copy = [_read_all(plain, self.layers, self.returned) for _ in range(reps + 1)][1:]
        # st.blocks counts the blocks packed, st.raw_blocks those left raw
        return {"codec": self.codec, "ratio": st.compression_ratio,
                "blocks": st.blocks + st.raw_blocks, "raw_blocks": st.raw_blocks,
                "bytes_before": st.bytes_before, "bytes_after": st.bytes_after,
                "encode_gb_per_s": float(np.median(enc)),
                "decode_gb_per_s": float(np.median(dec)),
                "uncompressed_keys_values_gb_per_s": float(np.median(copy)),
                "encode_samples": enc, "decode_samples": dec}


def _read_all(cache: KVCache, layers: int, nbytes: int) -> float:
    keys, values = cache.keys, cache.values
    t0 = time.perf_counter()
    for i in range(layers):
        keys(i)
        values(i)
    return nbytes / (time.perf_counter() - t0) / 1e9


def _block_bytes(data, block: int) -> list[bytes]:
    """The bytes of every whole block, K then V ([heads, tokens, head_dim])."""
    out = []
    for k, v in data:
        for s in range(0, k.shape[2] // block * block, block):
            out.append(k[0, :, s:s + block].tobytes() + v[0, :, s:s + block].tobytes())
    return out


class _Blosc2:
    """blosc2 on the same blocks, one ``blosc2.compress`` per block; decode
    into one preallocated buffer."""

    def __init__(self, blosc2, blocks: list[bytes], filt: str, codec: str) -> None:
        self.filt, self.codec = filt, codec
        self.kw = {"typesize": np.dtype(DTYPE).itemsize, "clevel": BLOSC2_CLEVEL,
                   "filter": getattr(blosc2.Filter, filt), "codec": getattr(blosc2.Codec, codec)}
        self.compress, self.decompress = blosc2.compress, blosc2.decompress
        self.blocks = blocks
        self.total = sum(len(b) for b in blocks)
        self.out = bytearray(self.total)
        self.offsets = np.cumsum([0] + [len(b) for b in blocks]).tolist()
        self.comp: list[bytes] = []

    def encode(self) -> float:
        compress, kw = self.compress, self.kw
        t0 = time.perf_counter()
        self.comp = [compress(b, **kw) for b in self.blocks]
        return self.total / (time.perf_counter() - t0) / 1e9

    def decode(self) -> float:
        decompress, mv, off = self.decompress, memoryview(self.out), self.offsets
        t0 = time.perf_counter()
        for c, a, b in zip(self.comp, off, off[1:]):
            decompress(c, dst=mv[a:b])
        return self.total / (time.perf_counter() - t0) / 1e9

    def result(self, enc: list[float], dec: list[float], reps: int) -> dict:
        assert self.out == b"".join(self.blocks)        # round trip (untimed)
        packed = sum(len(c) for c in self.comp)
        return {"filter": self.filt, "codec": self.codec, "clevel": BLOSC2_CLEVEL,
                "ratio": self.total / packed, "bytes_before": self.total, "bytes_after": packed,
                "encode_gb_per_s": float(np.median(enc)),
                "decode_gb_per_s": float(np.median(dec)),
                "encode_samples": enc, "decode_samples": dec}


def bench_compression(path: Path, reps: int, progress: bool) -> dict:
    """kvcache LOSSLESS (lz4, zstd) and blosc2 settings on the real K/V.

    ``reps`` + 1 rounds (the first a warm-up, untimed); in each, every
    implementation encodes then decodes once, taking turns in an order
    rotated every round, so that machine drift hits all alike."""
    path = Path(path)
    if not path.exists():
        return {"status": f"real K/V data not found at {path} (pass --kv-data)",
                "data": str(path)}
    data = _load_real(path)
    status: dict[str, str] = {}
    impls: dict[str, _KvLossless | _Blosc2] = {"kvcache lz4": _KvLossless(data, "lz4")}
    try:
        import zstandard  # noqa: F401
        impls["kvcache zstd"] = _KvLossless(data, "zstd")
    except ImportError as exc:
        status["kvcache zstd"] = _missing(exc)
    try:
        import blosc2
    except ImportError as exc:
        blosc2 = None
        status["blosc2"] = _missing(exc)
    else:
        blocks = _block_bytes(data, 64)
        for filt, codec in BLOSC2_SETTINGS:
            impls[f"{filt}+{codec}"] = _Blosc2(blosc2, blocks, filt, codec)
    names = list(impls)
    prog = _Progress(f"compression: {len(names)} codecs x {reps} rounds (encode + decode, "
                     "taking turns)", reps + 1, progress)
    enc: dict[str, list[float]] = {n: [] for n in names}
    dec: dict[str, list[float]] = {n: [] for n in names}
    threads = blosc2.nthreads if blosc2 is not None else None
    if blosc2 is not None:
        blosc2.set_nthreads(1)                        # one core, as kvcache's pass here
    try:
        for r in range(reps + 1):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                e = impls[name].encode()
                d = impls[name].decode()
                if r:
                    enc[name].append(e)
                    dec[name].append(d)
            prog.update(r + 1)
    finally:
        if blosc2 is not None:
            blosc2.set_nthreads(threads)
    prog.close()
    res = {n: impls[n].result(enc[n], dec[n], reps) for n in names}
    kv = {res[n]["codec"]: res[n] for n in names if n.startswith("kvcache")}
    b2 = {n: res[n] for n in names if not n.startswith("kvcache")}
    out = {"status": "ok", "data": str(path), "layers": list(DATA_LAYERS),
           "tokens": data[0][0].shape[2],
           "block_bytes": 2 * HEADS * 64 * HEAD_DIM * np.dtype(DTYPE).itemsize,
           "reps": reps, "kvcache": kv, "blosc2": b2,
           "blosc2_version": getattr(blosc2, "__version__", None),
           "status_by_impl": status}
    if b2:
        out["blosc2_best_ratio"] = max(b2, key=lambda s: b2[s]["ratio"])
    return out


# ------------------------------------------------------------------- table

HEADERS = ["section", "case", "kvcache", "baseline", "baseline value", "vs baseline", "note"]


def _quanto_hint(status: str) -> str:
    return "pip install optimum-quanto" if status.startswith(NOT_INSTALLED) else ""


def _transformers_rows(t: dict) -> list[list[str]]:
    ctx = t["context"]
    if t["status"] != "ok":
        return [["transformers", f"ctx {ctx:,} update and memory", "-",
                 "DynamicCache, StaticCache, QuantizedCache", t["status"], "",
                 "pip install 'kvcache[hf]' (torch, transformers; QuantizedCache: "
                 "optimum-quanto)"]]
    rows = []
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
                rows.append(["transformers", case, _fmt(med(who)), base, st.get(base, "-"), "",
                             _quanto_hint(st.get(base, ""))])
                continue
            note = [notes[base], f"mean {_fmt(up[base]['mean_ns'])} ns"]
            if who == KV and base == DYN:
                note.append(f"{t['steps']} steps x {t['layers']} layers each, in turns")
            if who == KV_HF and base == DYN:
                note.append("torch tensors in, 'kvcache' attention (returns the new states)")
            rows.append(["transformers", case, _fmt(med(who)), base, _fmt(med(base)),
                         _fmt(med(base) / med(who), "x"), "; ".join(note)])
    mem = t["memory_bytes"]
    for base, kvname, note in (
            (DYN, KV, "float16; kvcache: stats().memory_bytes"),
            (STATIC, KV, f"StaticCache preallocates {t['static_max_cache_len']:,} tokens"),
            (QUANT, "kvcache int4", "kvcache INT4 (every whole block) vs quanto int4 (all "
                                    "quantized at the prefill); packed data + scales")):
        case = f"ctx {ctx:,} memory MiB, {t['layers']} layers" + (
            ", int4" if base == QUANT else "")
        if base not in mem:
            rows.append(["transformers", case, "-", base, st.get(base, "-"), "",
                         _quanto_hint(st.get(base, ""))])
            continue
        rows.append(["transformers", case, f"{mem[kvname] / 2**20:,.2f}", base,
                     f"{mem[base] / 2**20:,.2f}", _fmt(mem[base] / mem[kvname], "x"), note])
    return rows


def _compression_rows(c: dict) -> list[list[str]]:
    if c["status"] != "ok":
        return [["compression", "LOSSLESS vs blosc2", "-", "blosc2", "-", "", c["status"]]]
    rows = []
    kv, b2, st = c["kvcache"], c["blosc2"], c["status_by_impl"]
    pairs = [("lz4", "SHUFFLE+LZ4")]
    best = c.get("blosc2_best_ratio")
    if best and best != "SHUFFLE+LZ4":
        pairs.append(("zstd" if "zstd" in kv and "ZSTD" in best else "lz4", best))
    if not b2:
        pairs = [("lz4", None)] + ([("zstd", None)] if "zstd" in kv else [])
    for codec, setting in pairs:
        k = kv[codec]
        b = b2.get(setting) if setting else None
        label = f"blosc2 {setting} c{BLOSC2_CLEVEL}" if setting else "blosc2"
        for key, name, note in (
                ("ratio", "ratio", (f"{k['raw_blocks']} of {k['blocks']} kvcache blocks stay "
                                    f"raw (would not shrink); per {c['block_bytes']:,}-byte "
                                    "block, one thread")),
                ("encode_gb_per_s", "encode GB/s",
                 "kvcache: compress_old_entries(0, workers=1), whole call"),
                ("decode_gb_per_s", "decode GB/s",
                 (f"kvcache: keys()+values() (uncompressed: "
                  f"{k['uncompressed_keys_values_gb_per_s']:.2f} GB/s); blosc2: decompress "
                  "into one buffer"))):
            case = f"LOSSLESS {codec}: {name}"
            if b is None:
                rows.append(["compression", case, _fmt(k[key], "r"), label,
                             st.get("blosc2", "-"), "", "pip install blosc2 (the [bench] extra)"])
                continue
            if setting == best and key == "ratio":
                note = "blosc2's best ratio of the settings tried; " + note
            rows.append(["compression", case, _fmt(k[key], "r"), label, _fmt(b[key], "r"),
                         _fmt(k[key] / b[key], "x"), note])
    if b2:
        others = ", ".join(f"{s} {v['ratio']:.3f}" for s, v in b2.items())
        rows.append(["compression", "blosc2 ratios (all settings tried)", "", "", "", "",
                     others])
    if "kvcache zstd" in st:
        rows.append(["compression", "LOSSLESS zstd", "-", "", "", "",
                     f"kvcache zstd codec: {st['kvcache zstd']} (pip install zstandard)"])
    return rows


def build_rows(res: dict) -> list[list[str]]:
    rows: list[list[str]] = []
    for t in res.get("transformers", []):
        rows.extend(_transformers_rows(t))
    if "compression" in res:
        rows.extend(_compression_rows(res["compression"]))
    return rows


def render(rows: list[list[str]], meta: dict) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    right = {2, 4, 5}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(HEADERS))
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("library_versions", {}).items())
    out = [(f"kvcache {meta['kvcache_version']} against other libraries (same run)"
            + (f": {versions}" if versions else "") + ("; QUICK" if meta["quick"] else "")),
           ("vs baseline: > 1 means kvcache is better: baseline time / kvcache time, baseline "
            "memory / kvcache memory, kvcache ratio or GB/s / baseline's."),
           rule, line(HEADERS), rule]
    out += _grouped(rows, line, rule)
    if "transformers" in meta.get("sections", ()):
        out.append("transformers: one layer's update of one (1, 3, 1, 64) float16 token, "
                   f"30 layers per step, the caches taking turns of {HF_TURN} steps; torch 1 "
                   "thread, no_grad. Memory right after a prefill of ctx tokens.")
    if "compression" in meta.get("sections", ()):
        out.append("compression: real SmolLM2-135M K/V (6 layers x 1,492 tokens, float16), "
                   "every whole 64-token block; medians of repetitions; "
                   "round trips checked bit-exact.")
    return "\n".join(out)
