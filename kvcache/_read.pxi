# Reading tokens back: keys(), values(), positions() (included by _core.pyx).
#
# Arrays returned to Python are always fresh copies: they never alias a
# block, so they stay valid after any later call.


cdef int _gather(KVStore s, const kv_layer *L, int64_t half, char *out,
                 int64_t *hits, int64_t *misses) except -1 nogil:
    """Copy the held tokens of one half (0: keys, half_bytes: values) into
    `out`, laid out [batch][heads][held][head_dim], in position order.

    Tokens of compressed blocks are decoded (the whole block, into a scratch
    buffer owned by this call, so concurrent readers of other layers never
    share one) and counted as misses; the rest are hits.
    """
    # The layer's extent is read once: `out` was sized from it, and the copy
    # must not follow a length that changes under a released GIL.
    cdef int64_t n = L.n, lo = L.lo
    cdef int64_t nh = _min(s.sinks, lo) + n - lo, r, h, i
    cdef int64_t head_stride = s.block_size * s.row_bytes
    cdef const int32_t *row
    cdef const char *src
    cdef char *dst
    cdef char *scratch = NULL
    cdef kv_block *b
    cdef kv_walk w
    cdef kv_span sp
    try:
        for r in range(s.batch):
            row = L.table + r * L.nblk
            dst = out + r * s.heads * nh * s.row_bytes
            i = 0
            _walk_held(s, lo, n, &w)
            while _next(s, L, &w, &sp):
                b = _blk(s, row[sp.blk])
                if b.tier == KV_TIER_FULL:
                    src = b.data
                    hits[0] += sp.n
                else:
                    if scratch == NULL:
                        scratch = <char *>PyMem_RawMalloc(s.block_bytes)
                        if scratch == NULL:
                            with gil:
                                raise MemoryError("cannot allocate a decode buffer")
                    _decode_block_nogil(s, row[sp.blk], scratch, 1 if half == 0 else 2)
                    src = scratch
                    misses[0] += sp.n
                src += half + sp.off * s.row_bytes
                for h in range(s.heads):
                    memcpy(dst + (h * nh + i) * s.row_bytes,
                           src + h * head_stride, sp.n * s.row_bytes)
                i += sp.n
    finally:
        PyMem_RawFree(scratch)
    return 0


cdef object _read(KVStore s, kv_layer *L, int which):
    """keys() (which 0) or values() (1) of the layer."""
    cdef int64_t nh = _held(s, L)
    cdef cnp.ndarray out = np.empty((s.batch, s.heads, nh, s.head_dim), dtype=s._dtype)
    cdef char *dst = <char *>cnp.PyArray_DATA(out)
    cdef int64_t half = which * s.half_bytes, hits = 0, misses = 0
    if nh * s.batch * s.heads * s.row_bytes > NOGIL_COPY_BYTES:
        L.busy += 1
        try:
            with nogil:
                _gather(s, L, half, dst, &hits, &misses)
        finally:
            L.busy -= 1
    else:
        _gather(s, L, half, dst, &hits, &misses)
    if s.metrics:
        L.c.hits += hits
        L.c.misses += misses
    return out


cdef object _positions(KVStore s, const kv_layer *L):
    """Absolute positions held, in the order keys() returns them (int64): the
    held ranges themselves, no slot involved."""
    return np.concatenate((np.arange(_min(s.sinks, L.lo), dtype=np.int64),
                           np.arange(L.lo, L.n, dtype=np.int64)))
