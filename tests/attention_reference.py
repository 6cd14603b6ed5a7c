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
    positions = np.asarray(positions)
    out = np.zeros(q.shape, dtype=np.float64)
    for i in range(t_q):
        # Only the keys query i sees take part (a masked key's value, even
        # NaN or inf, must not reach the row).
        seen = positions <= seq_len - t_q + i
        if not seen.any():
            continue
        s = np.einsum("bhd,bhnd->bhn", q[:, :, i], k[:, :, seen]) * scale
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        out[:, :, i] = np.einsum("bhn,bhnd->bhd", p, v[:, :, seen]) / p.sum(axis=-1)[..., None]
    return out


def rel_error(got, ref):
    """Relative Frobenius error ||got - ref|| / ||ref||."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(got - ref) / den) if den > 0 else float(np.linalg.norm(got))
