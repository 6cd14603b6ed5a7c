# Compression mechanisms (included by _core.pyx).  The policy -- which blocks
# are eligible, which tier each one gets, when to run -- is plain Python
# (kvcache/compression.py); the core offers three mechanisms:
#
# * _candidates(layer): every block the layer holds, with its table entry,
#   held positions, tier, age and flags, and the layer's epoch;
# * _trial_errors(layer, epoch, blocks, tier, exacts): the reconstruction
#   error each block would have in a tier, computed without the GIL;
# * _compress_blocks(layer, epoch, blocks, tiers, exacts): compress these
#   blocks to these tiers in place.
#
# A plan is applied only at the epoch its candidates were read at (a
# truncation, rewrite, eviction or reorder in between makes the call return
# "busy" for the policy to retry), and only while no GIL-free copy of the
# layer is in flight.  A block being encoded is pinned by an extra reference:
# a concurrent write copies it first (copy-on-write), a truncation cannot
# free it, and its payload is installed only if nothing changed it meanwhile.

# One candidate block; kvcache.compression.CANDIDATE_DTYPE declares the same
# fields in this order.
ctypedef struct kv_candidate:
    int64_t entry       # table entry (block index within a row)
    int64_t held        # positions of the layer held in its slots
    int64_t end         # 1 + the highest position held in it
    double born         # clock seconds when taken or last rewritten
    int32_t block       # block id
    int32_t refcount    # table entries sharing it (batch rows)
    int8_t tier         # KV_TIER_*
    uint8_t flags       # KV_FLAG_*
    char _pad[6]

CANDIDATE_ITEMSIZE = sizeof(kv_candidate)


cdef object _candidates(KVStore s, const kv_layer *L):
    """(epoch, seq_len, bytes of kv_candidate records), one record per
    distinct block, all read at one moment."""
    cdef int64_t *held = <int64_t *>PyMem_RawMalloc(_max(1, 2 * L.nblk) * sizeof(int64_t))
    cdef int64_t *end
    cdef kv_candidate *out = NULL
    cdef int64_t j, r, q, k = 0
    cdef int32_t bid
    cdef kv_block *b
    cdef bint seen
    if held == NULL:
        raise MemoryError("cannot allocate the candidate scan")
    try:
        end = held + L.nblk
        _count_held(s, L, L.lo, L.n, held, end)
        out = <kv_candidate *>PyMem_RawMalloc(_max(1, s.batch * L.nblk) * sizeof(kv_candidate))
        if out == NULL:
            raise MemoryError("cannot allocate the candidate list")
        for j in range(L.nblk):
            if held[j] == 0:
                continue
            for r in range(s.batch):
                bid = L.table[r * L.nblk + j]
                seen = False
                for q in range(r):           # rows sharing a block: list it once
                    if L.table[q * L.nblk + j] == bid:
                        seen = True
                        break
                if bid < 0 or seen:
                    continue
                b = _blk(s, bid)
                memset(&out[k], 0, sizeof(kv_candidate))
                out[k].entry = j
                out[k].held = held[j]
                out[k].end = end[j]
                out[k].born = b.born
                out[k].block = bid
                out[k].refcount = b.refcount
                out[k].tier = <int8_t>b.tier
                out[k].flags = <uint8_t>b.flags
                k += 1
        return L.epoch, L.n, (<char *>out)[:k * sizeof(kv_candidate)]
    finally:
        PyMem_RawFree(held)
        PyMem_RawFree(out)


cdef int _check_plan(KVStore s, cnp.ndarray blocks, cnp.ndarray tiers,
                     cnp.ndarray exacts) except -1:
    """A plan's arrays must give one quantized or LOSSLESS tier and one exact
    prefix shorter than a block per block; anything else is a policy's bug:
    ValueError, nothing done."""
    cdef int64_t i, n = blocks.shape[0]
    cdef const int8_t *tier = <const int8_t *>cnp.PyArray_DATA(tiers)
    cdef const int64_t *ex = <const int64_t *>cnp.PyArray_DATA(exacts)
    if tiers.shape[0] != n or exacts.shape[0] != n:
        raise ValueError(f"a compression plan needs one tier and one exact count per block: "
                         f"got {n} blocks, {tiers.shape[0]} tiers, {exacts.shape[0]} exacts")
    for i in range(n):
        if tier[i] not in (KV_TIER_FP16, KV_TIER_INT8, KV_TIER_INT4, KV_TIER_LOSSLESS):
            raise ValueError(f"tier must be one of FP16, INT8, INT4, LOSSLESS "
                             f"({KV_TIER_FP16}..{KV_TIER_LOSSLESS}), got {tier[i]}")
        if not 0 <= ex[i] < s.block_size:
            raise ValueError(f"exact rows must be in [0, {s.block_size}), got {ex[i]}")
        if tier[i] == KV_TIER_INT4 and s.head_dim % 2:
            raise ValueError(f"INT4 needs an even head_dim, got {s.head_dim}")
    return 0


cdef int _check_owned(KVStore s, const kv_layer *L, Py_ssize_t li,
                      cnp.ndarray blocks) except -1:
    """Every planned block must be one the layer holds.  Checked once the plan
    is known to be current (same epoch): a block a stale plan names may have
    left the layer legitimately."""
    cdef int64_t i, r, j
    cdef const int32_t *bid = <const int32_t *>cnp.PyArray_DATA(blocks)
    cdef set owned = set()
    for r in range(s.batch):
        for j in range(L.nblk):
            if L.table[r * L.nblk + j] >= 0:
                owned.add(L.table[r * L.nblk + j])
    for i in range(blocks.shape[0]):
        if bid[i] not in owned:
            raise ValueError(f"block {bid[i]} is not one of layer {li}'s blocks")
    return 0


cdef inline bint _pinnable(KVStore s, int32_t bid) noexcept:
    """Whether a planned block can still be encoded: full precision and not
    being encoded by another thread (else the plan is stale for it)."""
    cdef kv_block *b = _blk(s, bid)
    return b.tier == KV_TIER_FULL and not b.flags & KV_FLAG_ENCODING


cdef inline void _pin(KVStore s, int32_t bid) noexcept:
    cdef kv_block *b = _blk(s, bid)
    b.refcount += 1
    b.flags |= KV_FLAG_ENCODING


cdef inline void _unpin(KVStore s, int32_t bid) noexcept:
    _blk(s, bid).flags &= ~KV_FLAG_ENCODING
    _release_block(s, bid)


cdef object _trial_errors(KVStore s, kv_layer *L, Py_ssize_t li, int64_t epoch,
                          cnp.ndarray blocks, int tier, cnp.ndarray exacts):
    """Relative reconstruction error (Frobenius, the worse of keys and values)
    of each block encoded in `tier` (FP16/INT8/INT4) with its exact prefix;
    NaN for a block no longer at full precision.  None when the layer is
    busy or past `epoch` (the policy retries later)."""
    cdef int64_t i, n = blocks.shape[0]
    cdef cnp.ndarray tiers = np.full(n, tier, dtype=np.int8)
    cdef cnp.ndarray errs = np.full(n, np.nan, dtype=np.float64)
    cdef double *err = <double *>cnp.PyArray_DATA(errs)
    cdef const int32_t *bid = <const int32_t *>cnp.PyArray_DATA(blocks)
    cdef const int64_t *ex = <const int64_t *>cnp.PyArray_DATA(exacts)
    cdef cnp.ndarray ok = np.zeros(n, dtype=np.uint8)
    cdef uint8_t *pinned = <uint8_t *>cnp.PyArray_DATA(ok)
    # Scratch: a payload, the masked copy _encode_into may need, the decoded
    # block; each part starts KV_ALIGN-aligned (the decoded block is read as
    # floats, and payload sizes can be odd).
    cdef int64_t width = _round_up(_payload_size(s, tier, s.block_size - 1), KV_ALIGN)
    cdef int64_t bpad = _round_up(s.block_bytes, KV_ALIGN)
    cdef char *scratch
    cdef char *raw
    if tier == KV_TIER_LOSSLESS:
        raise ValueError("LOSSLESS is exact: it has no trial error")
    _check_plan(s, blocks, tiers, exacts)
    if L.busy or L.epoch != epoch:
        return None
    _check_owned(s, L, li, blocks)
    raw = <char *>PyMem_RawMalloc(width + 2 * bpad + KV_ALIGN)
    if raw == NULL:
        raise MemoryError("cannot allocate trial buffers")
    scratch = <char *>((<uintptr_t>raw + KV_ALIGN - 1) & ~(<uintptr_t>KV_ALIGN - 1))
    for i in range(n):
        if _pinnable(s, bid[i]) and not (tier == KV_TIER_FP16 and s.itemsize == 2):
            _pin(s, bid[i])
            pinned[i] = 1
    try:
        with nogil:
            for i in range(n):
                if pinned[i]:
                    _encode_into(s, _blk(s, bid[i]).data, tier, ex[i], <uint8_t *>scratch,
                                 scratch + width)
                    _decode_quantized(s, tier, <uint8_t *>scratch, ex[i],
                                      scratch + width + bpad, 3)
                    err[i] = kv_block_rel_error(&s.shape, _blk(s, bid[i]).data,
                                                scratch + width + bpad)
    finally:
        for i in range(n):
            if pinned[i]:
                _unpin(s, bid[i])
        PyMem_RawFree(raw)
    return errs


cdef list _compress_blocks(KVStore s, kv_layer *L, Py_ssize_t li, int64_t epoch,
                           cnp.ndarray blocks, cnp.ndarray tiers, cnp.ndarray exacts):
    """Compress each block to its tier.  Returns one (tier name, tokens,
    bytes before, bytes after) per block done ("raw" when LOSSLESS could not
    shrink it: it stays full precision, flagged; "dropped" when a write
    changed it meanwhile), or [("busy", layer, 0, 0)] when the layer is busy
    or past `epoch`.  Blocks no longer at full precision are skipped."""
    cdef int64_t i, n = blocks.shape[0]
    cdef const int32_t *bid = <const int32_t *>cnp.PyArray_DATA(blocks)
    cdef const int8_t *tier = <const int8_t *>cnp.PyArray_DATA(tiers)
    cdef const int64_t *ex = <const int64_t *>cnp.PyArray_DATA(exacts)
    cdef int t
    cdef list results = [], batch
    cdef set queued = set()
    _check_plan(s, blocks, tiers, exacts)
    if L.busy or L.epoch != epoch:
        return [("busy", li, 0, 0)]
    _check_owned(s, L, li, blocks)
    for t in (KV_TIER_FP16, KV_TIER_INT8, KV_TIER_INT4):
        if t == KV_TIER_FP16 and s.itemsize == 2:
            continue                     # a float16 block is already FP16
        batch = []
        for i in range(n):
            if tier[i] == t and bid[i] not in queued and _pinnable(s, bid[i]):
                queued.add(bid[i])
                batch.append((bid[i], ex[i]))
        if batch:
            results.extend(_compress_batch(s, L, batch, t))
    for i in range(n):
        if tier[i] != KV_TIER_LOSSLESS or bid[i] in queued:
            continue
        if L.busy:
            # A write began while the previous block was packed (the codecs
            # release the GIL).  Pinning now would raise a refcount the write
            # has already planned its new blocks by.
            results.append(("busy", li, 0, 0))
            break
        queued.add(bid[i])
        if _pinnable(s, bid[i]):
            results.append(_compress_lossless(s, L, bid[i]))
    return results


cdef object _compress_lossless(KVStore s, const kv_layer *L, int32_t bid):
    """Pack one block with the lossless codec (pinned meanwhile)."""
    cdef kv_block *b
    cdef int32_t refs = _blk(s, bid).refcount
    cdef bytes packed
    cdef uint8_t *payload
    cdef int64_t nbytes
    _pin(s, bid)
    try:
        packed = _lossless_pack(s, _blk(s, bid).data)
        b = _blk(s, bid)
        if len(packed) >= s.block_bytes:
            b.flags |= KV_FLAG_INCOMPRESSIBLE
            return ("raw", s.block_size, s.block_bytes, s.block_bytes)
        if not _unchanged(s, L, bid, refs):
            return ("dropped", 0, 0, 0)
        nbytes = len(packed)
        payload = <uint8_t *>PyMem_RawMalloc(nbytes)
        if payload == NULL:
            raise MemoryError(f"cannot allocate a {nbytes}-byte payload")
        memcpy(payload, <char *>packed, nbytes)
        res = _install(s, bid, KV_TIER_LOSSLESS, payload, nbytes, 0)
        if s.zstd:
            b.flags |= KV_FLAG_ZSTD          # decode with the codec that packed it
        return res
    finally:
        _unpin(s, bid)


cdef list _compress_batch(KVStore s, const kv_layer *L, list blocks, int tier):
    """Compress many blocks of one layer to a quantized tier, a few blocks per
    GIL-free pass.

    Every block is pinned before the first pass, so none can be freed or
    reused while the GIL is released between passes; a write to one copies
    it first and its payload is dropped.  Payloads are encoded into a small
    scratch buffer (reused, so its pages are warm) and then copied over the
    front of each block's own full-precision allocation, which is shrunk in
    place: compression takes no fresh memory (no page faults), and what it
    frees is each allocation's tail.
    """
    cdef Py_ssize_t n = len(blocks), i, first, m, pinned = 0, done = 0
    cdef int64_t width = _payload_size(s, tier, s.block_size - 1)
    cdef int32_t *bids = <int32_t *>PyMem_RawMalloc(n * sizeof(int32_t))
    cdef int32_t *refs = <int32_t *>PyMem_RawMalloc(n * sizeof(int32_t))
    cdef int64_t *exacts = <int64_t *>PyMem_RawMalloc(n * sizeof(int64_t))
    cdef char *scratch = <char *>PyMem_RawMalloc(COMPRESS_CHUNK * width)
    cdef char *masked = <char *>PyMem_RawMalloc(s.block_bytes)
    results = []
    try:
        if (bids == NULL or refs == NULL or exacts == NULL or scratch == NULL
                or masked == NULL):
            raise MemoryError("cannot allocate compression buffers")
        for i in range(n):                   # pin them all
            bids[i], exacts[i] = blocks[i]
            refs[i] = _blk(s, bids[i]).refcount
            _pin(s, bids[i])
            pinned += 1
        for first in range(0, n, COMPRESS_CHUNK):
            m = _min(COMPRESS_CHUNK, n - first)
            with nogil:
                for i in range(m):
                    _encode_into(s, _blk(s, bids[first + i]).data, tier, exacts[first + i],
                                 <uint8_t *>scratch + i * width, masked)
            for i in range(first, first + m):    # install in place, unpin
                results.append(_install_in_place(
                    s, L, bids[i], tier, <uint8_t *>scratch + (i - first) * width,
                    _payload_size(s, tier, exacts[i]), exacts[i], refs[i]))
                _unpin(s, bids[i])
                done += 1
    finally:
        for i in range(done, pinned):            # after an error: unpin the rest
            _unpin(s, bids[i])
        PyMem_RawFree(bids)
        PyMem_RawFree(refs)
        PyMem_RawFree(exacts)
        PyMem_RawFree(scratch)
        PyMem_RawFree(masked)
    return results


cdef object _install_in_place(KVStore s, const kv_layer *L, int32_t bid, int tier,
                              const uint8_t *encoded, int64_t nbytes, int64_t exact,
                              int32_t refs):
    """Install a payload still in a scratch buffer: it is stored over the
    front of the block's own allocation, shrunk to fit (or, for tiny heads
    whose scales and prefix outweigh the block, in a new one)."""
    cdef kv_block *b = _blk(s, bid)
    cdef void *shrunk
    cdef uint8_t *payload
    if not _unchanged(s, L, bid, refs):
        return ("dropped", 0, 0, 0)
    if nbytes <= s.block_bytes + KV_ALIGN:
        memcpy(b.raw, encoded, nbytes)
        shrunk = PyMem_RawRealloc(b.raw, nbytes)
        if shrunk != NULL:              # shrinking in place; NULL keeps it whole
            b.raw = <char *>shrunk
        payload = <uint8_t *>b.raw
    else:
        payload = <uint8_t *>PyMem_RawMalloc(nbytes)
        if payload == NULL:
            return ("dropped", 0, 0, 0)
        memcpy(payload, encoded, nbytes)
    return _install(s, bid, tier, payload, nbytes, exact)


cdef bint _unchanged(KVStore s, const kv_layer *L, int32_t bid, int32_t refs) noexcept:
    """Whether a block pinned with `refs` other references may take its
    payload: nobody replaced, released or shared it, and no GIL-free copy of
    its layer is reading the data the install frees."""
    return _blk(s, bid).refcount == refs + 1 and not L.busy


cdef object _install(KVStore s, int32_t bid, int tier, uint8_t *payload, int64_t nbytes,
                     int64_t exact):
    """Swap block `bid`'s full-precision data for `payload` (owned from now
    on); the data's memory goes back to the allocator, unless the payload was
    stored in it."""
    cdef kv_block *b = _blk(s, bid)
    if <char *>payload != b.raw:
        PyMem_RawFree(b.raw)
    b.raw = NULL
    b.data = NULL
    s.n_data_blocks -= 1
    b.payload = payload
    b.payload_bytes = nbytes
    b.tier = tier
    b.exact_rows = <int32_t>exact
    s.payload_total += nbytes
    s.n_compressed += 1
    return (TIER_NAMES[tier], s.block_size, s.block_bytes, nbytes)


cdef object _block_tiers(KVStore s, const kv_layer *L):
    """[batch, table entries] tier codes of the layer's blocks (-1: none)."""
    cdef int64_t r, j
    out = np.full((s.batch, L.nblk), -1, dtype=np.int8)
    for r in range(s.batch):
        for j in range(L.nblk):
            if L.table[r * L.nblk + j] >= 0:
                out[r, j] = _blk(s, L.table[r * L.nblk + j]).tier
    return out
