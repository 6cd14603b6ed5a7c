"""Every error path: the exception type, a message naming what was expected and
what was given, and a cache left exactly as it was.  Plus the inputs that must
be accepted (casts, odd layouts, NaN/inf)."""

import math

import numpy as np
import pytest
from kvhelpers import assert_unchanged, real_kv, snapshot

from kvcache import CacheFullError, GrowthStrategy, KVCache
from kvcache.growth import Adaptive, Exponential, Linear

H, D = 3, 64
CAP, S, BS = 32, 2, 8


def prefilled(overflow="ring", dtype="float16"):
    """Layer 0: 20 tokens (linear).  Layer 1: 40 tokens, wrapped (held 0,1 and 10..39)."""
    k, v = real_kv(8)
    cache = KVCache(2, H, D, max_seq_len=CAP, block_size=BS, sink_tokens=S, dtype=dtype,
                    overflow=overflow)
    cache.update(0, k[:, :, :20], v[:, :, :20], 20)
    if overflow == "ring":
        cache.update(1, k[:, :, :40], v[:, :, :40], 40)
    else:
        cache.update(1, k[:, :, :30], v[:, :, :30], 30)
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


CASES = list(_cases())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("call,exc,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_leaves_cache_unchanged(call, exc, fragments, dtype):
    cache = prefilled(dtype=dtype)
    before = snapshot(cache)
    with pytest.raises(exc) as info:
        call(cache)
    if exc is IndexError:
        assert not isinstance(info.value, CacheFullError)      # not a capacity problem
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    assert_unchanged(cache, before)
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
