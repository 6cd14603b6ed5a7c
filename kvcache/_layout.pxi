# Slot layout: where a position's K/V live (included by _core.pyx).
#
# A layer holds positions [0, min(S, lo)) (the sinks) and [lo, n) (the
# window).  Position p < S sits in slot p; a window position in slot
# S + (p - S) % (cap - S): linear until the window wraps, a ring after.
# Slot s is offset s % block_size of table entry s // block_size.
#
# Every reader, writer, exporter and kernel entry walks positions through
# one mechanism, the span walk below:
#
#     cdef kv_walk w
#     cdef kv_span sp
#     _walk_held(s, L.lo, L.n, &w)
#     while _next(s, L, &w, &sp):
#         ... positions sp.pos .. sp.pos + sp.n - 1 sit in table entry
#             sp.blk, slots sp.off .. sp.off + sp.n - 1 of its block


cdef inline kv_block *_blk(KVStore s, int64_t bid) noexcept nogil:
    """Descriptor of block `bid` (see _add_chunk in _pool.pxi for the layout)."""
    return &s.bdir[bid >> KV_CHUNK_SHIFT][bid & (KV_CHUNK - 1)]


cdef inline int64_t _held(KVStore s, const kv_layer *L) noexcept nogil:
    """Positions the layer holds (sinks plus window)."""
    return _min(s.sinks, L.lo) + L.n - L.lo


cdef inline int64_t _run(KVStore s, const kv_layer *L, int64_t p, int64_t end,
                         int64_t *blk, int64_t *off) noexcept nogil:
    """Table entry and offset of position p's slot, and how many positions
    from p (< end) follow it in consecutive slots of that block.

    Called for every piece of every update, so it avoids integer division
    (tens of cycles each): block sizes are powers of two, and the window
    modulo is taken only once the ring has wrapped.
    """
    cdef int64_t sl, lim, d, w
    if p < s.sinks:
        sl = p
        lim = s.sinks - p
    else:
        d = p - s.sinks
        w = L.cap - s.sinks
        if d >= w:
            d = d % w
        sl = s.sinks + d
        lim = L.cap - sl
    blk[0] = sl >> s.block_shift
    off[0] = sl & (s.block_size - 1)
    return _min(_min(end - p, lim), s.block_size - off[0])


cdef inline void _walk(kv_walk *w, int64_t a0, int64_t b0, int64_t a1,
                       int64_t b1) noexcept nogil:
    """A walk over positions [a0, b0), then [a1, b1)."""
    w.p = a0
    w.end = b0
    w.a1 = a1
    w.b1 = b1
    w.second = 0


cdef inline void _walk_held(KVStore s, int64_t lo, int64_t end, kv_walk *w) noexcept nogil:
    """A walk over the held positions below `end` of a layer whose window
    starts at `lo`: the sinks [0, min(S, lo, end)), then [lo, end)."""
    _walk(w, 0, _min(_min(s.sinks, lo), end), lo, end)


cdef inline bint _next(KVStore s, const kv_layer *L, kv_walk *w, kv_span *sp) noexcept nogil:
    """The walk's next span (False once both ranges are done)."""
    while w.p >= w.end:
        if w.second:
            return False
        w.second = 1
        w.p = w.a1
        w.end = w.b1
    sp.pos = w.p
    sp.n = _run(s, L, w.p, w.end, &sp.blk, &sp.off)
    w.p += sp.n
    return True


cdef void _count_held(KVStore s, const kv_layer *L, int64_t lo, int64_t n, int64_t *held,
                      int64_t *end) noexcept nogil:
    """Per table entry, for a window [lo, n): the held positions in its slots
    (`held`, L.nblk of them, zeroed first) and, when `end` is not NULL, one
    past the highest of them."""
    cdef kv_walk w
    cdef kv_span sp
    memset(held, 0, L.nblk * sizeof(int64_t))
    if end != NULL:
        memset(end, 0, L.nblk * sizeof(int64_t))
    _walk_held(s, lo, n, &w)
    while _next(s, L, &w, &sp):
        held[sp.blk] += sp.n
        if end != NULL:
            end[sp.blk] = _max(end[sp.blk], sp.pos + sp.n)


cdef cnp.ndarray _held_slots(KVStore s, const kv_layer *L, int64_t lo, int64_t n):
    """[nblk * block_size] bool: the slots holding the layer's held positions
    for a window [lo, n) (the exporter zeroes the others)."""
    cdef cnp.ndarray out = np.zeros(L.nblk * s.block_size, dtype=np.bool_)
    cdef char *m = <char *>cnp.PyArray_DATA(out)
    cdef kv_walk w
    cdef kv_span sp
    _walk_held(s, lo, n, &w)
    while _next(s, L, &w, &sp):
        memset(m + sp.blk * s.block_size + sp.off, 1, sp.n)
    return out
