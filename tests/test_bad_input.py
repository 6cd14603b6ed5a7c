"""Every error path: the exception type, a message naming what was expected and
what was given, and a cache left exactly as it was.  Plus the inputs that must
be accepted (casts, odd layouts, NaN/inf)."""

import math
import subprocess
import sys

import numpy as np
import pytest
from kvhelpers import assert_same_contents, assert_unchanged, contents, counters, real_kv, snapshot
from reference import RefCache

from kvcache import CacheFullError, GrowthStrategy, KVCache
from kvcache.growth import Adaptive, Exponential, Linear

H, D = 3, 64
CAP, S, BS = 32, 2, 8


def prefilled(overflow="ring", dtype="float16", compressed=False):
    """Layer 0: 20 tokens (linear).  Layer 1: 40 tokens, wrapped (held 0,1 and 10..39).
    `compressed`: every block outside the last 4 positions is INT8."""
    k, v = real_kv(8)
    cache = KVCache(2, H, D, max_seq_len=CAP, block_size=BS, sink_tokens=S, dtype=dtype,
                    overflow=overflow, residual_tokens=4, keep_first=0)
    cache.update(0, k[:, :, :20], v[:, :, :20], 20)
    if overflow == "ring":
        cache.update(1, k[:, :, :40], v[:, :, :40], 40)
    else:
        cache.update(1, k[:, :, :30], v[:, :, :30], 30)
    if compressed:
        assert cache.compress_old_entries(0, strategy="int8").blocks > 0
    cache.keys(0)                      # some hits, so that counters are not all zero
    return cache


def tokens(t=2, offset=100, dtype=np.float16):
    k, v = real_kv(22)
    return (k[:, :, offset:offset + t].astype(dtype), v[:, :, offset:offset + t].astype(dtype))


K2, V2 = tokens()
GIVEN = {"k": K2, "v": V2}


def _cases():
    k, v = K2, V2
    yield "hole", lambda c: c.update(0, k, v, 23), ValueError, ["21", "20", "hole"]
    yield "hole_pure_truncate_style", lambda c: c.update(0, k, v, 40), ValueError, ["38", "20"]
    yield "negative_seq_len", lambda c: c.update(0, None, None, -1), ValueError, ["-1"]
    yield "negative_seq_len_tokens", lambda c: c.update(0, k, v, -1), ValueError, ["-1"]
    yield "t_gt_seq_len", lambda c: c.update(0, k, v, 1), ValueError, ["1", "2"]
    yield "evicted_rewrite", lambda c: c.update(1, k, v, 11), IndexError, ["9", "evicted"]
    yield "evicted_overwrite_in_place", (lambda c: c.update(1, tokens(31)[0], tokens(31)[1],
                                                             40)), IndexError, ["9"]
    yield "layer_high", lambda c: c.update(2, k, v, 22), IndexError, ["2"]
    yield "layer_neg", lambda c: c.update(-1, k, v, 22), IndexError, ["-1"]
    yield "layer_float", lambda c: c.update(1.0, k, v, 22), TypeError, []
    yield "layer_str", lambda c: c.update("0", k, v, 22), TypeError, []
    yield "seq_len_float", lambda c: c.update(0, k, v, 22.0), TypeError, []
    yield "ndim3", lambda c: c.update(0, k[0], v[0], 22), ValueError, [str(k[0].shape), "4"]
    yield "ndim5", lambda c: c.update(0, k[None], v[None], 22), ValueError, [str(k[None].shape)]
    yield "ndim0", lambda c: c.update(0, np.float16(1), np.float16(1), 22), ValueError, ["()"]
    for name, axis in (("batch", 0), ("heads", 1), ("head_dim", 3)):
        bad = np.concatenate([k, k], axis=axis)
        want = {"batch": "1", "heads": "3", "head_dim": "64"}[name]
        yield (f"wrong_{name}", (lambda b: lambda c: c.update(0, b, b, 22))(bad), ValueError,
               [str(bad.shape), want])
    yield "wrong_shape_v_only", lambda c: c.update(0, k, v[:, :2], 22), ValueError, [
        str(v[:, :2].shape)]
    for dt in ("int32", "int8", "uint16", "float64", "longdouble", "complex64", "bool",
               "object"):
        bad = k.astype(dt)
        yield (f"dtype_{dt}", (lambda b: lambda c: c.update(0, b, b, 22))(bad), TypeError,
               [str(np.dtype(dt))])
    yield "dtype_v_only", lambda c: c.update(0, k, v.astype(np.float64), 22), TypeError, [
        "float64"]
    yield "list_input", lambda c: c.update(0, k.tolist(), v.tolist(), 22), TypeError, []
    yield "str_input", lambda c: c.update(0, "abc", "abc", 22), TypeError, []
    yield "dict_input", lambda c: c.update(0, {}, {}, 22), TypeError, []
    yield "k_none", lambda c: c.update(0, None, v, 22), TypeError, ["NoneType", "ndarray"]
    yield "v_none", lambda c: c.update(0, k, None, 22), TypeError, ["NoneType", "ndarray"]
    yield ("token_count_mismatch", lambda c: c.update(0, k, tokens(3)[1], 22), ValueError,
           ["2", "3"])
    yield "keys_bad_layer", lambda c: c.keys(2), IndexError, ["2"]
    yield "values_bad_layer", lambda c: c.values(-1), IndexError, ["-1"]
    yield "positions_bad_layer", lambda c: c.positions(5), IndexError, ["5"]
    yield "seq_len_bad_layer", lambda c: c.seq_len(-3), IndexError, ["-3"]
    yield "capacity_bad_layer", lambda c: c.capacity(2), IndexError, ["2"]
    yield "held_bad_layer", lambda c: c.held(2), IndexError, ["2"]
    yield "truncate_negative", lambda c: c.truncate(-1), ValueError, ["-1"]
    yield "truncate_negative_layer", lambda c: c.truncate(-1, layer_idx=0), ValueError, ["-1"]
    yield "truncate_bad_layer", lambda c: c.truncate(5, layer_idx=2), IndexError, ["2"]
    yield "truncate_neg_layer", lambda c: c.truncate(5, layer_idx=-1), IndexError, ["-1"]
    yield ("growth_after_wrap", lambda c: c.enable_dynamic_growth(), ValueError,
           ["1", "40", "32"])
    yield ("growth_bad_strategy", lambda c: c.enable_dynamic_growth("exponential"), TypeError,
           ["str"])
    yield ("growth_max_capacity_zero", lambda c: c.enable_dynamic_growth(max_capacity=0),
           ValueError, ["0"])
    yield ("growth_max_capacity_neg", lambda c: c.enable_dynamic_growth(max_capacity=-5),
           ValueError, ["-5"])
    yield ("growth_max_capacity_absurd",
           lambda c: c.enable_dynamic_growth(max_capacity=10**30), ValueError, [str(10**30)])
    yield ("growth_max_capacity_below_capacity",
           lambda c: c.enable_dynamic_growth(max_capacity=16), ValueError, ["16", "32"])
    yield ("growth_max_capacity_float",
           lambda c: c.enable_dynamic_growth(max_capacity=64.0), TypeError, ["float"])
    yield "reorder_empty", lambda c: c.reorder_batch([]), ValueError, []
    yield "reorder_out_of_range", lambda c: c.reorder_batch([1]), IndexError, ["1"]
    # -- filled in for the reliability issue: every input the issue lists
    # layer index of the wrong type or out of any range
    yield "layer_none", lambda c: c.update(None, k, v, 22), TypeError, ["NoneType", "integer"]
    yield "layer_np_float", lambda c: c.update(np.float64(0), k, v, 22), TypeError, ["float64"]
    yield "layer_1d_array", lambda c: c.update(np.array([0]), k, v, 22), TypeError, ["integer"]
    yield "layer_huge", lambda c: c.update(2**70, k, v, 22), IndexError, [str(2**70)]
    yield ("layer_np_uint64_huge", lambda c: c.update(np.uint64(2**63), k, v, 22), IndexError,
           [str(2**63)])
    yield ("layer_huge_negative", lambda c: c.update(-(2**70), k, v, 22), IndexError,
           ["-" + str(2**70)])
    # lengths of the wrong type, negative, huge
    yield "seq_len_none", lambda c: c.update(0, k, v, None), TypeError, ["NoneType"]
    yield "seq_len_str", lambda c: c.update(0, k, v, "22"), TypeError, ["str"]
    yield "seq_len_np_float", lambda c: c.update(0, k, v, np.float32(22)), TypeError, ["float32"]
    yield "seq_len_1d_array", lambda c: c.update(0, k, v, np.array([22])), TypeError, []
    yield "seq_len_huge_negative", lambda c: c.update(0, None, None, -(2**70)), ValueError, [
        "-" + str(2**70)]
    yield "seq_len_2_63", lambda c: c.update(0, None, None, 2**63), ValueError, [str(2**63)]
    yield "hole_pure_truncate", lambda c: c.update(0, None, None, 21), ValueError, ["21", "20"]
    yield "hole_zero_tokens", lambda c: c.update(0, k[:, :, :0], v[:, :, :0], 21), ValueError, [
        "21", "20"]
    yield "evicted_truncate_rewrite_at_window_start", (
        lambda c: c.update(1, k, v, 10)), IndexError, ["8", "evicted"]
    # more dtypes and non-arrays
    for label, dt in (("int64", "int64"), ("uint64", "uint64"), ("complex128", "complex128"),
                      ("str", "U1"), ("datetime", "M8[s]"), ("structured", [("a", "f2")])):
        bad = k.astype(dt) if label not in ("str", "datetime") else np.zeros(k.shape, dt)
        yield (f"dtype_{label}", (lambda b: lambda c: c.update(0, b, b, 22))(bad),
               TypeError, [str(np.dtype(dt))])
    yield "bytes_input", lambda c: c.update(0, b"ab", b"ab", 22), TypeError, ["S2"]
    yield "nested_ragged_list", (lambda c: c.update(0, [[1.0], [1.0, 2.0]], v, 22)), TypeError, []
    yield "v_only_int", lambda c: c.update(0, k, v.astype(np.int16), 22), TypeError, ["int16"]
    yield "v_only_ndim3", lambda c: c.update(0, k, v[0], 22), ValueError, [str(v[0].shape)]
    yield ("batch_zero", lambda c: c.update(0, k[:0], v[:0], 22), ValueError,
           [str(k[:0].shape)])
    yield ("head_dim_zero", lambda c: c.update(0, k[..., :0], v[..., :0], 22), ValueError,
           [str(k[..., :0].shape), "64"])
    yield ("ndim4_right_size_wrong_order", lambda c: c.update(0, k.swapaxes(1, 2),
                                                              v.swapaxes(1, 2), 22),
           ValueError, [str(k.swapaxes(1, 2).shape)])
    # the other calls
    yield "attention_layer_none", (lambda c: c.attention(None, np.zeros((1, H, 1, D)))), \
        TypeError, ["NoneType"]
    yield "attention_layer_huge", (lambda c: c.attention(2**70, np.zeros((1, H, 1, D)))), \
        IndexError, [str(2**70)]
    yield "attention_q_none", lambda c: c.attention(0, None), TypeError, ["object"]
    yield "attention_q_ragged", lambda c: c.attention(0, [[1.0], [1.0, 2.0]]), ValueError, []
    yield "prefetch_seq_len_huge", lambda c: c.prefetch(0, 2**70), ValueError, [str(2**70)]
    yield "prefetch_seq_len_none", lambda c: c.prefetch(0, None), TypeError, ["NoneType"]
    yield "prefetch_layer_none", lambda c: c.prefetch(None, 1), TypeError, ["NoneType"]
    yield "truncate_seq_len_none", lambda c: c.truncate(None), TypeError, ["NoneType"]
    yield "truncate_seq_len_float", lambda c: c.truncate(1.5), TypeError, ["float"]
    yield "truncate_layer_float", lambda c: c.truncate(5, 1.0), TypeError, ["float"]
    yield "truncate_layer_huge", lambda c: c.truncate(5, 2**70), IndexError, [str(2**70)]
    yield "block_tiers_bad_layer", lambda c: c.block_tiers(2), IndexError, ["2"]
    yield "reorder_float", lambda c: c.reorder_batch([0.0]), TypeError, ["float64"]
    yield "reorder_bool", lambda c: c.reorder_batch([True]), TypeError, ["bool"]
    yield "reorder_2d", lambda c: c.reorder_batch([[0]]), TypeError, ["(1, 1)"]
    yield "reorder_none", lambda c: c.reorder_batch(None), TypeError, ["object"]
    yield "reorder_str", lambda c: c.reorder_batch("abc"), TypeError, ["<U3"]
    yield ("reorder_too_many_rows", lambda c: c.reorder_batch(np.zeros(2**20 + 1, np.int64)),
           ValueError, [str(2**20 + 1), str(2**20)])
    yield ("compress_age_nan", lambda c: c.compress_old_entries(float("nan"), strategy="int8"),
           ValueError, ["nan"])
    yield ("compress_age_negative", lambda c: c.compress_old_entries(-1, strategy="int8"),
           ValueError, ["-1"])
    yield ("compress_age_str", lambda c: c.compress_old_entries("1", strategy="int8"),
           ValueError, ["'1'"])
    yield ("compress_strategy_bogus", lambda c: c.compress_old_entries(0, strategy="int3"),
           ValueError, ["int3", "INT8"])
    yield ("compress_no_strategy", lambda c: c.compress_old_entries(0), ValueError,
           ["compression"])
    yield ("compress_workers_zero", lambda c: c.compress_old_entries(0, strategy="int8",
                                                                     workers=0),
           ValueError, ["workers", "0"])
    yield ("compress_workers_float", lambda c: c.compress_old_entries(0, strategy="int8",
                                                                      workers=1.5),
           TypeError, ["float"])


CASES = list(_cases())


def _assert_unchanged(cache, before) -> None:
    """kvhelpers.assert_unchanged, where the snapshot's own reads may be hits or
    misses (compressed blocks)."""
    c_before, k_before = before
    c_now = counters(cache)
    reads = sum(2 * x["held"] * cache.batch_size for x in k_before)
    assert (c_now["hits"] + c_now["misses"]) - (c_before["hits"] + c_before["misses"]) == reads
    skip = ("hits", "misses", "hit_rate", "per_layer", "memory_efficiency")
    for key in c_before:
        if key not in skip:
            assert c_now[key] == c_before[key], (key, c_before[key], c_now[key])
    for i, (a, b) in enumerate(zip(c_before["per_layer"], c_now["per_layer"])):
        for key in a:
            if key not in ("hits", "misses"):
                assert a[key] == b[key], (i, key, a[key], b[key])
    assert_same_contents(k_before, contents(cache))


@pytest.mark.parametrize("dtype,compressed", [("float16", False), ("float32", False),
                                              ("float16", True)],
                         ids=["float16", "float32", "float16-int8-blocks"])
@pytest.mark.parametrize("call,exc,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_leaves_cache_unchanged(call, exc, fragments, dtype, compressed):
    cache = prefilled(dtype=dtype, compressed=compressed)
    before = snapshot(cache)
    tiers = [cache.block_tiers(i) for i in range(cache.num_layers)]
    with pytest.raises(exc) as info:
        call(cache)
    if exc is IndexError:
        assert not isinstance(info.value, CacheFullError)      # not a capacity problem
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    _assert_unchanged(cache, before)          # contents, counters and memory gauges
    assert [cache.block_tiers(i) for i in range(cache.num_layers)] == tiers
    # and the cache still works afterwards
    k, v = tokens(1, 300)
    cache.update(0, k, v, 21)
    np.testing.assert_array_equal(cache.keys(0)[:, :, 20:], k.astype(dtype))


@pytest.mark.parametrize("how", ["append_past", "one_big_write", "after_growth_limit"])
def test_cache_full_error_writes_nothing(how):
    cache = prefilled(overflow="error")
    if how == "after_growth_limit":
        cache.enable_dynamic_growth(GrowthStrategy.linear(8), max_capacity=40)
    before = snapshot(cache)
    k, v = tokens(12 if how == "after_growth_limit" else 3, 200)
    if how == "one_big_write":
        k, v = tokens(CAP + 1, 200)
        with pytest.raises(CacheFullError) as info:
            cache.update(0, k, v, 20 + CAP + 1)
    else:
        with pytest.raises(CacheFullError) as info:
            cache.update(1, k, v, 30 + k.shape[2])
    assert isinstance(info.value, IndexError)
    msg = str(info.value)
    assert "capacity" in msg
    assert_unchanged(cache, before)
    assert cache.capacity(1) == CAP      # a growth attempt that could not fit is undone
    assert cache.stats().growths == 0


def test_cache_full_exactly_at_capacity_is_fine():
    cache = prefilled(overflow="error")
    k, v = tokens(2, 200)
    cache.update(1, k, v, CAP)
    assert cache.seq_len(1) == CAP
    with pytest.raises(CacheFullError):
        cache.update(1, k[:, :, :1], v[:, :, :1], CAP + 1)
    # truncation and rewrites still work when full
    cache.update(1, k, v, CAP - 1)
    np.testing.assert_array_equal(cache.keys(1)[:, :, -2:], k)


def test_huge_layer_index_is_an_index_error():
    """Spec: a bad layer index raises IndexError.  Found: OverflowError for
    indices beyond the C range (an ArithmeticError, not IndexError)."""
    cache = prefilled()
    before = snapshot(cache)
    for call in (lambda: cache.update(2**70, K2, V2, 22), lambda: cache.keys(2**70),
                 lambda: cache.seq_len(-(2**70))):
        with pytest.raises(IndexError):
            call()
    assert_unchanged(cache, before)


def test_huge_seq_len_is_a_hole_value_error():
    """Spec: a hole raises ValueError; seq_len=2**70 with 2 tokens is a hole.
    Found: OverflowError."""
    cache = prefilled()
    before = snapshot(cache)
    with pytest.raises(ValueError):
        cache.update(0, K2, V2, 2**70)
    assert_unchanged(cache, before)


def test_truncate_to_huge_length_is_a_no_op():
    """Spec: truncate leaves a layer shorter than seq_len as it is, so any
    seq_len past every layer is a no-op.  Found: OverflowError for 2**70."""
    cache = prefilled()
    before = snapshot(cache)
    cache.truncate(2**62)            # within C range: fine
    cache.truncate(2**70)
    assert_unchanged(cache, before)


# ------------------------------------------------------------ constructor

def _ctor_cases():
    base = dict(num_layers=2, num_kv_heads=2, head_dim=4, max_seq_len=16)
    bad = [
        ("max_seq_len_absurd", dict(max_seq_len=10**30), ValueError, [str(10**30)]),
        ("max_seq_len_2_40_plus", dict(max_seq_len=2**40 + 1), ValueError, [str(2**40 + 1)]),
        ("max_seq_len_neg", dict(max_seq_len=-1), ValueError, ["-1"]),
        ("max_seq_len_zero", dict(max_seq_len=0), ValueError, ["0"]),
        ("max_seq_len_float", dict(max_seq_len=16.0), TypeError, ["float"]),
        ("max_seq_len_str", dict(max_seq_len="16"), TypeError, ["str"]),
        ("max_seq_len_none", dict(max_seq_len=None), TypeError, ["NoneType"]),
        ("num_layers_zero", dict(num_layers=0), ValueError, ["num_layers", "0"]),
        ("num_layers_neg", dict(num_layers=-2), ValueError, ["-2"]),
        ("num_layers_absurd", dict(num_layers=2**21), ValueError, [str(2**21)]),
        ("heads_zero", dict(num_kv_heads=0), ValueError, ["num_kv_heads"]),
        ("head_dim_zero", dict(head_dim=0), ValueError, ["head_dim"]),
        ("head_dim_absurd", dict(head_dim=2**17), ValueError, [str(2**17)]),
        ("batch_zero", dict(batch_size=0), ValueError, ["batch_size"]),
        ("block_size_zero", dict(block_size=0), ValueError, ["block_size", "0"]),
        ("block_size_neg", dict(block_size=-4), ValueError, ["-4"]),
        ("block_size_not_pow2", dict(block_size=12), ValueError, ["12"]),
        ("block_size_3", dict(block_size=3), ValueError, ["3"]),
        ("block_size_float", dict(block_size=8.0), TypeError, []),
        ("sinks_neg", dict(sink_tokens=-1), ValueError, ["-1"]),
        ("sinks_eq_max_seq_len", dict(sink_tokens=16), ValueError, ["16"]),
        ("sinks_gt_max_seq_len", dict(sink_tokens=20), ValueError, ["20", "16"]),
        ("dtype_int8", dict(dtype="int8"), TypeError, ["int8"]),
        ("dtype_float64", dict(dtype="float64"), TypeError, ["float64"]),
        ("dtype_np_int32", dict(dtype=np.int32), TypeError, ["int32"]),
        ("dtype_bogus", dict(dtype="bogus"), TypeError, ["bogus"]),
        ("overflow_bogus", dict(overflow="bogus"), ValueError, ["bogus"]),
        ("overflow_none", dict(overflow=None), ValueError, ["None"]),
        ("overflow_upper", dict(overflow="RING"), ValueError, ["RING"]),
        ("block_bytes_absurd", dict(num_kv_heads=2**16, head_dim=2**16, block_size=2**10),
         ValueError, ["block"]),
        # compression options
        ("compression_bogus", dict(compression="int3"), ValueError, ["int3", "INT8"]),
        ("residual_neg", dict(residual_tokens=-1), ValueError, ["residual_tokens", "-1"]),
        ("keep_first_neg", dict(keep_first=-1), ValueError, ["keep_first", "-1"]),
        ("group_size_zero", dict(group_size=0), ValueError, ["group_size", "0"]),
        ("group_size_not_dividing", dict(group_size=3), ValueError, ["3", "4"]),
        ("int4_odd_head_dim", dict(compression="int4", head_dim=5), ValueError, ["5"]),
        ("error_budget_nan", dict(error_budget=float("nan")), ValueError, ["nan"]),
        ("error_budget_neg", dict(error_budget=-1), ValueError, ["-1"]),
        ("auto_without_strategy", dict(auto_compress=True), ValueError, ["auto_compress"]),
        ("background_without_auto", dict(compression="int8", background=True), ValueError,
         ["auto_compress"]),
        ("lossless_codec_bogus", dict(lossless_codec="gzip"), ValueError, ["gzip"]),
        ("clock_not_callable", dict(clock=5), TypeError, ["int"]),
    ]
    for name, kw, exc, frags in bad:
        yield name, {**base, **kw}, exc, frags


CTOR = list(_ctor_cases())


@pytest.mark.parametrize("kwargs,exc,fragments", [c[1:] for c in CTOR], ids=[c[0] for c in CTOR])
def test_constructor_rejects(kwargs, exc, fragments):
    with pytest.raises(exc) as info:
        KVCache(**kwargs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)


@pytest.mark.parametrize("kwargs", [
    dict(block_size=1), dict(block_size=2**20 // 64), dict(sink_tokens=15), dict(max_seq_len=1),
    dict(dtype=np.float32), dict(dtype=np.dtype("float16")), dict(overflow="error"),
    dict(batch_size=3), dict(metrics=False),
])
def test_constructor_accepts_edge_values(kwargs):
    kw = dict(num_layers=1, num_kv_heads=2, head_dim=4, max_seq_len=16)
    kw.update(kwargs)
    cache = KVCache(**kw)
    x = np.ones((cache.batch_size, 2, 1, 4), np.float32)
    cache.update(0, x, x, 1)
    assert cache.seq_len(0) == 1
    assert cache.keys(0).dtype == np.dtype(kw.get("dtype", "float16"))


# ------------------------------------------------------- growth strategies

def _strategy_cases():
    yield "exp_one", lambda: GrowthStrategy.exponential(1.0), ["1.0"]
    yield "exp_below_one", lambda: GrowthStrategy.exponential(0.5), ["0.5"]
    yield "exp_zero", lambda: GrowthStrategy.exponential(0), ["0"]
    yield "exp_negative", lambda: GrowthStrategy.exponential(-2.0), ["-2.0"]
    yield "exp_nan", lambda: GrowthStrategy.exponential(float("nan")), ["nan"]
    yield "exp_str", lambda: GrowthStrategy.exponential("2"), ["'2'"]
    yield "exp_class_direct", lambda: Exponential(factor=0.9), ["0.9"]
    yield "lin_zero", lambda: GrowthStrategy.linear(0), ["0"]
    yield "lin_negative", lambda: GrowthStrategy.linear(-16), ["-16"]
    yield "lin_float", lambda: GrowthStrategy.linear(1.5), ["1.5"]
    yield "lin_str", lambda: GrowthStrategy.linear("64"), ["'64'"]
    yield "lin_class_direct", lambda: Linear(increment=0), ["0"]
    yield "ada_horizon_zero", lambda: GrowthStrategy.adaptive(horizon_s=0), ["0"]
    yield "ada_horizon_negative", lambda: GrowthStrategy.adaptive(horizon_s=-1.0), ["-1.0"]
    yield "ada_horizon_nan", lambda: GrowthStrategy.adaptive(horizon_s=float("nan")), ["nan"]
    yield "ada_min_factor_one", lambda: GrowthStrategy.adaptive(min_factor=1.0), ["1.0"]
    yield "ada_min_factor_below_one", lambda: GrowthStrategy.adaptive(min_factor=0.5), ["0.5"]
    yield ("ada_min_gt_max", lambda: GrowthStrategy.adaptive(min_factor=3.0, max_factor=2.0),
           ["3.0", "2.0"])
    yield "ada_class_direct", lambda: Adaptive(horizon_s=-2.0), ["-2.0"]


STRAT = list(_strategy_cases())


@pytest.mark.parametrize("make,fragments", [c[1:] for c in STRAT], ids=[c[0] for c in STRAT])
def test_growth_strategy_rejects_bad_params(make, fragments):
    with pytest.raises(ValueError) as info:
        make()
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


@pytest.mark.parametrize("make", [lambda: GrowthStrategy.exponential(math.inf),
                                  lambda: GrowthStrategy.adaptive(max_factor=math.inf)],
                         ids=["exponential_inf", "adaptive_max_factor_inf"])
def test_growth_strategy_rejects_infinite_factor(make):
    """An infinite factor can never give a capacity.  Found: accepted at
    construction, then every growth raises OverflowError from int(inf) inside
    update()."""
    with pytest.raises(ValueError):
        make()


# ---------------------------------------------------- accepted inputs

def _views(a):
    yield "c", a
    yield "transposed", np.ascontiguousarray(a.swapaxes(2, 3)).swapaxes(2, 3)
    yield "fortran", np.asfortranarray(a)
    yield "neg_stride_tokens", np.ascontiguousarray(a[:, :, ::-1])[:, :, ::-1]
    yield "neg_stride_all", np.ascontiguousarray(a[::-1, ::-1, ::-1, ::-1])[::-1, ::-1, ::-1, ::-1]
    big = np.zeros(a.shape[:3] + (a.shape[3] * 3,), a.dtype)
    big[..., 1::3] = a
    yield "strided_head_dim", big[..., 1::3]
    ro = a.copy()
    ro.flags.writeable = False
    yield "read_only", ro
    yield "byteswapped", a.astype(a.dtype.newbyteorder())
    raw = np.zeros(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)   # unaligned
    raw[...] = a
    yield "unaligned", raw
    yield "broadcast", np.broadcast_to(a[:, :, :1], a.shape)


@pytest.mark.parametrize("cache_dtype", ["float16", "float32"])
@pytest.mark.parametrize("src_dtype", ["float16", "float32"])
def test_layouts_and_casts_are_accepted(cache_dtype, src_dtype):
    k, v = real_kv(1)
    k = k[:, :, :37].astype(src_dtype) * np.asarray(1.001, src_dtype)   # not all f16-exact
    v = v[:, :, :37].astype(src_dtype)
    assert k.shape == v.shape == (1, H, 37, D)
    views_k, views_v = dict(_views(k)), dict(_views(v))
    for name in views_k:
        cache = KVCache(1, H, D, max_seq_len=64, block_size=8, dtype=cache_dtype)
        kk, vv = views_k[name], views_v[name]
        expected_k = np.asarray(kk, dtype=cache_dtype)     # numpy's rounding
        expected_v = np.asarray(vv, dtype=cache_dtype)
        k_before = np.array(kk, copy=True)
        cache.update(0, kk[:, :, :30], vv[:, :, :30], 30)
        cache.update(0, kk[:, :, 30:], vv[:, :, 30:], 37)
        got_k, got_v = cache.keys(0), cache.values(0)
        assert got_k.dtype == np.dtype(cache_dtype)
        assert np.array_equal(got_k, expected_k), name
        assert np.array_equal(got_v, expected_v), name
        # the input is not modified
        assert np.array_equal(kk, k_before), name


def test_zero_token_arrays_act_as_pure_truncate():
    cache = prefilled()
    empty = np.zeros((1, H, 0, D), np.float16)
    cache.update(0, empty, empty, 20)          # no-op
    assert cache.seq_len(0) == 20
    cache.update(0, empty, empty, 12)          # truncate
    assert cache.seq_len(0) == 12
    np.testing.assert_array_equal(cache.positions(0), np.arange(12))
    with pytest.raises(ValueError):
        cache.update(0, empty, empty, 13)      # a hole of one position


@pytest.mark.parametrize("cache_dtype", ["float16", "float32"])
@pytest.mark.parametrize("src_dtype", ["float16", "float32"])
def test_nan_and_inf_stored_as_given(cache_dtype, src_dtype):
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-7, 65504.0, 1e6, -1e6,
                        np.finfo(np.float16).tiny / 4], dtype=np.float32)
    row = np.resize(special, D)
    cache = KVCache(1, H, D, max_seq_len=8, block_size=4, dtype=cache_dtype)
    with np.errstate(over="ignore"):
        k = np.broadcast_to(row, (1, H, 5, D)).astype(src_dtype)
        v = -k
        exp_k = k.astype(cache_dtype)
        exp_v = v.astype(cache_dtype)
        cache.update(0, k, v, 5)
    uint = {"float16": np.uint16, "float32": np.uint32}[cache_dtype]
    # bit-exact: NaN payloads, infinities and the sign of zero all survive
    np.testing.assert_array_equal(cache.keys(0).view(uint), exp_k.view(uint))
    np.testing.assert_array_equal(cache.values(0).view(uint), exp_v.view(uint))
    got = cache.keys(0)
    assert np.isnan(got[0, 0, 0, 0]) and np.isposinf(got[0, 0, 0, 1])
    assert np.isneginf(got[0, 0, 0, 2]) and np.signbit(got[0, 0, 0, 3])


# ------------------------------------------- filled in: accepted inputs

def test_integer_forms_are_integers():
    """numpy integers, 0-d integer arrays and bools are integers (operator.index),
    as for Python sequences: True is layer 1."""
    k, v = tokens(2, 300)
    a, b = prefilled(), prefilled()
    a.update(1, k, v, 42)
    b.update(True, k, v, np.int32(42))
    a.update(0, k, v, 22)
    b.update(np.array(0), k, v, np.uint64(22))
    b.truncate(np.int64(50), layer_idx=np.int8(0))
    assert_same_contents(contents(a), contents(b))
    assert a.seq_len(True) == a.seq_len(1) and a.keys(np.intp(1)).shape == a.keys(1).shape


def test_mixed_and_buffer_inputs_are_accepted():
    """k and v of different float dtypes are each cast; a float16/float32
    buffer (memoryview) is an array."""
    k, v = tokens(2, 300)
    for cache_dtype in ("float16", "float32"):
        cache = prefilled(dtype=cache_dtype)
        cache.update(0, k.astype(np.float32), memoryview(v), 22)
        np.testing.assert_array_equal(cache.keys(0)[:, :, 20:], k.astype(cache_dtype))
        np.testing.assert_array_equal(cache.values(0)[:, :, 20:], v.astype(cache_dtype))


def test_ring_write_longer_than_everything_copies_only_the_window():
    """A single write of 2**40 tokens (a broadcast view: no memory) to a ring:
    only the positions the ring holds afterwards are copied; the rest count
    as evictions."""
    cache = KVCache(1, H, D, max_seq_len=CAP, block_size=BS, sink_tokens=S)
    x = np.broadcast_to(np.full((1, H, 1, D), 3, np.float16), (1, H, 2**40, D))
    cache.update(0, x, x, 2**40)
    s = cache.stats()
    assert cache.seq_len(0) == 2**40 and cache.held(0) == CAP
    assert s.tokens_written == CAP and s.evictions == 2**40 - CAP
    assert (cache.keys(0) == 3).all()
    np.testing.assert_array_equal(cache.positions(0)[S:], np.arange(2**40 - (CAP - S), 2**40))
    full = KVCache(1, H, D, max_seq_len=CAP, block_size=BS, overflow="error")
    with pytest.raises(CacheFullError):
        full.update(0, x, x, 2**40)
    assert full.seq_len(0) == 0 and full.stats().blocks == 0


def test_nan_and_inf_survive_every_write_path():
    """Stored as given: NaN payloads, infinities and -0.0 come back bit for bit
    after an append, an in-place overwrite, a truncating rewrite, a ring wrap
    and LOSSLESS compression (the quantized tiers are lossy by design; their
    handling of non-finite values is not specified)."""
    pytest.importorskip("lz4")
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 0.0, 65504.0, 6e-8],
                       dtype=np.float16)
    special[1] = np.frombuffer(np.uint16(0x7E01).tobytes(), np.float16)[0]   # a NaN payload
    row = np.resize(special, D)

    def toks(t, shift):
        return np.broadcast_to(np.roll(row, shift), (1, H, t, D)).copy()

    ref = RefCache(1, H, D, max_seq_len=32, block_size=8, sink_tokens=2)
    cache = KVCache(1, H, D, max_seq_len=32, block_size=8, sink_tokens=2, residual_tokens=0,
                    keep_first=0)
    n = 0
    for i, (t, seq_len) in enumerate([(20, 20), (4, 20), (3, 12), (30, 42), (5, 45)]):
        k, v = toks(t, i), -toks(t, i + 1)
        cache.update(0, k, v, seq_len)
        ref.update(0, k, v, seq_len)
        n = seq_len
    assert n == 45 and cache.seq_len(0) > cache.capacity(0)       # wrapped
    for name in ("keys", "values"):
        np.testing.assert_array_equal(getattr(cache, name)(0).view(np.uint16),
                                      getattr(ref, name)(0).view(np.uint16))
    assert cache.compress_old_entries(0, strategy="lossless").blocks > 0
    assert "lossless" in cache.block_tiers(0)[0]
    for name in ("keys", "values"):
        np.testing.assert_array_equal(getattr(cache, name)(0).view(np.uint16),
                                      getattr(ref, name)(0).view(np.uint16))


# ------------------------------------------------------- after reset()

def test_calls_after_reset():
    """reset() empties every layer and restores max_seq_len; counters stay.
    Afterwards the old lengths are holes, reads are empty, attention has
    nothing to attend, and a write from position 0 works."""
    cache = prefilled(compressed=True)
    grown = KVCache(1, H, D, max_seq_len=16, block_size=BS, overflow="error")
    grown.enable_dynamic_growth(GrowthStrategy.linear(16))
    k, v = tokens(24, 0)
    grown.update(0, k, v, 24)
    assert grown.capacity(0) > 16
    grown.reset()
    assert grown.capacity(0) == 16 and grown.seq_len(0) == 0
    updates = cache.stats().updates
    cache.reset()
    cache.reset()                                  # twice is fine
    s = cache.stats()
    assert s.updates == updates                    # counters are kept
    assert s.blocks - s.spare_blocks == 0 and s.compressed_blocks == 0 and s.tokens_held == 0
    for layer in range(2):
        assert cache.seq_len(layer) == cache.held(layer) == 0
        assert cache.capacity(layer) == CAP
        assert cache.keys(layer).shape == (1, H, 0, D) and cache.positions(layer).size == 0
    before = snapshot(cache)
    kk, vv = tokens(2, 100)
    for call, exc, frag in [
        (lambda: cache.update(0, kk, vv, 22), ValueError, "hole"),        # the old length
        (lambda: cache.update(1, kk, vv, 11), ValueError, "hole"),        # was "evicted"
        (lambda: cache.update(0, None, None, 1), ValueError, "hole"),
        (lambda: cache.attention(0, np.zeros((1, H, 1, D))), ValueError, "no tokens"),
        (lambda: cache.keys(2), IndexError, "2"),
    ]:
        with pytest.raises(exc) as info:
            call()
        assert frag in str(info.value), str(info.value)
    assert cache.prefetch(0, 10) == 0
    cache.truncate(5)                              # nothing to drop
    assert cache.compress_old_entries(0, strategy="int8").blocks == 0
    _assert_unchanged(cache, before)
    cache.update(0, kk, vv, 2)
    np.testing.assert_array_equal(cache.keys(0), kk)


# ------------------------------------------------- absurd capacities

_ABSURD = """
import resource
import numpy as np
from kvcache import GrowthStrategy, KVCache

# An address-space limit 1 GiB above what the interpreter uses: an absurd
# allocation fails here as it would on a machine without that memory, and
# nothing is ever touched (Linux would otherwise overcommit and OOM-kill).
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), used + (1 << 30)))

def case(name, fn):
    try:
        fn()
    except MemoryError as exc:
        print(name, "MemoryError", exc)
    else:
        print(name, "accepted")

# the validation allows 2**40 tokens; the block table alone is 64 GiB
case("capacity", lambda: KVCache(1, 1, 1, max_seq_len=2**40))
# each layer's table is 256 MiB: the fourth one fails (the three before are freed)
case("layers", lambda: KVCache(64, 1, 1, max_seq_len=2**32))
# 2**40 tokens x 2**20 rows, one per block: a 2**62-byte table (no overflow)
case("rows", lambda: KVCache(1, 1, 1, max_seq_len=2**40, batch_size=2**20, block_size=1))
# growth to an absurd capacity: the table (2**36 tokens), then the blocks (2**26 tokens)
cache = KVCache(1, 1, 64, max_seq_len=64, overflow="error")
x = np.arange(8 * 64, dtype=np.float16).reshape(1, 1, 8, 64)
cache.update(0, x, x, 8)
cache.enable_dynamic_growth(GrowthStrategy.linear(64), max_capacity=2**40)
s0 = cache.stats()
for t in (2**36, 2**26):
    huge = np.broadcast_to(np.ones((1, 1, 1, 64), np.float16), (1, 1, t, 64))
    case(f"growth{t}", lambda: cache.update(0, huge, huge, 8 + t))
s1 = cache.stats()
assert cache.seq_len(0) == 8 and cache.capacity(0) == 64
assert np.array_equal(cache.keys(0), x) and np.array_equal(cache.values(0), x)
assert (s1.updates, s1.tokens_written, s1.growths) == (s0.updates, s0.tokens_written, 0)
assert s1.blocks - s1.spare_blocks == s0.blocks - s0.spare_blocks
print("pool", s1.spare_blocks - s0.spare_blocks, s1.memory_bytes - s0.memory_bytes)
# reorder_batch to 2**20 rows of a 2**24-token table: 1 TiB of tables
wide = KVCache(2, 1, 1, max_seq_len=2**24)
case("reorder", lambda: wide.reorder_batch(np.zeros(2**20, np.int64)))
assert wide.batch_size == 1
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="needs RLIMIT_AS and /proc/self/statm (Linux)")
def test_absurd_capacities_raise_memory_error(tmp_path):
    """Capacities the validation allows but no memory holds raise MemoryError
    (never an abort), and a failed growth leaves the cache as it was.  Run in
    a subprocess under an address-space limit, so nothing large is allocated
    (outside the checkout, whose unbuilt source tree `python -c` would import)."""
    proc = subprocess.run([sys.executable, "-c", _ABSURD], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    for name in ("capacity", "layers", "rows", "growth68719476736"):
        assert lines[name].startswith("MemoryError cannot allocate a block table"), lines
    assert lines["growth67108864"].startswith("MemoryError cannot allocate a block"), lines
    assert lines["reorder"].startswith("MemoryError cannot allocate the new block tables")
    # What a failed allocation may leave in the pool (not in any layer): at
    # most one spare block per layer and row, and the descriptor room it grew.
    spare, grown = map(int, lines["pool"].split())
    assert 0 <= spare <= 1 and grown >= 0


# ------------------------------------------- reorder_batch and the clock

def test_reorder_huge_row_index_is_an_index_error():
    """Row indices beyond int64 are out of range like any other (not a wrong
    type), and the message shows the value given (not a wrapped one)."""
    cache = prefilled()
    before = snapshot(cache)
    for rows, given in (([2**70], str(2**70)), (np.array([2**63], np.uint64), str(2**63))):
        with pytest.raises(IndexError) as info:
            cache.reorder_batch(rows)
        assert given in str(info.value), str(info.value)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("rows", [0, np.int64(0), np.array(0)], ids=["int", "np_int", "0d"])
def test_reorder_scalar_is_a_type_error(rows):
    """A scalar is not a sequence of rows (len(indices) becomes the batch size)."""
    cache = prefilled()
    before = snapshot(cache)
    with pytest.raises(TypeError) as info:
        cache.reorder_batch(rows)
    assert "1-D" in str(info.value)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failing_clock_changes_nothing(fail_at):
    """A clock that raises inside update() (at its first, second or third
    call: the update reads it for the ages of the blocks it rewrites and of
    the blocks it takes) propagates its exception and changes nothing: not the
    contents, lengths, counters or block tiers, nor the blocks in use (a block
    taken and given back may stay in the spare pool, as after a MemoryError)."""
    state = {"calls": 0, "fail_at": None}

    def clock():
        state["calls"] += 1
        if state["fail_at"] is not None and state["calls"] >= state["fail_at"]:
            raise RuntimeError("clock failed")
        return 0.0

    cache = KVCache(1, 1, 4, max_seq_len=64, block_size=4, compression="int8",
                    residual_tokens=0, keep_first=0, clock=clock)
    x = np.arange(32, dtype=np.float16).reshape(1, 1, 8, 4)
    cache.update(0, x, x, 8)
    assert cache.compress_old_entries(0).blocks == 2
    before, tiers = snapshot(cache), cache.block_tiers(0)
    s0 = cache.stats()
    y = np.full((1, 1, 6, 4), 2, np.float16)
    # Rewrites 4..7 (INT8 block 1, decoded first) and appends 8, 9 (a new block).
    state["calls"], state["fail_at"] = 0, fail_at
    with pytest.raises(RuntimeError):
        cache.update(0, y, y, 10)
    state["fail_at"] = None
    _assert_unchanged_but_spares(cache, before, s0)
    assert cache.block_tiers(0) == tiers
    cache.update(0, y, y, 10)                       # and it works afterwards
    np.testing.assert_array_equal(cache.keys(0)[:, :, 4:], y)


def _assert_unchanged_but_spares(cache, before, s0) -> None:
    """_assert_unchanged, but for memory the pool may keep as spare blocks."""
    s1 = cache.stats()
    assert s1.blocks - s1.spare_blocks == s0.blocks - s0.spare_blocks
    assert s1.spare_blocks <= cache.num_layers * cache.batch_size
    assert s1.compressed_blocks == s0.compressed_blocks
    assert s1.compressed_bytes == s0.compressed_bytes
    assert s1.live_bytes == s0.live_bytes
    c_before, k_before = before
    c_now = counters(cache)
    for key in ("updates", "tokens_written", "evictions", "truncations", "growths"):
        assert c_now[key] == c_before[key], key
    assert_same_contents(k_before, contents(cache))
