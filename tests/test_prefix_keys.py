"""Content addresses of prefix blocks (kvcache/prefix_keys.py): chained
BLAKE2b digests of token ids under a namespace, equal across processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache.prefix_keys import DIGEST_BYTES, block_keys, namespace

NS_ARGS = dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=64, dtype="float16",
               tier="int8", model="SmolLM2-135M-Instruct")
NS = namespace(**NS_ARGS)


def reference_keys(ids, block_size, ns):
    """Written from the spec: key[i] = BLAKE2b-128(ns || key[i-1] || ids of
    block i), ids as little-endian int64, personalised 'kvcache-prefix'."""
    keys, prev = [], b""
    for i in range(len(ids) // block_size):
        chunk = b"".join(int(t).to_bytes(8, "little", signed=True)
                         for t in ids[i * block_size:(i + 1) * block_size])
        prev = hashlib.blake2b(ns + prev + chunk, digest_size=16,
                               person=b"kvcache-prefix").digest()
        keys.append(prev)
    return keys


@given(st.lists(st.integers(0, 2**31), max_size=200), st.sampled_from([1, 4, 16, 64]))
def test_keys_match_the_spec(ids, block_size):
    assert block_keys(ids, block_size, NS) == reference_keys(ids, block_size, NS)


def test_chained_prefixes():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, 64 * 5 + 17)
    keys = block_keys(ids, 64, NS)
    assert len(keys) == 5 and all(len(k) == DIGEST_BYTES for k in keys)
    assert len(set(keys)) == 5
    # a longer prompt with the same start shares the keys of the common full blocks
    assert block_keys(np.concatenate([ids, [1, 2, 3] * 40]), 64, NS)[:5] == keys
    # one token changed in block 2 changes the key of block 2 and every later one
    other = ids.copy()
    other[2 * 64 + 5] += 1
    changed = block_keys(other, 64, NS)
    assert changed[:2] == keys[:2]
    assert all(a != b for a, b in zip(changed[2:], keys[2:]))


@pytest.mark.parametrize("field, value", [("num_layers", 29), ("num_kv_heads", 4),
                                          ("head_dim", 32), ("block_size", 32),
                                          ("dtype", "float32"), ("tier", "int4"),
                                          ("model", "SmolLM2-360M")])
def test_any_namespace_field_changes_every_key(field, value):
    ids = list(range(256))
    other = namespace(**dict(NS_ARGS, **{field: value}))
    assert other != NS
    assert not set(block_keys(ids, 64, other)) & set(block_keys(ids, 64, NS))


def test_same_keys_in_processes_with_other_hash_seeds():
    ids = list(range(1000, 1300))
    code = ("import json, sys; from kvcache.prefix_keys import namespace, block_keys; "
            f"ns = namespace(**{NS_ARGS!r}); "
            f"print(json.dumps([k.hex() for k in block_keys({ids!r}, 64, ns)]))")
    want = [k.hex() for k in block_keys(ids, 64, NS)]
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.abspath(
                                 sys.executable)))
        assert json.loads(out.stdout) == want


def test_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        block_keys(np.zeros((2, 64), np.int64), 64, NS)
    with pytest.raises(TypeError, match="integers"):
        block_keys(np.zeros(64, np.float32), 64, NS)
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*63\)"):
        block_keys([-1] * 64, 64, NS)
    for bs in (0, -64, 1.5, True):
        with pytest.raises(ValueError, match="block_size"):
            block_keys(range(64), bs, NS)
    with pytest.raises(ValueError, match="16 bytes"):
        block_keys(range(64), 64, b"short")
    with pytest.raises(ValueError, match="head_dim"):
        namespace(**dict(NS_ARGS, head_dim=0))
    with pytest.raises(TypeError, match="model"):
        namespace(**dict(NS_ARGS, model=""))
    assert block_keys([], 64, NS) == [] and block_keys(range(63), 64, NS) == []
