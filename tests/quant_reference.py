"""A plain-numpy reference of kvcache's compressed tiers, written from the spec.

The compiled kernels are tested against this module: for the quantized tiers
(FP16, INT8, INT4) bit for bit, provided the C code follows the same float32
formulas (a float32 division by the scale, not a multiplication by its
reciprocal, nor float64 intermediates, which change some float32-cache
results; rint ties to even; float32 -> float16 rounding to nearest even,
subnormals and overflow to inf included).  An FMA in decode is harmless:
``f32(q) * s`` is exact (8-bit code times an 11-bit significand).  LOSSLESS
is checked by exact round trip.

Non-finite input is not specified for the quantized payloads: here NaN and inf
propagate (numpy's min/max) into scales/zeros and the decoded group, so the
adaptive error is NaN/inf and such a block always falls through to LOSSLESS.
Compare quantized payloads bit for bit on finite blocks only.

Conventions
-----------
* A block is an array ``[2, H, B, D]`` in the cache dtype (float16 or
  float32): index 0 of the first axis is the keys, 1 the values, each laid
  out ``[H heads][B tokens][D head_dim]``.
* All arithmetic is float32 (``np.float32`` everywhere, no float64
  intermediates), rounding with ``np.rint`` (ties to even).
  ``f16(x)`` is ``x.astype(np.float16)``, ``f32(h)`` is ``h.astype(np.float32)``.

Tiers (names used throughout: ``"full"``, ``"fp16"``, ``"int8"``, ``"int4"``,
``"lossless"``):

* ``fp16``: payload ``f16(block)``; decode ``f32(payload)`` cast to the cache dtype.
* ``int8``: asymmetric, per token and group of ``G8 = min(group8, D)``
  channels: ``zero = f16(lo)``, ``scale = f16((hi - lo) / 255)``,
  ``q = clip(rint((x - z) / s), 0, 255)`` (all zeros when ``s == 0``);
  decode ``f32(q) * s + z``.  Payload: codes ``u8[2][H][B][D]``, scales
  ``f16[2][H][B][D/G8]``, zeros ``f16[2][H][B][D/G8]``.
* ``int4`` (KIVI): 15 as the top level.  Keys per channel across the block's
  B tokens (scales/zeros ``[H][D]``), values per token in groups of
  ``G4 = min(group4, D)`` channels (``[H][B][D/G4]``).  Codes packed two per
  byte along D: ``q[..., 0::2] | (q[..., 1::2] << 4)``.  Payload: K codes
  ``u8[H][B][D/2]``, K scales, K zeros, V codes, V scales, V zeros.
* ``lossless``: byte-shuffle (plane 0 of every element, then plane 1, ...),
  then ``lz4.block.compress(..., store_size=False)``; stored raw (flagged)
  when that is not smaller.
* adaptive: the first of int4, int8, fp16 (float32 cache only), lossless
  whose error (max over K and V of the relative Frobenius error, float64)
  is ``<= budget``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TIERS", "DEFAULT_GROUP8", "DEFAULT_GROUP4", "DEFAULT_ERROR_BUDGET",
    "f16", "f32", "group_sizes",
    "encode_fp16", "decode_fp16",
    "quantize_groups", "dequantize_groups",
    "encode_int8", "decode_int8",
    "pack_nibbles", "unpack_nibbles", "encode_int4", "decode_int4",
    "byte_shuffle", "byte_unshuffle", "encode_lossless", "decode_lossless",
    "encode", "decode", "payload_bytes", "payload_nbytes", "full_nbytes",
    "reconstruct", "relative_error", "block_error", "choose_adaptive",
]

TIERS = ("full", "fp16", "int8", "int4", "lossless")
DEFAULT_GROUP8 = 64
DEFAULT_GROUP4 = 32
DEFAULT_ERROR_BUDGET = 0.10

_F32 = np.float32


def f16(x) -> np.ndarray:
    """Round to float16, nearest even (numpy's float32 -> float16 conversion;
    beyond float16's range it gives inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float16)


def f32(h) -> np.ndarray:
    return np.asarray(h).astype(np.float32)


def _cache_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise TypeError(f"cache dtype must be float16 or float32, got {dt}")
    return dt


def _check_block(block) -> np.ndarray:
    block = np.asarray(block)
    if block.ndim != 4 or block.shape[0] != 2:
        raise ValueError(f"a block is [2, H, B, D], got shape {block.shape}")
    _cache_dtype(block.dtype)
    return block


def group_sizes(D: int, group8: int = DEFAULT_GROUP8,
                group4: int = DEFAULT_GROUP4) -> tuple[int, int]:
    """``(G8, G4) = (min(group8, D), min(group4, D))``, validated against D."""
    if D < 1 or group8 < 1 or group4 < 1:
        raise ValueError("D and the group sizes must be positive")
    g8, g4 = min(group8, D), min(group4, D)
    if D % g8:
        raise ValueError(f"head_dim {D} is not a multiple of the INT8 group {g8}")
    if D % g4:
        raise ValueError(f"head_dim {D} is not a multiple of the INT4 group {g4}")
    return g8, g4


# ------------------------------------------------------------------- FP16

def encode_fp16(block) -> np.ndarray:
    """Payload ``f16(block)`` (same shape; identity for a float16 block)."""
    return f16(block)


def decode_fp16(payload, dtype) -> np.ndarray:
    return f32(payload).astype(_cache_dtype(dtype))


# ------------------------------------------------ asymmetric group quantizer

def quantize_groups(x, levels: int, axis: int = -1):
    """Quantize float32 groups laid along ``axis`` (each group is the whole axis).

    ``x`` is float32 with the group on ``axis``; returns ``(q, scale, zero)``
    with ``q`` uint8 of x's shape and ``scale``/``zero`` float16 with ``axis``
    removed.  ``levels`` is the top code (255 or 15).
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError("quantize_groups works on float32 values (f32(values))")
    lo = x.min(axis=axis)
    hi = x.max(axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):
        zero = f16(lo)
        scale = f16((hi - lo) / _F32(levels))
    s = np.expand_dims(f32(scale), axis)
    z = np.expand_dims(f32(zero), axis)
    nonzero = s != 0
    safe_s = np.where(nonzero, s, _F32(1))          # s == 0: codes are all 0
    # Non-finite input (NaN, inf, or a float32 range beyond float16) gives
    # non-finite scales/zeros and unspecified codes; decode is then
    # non-finite too, which the adaptive choice rejects.
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip(np.rint((x - z) / safe_s), _F32(0), _F32(levels))
        q = np.where(nonzero & np.isfinite(q), q, _F32(0)).astype(np.uint8)
    return q, scale, zero


def dequantize_groups(q, scale, zero, axis: int = -1) -> np.ndarray:
    """``f32(q) * s + z`` in float32 (the product is exact, so one rounding,
    the same with or without FMA)."""
    s = np.expand_dims(f32(scale), axis)
    z = np.expand_dims(f32(zero), axis)
    with np.errstate(invalid="ignore", over="ignore"):
        return f32(q) * s + z


# ------------------------------------------------------------------- INT8

def encode_int8(x, group8: int = DEFAULT_GROUP8):
    """INT8 codes of ``x`` (a whole block ``[2, H, B, D]`` or one half ``[H, B, D]``;
    any ``[..., D]`` works: groups are per row of G8 channels).

    Returns ``(codes u8[..., D], scales f16[..., D/G8], zeros f16[..., D/G8])``.
    """
    x = np.asarray(x)
    D = x.shape[-1]
    g8, _ = group_sizes(D, group8, 1)
    xg = f32(x).reshape(x.shape[:-1] + (D // g8, g8))
    q, scale, zero = quantize_groups(xg, 255, axis=-1)
    return q.reshape(x.shape), scale, zero


def decode_int8(codes, scales, zeros, dtype) -> np.ndarray:
    """Inverse of :func:`encode_int8`, cast to the cache dtype."""
    codes = np.asarray(codes)
    D = codes.shape[-1]
    ngroups = np.shape(scales)[-1]
    g8 = D // ngroups
    qg = codes.reshape(codes.shape[:-1] + (ngroups, g8))
    x = dequantize_groups(qg, scales, zeros, axis=-1)
    return x.reshape(codes.shape).astype(_cache_dtype(dtype))


# ------------------------------------------------------------------- INT4

def pack_nibbles(q) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis: even channel low nibble."""
    q = np.asarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        raise ValueError("INT4 packing needs an even last axis")
    if q.size and q.max() > 15:
        raise ValueError("INT4 codes must be in 0..15")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    return q


def encode_int4(block, group4: int = DEFAULT_GROUP4):
    """INT4 (KIVI) payload of a block ``[2, H, B, D]``.

    Returns a tuple in payload order:
    ``(k_codes u8[H,B,D/2], k_scales f16[H,D], k_zeros f16[H,D],
    v_codes u8[H,B,D/2], v_scales f16[H,B,D/G4], v_zeros f16[H,B,D/G4])``.
    """
    block = _check_block(block)
    _, H, B, D = block.shape
    _, g4 = group_sizes(D, D, group4)
    if D % 2:
        raise ValueError("INT4 needs an even head_dim")
    k = f32(block[0])                                   # [H, B, D]
    v = f32(block[1])
    # keys: one group per (head, channel) = the B tokens -> reduce over axis 1
    kq, ks, kz = quantize_groups(k, 15, axis=1)          # kq [H,B,D]; ks [H,D]
    # values: per token, groups of G4 channels
    vq, vs, vz = quantize_groups(v.reshape(H, B, D // g4, g4), 15, axis=-1)
    vq = vq.reshape(H, B, D)
    return pack_nibbles(kq), ks, kz, pack_nibbles(vq), vs, vz


def decode_int4(payload, dtype) -> np.ndarray:
    """Inverse of :func:`encode_int4`: the block ``[2, H, B, D]`` in the cache dtype."""
    k_codes, ks, kz, v_codes, vs, vz = payload
    kq = unpack_nibbles(k_codes)
    vq = unpack_nibbles(v_codes)
    H, B, D = kq.shape
    g4 = D // np.shape(vs)[-1]
    k = dequantize_groups(kq, ks, kz, axis=1)
    v = dequantize_groups(vq.reshape(H, B, D // g4, g4), vs, vz, axis=-1).reshape(H, B, D)
    return np.stack([k, v]).astype(_cache_dtype(dtype))


# --------------------------------------------------------------- LOSSLESS

def byte_shuffle(arr) -> np.ndarray:
    """Byte planes of a contiguous array: plane 0 of every element, then plane 1, ..."""
    arr = np.ascontiguousarray(arr)
    n = arr.dtype.itemsize
    return arr.reshape(-1).view(np.uint8).reshape(-1, n).T.copy().reshape(-1)


def byte_unshuffle(data, dtype, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    planes = np.frombuffer(data, np.uint8).reshape(dt.itemsize, -1)
    return planes.T.copy().view(dt).reshape(shape)


def encode_lossless(block) -> tuple[bool, bytes]:
    """``(stored_raw, data)``: lz4 of the byte-shuffled block, or the raw bytes
    (``stored_raw`` True) when compression does not make it smaller."""
    import lz4.block

    block = np.ascontiguousarray(block)
    raw = block.tobytes()
    comp = lz4.block.compress(byte_shuffle(block).tobytes(), store_size=False)
    if len(comp) < len(raw):
        return False, comp
    return True, raw


def decode_lossless(payload, dtype, shape) -> np.ndarray:
    import lz4.block

    stored_raw, data = payload
    dt = _cache_dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    if stored_raw:
        if len(data) != nbytes:
            raise ValueError("raw lossless payload has the wrong size")
        return np.frombuffer(data, dt).reshape(shape).copy()
    shuffled = lz4.block.decompress(data, uncompressed_size=nbytes)
    return byte_unshuffle(shuffled, dt, shape)


# ---------------------------------------------------------------- dispatch

def encode(block, tier: str, group8: int = DEFAULT_GROUP8, group4: int = DEFAULT_GROUP4):
    """The payload of ``block`` in ``tier`` (a tuple of arrays, or
    ``(stored_raw, bytes)`` for lossless)."""
    block = _check_block(block)
    if tier == "full":
        return (block.copy(),)
    if tier == "fp16":
        return (encode_fp16(block),)
    if tier == "int8":
        return encode_int8(block, group8)
    if tier == "int4":
        return encode_int4(block, group4)
    if tier == "lossless":
        return encode_lossless(block)
    raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def decode(payload, tier: str, dtype, shape) -> np.ndarray:
    dt = _cache_dtype(dtype)
    if tier == "full":
        return np.asarray(payload[0]).astype(dt)
    if tier == "fp16":
        return decode_fp16(payload[0], dt)
    if tier == "int8":
        return decode_int8(*payload, dt)
    if tier == "int4":
        return decode_int4(payload, dt)
    if tier == "lossless":
        return decode_lossless(payload, dt, shape)
    raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def payload_bytes(payload, tier: str) -> bytes:
    """The payload serialised in the spec's order (C order, little-endian), the
    byte image the compiled store is expected to hold."""
    if tier == "lossless":
        return bytes(payload[1])
    return b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
                    for a in payload)


def full_nbytes(H: int, B: int, D: int, itemsize: int) -> int:
    """An uncompressed block: keys and values in the cache dtype."""
    return 2 * H * B * D * itemsize


def payload_nbytes(tier: str, H: int, B: int, D: int, itemsize: int,
                   group8: int = DEFAULT_GROUP8, group4: int = DEFAULT_GROUP4) -> int:
    """Bytes of one block's payload in ``tier`` (what memory counts).

    ``itemsize`` is the cache dtype's (it only matters for ``"full"``).
    ``"lossless"`` is data dependent: use ``len(encode_lossless(block)[1])``.
    """
    g8, g4 = group_sizes(D, group8, group4)
    if tier == "full":
        return full_nbytes(H, B, D, itemsize)
    if tier == "fp16":
        return 2 * H * B * D * 2
    if tier == "int8":
        return 2 * H * B * D + 2 * (2 * H * B * (D // g8)) * 2
    if tier == "int4":
        return (H * B * D // 2 + 2 * H * D * 2          # K codes, K scales + zeros
                + H * B * D // 2 + 2 * H * B * (D // g4) * 2)   # V codes, V scales + zeros
    if tier == "lossless":
        raise ValueError("the lossless payload size depends on the data: "
                         "use len(encode_lossless(block)[1])")
    raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def reconstruct(block, tier: str, dtype=None, group8: int = DEFAULT_GROUP8,
                group4: int = DEFAULT_GROUP4) -> np.ndarray:
    """Encode then decode: what the cache returns for ``block`` stored in ``tier``.

    ``dtype`` is the cache dtype (default: the block's own)."""
    block = _check_block(block)
    dt = block.dtype if dtype is None else _cache_dtype(dtype)
    block = block.astype(dt, copy=False)
    return decode(encode(block, tier, group8, group4), tier, dt, block.shape)


# ---------------------------------------------------------------- adaptive

def relative_error(x, x_rec) -> float:
    """``||x' - x|| / ||x||`` (Frobenius) in float64 from the float32 values;
    0 for an all-zero ``x`` (NaN propagates)."""
    a = f32(x).astype(np.float64)
    b = f32(x_rec).astype(np.float64)
    den = np.sqrt(np.sum(a * a))
    num = np.sqrt(np.sum((b - a) ** 2))
    if den == 0:
        return 0.0                      # the spec: a zero block counts as error 0
    return float(num / den)


def block_error(block, rec) -> float:
    """Max over keys and values of :func:`relative_error`, NaN if either is NaN
    (Python's ``max`` and C's ``fmax`` would drop a NaN and let a block holding
    NaN or inf pass as INT4: compare with ``!(err <= budget)`` semantics)."""
    return float(np.max([relative_error(block[0], rec[0]), relative_error(block[1], rec[1])]))


def choose_adaptive(block, dtype=None, budget: float = DEFAULT_ERROR_BUDGET,
                    group8: int = DEFAULT_GROUP8, group4: int = DEFAULT_GROUP4):
    """``(tier, decoded)``: the first of int4, int8, fp16 (float32 cache only),
    lossless whose :func:`block_error` is ``<= budget``.  A NaN error never
    qualifies, so a block holding NaN or inf falls through to lossless."""
    block = _check_block(block)
    dt = block.dtype if dtype is None else _cache_dtype(dtype)
    block = block.astype(dt, copy=False)
    tiers = ["int4", "int8"] + (["fp16"] if dt == np.float32 else [])
    for tier in tiers:
        rec = reconstruct(block, tier, dt, group8, group4)
        if block_error(block, rec) <= budget:
            return tier, rec
    return "lossless", reconstruct(block, "lossless", dt)
