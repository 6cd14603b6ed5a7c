"""Stateful property test: KVCache run beside the plain-numpy RefCache.

Every rule applies one operation to both.  When the reference raises, the
cache must raise the same exception type and stay exactly as it was (its
counters are compared before and after; its contents are compared with the
unchanged reference by the invariant).  After every step every layer's keys,
values, positions, seq_len and capacity must be exactly equal, and the
counters must match the reference's.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from kvhelpers import counters, layout
from reference import RefCache

from kvcache import GrowthStrategy, KVCache
from kvcache.growth import Adaptive

SRC_DTYPES = ("native", "float32", "float16")
LAYOUTS = ("c", "transposed", "neg_t", "neg_d", "strided", "fortran", "readonly", "swapped")


@dataclass
class Config:
    num_layers: int
    heads: int
    head_dim: int
    max_seq_len: int
    block_size: int
    sinks: int
    batch: int
    dtype: str
    overflow: str
    seed: int


@st.composite
def configs(draw):
    max_seq_len = draw(st.integers(8, 40))
    return Config(
        num_layers=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 5)),
        max_seq_len=max_seq_len,
        block_size=draw(st.sampled_from([1, 2, 4, 8])),
        sinks=draw(st.integers(0, 3)),
        batch=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(["float16", "float32"])),
        overflow=draw(st.sampled_from(["ring", "ring", "ring", "error"])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def growth_specs():
    return st.tuples(st.sampled_from(["exponential", "linear", "adaptive", "default"]),
                     st.sampled_from([1.1, 1.5, 2.0, 3.7]), st.integers(1, 20),
                     st.sampled_from([1e-4, 0.5, 30.0]),
                     st.one_of(st.none(), st.integers(-5, 60)))


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = None
        self.ref = None

    @initialize(cfg=configs(), lengths=st.lists(st.integers(0, 60), min_size=3, max_size=3),
                growth=st.one_of(st.none(), growth_specs()))
    def build(self, cfg, lengths, growth):
        if cfg.sinks >= cfg.max_seq_len:     # not reachable with the ranges, kept explicit
            cfg.sinks = 0
        kw = dict(max_seq_len=cfg.max_seq_len, batch_size=cfg.batch, dtype=cfg.dtype,
                  block_size=cfg.block_size, sink_tokens=cfg.sinks, overflow=cfg.overflow)
        note(f"KVCache({cfg.num_layers}, {cfg.heads}, {cfg.head_dim}, **{kw})")
        self.cfg = cfg
        self.rows_shared = False
        self.cache = KVCache(cfg.num_layers, cfg.heads, cfg.head_dim, **kw)
        self.ref = RefCache(cfg.num_layers, cfg.heads, cfg.head_dim, **kw)
        self.rng = np.random.default_rng(cfg.seed)
        if growth is not None:
            self._enable(*growth)
        # Start from a prefilled cache (some layers past capacity) so that
        # short runs still reach the ring and growth paths.
        for layer in range(self.cfg.num_layers):
            k, v = self._tokens(lengths[layer], "native", "c")
            self._update(layer, k, v, lengths[layer], "prefill")

    # ----------------------------------------------------------- helpers

    def _layer(self, i):
        return i % self.cfg.num_layers

    def _tokens(self, t, src, how):
        cfg = self.cfg
        shape = (self.ref.batch, cfg.heads, t, cfg.head_dim)
        dt = cfg.dtype if src == "native" else src
        k = (self.rng.standard_normal(shape, dtype=np.float32) * 3).astype(dt)
        v = (self.rng.standard_normal(shape, dtype=np.float32) * 3).astype(dt)
        return layout(k, how), layout(v, how)

    def _both(self, desc, do_cache, do_ref):
        """Apply to the reference; the cache must agree (success or exception type)."""
        note(desc)
        try:
            do_ref()
        except Exception as exc:         # the reference is unchanged (validates first)
            before = counters(self.cache)
            with pytest.raises(Exception) as info:
                do_cache()
            assert type(info.value) is type(exc), (desc, info.value, exc)
            assert counters(self.cache) == before, desc
            note(f"  -> {type(exc).__name__} (both)")
            event(f"{desc.split('(')[0]}: {type(exc).__name__}")
            return False
        do_cache()
        event(f"{desc.split('(')[0]}: ok")
        return True

    def _update(self, layer, k, v, seq_len, desc):
        self._both(f"update({layer}, t={None if k is None else k.shape[2]}, seq_len={seq_len})"
                   f" {desc}",
                   lambda: self.cache.update(layer, k, v, seq_len),
                   lambda: self.ref.update(layer, k, v, seq_len))

    # ------------------------------------------------------------- rules

    @rule(li=st.integers(0, 2), t=st.integers(1, 6), src=st.sampled_from(SRC_DTYPES),
          how=st.sampled_from(LAYOUTS), np_ints=st.booleans())
    def append(self, li, t, src, how, np_ints):
        layer = self._layer(li)
        k, v = self._tokens(t, src, how)
        seq_len = self.ref.seq_len(layer) + t
        if np_ints:                      # numpy integers are integers (operator.index)
            layer, seq_len = np.int64(layer), np.int32(seq_len)
        self._update(layer, k, v, seq_len, f"append {src}/{how}")

    @rule(li=st.integers(0, 2), t=st.integers(1, 6), src=st.sampled_from(SRC_DTYPES),
          how=st.sampled_from(LAYOUTS))
    def overwrite(self, li, t, src, how):
        layer = self._layer(li)
        n = self.ref.seq_len(layer)
        t = min(t, n)
        k, v = self._tokens(t, src, how)
        self._update(layer, k, v, n, f"overwrite {src}/{how}")

    @rule(li=st.integers(0, 2), back=st.integers(1, 10), t=st.integers(0, 6),
          src=st.sampled_from(SRC_DTYPES), how=st.sampled_from(LAYOUTS))
    def rewrite_truncate(self, li, back, t, src, how):
        layer = self._layer(li)
        m = max(0, self.ref.seq_len(layer) - back)
        t = min(t, m)
        k, v = self._tokens(t, src, how)
        self._update(layer, k, v, m, f"truncating rewrite {src}/{how}")

    @rule(li=st.integers(0, 2), back=st.integers(0, 12))
    def pure_truncate_update(self, li, back):
        layer = self._layer(li)
        m = max(0, self.ref.seq_len(layer) - back)
        self._update(layer, None, None, m, "pure truncate")

    @rule(li=st.one_of(st.none(), st.integers(0, 2)), back=st.integers(-3, 12))
    def truncate_method(self, li, back):
        layer = None if li is None else self._layer(li)
        longest = max(self.ref.seq_len(i) for i in range(self.cfg.num_layers))
        m = longest - back
        self._both(f"truncate({m}, layer_idx={layer})",
                   lambda: self.cache.truncate(m, layer),
                   lambda: self.ref.truncate(m, layer))

    @rule(li=st.integers(0, 2), extra=st.integers(1, 20), src=st.sampled_from(SRC_DTYPES),
          how=st.sampled_from(LAYOUTS))
    def big_write(self, li, extra, src, how):
        """One write of more tokens than the layer can hold."""
        layer = self._layer(li)
        # Bounded: with growth enabled capacity follows seq_len upwards.
        t = min(self.ref.capacity(layer), 120) + extra
        k, v = self._tokens(t, src, how)
        self._update(layer, k, v, self.ref.seq_len(layer) + t, f"big write {src}/{how}")

    @rule(li=st.integers(0, 2), t=st.integers(0, 50), seq=st.integers(-3, 60),
          relative=st.booleans())
    def arbitrary_update(self, li, t, seq, relative):
        """Anything: holes, negative lengths, t > seq_len, evicted rewrites, overflow."""
        layer = self._layer(li)
        seq_len = self.ref.seq_len(layer) + seq - 10 if relative else seq
        k, v = self._tokens(t, "native", "c")
        self._update(layer, k, v, seq_len, "arbitrary")

    @rule(growth=growth_specs())
    def enable_growth(self, growth):
        self._enable(*growth)

    def _enable(self, kind, factor, increment, dt, extra):
        if kind == "exponential":
            s_cache = s_ref = GrowthStrategy.exponential(factor)
        elif kind == "linear":
            s_cache = s_ref = GrowthStrategy.linear(increment)
        elif kind == "default":
            s_cache, s_ref = None, GrowthStrategy.exponential(1.5)
        else:
            # Two twins with identical deterministic clocks: the strategy keeps
            # per-layer state, so the cache and the reference each need their own.
            def make():
                ticks = itertools.count()
                return Adaptive(horizon_s=2.0, min_factor=1.125, max_factor=factor + 0.5,
                                clock=lambda: next(ticks) * dt)
            s_cache, s_ref = make(), make()
        cap_max = None if extra is None else max(1, self.cfg.max_seq_len + extra)
        self._both(f"enable_dynamic_growth({kind}, factor={factor}, inc={increment}, "
                   f"dt={dt}, max_capacity={cap_max})",
                   lambda: self.cache.enable_dynamic_growth(s_cache, cap_max),
                   lambda: self.ref.enable_dynamic_growth(s_ref, cap_max))

    @rule()
    def disable_growth(self):
        self._both("disable_dynamic_growth()", self.cache.disable_dynamic_growth,
                   self.ref.disable_dynamic_growth)

    @rule(idx=st.lists(st.integers(0, 7), min_size=0, max_size=3), valid=st.integers(0, 4))
    def reorder_batch(self, idx, valid):
        """Beam reorder / selection / repetition: rows then share blocks (copy-on-write)."""
        if valid:
            idx = [i % self.ref.batch for i in idx] or [0]
        self._both(f"reorder_batch({idx})", lambda: self.cache.reorder_batch(idx),
                   lambda: self.ref.reorder_batch(idx))
        assert self.cache.batch_size == self.ref.batch
        if len(set(idx)) < len(idx):
            self.rows_shared = True

    @rule()
    def reset(self):
        self._both("reset()", self.cache.reset, self.ref.reset)

    @rule(li=st.integers(0, 2), t=st.integers(1, 4),
          what=st.sampled_from(["layer_high", "layer_neg", "k_none", "v_none", "ndim3",
                                "ndim5", "batch", "heads", "head_dim", "int32", "float64",
                                "complex64", "bool", "object", "list", "t_mismatch"]))
    def invalid_input(self, li, t, what):
        layer = self._layer(li)
        n = self.ref.seq_len(layer)
        k, v = self._tokens(t, "native", "c")
        cfg = self.cfg
        expected = ValueError
        if what == "layer_high":
            layer, expected = cfg.num_layers, IndexError
        elif what == "layer_neg":
            layer, expected = -1, IndexError
        elif what == "k_none":
            k, expected = None, TypeError
        elif what == "v_none":
            v, expected = None, TypeError
        elif what == "ndim3":
            k = k[0]
        elif what == "ndim5":
            v = v[None]
        elif what == "batch":
            k = np.concatenate([k, k], axis=0)
        elif what == "heads":
            v = np.concatenate([v, v], axis=1)
        elif what == "head_dim":
            k = np.concatenate([k, k], axis=3)
        elif what in ("int32", "float64", "complex64", "bool", "object"):
            k, expected = k.astype(what), TypeError
        elif what == "list":
            v, expected = v.tolist(), TypeError
        elif what == "t_mismatch":
            v = np.concatenate([v, v[:, :, :1]], axis=2)
        note(f"invalid update: {what}")
        before = counters(self.cache)
        with pytest.raises(expected):
            self.cache.update(layer, k, v, n + t)
        assert counters(self.cache) == before
        with pytest.raises(expected):
            self.ref.update(layer, k, v, n + t)

    # -------------------------------------------------------- invariant

    @invariant()
    def same_as_reference(self):
        if self.cache is None:
            return
        s = self.cache.stats()
        assert s.evictions == self.ref.evictions
        assert s.truncations == self.ref.truncations
        assert s.growths == self.ref.growths
        assert s.growth_bytes == self.ref.growth_bytes
        assert s.hits == self.ref.hits
        assert s.misses == 0
        if self.rows_shared:
            # rows sharing a block after reorder_batch count its bytes once:
            # between one row's worth and every row's
            assert self.ref.live_bytes() // self.ref.batch <= s.live_bytes
            assert s.live_bytes <= self.ref.live_bytes()
        else:
            assert s.live_bytes == self.ref.live_bytes()
        assert s.tokens_written == self.ref.tokens_written
        # the pool: at most one spare block per layer and row, no block
        # outside a table entry (no leak), memory covers the blocks in use
        batch = self.ref.batch
        assert s.spare_blocks <= self.cfg.num_layers * batch
        in_use = s.blocks - s.spare_blocks
        entries = sum(-(-self.ref.capacity(i) // self.cfg.block_size)
                      for i in range(self.cfg.num_layers)) * batch
        assert 0 <= in_use <= entries
        block_bytes = 2 * self.cfg.block_size * self.cfg.heads * self.cfg.head_dim * np.dtype(
            self.cfg.dtype).itemsize
        assert s.memory_bytes >= s.blocks * block_bytes
        if all(self.ref.seq_len(i) == 0 for i in range(self.cfg.num_layers)):
            assert in_use == 0
        assert s.memory_bytes > 0
        assert 0.0 <= s.memory_efficiency <= 1.0
        for i in range(self.cfg.num_layers):
            if self.ref.seq_len(i) > self.ref.capacity(i):
                event("a layer has wrapped")
            if self.ref.capacity(i) > self.cfg.max_seq_len:
                event("a layer has grown")
            if self.ref.layers[i].lo > self.cfg.sinks:
                event("a layer has evicted")
        for i in range(self.cfg.num_layers):
            assert self.cache.seq_len(i) == self.ref.seq_len(i), i
            assert self.cache.capacity(i) == self.ref.capacity(i), i
            assert self.cache.held(i) == self.ref.held(i), i
            pc, pr = self.cache.positions(i), self.ref.positions(i)
            assert pc.dtype == np.int64
            assert np.array_equal(pc, pr), (i, pc, pr)
            for name in ("keys", "values"):
                a = getattr(self.cache, name)(i)
                b = getattr(self.ref, name)(i)
                assert a.dtype == b.dtype == np.dtype(self.cfg.dtype)
                assert a.shape == b.shape, (i, name, a.shape, b.shape)
                assert np.array_equal(a, b), (i, name)


TestCacheMachine = CacheMachine.TestCase
