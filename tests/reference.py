"""A plain-numpy reference of kvcache's semantics, written from the spec.

Deliberately simple and slow: per layer a dict ``position -> (k, v)`` of
``[batch, heads, head_dim]`` arrays plus the layer's ``n`` (absolute length),
``lo`` (first held window position) and ``cap`` (capacity).  Held positions
are ``[0, min(S, lo))`` then ``[lo, n)``.  No blocks, no slots, no ring
arithmetic: whatever the compiled cache does with its memory, what it returns
must equal what this returns.

Every method validates everything before changing anything, so a call that
raises leaves the reference unchanged (the same contract as the cache).
"""

from __future__ import annotations

import operator

import numpy as np

from kvcache import CacheFullError, GrowthStrategy

MAX_TOKENS = 2**40

__all__ = ["RefCache", "RefLayer", "MAX_TOKENS"]


class RefLayer:
    def __init__(self, cap: int) -> None:
        self.n = 0
        self.lo = 0
        self.cap = cap
        self.tokens: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def held_positions(self, sinks: int) -> list[int]:
        return list(range(min(sinks, self.lo))) + list(range(self.lo, self.n))


class RefCache:
    """Reference cache.  Constructor arguments as :class:`kvcache.KVCache`
    (validation of the constructor itself is not mirrored: build it only with
    arguments the real cache accepts)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int = 4096, batch_size: int = 1, dtype="float16",
                 block_size: int | None = None, sink_tokens: int = 0,
                 overflow: str = "ring") -> None:
        self.num_layers = num_layers
        self.heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.batch = batch_size
        self.dtype = np.dtype(dtype)
        self.block_size = 64 if block_size is None else block_size
        self.sinks = sink_tokens
        self.ring = overflow == "ring"
        self.layers = [RefLayer(max_seq_len) for _ in range(num_layers)]
        self.strategy: GrowthStrategy | None = None
        self.max_capacity = max_seq_len
        # counters (tokens x batch rows, like the cache's)
        self.evictions = 0
        self.hits = 0
        self.truncations = 0
        self.growths = 0
        self.growth_bytes = 0
        self.tokens_written = 0            # positions written per row, dropped ones excluded
        self.growth_log: list[tuple[int, int, int]] = []   # (layer, old, new)

    # ---------------------------------------------------------------- helpers

    def _layer(self, layer_idx) -> RefLayer:
        i = operator.index(layer_idx)
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer_idx {i} out of range")
        return self.layers[i]

    def _check(self, x, name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except Exception as exc:  # pragma: no cover - odd objects
                raise TypeError(name) from exc
        if x.dtype.kind != "f" or x.dtype.itemsize not in (2, 4):
            raise TypeError(f"{name} dtype {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} ndim {x.ndim}")
        b, h, _, d = x.shape
        if (b, h, d) != (self.batch, self.heads, self.head_dim):
            raise ValueError(f"{name} shape {x.shape}")
        return x.astype(self.dtype)      # numpy's rounding, a copy

    def held(self, layer_idx) -> int:
        return len(self._layer(layer_idx).held_positions(self.sinks))

    # ------------------------------------------------------------- the rule

    def update(self, layer_idx, k, v, seq_len: int) -> None:
        L = self._layer(layer_idx)
        if k is None and v is None:
            ka = va = None
            t = 0
        elif k is None or v is None:
            raise TypeError("k and v: both arrays or both None")
        else:
            ka = self._check(k, "k")
            va = self._check(v, "v")
            t = ka.shape[2]
            if va.shape[2] != t:
                raise ValueError("k and v token counts differ")
        m = operator.index(seq_len)
        S = self.sinks
        if m < 0:
            raise ValueError("negative seq_len")
        start = m - t
        if start < 0:
            raise ValueError("more tokens than seq_len")
        if start > L.n:
            raise ValueError("hole")
        # truncation part
        n_t = min(L.n, m)
        lo_t = min(L.lo, m)
        held_t = set(range(min(S, lo_t))) | set(range(lo_t, n_t))
        for p in range(start, n_t):               # rewritten in place
            if p not in held_t:
                raise IndexError(f"position {p} was evicted")
        held_after = min(S, lo_t) + m - lo_t
        cap = L.cap
        if (held_after > cap and self.strategy is not None and n_t <= cap
                and cap < self.max_capacity):
            cap = min(self.strategy.next_capacity(cap, m, self.block_size,
                                                  operator.index(layer_idx)),
                      self.max_capacity)
        lo_new = lo_t
        if held_after > cap:
            if not self.ring:
                raise CacheFullError("full")
            lo_new = m - (cap - S)
        # ---- commit
        new_held = list(range(min(S, lo_new))) + list(range(lo_new, m))
        self.evictions += (len(held_t) + (m - n_t) - len(new_held)) * self.batch
        if m < L.n:
            self.truncations += 1
        if cap != L.cap:
            self.growths += 1
            self.growth_bytes += (cap - L.cap) * self.token_bytes()
            self.growth_log.append((operator.index(layer_idx), L.cap, cap))
        tokens = {p: kv for p, kv in L.tokens.items() if p < m}
        for p in range(start, m):
            j = p - start
            tokens[p] = (ka[:, :, j, :].copy(), va[:, :, j, :].copy())
        keep = set(new_held)
        self.tokens_written += sum(1 for p in range(start, m) if p in keep)
        L.tokens = {p: kv for p, kv in tokens.items() if p in keep}
        L.n, L.lo, L.cap = m, lo_new, cap

    def truncate(self, seq_len: int, layer_idx=None) -> None:
        m = operator.index(seq_len)
        if m < 0:
            raise ValueError("negative seq_len")
        idx = range(self.num_layers) if layer_idx is None else [layer_idx]
        for i in idx:
            self._layer(i)
        for i in idx:
            if self.layers[i].n > m:
                self.update(i, None, None, m)

    def reorder_batch(self, indices) -> None:
        """Row r of every layer becomes what row indices[r] was."""
        idx = [operator.index(i) for i in indices]
        if not idx:
            raise ValueError("no rows selected")
        if min(idx) < 0 or max(idx) >= self.batch:
            raise IndexError("row index out of range")
        for L in self.layers:
            L.tokens = {p: (k[idx].copy(), v[idx].copy()) for p, (k, v) in L.tokens.items()}
        self.batch = len(idx)

    def token_bytes(self) -> int:
        """Bytes of one token position: keys and values, every row and head."""
        return 2 * self.batch * self.heads * self.head_dim * self.dtype.itemsize

    def reset(self) -> None:
        self.layers = [RefLayer(self.max_seq_len) for _ in range(self.num_layers)]

    # ----------------------------------------------------------------- growth

    def enable_dynamic_growth(self, strategy: GrowthStrategy,
                              max_capacity: int | None = None) -> None:
        cap_max = MAX_TOKENS if max_capacity is None else operator.index(max_capacity)
        if not 1 <= cap_max <= MAX_TOKENS:
            raise ValueError("max_capacity out of range")
        for L in self.layers:
            if cap_max < L.cap:
                raise ValueError("max_capacity below a layer's capacity")
            if L.n > L.cap:
                raise ValueError("wrapped")
        self.strategy = strategy
        self.max_capacity = cap_max

    def disable_dynamic_growth(self) -> None:
        self.strategy = None
        self.max_capacity = max(L.cap for L in self.layers)

    # ------------------------------------------------------------------ reads

    def positions(self, layer_idx) -> np.ndarray:
        return np.array(self._layer(layer_idx).held_positions(self.sinks), dtype=np.int64)

    def _read(self, layer_idx, which: int) -> np.ndarray:
        L = self._layer(layer_idx)
        pos = L.held_positions(self.sinks)
        out = np.empty((self.batch, self.heads, len(pos), self.head_dim), dtype=self.dtype)
        for i, p in enumerate(pos):
            out[:, :, i, :] = L.tokens[p][which]
        self.hits += len(pos) * self.batch
        return out

    def keys(self, layer_idx) -> np.ndarray:
        return self._read(layer_idx, 0)

    def values(self, layer_idx) -> np.ndarray:
        return self._read(layer_idx, 1)

    def seq_len(self, layer_idx) -> int:
        return self._layer(layer_idx).n

    def capacity(self, layer_idx) -> int:
        return self._layer(layer_idx).cap

    def live_bytes(self) -> int:
        held = sum(self.held(i) for i in range(self.num_layers))
        return held * self.batch * self.heads * self.head_dim * self.dtype.itemsize * 2
