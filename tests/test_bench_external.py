"""The bench's comparisons with other libraries (``kvcache.bench.hf_caches`` and
``kvcache.bench.compression``):
the ``transformers`` section (DynamicCache, StaticCache, QuantizedCache) and
the ``compression`` section (kvcache LOSSLESS against blosc2).

What is held to account: at tiny sizes each section measures every cache or
codec it says it does, on the same tokens or bytes (memory accounting and
byte counts that must agree exactly, round trips), and reports a missing
optional package as "not installed" in its JSON and its table rows instead
of dropping it.  No timing is asserted.  The parts that need torch and
transformers, optimum-quanto or blosc2 run wherever those are installed;
the "not installed" paths run everywhere (the package is hidden).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kvcache.__main__ import main as cli_main
from kvcache.bench import compression as comp
from kvcache.bench import hf_caches as hf
from kvcache.bench.table import BASELINES

DATA = Path(__file__).resolve().parent / "data" / "smollm2_kv_prose.npz"
TOKEN_BYTES = 2 * 3 * 64 * 2            # K and V of one float16 token, one layer
# find_spec of a submodule imports its parent: no `optimum` at all raises.
HAS_QUANTO = (importlib.util.find_spec("optimum") is not None
              and importlib.util.find_spec("optimum.quanto") is not None)


def _hide(monkeypatch, *modules):
    """Make ``import m`` raise ImportError for each module (and its submodules)."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


# ------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def hf_result():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return hf.bench_transformers(64, 8, 60.0, progress=False)


def test_transformers_section_measures_every_cache(hf_result):
    t = hf_result
    assert t["status"] == "ok" and t["context"] == 64 and t["steps"] == 8
    names = {hf.KV, hf.KV_HF, hf.DYN, hf.STATIC}
    if HAS_QUANTO:
        names.add(hf.QUANT)
        assert t["status_by_cache"] == {}
    else:
        assert t["status_by_cache"][hf.QUANT].startswith("not installed")
    assert set(t["update"]) == names
    for name, s in t["update"].items():
        # the same tokens: 8 steps x 30 layers each, every call timed
        assert s["n"] == 8 * 30, name
        assert 0 < s["min_ns"] <= s["median_ns"] <= s["max_ns"]
    assert set(t["speedup_vs"]) == names - {hf.KV}
    assert t["speedup_vs"][hf.DYN] == pytest.approx(
        t["update"][hf.DYN]["median_ns"] / t["update"][hf.KV]["median_ns"])


def test_transformers_section_memory_accounting(hf_result):
    mem = hf_result["memory_bytes"]
    live = 30 * 64 * TOKEN_BYTES
    assert mem[hf.DYN] == live                           # exactly the tensors' bytes
    assert mem[hf.STATIC] == 30 * (64 + 8) * TOKEN_BYTES     # preallocated for the decode
    assert hf_result["static_max_cache_len"] == 64 + 8
    assert live <= mem[hf.KV] < 1.1 * live               # blocks plus a little metadata
    if HAS_QUANTO:
        # 4-bit payload plus scales: well under float16, above a quarter of it
        assert live / 4 < mem[hf.QUANT] < live / 2
        assert live / 4 < mem["kvcache int4"] < live / 2
        assert hf_result["quantized"]["residual_tokens_at_end"] == 8
    assert hf_result["memory_ratio_vs"][hf.DYN] == pytest.approx(live / mem[hf.KV])


def test_transformers_rows(hf_result):
    rows = hf.rows({"transformers": [hf_result]})
    assert all(len(r) == len(BASELINES.headers) for r in rows)
    for base in ("DynamicCache", "StaticCache", "QuantizedCache"):
        assert sum(r[3] == base for r in rows) == 3, base    # 2 update rows + 1 memory row
    quant = [r for r in rows if r[3] == "QuantizedCache"]
    if HAS_QUANTO:
        assert all(r[5].endswith("x") for r in quant)
    else:
        assert all(r[4].startswith("not installed") for r in quant)


def test_transformers_not_installed(monkeypatch):
    _hide(monkeypatch, "transformers")
    # torch is checked first: without it (a venv with only the test extra)
    # that is the name reported.
    missing = "transformers" if importlib.util.find_spec("torch") is not None else "torch"
    t = hf.bench_transformers(64, 8, 1.0, progress=False)
    assert t == {"context": 64, "status": f"not installed ({missing})"}
    (row,) = hf.rows({"transformers": [t]})
    assert row[0] == "transformers" and row[4] == f"not installed ({missing})"
    assert "pip install 'kvcache[hf]'" in row[6]


def test_quantized_cache_not_installed(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers.cache_utils as cu
    monkeypatch.setattr(cu, "is_optimum_quanto_available", lambda: False)
    t = hf.bench_transformers(64, 8, 60.0, progress=False)
    assert t["status"] == "ok"
    assert hf.QUANT not in t["update"] and hf.QUANT not in t["memory_bytes"]
    assert t["status_by_cache"][hf.QUANT].startswith("not installed")
    quant = [r for r in hf.rows({"transformers": [t]}) if r[3] == "QuantizedCache"]
    assert len(quant) == 3 and all(r[4].startswith("not installed") for r in quant)


def test_quantized_cache_failure_is_reported(monkeypatch):
    """A QuantizedCache that raises (say, quanto's extension fails to build)
    is reported as failed in its rows; the other caches are still measured."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers.cache_utils as cu

    def boom(self, *args, **kwargs):
        raise RuntimeError("extension build failed")

    monkeypatch.setattr(cu.QuantoQuantizedLayer, "__init__", boom)
    t = hf.bench_transformers(64, 8, 60.0, progress=False)
    assert t["status_by_cache"] == {
        hf.QUANT: "failed (RuntimeError: extension build failed)"}
    assert set(t["update"]) == {hf.KV, hf.KV_HF, hf.DYN, hf.STATIC}
    quant = [r for r in hf.rows({"transformers": [t]}) if r[3] == "QuantizedCache"]
    assert len(quant) == 3 and all(r[4].startswith("failed (RuntimeError") for r in quant)
    assert all(r[6] == "" for r in quant)             # no "pip install" advice for a failure


# ------------------------------------------------------------- compression


@pytest.fixture(scope="module")
def comp_result():
    if not DATA.exists():
        pytest.fail(f"the real K/V data is missing: {DATA}")
    return comp.bench_compression(DATA, 1, progress=False)


def test_compression_section_kvcache(comp_result):
    c = comp_result
    assert c["status"] == "ok" and c["tokens"] == 1492 and c["block_bytes"] == 49152
    lz4 = c["kvcache"]["lz4"]
    # 6 layers x 23 whole 64-token blocks, each tried; raw ones count 1:1
    assert lz4["blocks"] == 6 * 23
    assert lz4["bytes_before"] == 6 * 23 * 49152
    assert lz4["ratio"] == pytest.approx(lz4["bytes_before"] / lz4["bytes_after"])
    assert lz4["ratio"] >= 1.0
    assert lz4["encode_gb_per_s"] > 0 and lz4["decode_gb_per_s"] > 0
    if importlib.util.find_spec("zstandard") is not None:
        assert c["kvcache"]["zstd"]["bytes_before"] == lz4["bytes_before"]
    else:
        assert c["status_by_impl"]["kvcache zstd"].startswith("not installed")


def test_compression_section_blosc2(comp_result):
    c = comp_result
    if importlib.util.find_spec("blosc2") is None:
        assert c["blosc2"] == {} and c["status_by_impl"]["blosc2"].startswith("not installed")
        return
    assert set(c["blosc2"]) == {f"{f}+{k}" for f, k in comp.BLOSC2_SETTINGS}
    for s in c["blosc2"].values():
        # the very bytes kvcache compressed (its round trip is checked inside)
        assert s["bytes_before"] == c["kvcache"]["lz4"]["bytes_before"]
        assert s["ratio"] == pytest.approx(s["bytes_before"] / s["bytes_after"])
    assert c["blosc2_best_ratio"] in c["blosc2"]
    rows = comp.rows({"compression": c})
    ratio = next(r for r in rows if r[1] == "LOSSLESS lz4: ratio")
    assert ratio[3] == "blosc2 SHUFFLE+LZ4 c5"
    assert ratio[5] == f"{c['kvcache']['lz4']['ratio'] / c['blosc2']['SHUFFLE+LZ4']['ratio']:.2f}x"


def test_compression_blosc2_not_installed(monkeypatch):
    _hide(monkeypatch, "blosc2")
    c = comp.bench_compression(DATA, 1, progress=False)
    assert c["status"] == "ok" and c["blosc2"] == {}
    assert c["status_by_impl"]["blosc2"] == "not installed (blosc2)"
    rows = comp.rows({"compression": c})
    lz4 = [r for r in rows if r[1].startswith("LOSSLESS lz4")]
    assert len(lz4) == 3
    assert all(r[4] == "not installed (blosc2)" and r[2] != "-" for r in lz4)


def test_compression_data_missing(tmp_path):
    c = comp.bench_compression(tmp_path / "none.npz", 1, progress=False)
    assert c["status"].startswith("real K/V data not found")
    (row,) = comp.rows({"compression": c})
    assert "--kv-data" in row[6]


def test_default_kv_data(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCACHE_KV_DATA", str(tmp_path / "x.npz"))
    assert comp.default_kv_data() == tmp_path / "x.npz"
    monkeypatch.delenv("KVCACHE_KV_DATA")
    assert comp.default_kv_data().name == "smollm2_kv_prose.npz"


# --------------------------------------------------------------------- CLI


def test_bench_cli_external_sections(tmp_path, capsys):
    """Both sections through the command line: the third table and --json."""
    path = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--sections", "transformers,compression",
                     "--contexts", "64", "--steps", "8", "--no-progress",
                     "--kv-data", str(DATA), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["meta"]["sections"] == ["compression", "transformers"]
    assert res["meta"]["settings"]["transformers_contexts"] == [64]
    assert res["meta"]["settings"]["kv_data"] == str(DATA)
    assert len(res["transformers"]) == 1 and "compression" in res
    assert res["table"]["rows"] == [] and res["attention_table"]["rows"] == []
    rows = res["baselines_table"]["rows"]
    assert res["baselines_table"]["headers"] == BASELINES.headers
    assert {r[0] for r in rows} == {"transformers", "compression"}
    assert "against other libraries" in out and "vs baseline" in out
    for r in rows:
        assert r[1] in out and r[4] in out, r
    assert np.isfinite(res["meta"]["wall_s"])
