"""Attention over the cache (``KVCache.attention``), SmolLM2-135M's attention shape.

One decode query: 9 query heads over the 3 KV heads (grouped-query), head_dim
64, batch 1, scale 1/8, against one layer of a float16 cache.

* ``Attention``: one ``attention()`` call on a layer holding ``context``
  tokens, every block in ``tier`` (INT8/INT4: ``residual_tokens=0``,
  ``keep_first=0``, so every token is quantized), computed by kernel
  ``backend`` (``kvcache._core.set_backend``; a backend this build or CPU
  lacks is skipped).  Repeated calls read the same layer, so its K/V stay in
  whatever cache level holds them (3 MiB at 4,096 tokens, 24 MiB at 32,768).
* ``AttentionVsNumpy``: the same query in numpy on float32 K/V materialized
  once in setup (numpy's best case: no conversion in the timed call), one
  BLAS thread when threadpoolctl is installed (the kernel runs on one core).
* ``Prefetch``: ``attention(prefetch=True)`` against ``prefetch=False`` on a
  30-layer cache whose blocks are either allocated layer after layer
  ("contiguous") or scattered through the heap ("fragmented", see
  ``_fragmented``).  Each call attends the next of the 30 layers in turn, as a
  decode step does, so the K/V it reads were last touched 29 layers ago (out
  of cache: 30 layers are 90 MiB at 4,096 tokens).
* ``AttentionAccuracy``: the relative error of ``attention()`` on the real
  SmolLM2-135M keys, values and queries (``tests/data``: 6 layers, 1,492
  tokens, the model's own queries for the last 16 positions, causal) against
  a float64 numpy reference, per storage tier.

``python -m kvcache bench --sections attention,prefetch`` measures the same
against numpy, torch and the machine's read bandwidth in one run;
``python tools/attention_report.py`` prints the accuracy per layer and backend.
"""

import functools
import os
from pathlib import Path

import numpy as np

from kvcache import KVCache

try:
    from kvcache.bench.common import fill_contiguous, fill_fragmented
except ImportError:
    try:                # a kvcache whose bench was one module (asv over history)
        from kvcache.bench import fill_contiguous, fill_fragmented
    except ImportError:     # a kvcache from before these helpers: no Prefetch
        fill_contiguous = fill_fragmented = None

from ._common import BATCH, HEAD_DIM, HEADS, LAYERS, built, grid, prefill

try:
    from kvcache import _core
    _BACKENDS = _core.compiled_backends()
except (ImportError, AttributeError):      # a kvcache without attention
    _core = None
    _BACKENDS = ["avx512", "avx2", "neon", "scalar"]

Q_HEADS = 9
GROUP = Q_HEADS // HEADS
# 3 MiB and 24 MiB of float16 K+V per layer; quick profile: 4096 only
CONTEXTS = grid([4096, 32768], [4096])
SCALE = 1.0 / np.sqrt(HEAD_DIM)

DATA_DIR = Path(__file__).resolve().parents[2] / "tests" / "data"
KV_DATA = Path(os.environ.get("KVCACHE_KV_DATA", DATA_DIR / "smollm2_kv_prose.npz"))
Q_DATA = Path(os.environ.get("KVCACHE_Q_DATA", DATA_DIR / "smollm2_q_prose.npz"))


def _require_attention():
    if _core is None or not hasattr(KVCache, "attention"):
        raise NotImplementedError("this kvcache has no attention()")   # asv: skipped


@functools.lru_cache(maxsize=2)
def _values(context):
    """Values, distinct from the keys (``prefill`` gives the keys)."""
    rng = np.random.default_rng(context + 1)
    a = rng.standard_normal((BATCH, HEADS, context, HEAD_DIM), dtype=np.float32)
    a = a.astype("float16")
    a.flags.writeable = False
    return a


def _query(t_q=1, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, Q_HEADS, t_q, HEAD_DIM), dtype=np.float32)


def _one_layer(context, tier):
    """One layer of ``context`` tokens, every block in ``tier``."""
    k, v = prefill(context), _values(context)
    if tier == "float16":
        cache = KVCache(1, HEADS, HEAD_DIM, max_seq_len=context, batch_size=BATCH,
                        overflow="error")
        cache.update(0, k, v, context)
    else:
        cache = KVCache(1, HEADS, HEAD_DIM, max_seq_len=context, batch_size=BATCH,
                        overflow="error", residual_tokens=0, keep_first=0)
        cache.update(0, k, v, context)
        cache.compress_old_entries(0, strategy=tier)
    return cache


class Attention:
    params = [
        # context: tokens the layer holds (3 MiB and 24 MiB of float16 K+V)
        CONTEXTS,
        # tier: storage of every block: float16 (the cache dtype), int8 (per
        # token, 64 channels), int4 (KIVI: keys per channel, values per
        # group), dequantized inside the kernel's dot products
        ["float16", "int8", "int4"],
        # backend: the kernel variant (kvcache._core.set_backend); ones this
        # build or CPU lacks are skipped
        _BACKENDS,
    ]
    param_names = ["context", "tier", "backend"]
    timeout = 300

    def setup(self, context, tier, backend):
        _require_attention()
        if backend not in _core.available_backends():
            raise NotImplementedError(f"backend {backend} not available here")   # skipped
        self.cache = built(("Attention", context, tier), lambda: _one_layer(context, tier))
        _core.set_backend(backend)
        self.q = _query()
        self.out = np.empty(self.q.shape, np.float32)
        for _ in range(3):                  # warm: the K/V in cache as far as they fit
            self.cache.attention(0, self.q, out=self.out)

    def teardown(self, context, tier, backend):
        _core.set_backend(None)
        del self.cache

    def time_attention(self, context, tier, backend):
        """One decode query (9 heads) over the whole layer."""
        self.cache.attention(0, self.q, out=self.out)


class AttentionVsNumpy:
    params = [
        # context: as in Attention
        CONTEXTS,
        # formulation: "matmul" = stacked matmuls over the 3 KV heads (each
        # with its 3 query heads); "einsum" = the same with np.einsum;
        # "per_head" = a Python loop of 2-D matmuls, one per KV head
        ["matmul", "einsum", "per_head"],
    ]
    param_names = ["context", "formulation"]
    timeout = 300

    def setup(self, context, formulation):
        self.k = np.ascontiguousarray(prefill(context)[0], dtype=np.float32)  # [3, ctx, 64]
        self.v = np.ascontiguousarray(_values(context)[0], dtype=np.float32)
        self.kt = self.k.transpose(0, 2, 1)
        q = _query()
        self.qg = (q[0, :, 0] * np.float32(SCALE)).reshape(HEADS, GROUP, HEAD_DIM)
        self.limits = None
        try:
            from threadpoolctl import threadpool_limits
            self.limits = threadpool_limits(1)
        except ImportError:
            pass
        self.fn = getattr(self, "_" + formulation)
        self.fn()

    def teardown(self, context, formulation):
        if self.limits is not None:
            self.limits.restore_original_limits()

    @staticmethod
    def _softmax(s):
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        return s

    def _matmul(self):
        return self._softmax(self.qg @ self.kt) @ self.v

    def _einsum(self):
        s = self._softmax(np.einsum("hgd,hnd->hgn", self.qg, self.k))
        return np.einsum("hgn,hnd->hgd", s, self.v)

    def _per_head(self):
        out = np.empty((HEADS, GROUP, HEAD_DIM), np.float32)
        for h in range(HEADS):
            out[h] = self._softmax(self.qg[h] @ self.kt[h]) @ self.v[h]
        return out

    def time_numpy_reference(self, context, formulation):
        """The same decode query in numpy, float32 K/V already materialized."""
        self.fn()


# ---------------------------------------------------------------- prefetch


def _contiguous(context):
    return fill_contiguous(context, prefill(context), _values(context))


def _fragmented(context):
    return fill_fragmented(context, prefill(context), _values(context),
                           np.random.default_rng(context))


class Prefetch:
    params = [
        # prefetch: attention(prefetch=...): hint each next block while one
        # is computed
        [True, False],
        # layout: "contiguous" = each layer's blocks allocated one after
        # another; "fragmented" = scattered through the heap (see _fragmented)
        ["contiguous", "fragmented"],
        # context: tokens each of the 30 layers holds (as in Attention)
        CONTEXTS,
    ]
    param_names = ["prefetch", "layout", "context"]
    timeout = 300

    def setup(self, prefetch, layout, context):
        _require_attention()
        if fill_contiguous is None:
            raise NotImplementedError("this kvcache has no bench.fill_contiguous")  # skipped
        build = _contiguous if layout == "contiguous" else _fragmented
        self.cache = built(("Prefetch", layout, context), lambda: build(context))
        self.q = _query()
        self.out = np.empty(self.q.shape, np.float32)
        att, q, out = self.cache.attention, self.q, self.out
        layer = 0

        def next_layer():
            nonlocal layer
            att(layer, q, out=out, prefetch=prefetch)
            layer = layer + 1 if layer + 1 < LAYERS else 0

        def step():
            for i in range(LAYERS):
                att(i, q, out=out, prefetch=prefetch)

        self.next_layer, self.step = next_layer, step
        step()                              # warm: code and tables, not the K/V

    def teardown(self, prefetch, layout, context):
        del self.cache, self.next_layer, self.step

    def time_attention(self, prefetch, layout, context):
        """One decode query over the next of the 30 layers (its K/V cold)."""
        self.next_layer()

    def time_decode_step(self, prefetch, layout, context):
        """One decode query over each of the 30 layers in turn."""
        self.step()


# ---------------------------------------------------------------- accuracy

DATA_LAYERS = (0, 1, 8, 15, 22, 29)


@functools.lru_cache(maxsize=1)
def _real():
    """[(k, v, q)] of the stored layers: k/v float16 [1, 3, 1492, 64], q
    float32 [1, 9, 16, 64] (the last 16 positions)."""
    if not (KV_DATA.exists() and Q_DATA.exists()):
        raise NotImplementedError(f"real data not found at {KV_DATA} / {Q_DATA}")  # skipped
    out = []
    with np.load(KV_DATA) as kv, np.load(Q_DATA) as qd:
        for layer in DATA_LAYERS:
            out.append((kv[f"k_L{layer}"][None], kv[f"v_L{layer}"][None],
                        qd[f"q_L{layer}"][None]))
    return out


def _reference(q, k, v):
    """float64 softmax(q k^T * SCALE) v, grouped-query, causal: query i of
    t_q sits at position n - t_q + i and sees keys at positions <= its own."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    t_q, n = q.shape[2], k.shape[2]
    k = np.repeat(k, GROUP, axis=1)
    v = np.repeat(v, GROUP, axis=1)
    s = np.einsum("bhtd,bhnd->bhtn", q, k) * SCALE
    visible = np.arange(n)[None, :] <= (n - t_q + np.arange(t_q))[:, None]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhtn,bhnd->bhtd", p / p.sum(axis=-1, keepdims=True), v)


class AttentionAccuracy:
    params = [
        # tier: storage of the real K/V: "float32"/"float16" = the cache
        # dtype, nothing compressed (the data is float16, so both hold it
        # exactly: kernel arithmetic only); "int8"/"int4" = every whole block
        # quantized (residual_tokens=0, keep_first=0: 1,472 of 1,492 tokens,
        # the partial last block stays float16); "int8_keep4"/
        # "int4_keep4" = the first 4 positions kept exact (the default
        # keep_first; layers 15 and 22 put ~40% of attention on position 0)
        ["float32", "float16", "int8", "int4", "int8_keep4", "int4_keep4"],
    ]
    param_names = ["tier"]
    timeout = 120

    def setup(self, tier):
        _require_attention()
        self.data = _real()

    def _errors(self, tier):
        """Per stored layer, (||out - ref||^2, ||ref||^2)."""
        dtype = "float32" if tier == "float32" else "float16"
        strategy = tier.split("_")[0] if tier.startswith("int") else None
        keep_first = 4 if tier.endswith("_keep4") else 0
        out = []
        for k, v, q in self.data:
            n = k.shape[2]
            cache = KVCache(1, HEADS, HEAD_DIM, max_seq_len=n, dtype=dtype, overflow="error",
                            residual_tokens=0, keep_first=keep_first)
            cache.update(0, k.astype(dtype), v.astype(dtype), n)
            if strategy is not None:
                cache.compress_old_entries(0, strategy=strategy)
            got = cache.attention(0, q).astype(np.float64)
            ref = _reference(q, k, v)
            out.append((float(np.sum((got - ref) ** 2)), float(np.sum(ref * ref))))
        return out

    def track_rel_error(self, tier):
        """Relative Frobenius error of the attention output, the 6 layers pooled."""
        e = self._errors(tier)
        return (sum(a for a, _ in e) / sum(b for _, b in e)) ** 0.5

    track_rel_error.unit = "relative"

    def track_max_layer_rel_error(self, tier):
        """The worst layer's relative Frobenius error."""
        return max((a / b) ** 0.5 for a, b in self._errors(tier))

    track_max_layer_rel_error.unit = "relative"
