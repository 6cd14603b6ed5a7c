"""Plain numpy reference for KVCache.attention (float64 throughout).

softmax(q . K^T * scale) . V over the held keys and values, grouped-query
(query head i reads KV head i // (num_q_heads // num_kv_heads)), causal by
absolute position: query i of t_q sits at position seq_len - t_q + i and sees
keys at positions <= its own.  A query that sees no key gets zeros (as the
kernel does).
"""

from __future__ import annotations

import numpy as np


def reference_attention(q, keys, values, positions, seq_len, scale=None):
    """q [B, Hq, t_q, D]; keys/values [B, Hkv, N, D]; positions [N] absolute."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    b, hq, t_q, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    k = np.repeat(k, group, axis=1)                       # [B, Hq, N, D]
    v = np.repeat(v, group, axis=1)
    s = np.einsum("bhtd,bhnd->bhtn", q, k) * scale
    qpos = seq_len - t_q + np.arange(t_q)
    visible = np.asarray(positions)[None, :] <= qpos[:, None]   # [t_q, N]
    s = np.where(visible[None, None], s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    p = np.where(visible[None, None], p, 0.0)
    den = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhtn,bhnd->bhtd", p, v)
    return np.divide(out, den, out=np.zeros_like(out), where=den > 0)


def rel_error(got, ref):
    """Relative Frobenius error ||got - ref|| / ||ref||."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / den) if den > 0 else float(np.linalg.norm(got))
