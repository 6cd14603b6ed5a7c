# Attention over the block tables (included by _core.pyx; KVStore.attention
# and KVStore.prefetch call in here; the kernel in use is _dispatch.pxi's).
#
# A call walks the layer's table once per batch row and describes what it
# holds as runs (consecutive positions in consecutive slots of one block, in
# one storage format), then hands them to the compiled kernel without the
# GIL.  Nothing is copied: full-precision and quantized blocks are read where
# they lie.  LOSSLESS blocks are the exception (their codec is the lz4
# package's, which needs the GIL): a few at a time are decoded into a
# scratch buffer owned by the call, then attended like full blocks.

cdef enum:
    # LOSSLESS blocks decoded per pass (the scratch is this many blocks).
    LOSSLESS_BATCH = 8
    # Explicit prefetch: the first bytes of what the next call reads go to
    # every cache level (an L1's worth), the following ones to L2 (about
    # half of a typical L2), in the order the kernel reads them.
    PREFETCH_HOT_BYTES = 32768
    PREFETCH_BYTES = 524288

# ------------------------------------------------------------------ runs

cdef inline int64_t _emit(kv_run *runs, int32_t *lbids, int64_t k, const uint8_t *base,
                          int32_t fmt, int64_t stride, int64_t off, int64_t pos, int64_t c,
                          int32_t lbid) noexcept nogil:
    """Append runs for positions [pos, pos + c) in slots [off, off + c),
    split to the kernel's longest run.  Returns the new count."""
    cdef int64_t m
    while c > 0:
        m = _min(c, KV_ATTN_MAX_RUN)
        runs[k].base = base
        runs[k].pos = pos
        runs[k].fmt = fmt
        runs[k].stride = <int32_t>stride
        runs[k].off = <int32_t>off
        runs[k].n = <int32_t>m
        lbids[k] = lbid
        k += 1
        pos += m
        off += m
        c -= m
    return k


cdef int64_t _max_runs(KVStore s, int64_t held) noexcept nogil:
    """Bound on the runs of one batch row: each block piece of the two held
    ranges may split at its verbatim rows and at KV_ATTN_MAX_RUN."""
    return held // KV_ATTN_MAX_RUN + 2 * (held // s.block_size + 4) + 8


cdef int64_t _build_runs(KVStore s, const kv_layer *L, int64_t r, int64_t end, kv_run *runs,
                         int32_t *lbids, int64_t *hits, int64_t *misses) noexcept nogil:
    """Runs of batch row r covering its held positions below `end`, in
    position order; LOSSLESS ones get base NULL and their block id in
    lbids (-1 elsewhere).  Counts tokens of full blocks as hits, the others
    as misses."""
    cdef const int32_t *row = L.table + r * L.nblk
    cdef int64_t k = 0, p, c, off, body, ex, c1
    cdef int32_t full_fmt = KV_FMT_F16 if s.itemsize == 2 else KV_FMT_F32, fmt
    cdef kv_block *b
    cdef kv_walk w
    cdef kv_span sp
    _walk_held(s, L.lo, end, &w)
    while _next(s, L, &w, &sp):
        p, c, off = sp.pos, sp.n, sp.off
        b = _blk(s, row[sp.blk])
        if b.tier == KV_TIER_FULL:
            k = _emit(runs, lbids, k, <const uint8_t *>b.data, full_fmt, s.block_size,
                      off, p, c, -1)
            hits[0] += c
        elif b.tier == KV_TIER_LOSSLESS:
            k = _emit(runs, lbids, k, NULL, full_fmt, s.block_size, off, p, c, row[sp.blk])
            misses[0] += c
        else:
            misses[0] += c
            ex = b.exact_rows
            if off < ex:                 # leading slots kept verbatim after the payload
                body = kv_payload_bytes(b.tier, &s.shape)
                c1 = _min(c, ex - off)
                k = _emit(runs, lbids, k, b.payload + body, full_fmt, ex, off, p, c1, -1)
                p += c1
                off += c1
                c -= c1
            if c > 0:
                fmt = (KV_FMT_F16 if b.tier == KV_TIER_FP16 else
                       KV_FMT_INT8 if b.tier == KV_TIER_INT8 else KV_FMT_INT4)
                k = _emit(runs, lbids, k, b.payload, fmt, s.block_size, off, p, c, -1)
    return k


# ------------------------------------------------------------ attention

cdef cnp.ndarray _query(KVStore s, object q, object scale):
    """q validated and multiplied by the scale, as a fresh C-contiguous
    float32 array."""
    cdef double sc
    if not isinstance(q, np.ndarray):
        q = np.asarray(q)
    shape = q.shape
    if q.dtype.kind != "f":
        raise TypeError(f"q must be a floating-point array (float16, float32 or float64), "
                        f"got dtype {q.dtype}")
    if len(shape) != 4:
        raise ValueError(f"q must be 4-D [batch, num_q_heads, t_q, head_dim], "
                         f"got shape {shape}")
    if shape[0] != s.batch or shape[3] != s.head_dim:
        raise ValueError(f"q must be [{s.batch}, num_q_heads, t_q, {s.head_dim}] "
                         f"(batch_size, ..., head_dim), got shape {shape}")
    if shape[1] == 0 or shape[1] % s.heads:
        raise ValueError(f"num_q_heads must be a positive multiple of num_kv_heads "
                         f"({s.heads}), got {shape[1]}")
    if shape[2] == 0:
        raise ValueError("q holds no query (t_q == 0)")
    if scale is None:
        sc = 1.0 / math.sqrt(s.head_dim)
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
        sc = float(scale)
        if not math.isfinite(sc):
            raise ValueError(f"scale must be finite, got {scale}")
    out = np.empty(shape, dtype=np.float32)
    np.multiply(q, np.float32(sc), out=out, casting="same_kind")
    return out


cdef object _attention(KVStore s, object layer_idx, object q, object scale, object out,
                       bint prefetch):
    cdef kv_layer *L = _layer_at(s, layer_idx)
    cdef cnp.ndarray qs = _query(s, q, scale)
    cdef int64_t hq = qs.shape[1], t_q = qs.shape[2], n = L.n
    cdef cnp.ndarray res
    if n == 0:
        raise ValueError(f"layer {layer_idx} holds no tokens")
    if t_q > n:
        raise ValueError(f"t_q ({t_q}) exceeds the layer's length ({n}): query i sits at "
                         f"position seq_len - t_q + i")
    shape = (s.batch, hq, t_q, s.head_dim)
    if out is None:
        res = np.empty(shape, dtype=np.float32)
    else:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise TypeError(f"out must be float32, got {out.dtype}")
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {out.shape}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be C-contiguous and writeable")
        res = <cnp.ndarray>out

    cdef kv_attn_geom g
    g.kv_heads = s.heads
    g.dim = s.head_dim
    g.rows = (hq // s.heads) * t_q
    g.t_q = t_q
    g.q_pos0 = n - t_q
    g.g8 = s.shape.g8
    g.g4 = s.shape.g4
    g.prefetch = prefetch
    cdef const kv_attn_kernel *kern = _kernel_for(&g)

    cdef int64_t held = _held(s, L), cap = _max_runs(s, held), r, i, nr, nd, nl, lines = 0
    cdef int64_t hits = 0, misses = 0, row_floats = hq * t_q * s.head_dim, a, nb, slot
    cdef kv_run *runs = NULL
    cdef kv_run *lruns
    cdef int32_t *lbids = NULL
    cdef int32_t slot_bid[LOSSLESS_BATCH]
    cdef float *state = NULL
    cdef char *scratch = NULL
    cdef const float *qd = <const float *>cnp.PyArray_DATA(qs)
    cdef float *od = <float *>cnp.PyArray_DATA(res)
    L.busy += 1          # the background compressor leaves this layer alone
    try:
        runs = <kv_run *>PyMem_RawMalloc(2 * cap * sizeof(kv_run))
        lbids = <int32_t *>PyMem_RawMalloc(cap * sizeof(int32_t))
        state = <float *>PyMem_RawMalloc(kv_attn_state_floats(&g) * sizeof(float))
        if runs == NULL or lbids == NULL or state == NULL:
            raise MemoryError("cannot allocate attention buffers")
        lruns = runs + cap
        for r in range(s.batch):
            nr = _build_runs(s, L, r, n, runs, lbids, &hits, &misses)
            # Direct runs stay in front (in order), LOSSLESS ones move aside.
            nd = nl = 0
            for i in range(nr):
                if lbids[i] < 0:
                    runs[nd] = runs[i]
                    nd += 1
                else:
                    lruns[nl] = runs[i]
                    lbids[nl] = lbids[i]
                    nl += 1
            with nogil:
                kv_attn_state_init(&g, state)
                lines += kern.attend(&g, qd + r * row_floats, runs, nd, state)
            a = 0
            while a < nl:
                # Decode up to LOSSLESS_BATCH distinct blocks, attend their runs.
                if scratch == NULL:
                    scratch = <char *>PyMem_RawMalloc(LOSSLESS_BATCH * s.block_bytes)
                    if scratch == NULL:
                        raise MemoryError("cannot allocate a decode buffer")
                nb = 0
                i = a
                while i < nl:
                    slot = 0
                    while slot < nb and slot_bid[slot] != lbids[i]:
                        slot += 1
                    if slot == nb:
                        if nb == LOSSLESS_BATCH:
                            break
                        _decode_block(s, lbids[i], scratch + nb * s.block_bytes, 3)
                        slot_bid[nb] = lbids[i]
                        nb += 1
                    lruns[i].base = <const uint8_t *>(scratch + slot * s.block_bytes)
                    i += 1
                with nogil:
                    lines += kern.attend(&g, qd + r * row_floats, lruns + a, i - a, state)
                a = i
            kv_attn_finish(&g, state, od + r * row_floats)
    finally:
        L.busy -= 1
        PyMem_RawFree(runs)
        PyMem_RawFree(lbids)
        PyMem_RawFree(state)
        PyMem_RawFree(scratch)
    if s.metrics:
        L.c.hits += hits
        L.c.misses += misses
        L.c.prefetches += lines
        L.c.prefetch_bytes += lines * 64
    return res


cdef object _prefetch(KVStore s, object layer_idx, object seq_len):
    cdef kv_layer *L = _layer_at(s, layer_idx)
    cdef int64_t end = _as_int64(seq_len, "seq_len", ValueError)
    if end < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    end = _min(end, L.n)
    cdef kv_attn_geom g
    g.kv_heads = s.heads
    g.dim = s.head_dim
    g.rows = g.t_q = 1
    g.q_pos0 = 0
    g.g8 = s.shape.g8
    g.g4 = s.shape.g4
    g.prefetch = 0
    cdef int64_t held = _held(s, L), cap = _max_runs(s, held), r, i, h, nr, nbytes
    cdef int64_t lines = 0, hinted = 0, hits = 0, misses = 0
    cdef int half
    cdef const uint8_t *p
    cdef kv_run *runs = <kv_run *>PyMem_RawMalloc(cap * sizeof(kv_run))
    cdef int32_t *lbids = <int32_t *>PyMem_RawMalloc(cap * sizeof(int32_t))
    if runs == NULL or lbids == NULL:
        PyMem_RawFree(runs)
        PyMem_RawFree(lbids)
        raise MemoryError("cannot allocate prefetch buffers")
    try:
        for r in range(s.batch):
            nr = _build_runs(s, L, r, end, runs, lbids, &hits, &misses)
            for i in range(nr):
                if runs[i].base == NULL:         # LOSSLESS: decoded anyway
                    continue
                for h in range(s.heads):
                    for half in range(2):
                        if hinted >= PREFETCH_BYTES:
                            break
                        kv_run_span(&g, &runs[i], h, half, &p, &nbytes)
                        nbytes = _min(nbytes, PREFETCH_BYTES - hinted)
                        lines += kv_prefetch_range(p, nbytes, PREFETCH_HOT_BYTES - hinted)
                        hinted += nbytes
    finally:
        PyMem_RawFree(runs)
        PyMem_RawFree(lbids)
    if s.metrics:
        L.c.prefetches += lines
        L.c.prefetch_bytes += lines * 64
    return lines * 64
