"""Content addresses of prefix blocks: chained digests of token ids.

A block of a prompt is named by what produced its K/V: every token id from
the start of the prompt up to the end of the block, and the namespace: the
cache geometry, storage dtype and tier, and the model.  Block ``i``'s key
is ``BLAKE2b-128(namespace || key[i-1] || ids of block i)`` (``key[-1]`` is
empty; ids as little-endian int64), so equal keys mean an equal prefix under
an equal namespace, and the key of block ``i`` is computed from block
``i - 1``'s in one step.

The hash is hashlib's BLAKE2b, never Python's ``hash()``: that one is
salted per process (``PYTHONHASHSEED``), so two workers would never agree
on a key.  A digest of 128 bits makes an accidental collision negligible;
a store must still compare the token ids it keeps with a hit's, so even a
collision can never return another prompt's K/V.
"""

from __future__ import annotations

import hashlib
import json
import numbers

import numpy as np

__all__ = ["DIGEST_BYTES", "namespace", "block_keys"]

#: Bytes of a block key and of a namespace.
DIGEST_BYTES = 16
_PERSON = b"kvcache-prefix"           # domain separation from other BLAKE2b uses


def namespace(*, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
              dtype: str, tier: str, model: str) -> bytes:
    """The namespace digest of K/V produced by ``model`` (a caller-given
    identity: name, revision, config hash ...) and stored with this geometry,
    dtype and tier.  Blocks of different namespaces never share a key."""
    fields = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim,
              "block_size": block_size}
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("dtype", dtype), ("tier", tier), ("model", model)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    text = json.dumps({**{k: int(v) for k, v in fields.items()}, "dtype": dtype,
                       "tier": tier, "model": model}, sort_keys=True).encode()
    return hashlib.blake2b(text, digest_size=DIGEST_BYTES, person=_PERSON).digest()


def _token_ids(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
    if ids.size and ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
        raise ValueError(f"token ids must be in [0, 2**63), got values from {ids.min()} "
                         f"to {ids.max()}")
    return ids.astype("<i8", copy=False)


def block_keys(token_ids, block_size: int, ns: bytes) -> list[bytes]:
    """The key of every full block of ``token_ids`` (a trailing partial block
    has none), in order, under namespace ``ns``."""
    if (isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral)
            or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(ns, bytes) or len(ns) != DIGEST_BYTES:
        raise ValueError(f"the namespace must be {DIGEST_BYTES} bytes (see namespace()), "
                         f"got {ns!r}")
    data = _token_ids(token_ids).tobytes()
    step = 8 * int(block_size)
    keys, prev = [], b""
    # The namespace leads every hashed message: hash it once, copy the state.
    base = hashlib.blake2b(ns, digest_size=DIGEST_BYTES, person=_PERSON)
    for start in range(0, len(data) - step + 1, step):
        h = base.copy()
        h.update(prev)
        h.update(data[start:start + step])
        prev = h.digest()
        keys.append(prev)
    return keys
