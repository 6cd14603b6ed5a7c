# The tier codecs as the store uses them (included by _core.pyx).
#
# FP16/INT8/INT4 payloads are encoded and decoded by the C codecs
# (src/kv_tiers*.c), chosen per CPU like the attention kernels; LOSSLESS
# blocks are byte-shuffled in C and packed by kvcache.lossless (the lz4 or
# zstandard package: the GIL is held while they run).  A quantized payload
# is the codec's body, then the block's first `exact_rows` slots verbatim
# ([2][heads][exact][head_dim]).

from kvcache import lossless as _lossless

# The codec variant in use: chosen with the attention kernel by
# set_backend(), first by _init_backend() at import (environment overrides
# included).
cdef const kv_codec_table *_codecs = kv_codecs_select(0)


def codec_backend():
    """Name of the tier codecs in use ("avx2" or "scalar")."""
    return _codecs.name.decode()


def _select_codecs(bint allow_simd):
    """Choose the codecs again (tests run every variant; not thread-safe
    against compression running at the same time).  Returns the name."""
    global _codecs
    _codecs = kv_codecs_select(allow_simd)
    return codec_backend()


cdef void _encode(const kv_shape *sh, int tier, const void *block, uint8_t *out) noexcept nogil:
    if tier == KV_TIER_FP16:
        _codecs.encode_fp16(sh, block, out)
    elif tier == KV_TIER_INT8:
        _codecs.encode_int8(sh, block, out)
    else:
        _codecs.encode_int4(sh, block, out)


cdef void _decode_payload(const kv_shape *sh, int tier, const uint8_t *payload,
                          void *block, int halves) noexcept nogil:
    if tier == KV_TIER_FP16:
        _codecs.decode_fp16(sh, payload, block, halves)
    elif tier == KV_TIER_INT8:
        _codecs.decode_int8(sh, payload, block, halves)
    else:
        _codecs.decode_int4(sh, payload, block, halves)


cdef inline int64_t _payload_size(KVStore s, int tier, int64_t exact) noexcept nogil:
    """Bytes of a FP16/INT8/INT4 payload keeping `exact` leading slots verbatim."""
    return kv_payload_bytes(tier, &s.shape) + 2 * s.heads * exact * s.row_bytes


cdef void _encode_into(KVStore s, const char *data, int tier, int64_t exact, uint8_t *payload,
                       char *masked) noexcept nogil:
    """Encode a full block (`data`) into `payload` (_payload_size bytes).
    With `exact`, the first slots are saved verbatim after the body and, in
    a copy (`masked`, block_bytes), replaced by the next slot's values before
    quantizing: a sink token's outliers then do not widen the other tokens'
    ranges (keys are quantized per channel across the block's tokens)."""
    cdef int64_t body = kv_payload_bytes(tier, &s.shape), h, w, r
    cdef int64_t head_stride = s.block_size * s.row_bytes
    cdef const char *src = data
    cdef char *row
    if exact:
        memcpy(masked, data, s.block_bytes)
        for w in range(2):
            for h in range(s.heads):
                row = masked + w * s.half_bytes + h * head_stride
                memcpy(payload + body + ((w * s.heads + h) * exact) * s.row_bytes,
                       row, exact * s.row_bytes)
                for r in range(exact):
                    memcpy(row + r * s.row_bytes, row + exact * s.row_bytes, s.row_bytes)
        src = masked
    _encode(&s.shape, tier, src, payload)


cdef void _restore_prefix(KVStore s, const uint8_t *payload, int tier, int64_t exact,
                          char *dst, int halves) noexcept nogil:
    """Copy a quantized payload's verbatim leading slots over `dst`."""
    cdef int64_t body = kv_payload_bytes(tier, &s.shape), w, h
    for w in range(2):
        if exact and halves & (1 << w):
            for h in range(s.heads):
                memcpy(dst + w * s.half_bytes + h * s.block_size * s.row_bytes,
                       payload + body + ((w * s.heads + h) * exact) * s.row_bytes,
                       exact * s.row_bytes)


cdef void _decode_quantized(KVStore s, int tier, const uint8_t *payload, int64_t exact,
                            char *dst, int halves) noexcept nogil:
    """A FP16/INT8/INT4 payload back to a full block (the halves named)."""
    _decode_payload(&s.shape, tier, payload, dst, halves)
    _restore_prefix(s, payload, tier, exact, dst, halves)


cdef bytes _lossless_pack(KVStore s, const char *data):
    """A full block shuffled and packed by the cache's lossless codec."""
    cdef bytearray shuffled = bytearray(s.block_bytes)
    kv_shuffle(<const uint8_t *>data, <uint8_t *><char *>shuffled,
               s.block_bytes // s.itemsize, s.itemsize)
    return _lossless.pack(shuffled, _lossless.CODECS[s.zstd])


cdef int _decode_block_nogil(KVStore s, int32_t bid, char *dst, int halves) except -1 nogil:
    """Write block `bid` at full precision into `dst` (block_bytes): the
    halves named by `halves` (1: keys, 2: values, 3: both; LOSSLESS always
    decodes both)."""
    cdef kv_block *b = _blk(s, bid)
    if b.tier == KV_TIER_FULL:
        memcpy(dst, b.data, s.block_bytes)
    elif b.tier != KV_TIER_LOSSLESS:
        _decode_quantized(s, b.tier, b.payload, b.exact_rows, dst, halves)
    else:
        with gil:                       # the LOSSLESS codecs are Python packages
            _decode_block(s, bid, dst, halves)
    return 0


cdef int _decode_block(KVStore s, int32_t bid, char *dst, int halves) except -1:
    cdef kv_block *b = _blk(s, bid)
    cdef bytes plain
    if b.tier != KV_TIER_LOSSLESS:
        return _decode_block_nogil(s, bid, dst, halves)
    plain = _lossless.unpack((<char *>b.payload)[:b.payload_bytes], s.block_bytes,
                             _lossless.CODECS[(b.flags & KV_FLAG_ZSTD) != 0])
    kv_unshuffle(<const uint8_t *><char *>plain, <uint8_t *>dst,
                 s.block_bytes // s.itemsize, s.itemsize)
    return 0


def _float_to_half(const float[::1] x):
    """Test shim: the core's float -> half conversion, as uint16 bits."""
    cdef Py_ssize_t i
    out = np.empty(x.shape[0], dtype=np.uint16)
    cdef uint16_t[::1] o = out
    with nogil:
        for i in range(x.shape[0]):
            o[i] = kv_float_to_half(x[i])
    return out


def _half_to_float(const uint16_t[::1] h):
    """Test shim: the core's half -> float conversion."""
    cdef Py_ssize_t i
    out = np.empty(h.shape[0], dtype=np.float32)
    cdef float[::1] o = out
    with nogil:
        for i in range(h.shape[0]):
            o[i] = kv_half_to_float(h[i])
    return out
