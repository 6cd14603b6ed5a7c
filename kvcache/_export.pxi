# Export and import of the whole store: what save files hold (included by
# _core.pyx; kvcache.fileformat writes and reads the bytes).


cdef object _export(KVStore s, layers, int64_t prefix):
    """(states, tables, blocks) of the layers; see KVStore._export."""
    cdef int64_t r, j, n, lo, bs = s.block_size
    cdef kv_layer *L
    cdef int32_t bid
    cdef kv_block *b
    cdef cnp.ndarray held, tab, plain
    cdef dict ids = {}
    cdef list states = [], tables = [], blocks = []
    cdef double now = s.clock()
    for li in layers:
        L = _layer_at(s, li)
        n = L.n if prefix < 0 else prefix
        lo = L.lo if prefix < 0 else 0
        held = _held_slots(s, L, lo, n)
        tab = np.full((s.batch, L.nblk), -1, dtype=np.int32)
        for j in range(L.nblk):
            mask = held[j * bs:(j + 1) * bs]
            if not mask.any():
                continue
            partial = not mask.all()
            for r in range(s.batch):
                bid = L.table[r * L.nblk + j]
                if bid < 0:
                    raise RuntimeError(f"layer {li} holds a slot without a block")
                if bid in ids:
                    tab[r, j] = ids[bid]
                    continue
                b = _blk(s, bid)
                if b.tier == KV_TIER_FULL or (partial and prefix >= 0):
                    plain = np.empty(s.block_bytes, dtype=np.uint8)
                    _decode_block(s, bid, <char *>cnp.PyArray_DATA(plain), 3)
                    if partial:
                        plain.reshape(2, s.heads, bs, s.row_bytes)[:, :, ~mask] = 0
                    record = (KV_TIER_FULL, b.flags & KV_FLAG_INCOMPRESSIBLE
                              if b.tier == KV_TIER_FULL else 0, 0, plain.tobytes())
                else:
                    record = (b.tier, b.flags & KV_FLAG_ZSTD, b.exact_rows,
                              (<char *>b.payload)[:b.payload_bytes])
                ids[bid] = tab[r, j] = len(blocks)
                blocks.append(record[:3] + (max(0.0, now - b.born), record[3]))
        states.append((n, lo, L.cap))
        tables.append(tab)
    return states, tables, blocks


cdef object _import(KVStore s, list states, list tables, list blocks):
    """Give a fresh, empty store the state _export described; see
    KVStore._import."""
    cdef Py_ssize_t i, nb = len(blocks)
    cdef int64_t li, r, j, nbytes
    cdef kv_layer *L
    cdef kv_block *b
    cdef int32_t bid, e
    cdef const uint8_t[::1] buf
    cdef const int32_t[:, ::1] tab
    cdef cnp.ndarray bids = np.empty(_max(1, nb), dtype=np.int32)
    cdef cnp.ndarray placed = np.zeros(_max(1, nb), dtype=np.uint8)
    cdef int32_t[::1] newid = bids
    cdef uint8_t[::1] seen = placed
    cdef uint8_t *payload
    cdef double now = s.clock()
    for li in range(s.num_layers):
        if s.layers[li].n or s.nblocks:
            raise ValueError("_import needs a fresh store")
    for li in range(s.num_layers):              # tables first: no block to undo
        if states[li][2] != s.layers[li].cap:
            PyMem_RawFree(_set_capacity(s, &s.layers[li], states[li][2]))
    for i in range(nb):
        tier, flags, exact, age, data = blocks[i]
        buf = data
        nbytes = buf.shape[0]
        bid = _take_block(s)
        newid[i] = bid
        b = _blk(s, bid)
        if tier == KV_TIER_FULL:
            memcpy(b.data, &buf[0], s.block_bytes)
        else:
            payload = <uint8_t *>PyMem_RawMalloc(nbytes)
            if payload == NULL:
                raise MemoryError(f"cannot allocate a payload of {nbytes} bytes")
            memcpy(payload, &buf[0], nbytes)
            _install(s, bid, tier, payload, nbytes, exact)
        b.flags = flags
        b.born = now - age
    # ---- nothing below can fail
    for li in range(s.num_layers):
        L = &s.layers[li]
        tab = tables[li]
        for r in range(s.batch):
            for j in range(L.nblk):
                e = tab[r, j]
                if e >= 0:
                    L.table[r * L.nblk + j] = newid[e]
                    if seen[e]:                 # _take_block gave the first
                        _blk(s, newid[e]).refcount += 1
                    seen[e] = 1
        L.n, L.lo = states[li][0], states[li][1]
