"""The ``compression`` section: kvcache's LOSSLESS tier against blosc2.

On real SmolLM2-135M keys and values (``default_kv_data()``: the trimmed
copy shipped in ``kvcache/bench/data/``, see its README, or ``--kv-data`` /
``$KVCACHE_KV_DATA``, e.g. the full ``tests/data/smollm2_kv_prose.npz`` of a
checkout): kvcache's LOSSLESS tier (byte shuffle + LZ4, or zstd with
``lossless_codec="zstd"``) against blosc2 on the same bytes: the six stored
layers in a 6-layer cache, ``compress_old_entries(0, workers=1)`` on every
whole 64-token block (49,152 bytes of K then V); blosc2 compresses the same
blocks one by one (the granularity a cache reads them back at), one thread,
clevel 5, with SHUFFLE or BITSHUFFLE and LZ4 or ZSTD.  Ratio: bytes before /
after (a kvcache block that would not shrink stays raw and counts 1:1).
Encode GB/s: full-precision bytes / time (kvcache: the whole public call,
its block swap and hand-back of freed memory included); decode GB/s:
``keys()`` + ``values()`` of every layer (bytes returned / time) and blosc2
decompressing every block into one preallocated buffer.  Medians over
repetitions; every round trip is checked bit-exact.  zstd needs
``zstandard`` and blosc2 ``blosc2``; where one is missing its rows say "not
installed".
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np

from ..cache import KVCache
from .common import BATCH, DTYPE, HEAD_DIM, HEADS, Progress, missing
from .table import Row, fmt

NAME = "compression"

DATA_LAYERS = (0, 1, 8, 15, 22, 29)
BLOSC2_SETTINGS = (("SHUFFLE", "LZ4"), ("SHUFFLE", "ZSTD"), ("BITSHUFFLE", "LZ4"),
                   ("BITSHUFFLE", "ZSTD"))
BLOSC2_CLEVEL = 5


def default_kv_data() -> Path:
    """$KVCACHE_KV_DATA, else the real K/V shipped with this package."""
    env = os.environ.get("KVCACHE_KV_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "smollm2_kv_prose.npz"


def _load_real(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(k, v)] per stored layer, float16 [1, 3, tokens, 64]."""
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
        status["kvcache zstd"] = missing(exc)
    try:
        import blosc2
    except ImportError as exc:
        blosc2 = None
        status["blosc2"] = missing(exc)
    else:
        blocks = _block_bytes(data, 64)
        for filt, codec in BLOSC2_SETTINGS:
            impls[f"{filt}+{codec}"] = _Blosc2(blosc2, blocks, filt, codec)
    names = list(impls)
    prog = Progress(f"compression: {len(names)} codecs x {reps} rounds (encode + decode, "
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


# -------------------------------------------------------------------- table


def rows(res: dict) -> list[Row]:
    if NAME not in res:
        return []
    c = res[NAME]
    if c["status"] != "ok":
        return [["compression", "LOSSLESS vs blosc2", "-", "blosc2", "-", "", c["status"]]]
    out: list[Row] = []
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
                out.append(["compression", case, fmt(k[key], "r"), label,
                            st.get("blosc2", "-"), "", "pip install blosc2 (the [bench] extra)"])
                continue
            if setting == best and key == "ratio":
                note = "blosc2's best ratio of the settings tried; " + note
            out.append(["compression", case, fmt(k[key], "r"), label, fmt(b[key], "r"),
                        fmt(k[key] / b[key], "x"), note])
    if b2:
        others = ", ".join(f"{s} {v['ratio']:.3f}" for s, v in b2.items())
        out.append(["compression", "blosc2 ratios (all settings tried)", "", "", "", "",
                    others])
    if "kvcache zstd" in st:
        out.append(["compression", "LOSSLESS zstd", "-", "", "", "",
                    f"kvcache zstd codec: {st['kvcache zstd']} (pip install zstandard)"])
    return out


def run(settings, meta: dict) -> dict:
    res = bench_compression(settings.kv_data, settings.compression_reps, settings.progress)
    if res.get("blosc2_version"):
        meta.setdefault("library_versions", {})["blosc2"] = res["blosc2_version"]
    return res


def note(res: dict, meta: dict) -> str:
    c = res.get(NAME, {})
    if c.get("status") != "ok":
        return ""                   # the row says why
    return (f"compression: real SmolLM2-135M K/V ({len(c['layers'])} layers x "
            f"{c['tokens']:,} tokens, float16), every whole 64-token block; medians of "
            "repetitions; round trips checked bit-exact.")
