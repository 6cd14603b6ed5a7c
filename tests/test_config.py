"""CacheConfig: the one place KVCache's options are checked, and what a save
file records of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvcache import CacheConfig, CompressionStrategy, KVCache


def test_applied_defaults():
    c = CacheConfig(2, 4, 80)
    assert (c.block_size, c.group_size, c.int8_group_size, c.keep_first) == (64, 20, 40, 4)
    assert c.compression is CompressionStrategy.NONE and c.dtype == "float16"
    assert CacheConfig(2, 4, 64, sink_tokens=3).keep_first == 3
    assert CacheConfig(1, 1, 8, dtype=np.float32, compression="int8").dtype == "float32"
    assert CacheConfig(1, 1, 8, error_budget=1).error_budget == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.head_dim = 64


def test_an_explicit_group_size_of_32_is_honoured():
    """32 used to be both the default and a value: given explicitly, it was
    silently fitted to head_dim.  Now the default is None (fitted) and a
    given 32 is applied as given, or rejected when it does not divide."""
    assert CacheConfig(1, 1, 64, group_size=32).group_size == 32
    assert KVCache(1, 1, 64, group_size=32).group_size == 32
    assert KVCache(1, 1, 80).group_size == 20                   # fitted: 80 = 4 * 20
    for given in (32, 64):
        with pytest.raises(ValueError, match=rf"group_size \({given}\) must divide head_dim "
                                             r"\(80\)"):
            KVCache(1, 1, 80, group_size=given)
    assert KVCache(1, 1, 80, group_size=20, int8_group_size=40).config == CacheConfig(1, 1, 80)
    assert KVCache(1, 1, 8, group_size=32).group_size == 8        # capped at head_dim


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=0), dict(head_dim=1.5), dict(block_size=12), dict(dtype="int8"),
    dict(overflow="RING"), dict(sink_tokens=16), dict(compression="int3"),
    dict(group_size=3), dict(int8_group_size=3), dict(compression="int4", head_dim=5),
    dict(error_budget=float("nan")), dict(auto_compress=True),
    dict(compression="int8", background=True), dict(lossless_codec="gzip"),
    dict(num_kv_heads=2**16, head_dim=2**16, block_size=2**10),
])
def test_the_constructor_raises_what_the_config_raises(kwargs):
    kw = {**dict(num_layers=1, num_kv_heads=2, head_dim=4, max_seq_len=16), **kwargs}
    with pytest.raises((TypeError, ValueError)) as from_config:
        CacheConfig(**kw)
    with pytest.raises(type(from_config.value)) as from_cache:
        KVCache(**kw)
    assert str(from_cache.value) == str(from_config.value)


def test_the_cache_exposes_its_config():
    cache = KVCache(3, 2, 16, max_seq_len=100, batch_size=2, block_size=16, sink_tokens=2,
                    compression="int8", residual_tokens=32, auto_compress=True,
                    error_budget=0.2, lossless_codec="zstd" if _has_zstd() else "lz4")
    c = cache.config
    assert c == CacheConfig(**c.kwargs())
    for name in ("num_layers", "num_kv_heads", "head_dim", "max_seq_len", "batch_size",
                 "block_size", "sink_tokens", "overflow", "compression", "residual_tokens",
                 "group_size", "int8_group_size", "keep_first", "error_budget",
                 "auto_compress", "lossless_codec"):
        assert getattr(cache, name) == getattr(c, name), name
    assert str(cache.dtype) == c.dtype and cache.metrics_enabled == c.metrics
    # reorder_batch changes the batch size: the config follows it.
    cache.reorder_batch([0, 1, 1])
    assert cache.config.batch_size == 3 and cache.config.residual_tokens == 32
    with pytest.raises(AttributeError):
        cache.compression = "int4"                        # read-only: the config holds it


def _has_zstd() -> bool:
    import importlib.util
    return importlib.util.find_spec("zstandard") is not None


def test_dict_round_trip_and_strict_reading():
    c = CacheConfig(2, 4, 96, compression="adaptive", residual_tokens=0, keep_first=1)
    d = c.to_dict()
    assert d["compression"] == "ADAPTIVE" and CacheConfig.from_dict(d) == c
    cases = [
        ({**d, "extra": 1}, ValueError, "unknown fields"),
        ({k: v for k, v in d.items() if k != "head_dim"}, ValueError, "lacks the field"),
        ({**d, "metrics": 1}, TypeError, "config.metrics must be bool"),
        ({**d, "head_dim": 96.0}, TypeError, "config.head_dim must be int"),
        ({**d, "group_size": None}, TypeError, "config.group_size must be int"),
        ({**d, "compression": "adaptive"}, ValueError, "unknown compression strategy"),
        ({**d, "head_dim": 7}, ValueError, "head_dim"),
    ]
    for bad, exc, message in cases:
        with pytest.raises(exc, match=message):
            CacheConfig.from_dict(bad)
    assert CacheConfig.from_dict({**d, "error_budget": 0}).error_budget == 0.0
