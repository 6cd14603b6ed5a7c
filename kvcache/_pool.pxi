# The block pool and the block tables (included by _core.pyx).
#
# Every block comes from the store's pool: a spare one (data kept for reuse,
# up to max_spare of them), else fresh memory.  Descriptors live in fixed
# chunks that never move (see _add_chunk); a block's id indexes them.
# Ownership: the store owns every block and table and frees each exactly
# once, here (_free_data, _set_capacity's caller) or in _free_store.


cdef int32_t _take_block(KVStore s) except -2:
    """A block with refcount 1: a spare one, else freshly allocated."""
    cdef int32_t bid
    cdef char *raw
    cdef double now = s.clock()
    cdef kv_block *b
    if s.spare_head >= 0:
        bid = s.spare_head
        b = _blk(s, bid)
        s.spare_head = b.next
        s.n_spare -= 1
        b.refcount = 1
        b.born = now
        return bid
    if s.unused_head >= 0:
        bid = s.unused_head
    else:
        if s.nblocks == s.blocks_alloc:
            if s.blocks_alloc + KV_CHUNK > MAX_BLOCKS:
                raise MemoryError(f"the block pool is limited to {MAX_BLOCKS} blocks")
            _add_chunk(s)
        bid = <int32_t>s.nblocks
        _blk(s, bid).raw = NULL
        _blk(s, bid).next = -1
    raw = <char *>PyMem_RawMalloc(s.block_bytes + KV_ALIGN)
    if raw == NULL:
        if bid == s.nblocks:            # a new descriptor: park it as unused
            s.nblocks += 1
            _blk(s, bid).next = s.unused_head
            s.unused_head = bid
        raise MemoryError(f"cannot allocate a block of {s.block_bytes} bytes")
    b = _blk(s, bid)
    if bid == s.unused_head:
        s.unused_head = b.next
    else:
        s.nblocks += 1
    b.raw = raw
    b.data = <char *>((<uintptr_t>raw + KV_ALIGN - 1) & ~(<uintptr_t>KV_ALIGN - 1))
    b.refcount = 1
    b.next = -1
    b.payload = NULL
    b.payload_bytes = 0
    b.tier = KV_TIER_FULL
    b.flags = 0
    b.exact_rows = 0
    b.born = now
    s.n_data_blocks += 1
    return bid


cdef int _add_chunk(KVStore s) except -1:
    """Room for KV_CHUNK more descriptors.

    Descriptors live in fixed chunks that never move, so a pool of any size
    grows in O(1) (no copy, no latency spike) and a thread copying without
    the GIL keeps valid descriptor pointers.  Only the small directory of
    chunk pointers is ever replaced; an old directory is retired, not freed,
    because such a thread may still be reading it (sizes double, so the
    retired ones add up to less than the live one).
    """
    cdef kv_block **grown
    cdef int64_t new_dir
    cdef kv_block *chunk
    if s.nchunks == s.ndir:
        new_dir = _max(8, 2 * s.ndir)
        if s.n_retired == MAX_RETIRED:
            raise MemoryError("the block pool cannot grow further")
        grown = <kv_block **>PyMem_RawMalloc(new_dir * sizeof(kv_block *))
        if grown == NULL:
            raise MemoryError(f"cannot grow the block directory to {new_dir} chunks")
        if s.bdir != NULL:
            memcpy(grown, s.bdir, s.nchunks * sizeof(kv_block *))
            s.retired[s.n_retired] = s.bdir
            s.n_retired += 1
            s.retired_bytes += s.ndir * sizeof(kv_block *)
        s.bdir = grown
        s.ndir = new_dir
    chunk = <kv_block *>PyMem_RawMalloc(KV_CHUNK * sizeof(kv_block))
    if chunk == NULL:
        raise MemoryError(f"cannot allocate {KV_CHUNK} block descriptors")
    s.bdir[s.nchunks] = chunk
    s.nchunks += 1
    s.blocks_alloc += KV_CHUNK
    return 0


cdef void _release_block(KVStore s, int32_t bid) noexcept:
    """Drop one reference; at zero keep the block spare or free it."""
    cdef kv_block *b = _blk(s, bid)
    b.refcount -= 1
    if b.refcount > 0:
        return
    b.flags = 0
    if s.n_spare < s.max_spare and b.tier == KV_TIER_FULL:
        b.next = s.spare_head
        s.spare_head = bid
        s.n_spare += 1
    else:
        _free_data(s, bid)


cdef void _free_data(KVStore s, int32_t bid) noexcept:
    """Return a block's memory to the allocator; its descriptor becomes unused."""
    cdef kv_block *b = _blk(s, bid)
    if b.raw != NULL:
        PyMem_RawFree(b.raw)
        s.n_data_blocks -= 1
    if b.payload != NULL:
        PyMem_RawFree(b.payload)
        s.payload_total -= b.payload_bytes
        s.n_compressed -= 1
    b.raw = NULL
    b.data = NULL
    b.payload = NULL
    b.payload_bytes = 0
    b.tier = KV_TIER_FULL
    b.exact_rows = 0
    b.next = s.unused_head
    s.unused_head = bid


cdef void _trim_spares(KVStore s) noexcept:
    """Free spare blocks beyond max_spare."""
    cdef int32_t bid
    while s.n_spare > s.max_spare:
        bid = s.spare_head
        s.spare_head = _blk(s, bid).next
        s.n_spare -= 1
        _free_data(s, bid)


cdef void _free_store(KVStore s) noexcept:
    """Free every table, block and descriptor (the store's destructor)."""
    cdef int64_t i
    if s.layers != NULL:
        for i in range(s.num_layers):
            PyMem_RawFree(s.layers[i].table)
        PyMem_RawFree(s.layers_raw)
        s.layers = NULL
    if s.bdir != NULL:
        for i in range(s.nblocks):
            PyMem_RawFree(_blk(s, i).raw)        # NULL when compressed or unused
            PyMem_RawFree(_blk(s, i).payload)    # NULL unless compressed
        for i in range(s.nchunks):
            PyMem_RawFree(s.bdir[i])
        PyMem_RawFree(s.bdir)
        s.bdir = NULL
    for i in range(s.n_retired):
        PyMem_RawFree(s.retired[i])
    s.n_retired = 0


# ---------------------------------------------------------------- tables

cdef void _release_unheld(KVStore s, kv_layer *L) noexcept:
    """Release the blocks (every row) in which the layer holds no slot.

    Linear layout: everything past position n.  A wrapped ring: blocks whose
    slots all fell out of the held set (a truncation behind the window); the
    ring's later writes allocate them again on demand.
    """
    cdef int64_t j, r
    cdef char *held_blk
    cdef kv_walk w
    cdef kv_span sp
    if L.lo <= s.sinks:
        _release_tail(s, L, _ceil_div(L.n, s.block_size))
        return
    held_blk = <char *>PyMem_RawMalloc(L.nblk)
    if held_blk == NULL:
        return                          # only an optimisation: keep the blocks
    memset(held_blk, 0, L.nblk)
    _walk_held(s, L.lo, L.n, &w)
    while _next(s, L, &w, &sp):
        held_blk[sp.blk] = 1
    for j in range(L.nblk):
        if not held_blk[j]:
            for r in range(s.batch):
                if L.table[r * L.nblk + j] >= 0:
                    _release_block(s, L.table[r * L.nblk + j])
                    L.table[r * L.nblk + j] = -1
    PyMem_RawFree(held_blk)


cdef void _release_tail(KVStore s, kv_layer *L, int64_t first_blk) noexcept:
    """Release every row's blocks from table entry `first_blk` on."""
    cdef int64_t r, j
    cdef int32_t *row
    for r in range(s.batch):
        row = L.table + r * L.nblk
        for j in range(first_blk, L.nblk):
            if row[j] >= 0:
                _release_block(s, row[j])
                row[j] = -1


cdef int32_t *_set_capacity(KVStore s, kv_layer *L, int64_t cap) except? NULL:
    """Give the layer a table for `cap` tokens; entries keep their block.

    Returns the previous table for the caller to free (or to restore with
    _restore_table if what follows fails).  Raises MemoryError leaving the
    layer unchanged.  Shrinking releases the blocks past the new end.
    """
    cdef int64_t nblk = _ceil_div(cap, s.block_size), r, j, keep
    cdef int32_t *table = <int32_t *>PyMem_RawMalloc(_max(1, nblk * s.batch) * sizeof(int32_t))
    cdef int32_t *old = L.table
    if table == NULL:
        raise MemoryError(f"cannot allocate a block table for {cap} tokens")
    keep = _min(nblk, L.nblk)
    if nblk < L.nblk:
        _release_tail(s, L, nblk)
    for r in range(s.batch):
        for j in range(nblk):
            table[r * nblk + j] = L.table[r * L.nblk + j] if j < keep else -1
    L.table = table
    L.nblk = nblk
    L.cap = cap
    L.epoch += 1
    return old


cdef void _restore_table(KVStore s, kv_layer *L, int32_t *old_table, int64_t old_cap,
                         int64_t old_nblk) noexcept:
    """Undo a _set_capacity that grew the table (blocks it gained are released)."""
    _release_tail(s, L, old_nblk)
    PyMem_RawFree(L.table)
    L.table = old_table
    L.cap = old_cap
    L.nblk = old_nblk


cdef object _reorder_rows(KVStore s, const int64_t *idx, int64_t nb):
    """Make row r of every layer what row idx[r] was (nb rows; indices
    validated by the caller).  All-or-nothing: every new table is allocated
    before any reference moves."""
    cdef int64_t r, j, i
    cdef kv_layer *L
    cdef int32_t **tables = <int32_t **>PyMem_RawMalloc(_max(1, s.num_layers)
                                                        * sizeof(int32_t *))
    if tables == NULL:
        raise MemoryError("cannot allocate the new block tables")
    for i in range(s.num_layers):
        tables[i] = <int32_t *>PyMem_RawMalloc(_max(1, nb * s.layers[i].nblk) * sizeof(int32_t))
        if tables[i] == NULL:
            for j in range(i):
                PyMem_RawFree(tables[j])
            PyMem_RawFree(tables)
            raise MemoryError("cannot allocate the new block tables")
    s.max_spare = s.num_layers * nb
    _trim_spares(s)
    for i in range(s.num_layers):
        L = &s.layers[i]
        for r in range(nb):              # take the new references first ...
            for j in range(L.nblk):
                tables[i][r * L.nblk + j] = L.table[idx[r] * L.nblk + j]
                if tables[i][r * L.nblk + j] >= 0:
                    _blk(s, tables[i][r * L.nblk + j]).refcount += 1
        _release_tail(s, L, 0)           # ... then drop the old ones
        PyMem_RawFree(L.table)
        L.table = tables[i]
        L.epoch += 1
    PyMem_RawFree(tables)
    s.batch = nb
