"""Every compiled codec variant against the numpy reference, bit for bit.

The AVX2 build is the scalar source compiled again for wider vectors; the
hazard is a compiler contracting or reordering float operations differently
in one variant (a different rounding of one code or one decoded value).
"""

import numpy as np
import pytest
import quant_reference as qr

from kvcache import KVCache, _core

DATA = np.load(__file__.rsplit("/", 1)[0] + "/data/smollm2_kv_prose.npz")


@pytest.fixture(params=["scalar", "avx2"])
def variant(request):
    got = _core._select_codecs(request.param != "scalar")
    try:
        if got != request.param:
            pytest.skip(f"this CPU/OS does not run the {request.param} codecs (got {got})")
        yield got
    finally:
        _core._select_codecs(True)             # back to the best variant


# FP16 only applies to a float32 cache (a float16 block is already FP16).
@pytest.mark.parametrize("tier, dtype", [("int8", "float16"), ("int8", "float32"),
                                         ("int4", "float16"), ("int4", "float32"),
                                         ("fp16", "float32")])
def test_variant_matches_reference(variant, tier, dtype):
    for layer in (0, 15, 29):
        k = DATA[f"k_L{layer}"][None, :, :1472].astype(dtype)
        v = DATA[f"v_L{layer}"][None, :, :1472].astype(dtype)
        cache = KVCache(1, 3, 64, max_seq_len=1472, dtype=dtype, compression=tier,
                        residual_tokens=0, keep_first=0)
        cache.update(0, k, v, 1472)
        assert cache.compress_old_entries(0, workers=1).blocks == 23
        K, V = cache.keys(0), cache.values(0)
        for b in range(23):
            s = slice(b * 64, (b + 1) * 64)
            want = qr.reconstruct(np.stack([k[0, :, s], v[0, :, s]]), tier, dtype=dtype)
            got = np.stack([K[0, :, s], V[0, :, s]])
            assert np.array_equal(want.astype(got.dtype).view(np.uint8), got.view(np.uint8)), \
                f"{variant} {tier} {dtype} layer {layer} block {b}"


def test_kill_switch_selects_scalar():
    assert _core._select_codecs(False) == "scalar"
    assert _core._select_codecs(True) in ("scalar", "avx2")
