# Counters and memory gauges (included by _core.pyx; kvcache.stats turns
# them into CacheStats).


cdef object _counter_array(KVStore s, object dtype):
    """Every layer's kv_counters as one structured array of `dtype`
    (kvcache.stats.COUNTER_DTYPE: the struct's fields, in order)."""
    cdef int64_t i
    cdef cnp.ndarray out
    if dtype.itemsize != sizeof(kv_counters):
        raise TypeError(f"the counter dtype must be {sizeof(kv_counters)} bytes, "
                        f"got {dtype.itemsize}")
    out = np.empty(s.num_layers, dtype=dtype)
    for i in range(s.num_layers):
        memcpy(<char *>cnp.PyArray_DATA(out) + i * sizeof(kv_counters), &s.layers[i].c,
               sizeof(kv_counters))
    return out


cdef void _reset_counters(KVStore s) noexcept:
    cdef int64_t i
    for i in range(s.num_layers):
        memset(&s.layers[i].c, 0, sizeof(kv_counters))


cdef object _memory(KVStore s):
    """(memory_bytes, live_bytes, blocks, spare_blocks, compressed_blocks,
    compressed_bytes).

    live_bytes is the memory that holds held tokens: a full block's held
    slots, a compressed block's payload (pro rata to its held slots).  It
    counts token data once per block: rows that share a block after
    reorder_batch share its bytes, so live_bytes never exceeds what the
    blocks hold and memory_efficiency stays a fraction.
    """
    cdef int64_t i, meta, live = 0
    meta = (s.blocks_alloc * sizeof(kv_block) + s.ndir * sizeof(kv_block *)
            + s.retired_bytes + s.num_layers * sizeof(kv_layer))
    for i in range(s.num_layers):
        meta += s.layers[i].nblk * s.batch * sizeof(int32_t)
        live += _live_bytes(s, &s.layers[i])
    return (s.n_data_blocks * (s.block_bytes + KV_ALIGN) + s.payload_total + meta,
            live, s.n_data_blocks + s.n_compressed, s.n_spare,
            s.n_compressed, s.payload_total)


cdef int64_t _live_bytes(KVStore s, const kv_layer *L) noexcept:
    """Bytes holding the layer's held tokens over all rows, a shared block
    once, a compressed block by its payload."""
    cdef int64_t slot_bytes = 2 * s.heads * s.row_bytes
    cdef kv_block *b
    cdef int64_t total = 0, r, q
    cdef int32_t bid
    cdef bint seen
    cdef kv_walk w
    cdef kv_span sp
    _walk_held(s, L.lo, L.n, &w)
    while _next(s, L, &w, &sp):
        for r in range(s.batch):
            bid = L.table[r * L.nblk + sp.blk]
            seen = False
            if _blk(s, bid).refcount > 1:       # shared: count at its first row
                for q in range(r):
                    if L.table[q * L.nblk + sp.blk] == bid:
                        seen = True
                        break
            if not seen:
                b = _blk(s, bid)
                if b.tier == KV_TIER_FULL:
                    total += sp.n * slot_bytes
                else:
                    total += b.payload_bytes * sp.n // s.block_size
    return total
