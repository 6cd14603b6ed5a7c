"""The core's half-float conversions against numpy, bit for bit.

Every codec stores scales, zero points and FP16 payloads through these; a
rounding difference from numpy would make the tiers disagree with their
reference (and with what users get from ``astype(np.float16)``).
"""

import numpy as np

from kvcache import _core


def test_half_to_float_is_exact_for_every_half():
    h = np.arange(65536, dtype=np.uint16)
    got = _core._half_to_float(h)
    want = h.view(np.float16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))   # NaN payloads too


def test_float_to_half_rounds_like_numpy():
    rng = np.random.default_rng(0)
    bits = np.concatenate([
        rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000, 0x39000000, 11, dtype=np.uint32),   # subnormal halves, ties
        np.arange(0x477F0000, 0x47800100, dtype=np.uint32),       # the overflow edge
        np.arange(0x7F800000, 0x7F802000, dtype=np.uint32),       # inf and NaN payloads
        np.array([0, 0x80000000, 0x7FC00000, 0xFF800000, 0x387FE000, 0x38800000],
                 dtype=np.uint32),
    ])
    x = bits.view(np.float32)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = _core._float_to_half(x)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [hex(b) for b in bits[bad[:5]]]
