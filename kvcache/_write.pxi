# Writing tokens: update's plan and its commit (included by _core.pyx).
#
# An update is planned by a pure function of the layer's extent and the call
# (_plan_write: no allocation, no state change, testable on its own through
# _plan_write_shim), then carried out: growth asked of the Python policy
# where the plan needs more capacity, blocks made writable (_ensure_blocks,
# all-or-nothing), and the commit, which cannot fail.

cdef enum:
    WRITE_OK = 0
    WRITE_NEGATIVE = 1      # seq_len < 0
    WRITE_SHORT = 2         # seq_len < tokens given
    WRITE_HOLE = 3          # first position written past the layer's length
    WRITE_EVICTED = 4       # rewrites positions the ring already evicted
    WRITE_FULL = 5          # more than the capacity and overflow="error"


cdef int _plan_write(int64_t S, int64_t n, int64_t lo, int64_t cap, int64_t batch, bint ring,
                     int64_t t, int64_t m, kv_write_plan *pl) noexcept nogil:
    """Plan writing `t` tokens at positions m - t .. m - 1 of a layer whose
    window is [lo, n) with capacity `cap` and S sinks, leaving it at length
    m; sets pl.status to WRITE_OK or the first rule the call breaks."""
    pl.status = WRITE_OK
    pl.start = m - t
    pl.n_t = _min(n, m)                # the truncation part: drop positions >= m
    pl.lo_t = _min(lo, m)
    pl.held_after = _min(S, pl.lo_t) + m - pl.lo_t
    pl.lo_new = pl.lo_t
    pl.evicted = 0
    if m < 0:
        pl.status = WRITE_NEGATIVE
    elif pl.start < 0:
        pl.status = WRITE_SHORT
    elif pl.start > n:
        pl.status = WRITE_HOLE
    elif (pl.start < pl.n_t and pl.lo_t > S and pl.start < pl.lo_t and pl.n_t > S):
        # Positions rewritten in place must still be held: none of
        # [start, n_t) may fall in the evicted gap [S, lo_t).
        pl.status = WRITE_EVICTED
    elif pl.held_after > cap:
        if not ring:
            pl.status = WRITE_FULL
        else:
            pl.lo_new = m - (cap - S)      # evict the oldest window positions
            # Held (after the truncation part) plus new, minus held after.
            pl.evicted = ((_min(S, pl.lo_t) + pl.n_t - pl.lo_t) + (m - pl.n_t)
                          - (S + m - pl.lo_new)) * batch
    # The positions written: those of [start, m) still held afterwards.
    # Evicted slots are reused as they are (the ring never copies).
    pl.a0 = pl.start
    pl.b0 = _max(pl.start, _min(m, _min(S, pl.lo_new)))
    pl.a1 = _max(pl.start, pl.lo_new)
    pl.b1 = m
    pl.written = (pl.b0 - pl.a0) + (pl.b1 - pl.a1)
    return pl.status


cdef object _plan_error(KVStore s, const kv_write_plan *pl, Py_ssize_t layer_idx, int64_t t,
                        int64_t m, int64_t n):
    """The exception for a plan's status."""
    if pl.status == WRITE_NEGATIVE:
        return ValueError(f"seq_len must be >= 0, got {m}")
    if pl.status == WRITE_SHORT:
        return ValueError(f"seq_len ({m}) must be at least the number of tokens given ({t})")
    if pl.status == WRITE_HOLE:
        return ValueError(
            f"writing {t} tokens at positions {pl.start}..{m - 1} would leave a hole: "
            f"layer {layer_idx} holds {n} tokens, so the first position written "
            f"must be <= {n}")
    if pl.status == WRITE_EVICTED:
        return IndexError(
            f"positions {pl.start}..{pl.n_t - 1} of layer {layer_idx} include positions the "
            f"ring already evicted ({s.sinks}..{pl.lo_t - 1}); the oldest writable window "
            f"position is {pl.lo_t}")
    return CacheFullError(
        f"layer {layer_idx} would hold {pl.held_after} tokens but its capacity is "
        f"{s.layers[layer_idx].cap} and overflow='error'; nothing was written")


def _plan_write_shim(int64_t sinks, int64_t n, int64_t lo, int64_t cap, int64_t batch,
                     bint ring, int64_t t, int64_t m):
    """Test shim: _plan_write's plan as a dict."""
    cdef kv_write_plan pl
    _plan_write(sinks, n, lo, cap, batch, ring, t, m, &pl)
    return pl


cdef int _write(KVStore s, kv_layer *L, Py_ssize_t layer_idx, cnp.ndarray ka, cnp.ndarray va,
                int64_t t, int64_t m) except -1:
    """Carry out update(layer_idx, ka, va, m) (t tokens; ka = va = None for a
    pure truncation): validated and planned before anything changes."""
    cdef kv_write_plan pl
    cdef int64_t n_old = L.n, old_cap = L.cap, old_nblk = L.nblk, cap
    cdef int32_t *old_table = NULL
    cdef double now = 0.0, grow_seconds = 0.0
    cdef bint truncated
    if _plan_write(s.sinks, L.n, L.lo, L.cap, s.batch, s.ring, t, m, &pl) not in (
            WRITE_OK, WRITE_FULL):
        raise _plan_error(s, &pl, layer_idx, t, m, L.n)
    # Growth keeps the layout linear, so it is only possible while every
    # stored position still sits in slot == position (n_t <= cap).
    if (pl.held_after > L.cap and s.growth_enabled and pl.n_t <= L.cap
            and L.cap < s.max_capacity):
        grow_seconds = perf_counter()
        cap = _min(s._grown_capacity(layer_idx, L.cap, m), s.max_capacity)
        if cap > L.cap:                    # a policy never shrinks a layer
            old_table = _set_capacity(s, L, cap)
            _plan_write(s.sinks, L.n, L.lo, L.cap, s.batch, s.ring, t, m, &pl)
        grow_seconds = perf_counter() - grow_seconds
    # Busy from the first table change to the last byte copied: the
    # compressor (a background worker, or compress_old_entries on another
    # thread) installs nothing over this layer's blocks meanwhile.  Needed
    # even for small writes: decoding a LOSSLESS block in _ensure_blocks
    # releases the GIL while fresh, still unwritten blocks sit in the table.
    L.busy += 1
    try:
        if pl.status == WRITE_FULL:
            raise _plan_error(s, &pl, layer_idx, t, m, L.n)
        # Blocks written again get a new age; read the clock first, before
        # any block changes, so that a failing clock changes nothing.
        if pl.start < pl.n_t or (pl.evicted and s.track_ages
                                 and _touches(s, L, pl.a1, pl.b1, True)):
            now = s.clock()
        _ensure_blocks(s, L, pl.a0, pl.b0, pl.a1, pl.b1)      # may raise MemoryError
    except BaseException:
        L.busy -= 1
        if old_table != NULL:              # undo the growth
            _restore_table(s, L, old_table, old_cap, old_nblk)
        raise
    # ---- commit: nothing below can fail (growth logging and automatic
    # compression, at the end, only report their own errors)
    if s.metrics:
        # The only counting on the hot path: ~1% of its instructions.
        L.c.updates += 1
        L.c.tokens_written += pl.written
        L.c.evictions += pl.evicted
    truncated = m < L.n
    L.c.truncations += truncated and s.metrics
    if truncated or pl.start < pl.n_t or pl.evicted:
        L.epoch += 1                       # blocks released, rewritten or reused
    L.n = m
    L.lo = pl.lo_new
    if truncated:
        _release_unheld(s, L)
    if pl.written:
        if pl.written * s.batch * s.heads * s.row_bytes * 2 > NOGIL_COPY_BYTES:
            with nogil:
                _scatter_kv(s, L, ka, va, &pl)
        else:
            _scatter_kv(s, L, ka, va, &pl)
    L.busy -= 1
    if pl.start < pl.n_t:
        _touch(s, L, pl.start, pl.n_t, False, now)   # rewritten in place: young again
    if pl.evicted and s.track_ages:
        _touch(s, L, pl.a1, pl.b1, True, now)        # the ring re-entered old blocks
    if old_table != NULL:
        PyMem_RawFree(old_table)
        s._growth_done(layer_idx, old_cap, L.cap, grow_seconds)
    if (s.auto_lag >= 0 and m > n_old
            and (m - s.auto_lag) >> s.block_shift != (n_old - s.auto_lag) >> s.block_shift):
        # A block boundary passed n - auto_lag (once every block_size tokens
        # per layer): the compression policy decides what to do.
        s._auto_compress(layer_idx)
    return 0


cdef int _ensure_blocks(KVStore s, kv_layer *L, int64_t a0, int64_t b0,
                        int64_t a1, int64_t b1) except -1:
    """Give every slot of positions [a0, b0) and [a1, b1), in every row, a
    full-precision block of its own (refcount 1).  All-or-nothing: on an
    exception (MemoryError, the clock) no table entry changes."""
    cdef int64_t r, need = 0, used = 0, i
    cdef int32_t bid, old
    cdef int32_t *row
    cdef int32_t stack_ids[32]
    cdef int32_t *ids = stack_ids
    cdef int pass_
    cdef kv_walk w
    cdef kv_span sp
    for pass_ in range(2):
        # Pass 0 counts the entries needing a new (or unshared) block and
        # takes that many from the pool; pass 1 installs them, copying a
        # shared block first (copy-on-write).
        for r in range(s.batch):
            row = L.table + r * L.nblk
            _walk(&w, a0, b0, a1, b1)
            while _next(s, L, &w, &sp):
                old = row[sp.blk]
                if (old < 0 or _blk(s, old).refcount > 1
                        or _blk(s, old).tier != KV_TIER_FULL):
                    if pass_ == 0:
                        need += 1
                    else:
                        bid = ids[used]
                        used += 1
                        if old >= 0:
                            # Copy-on-write of a shared block, or a compressed
                            # block written again: it comes back to full
                            # precision (decoded whole).
                            _decode_block(s, old, _blk(s, bid).data, 3)
                            _release_block(s, old)
                        row[sp.blk] = bid
        if pass_ == 1:
            break
        if need == 0:
            return 0
        if need > 32:
            ids = <int32_t *>PyMem_RawMalloc(need * sizeof(int32_t))
            if ids == NULL:
                raise MemoryError(f"cannot plan {need} block allocations")
        try:
            for i in range(need):
                ids[i] = _take_block(s)
                used += 1
        except BaseException:              # MemoryError, or a clock that raised
            for i in range(used):
                _release_block(s, ids[i])
            if ids != stack_ids:
                PyMem_RawFree(ids)
            raise
        used = 0
    for i in range(used, need):            # pass 0 counts a revisited block twice
        _release_block(s, ids[i])
    if ids != stack_ids:
        PyMem_RawFree(ids)
    return 0


cdef bint _touches(KVStore s, const kv_layer *L, int64_t a, int64_t b, bint entered) noexcept:
    """Whether _touch(L, a, b, entered) would touch any block."""
    cdef kv_walk w
    cdef kv_span sp
    if not entered:
        return a < b
    _walk(&w, a, b, 0, 0)
    while _next(s, L, &w, &sp):
        if sp.off == 0 or sp.blk * s.block_size + sp.off == s.sinks:
            return True
    return False


cdef void _touch(KVStore s, const kv_layer *L, int64_t a, int64_t b, bint entered,
                 double now) noexcept:
    """Blocks holding positions [a, b) were written again: their age restarts
    at `now` and a LOSSLESS "incompressible" verdict no longer holds.  With
    `entered`, only blocks the write entered count: at their first slot, or
    at the ring's wrap point (the first window slot)."""
    cdef int64_t r
    cdef kv_block *blk
    cdef kv_walk w
    cdef kv_span sp
    for r in range(s.batch):
        _walk(&w, a, b, 0, 0)
        while _next(s, L, &w, &sp):
            if not entered or sp.off == 0 or sp.blk * s.block_size + sp.off == s.sinks:
                blk = _blk(s, L.table[r * L.nblk + sp.blk])
                blk.born = now
                blk.flags &= ~KV_FLAG_INCOMPRESSIBLE


# ------------------------------------------------------------- inputs

cdef cnp.ndarray _as_input(KVStore s, object x, str name):
    """`x` as an ndarray of the cache dtype and shape [batch, heads, t, head_dim].

    The fast path (an ndarray already of the cache dtype, native byte order)
    costs a few pointer reads; anything else goes through numpy.
    """
    cdef cnp.ndarray a
    cdef cnp.npy_intp *d
    if (cnp.PyArray_Check(x) and cnp.PyArray_TYPE(<cnp.ndarray>x) == s.typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>x)):
        a = <cnp.ndarray>x
    else:
        a = _convert_input(s, x, name)
    if cnp.PyArray_NDIM(a) != 4:
        raise ValueError(f"{name} must have 4 dimensions [batch, kv_heads, tokens, head_dim], "
                         f"got shape {np.shape(a)}")
    d = cnp.PyArray_DIMS(a)
    if d[0] != s.batch or d[1] != s.heads or d[3] != s.head_dim:
        raise ValueError(
            f"{name} must have shape [{s.batch}, {s.heads}, tokens, {s.head_dim}] "
            f"(batch, kv_heads, tokens, head_dim), got {np.shape(a)}")
    return a


cdef cnp.ndarray _convert_input(KVStore s, object x, str name):
    if not cnp.PyArray_Check(x):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{name} must be an array of float16 or float32, "
                            f"got {type(x).__name__}") from exc
    dt = (<cnp.ndarray>x).dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4):
        raise TypeError(f"{name} must have dtype float16 or float32, got {dt}")
    return np.asarray(x, dtype=s._dtype)


cdef inline void _copy_row(char *dst, const char *src, int64_t n_items,
                           int64_t stride, int64_t itemsize) noexcept nogil:
    """Copy one head_dim row of `n_items` elements read with byte `stride`.

    Element copies go through memcpy: a strided input view may be unaligned,
    and a fixed-size memcpy compiles to a plain load where that is allowed.
    """
    cdef int64_t i
    if stride == itemsize:
        memcpy(dst, src, n_items * itemsize)
    elif itemsize == 2:
        for i in range(n_items):
            memcpy(dst + 2 * i, src + i * stride, 2)
    else:
        for i in range(n_items):
            memcpy(dst + 4 * i, src + i * stride, 4)


cdef inline void _put_rows(KVStore s, char *dst, const char *src,
                           const cnp.npy_intp *st, int64_t c) noexcept nogil:
    """Copy `c` consecutive tokens of one head (input strides `st`) to `dst`."""
    cdef int64_t j
    if st[3] == s.itemsize and st[2] == s.row_bytes:
        memcpy(dst, src, c * s.row_bytes)
    else:
        for j in range(c):
            _copy_row(dst + j * s.row_bytes, src + j * st[2], s.head_dim, st[3], s.itemsize)


cdef void _scatter_kv(KVStore s, const kv_layer *L, cnp.ndarray ka, cnp.ndarray va,
                      const kv_write_plan *pl) noexcept nogil:
    """Copy the input tokens of the planned positions into their slots,
    keys and values, every row and head (input index p - start)."""
    cdef const char *kd = <const char *>cnp.PyArray_DATA(ka)
    cdef const char *vd = <const char *>cnp.PyArray_DATA(va)
    cdef const cnp.npy_intp *ks = cnp.PyArray_STRIDES(ka)
    cdef const cnp.npy_intp *vs = cnp.PyArray_STRIDES(va)
    cdef int64_t r, h, i
    cdef int64_t head_stride = s.block_size * s.row_bytes
    cdef const int32_t *row
    cdef char *dst
    cdef kv_walk w
    cdef kv_span sp
    for r in range(s.batch):
        row = L.table + r * L.nblk
        _walk(&w, pl.a0, pl.b0, pl.a1, pl.b1)
        while _next(s, L, &w, &sp):
            dst = _blk(s, row[sp.blk]).data + sp.off * s.row_bytes
            i = sp.pos - pl.start
            for h in range(s.heads):
                _put_rows(s, dst + h * head_stride,
                          kd + r * ks[0] + h * ks[1] + i * ks[2], ks, sp.n)
                _put_rows(s, dst + s.half_bytes + h * head_stride,
                          vd + r * vs[0] + h * vs[1] + i * vs[2], vs, sp.n)
