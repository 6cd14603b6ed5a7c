"""Stateful property test of the compressed tiers: KVCache beside the numpy model.

The model is test_compression.Model: RefCache (tests/reference.py) plus the
block tiers.  When compression runs, every eligible full block's positions
are replaced in the model by the reference reconstruction
(tests/quant_reference.py) of that block's current contents; writes into a
compressed block restore it first (decoded values, then the write).  After
every step every layer's positions, keys and values must be equal bit for
bit, and so must the block tiers, the hit/miss counters and the compressed
blocks and bytes.  A call the model rejects must raise the same exception
type in the cache and leave it unchanged.

Shapes are small (block_size 1..8, head_dim 2..8 even, residual 0..10) so
that short runs reach the ring, sinks inside blocks, partly held blocks and
recompression of restored blocks.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_compression import FakeClock, Model, assert_bits_equal, assert_stats_match

STRATEGIES = ("fp16", "int8", "int4", "lossless", "adaptive")


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
    compression: str
    residual: int
    keep_first: int | None
    group_size: int
    int8_group_size: int
    budget: float
    seed: int


@st.composite
def configs(draw):
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    divisors = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
    max_seq_len = draw(st.integers(8, 40))
    return Config(
        num_layers=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 2)),
        head_dim=head_dim,
        max_seq_len=max_seq_len,
        block_size=draw(st.sampled_from([1, 2, 4, 8])),
        sinks=draw(st.integers(0, 3)),
        batch=draw(st.integers(1, 2)),
        dtype=draw(st.sampled_from(["float16", "float32"])),
        overflow=draw(st.sampled_from(["ring", "ring", "ring", "error"])),
        compression=draw(st.sampled_from(STRATEGIES)),
        residual=draw(st.integers(0, 10)),
        keep_first=draw(st.one_of(st.none(), st.integers(0, 6))),
        group_size=draw(st.sampled_from(divisors)),
        int8_group_size=draw(st.sampled_from(divisors)),
        budget=draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


class CompressionMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cache = None
        self.model = None

    @initialize(cfg=configs(), lengths=st.lists(st.integers(0, 50), min_size=2, max_size=2))
    def build(self, cfg, lengths):
        self.cfg = cfg
        self.clock = FakeClock(0.0)
        self.model = Model(
            cfg.num_layers, cfg.heads, cfg.head_dim, max_seq_len=cfg.max_seq_len,
            batch_size=cfg.batch, dtype=cfg.dtype, block_size=cfg.block_size,
            sink_tokens=cfg.sinks, overflow=cfg.overflow, compression=cfg.compression,
            residual_tokens=cfg.residual, keep_first=cfg.keep_first,
            group_size=cfg.group_size, int8_group_size=cfg.int8_group_size,
            error_budget=cfg.budget, clock=self.clock)
        note(f"{cfg}")
        self.cache = self.model.cache()
        self.rng = np.random.default_rng(cfg.seed)
        for li in range(cfg.num_layers):
            k, v = self._tokens(lengths[li])
            self._update(li, k, v, lengths[li], "prefill")

    # ------------------------------------------------------------ helpers

    def _layer(self, i):
        return i % self.cfg.num_layers

    def _tokens(self, t, kind=None):
        shape = (self.model.ref.batch, self.cfg.heads, t, self.cfg.head_dim)
        kind = kind or self.rng.choice(["normal", "normal", "outliers", "constant", "steps"])
        k = self.rng.standard_normal(shape, dtype=np.float32) * 3
        v = self.rng.standard_normal(shape, dtype=np.float32)
        if kind == "outliers":                  # an outlier channel (keys per channel)
            k[..., 0] *= 50
        elif kind == "constant":                # zero scales; LOSSLESS shrinks it
            k[...] = 1.5
            v[...] = 0.0
        elif kind == "steps":                   # few distinct values
            k = np.round(k)
            v = np.round(v * 4) / 4
        return k.astype(self.cfg.dtype), v.astype(self.cfg.dtype)

    def _both(self, desc, do_cache, do_model):
        """Apply to the model; the cache must agree (success, or exception type
        with nothing changed)."""
        note(desc)
        try:
            out = do_model()
        except Exception as exc:
            before = self._observe()
            with pytest.raises(Exception) as info:
                do_cache()
            assert type(info.value) is type(exc), (desc, info.value, exc)
            assert self._observe() == before, desc
            event(f"{desc.split('(')[0]}: {type(exc).__name__}")
            return None
        got = do_cache()
        event(f"{desc.split('(')[0]}: ok")
        return got, out

    def _observe(self):
        s = self.cache.stats()
        return (s.compressed_blocks, s.compressed_bytes, s.blocks, s.tokens_written,
                s.evictions, [self.cache.seq_len(i) for i in range(self.cfg.num_layers)],
                [self.cache.block_tiers(i) for i in range(self.cfg.num_layers)])

    def _update(self, li, k, v, seq_len, desc):
        before = self.model.compressed()[0]
        self._both(f"update({li}, t={None if k is None else k.shape[2]}, seq_len={seq_len}) "
                   f"{desc}",
                   lambda: self.cache.update(li, k, v, seq_len),
                   lambda: self.model.update(li, k, v, seq_len))
        if self.model.compressed()[0] < before:
            event(f"{desc}: a compressed block restored or freed")

    # -------------------------------------------------------------- rules

    @rule(li=st.integers(0, 1), t=st.integers(1, 6))
    def append(self, li, t):
        li = self._layer(li)
        k, v = self._tokens(t)
        self._update(li, k, v, self.model.ref.seq_len(li) + t, "append")

    @rule(li=st.integers(0, 1), t=st.integers(1, 12))
    def overwrite(self, li, t):
        """In place: the last t positions (often inside compressed blocks)."""
        li = self._layer(li)
        n = self.model.ref.seq_len(li)
        t = min(t, n)
        if t:
            k, v = self._tokens(t)
            self._update(li, k, v, n, "overwrite")

    @rule(li=st.integers(0, 1), back=st.integers(1, 12), t=st.integers(0, 6))
    def rewrite_truncate(self, li, back, t):
        li = self._layer(li)
        m = max(0, self.model.ref.seq_len(li) - back)
        t = min(t, m)
        k, v = self._tokens(t)
        self._update(li, k, v, m, "truncating rewrite")

    @rule(li=st.one_of(st.none(), st.integers(0, 1)), back=st.integers(-2, 14))
    def truncate(self, li, back):
        li = None if li is None else self._layer(li)
        longest = max(self.model.ref.seq_len(i) for i in range(self.cfg.num_layers))
        m = max(0, longest - back)
        self._both(f"truncate({m}, {li})", lambda: self.cache.truncate(m, li),
                   lambda: self.model.truncate(m, li))

    @rule(li=st.integers(0, 1), extra=st.integers(1, 20))
    def ring_overflow(self, li, extra):
        """More tokens than the layer holds (ring: evicts; error: CacheFullError)."""
        li = self._layer(li)
        t = self.model.ref.capacity(li) + extra
        k, v = self._tokens(t)
        self._update(li, k, v, self.model.ref.seq_len(li) + t, "overflow")

    @rule(li=st.integers(0, 1), steps=st.integers(1, 12))
    def decode(self, li, steps):
        """One token at a time (wraps the ring slot by slot)."""
        li = self._layer(li)
        for _ in range(steps):
            k, v = self._tokens(1, "normal")
            self._update(li, k, v, self.model.ref.seq_len(li) + 1, "decode")

    @rule(dt=st.sampled_from([0.5, 10.0, 30.0, 100.0]))
    def tick(self, dt):
        self.clock.advance(dt)

    @rule(strategy=st.one_of(st.none(), st.sampled_from(STRATEGIES)),
          age=st.sampled_from([0, 0.0, 10, 25.0, datetime.timedelta(seconds=40), 1e9]))
    def compress(self, strategy, age):
        """compress_old_entries with ages against the ticking clock."""
        self._compress(strategy, age)

    @rule(strategy=st.sampled_from(STRATEGIES))
    def compress_all(self, strategy):
        """compress_old_entries(0): every eligible block (the common call)."""
        self._compress(strategy, 0)

    def _compress(self, strategy, age):
        res = self._both(f"compress_old_entries({age!r}, {strategy})",
                         lambda: self.cache.compress_old_entries(age, strategy),
                         lambda: self.model.compress(age, strategy))
        if res is not None:
            got, entries = res
            assert_stats_match(got, entries)
            for name in got.by_strategy:
                event(f"compressed to {name}")

    @rule(idx=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def reorder_batch(self, idx):
        """Rows then share (compressed) blocks: copy-on-write restores them."""
        idx = [i % self.model.ref.batch for i in idx]
        self._both(f"reorder_batch({idx})", lambda: self.cache.reorder_batch(idx),
                   lambda: self.model.reorder_batch(idx))

    @rule()
    def reset(self):
        self._both("reset()", self.cache.reset, self.model.reset)

    # ---------------------------------------------------------- invariant

    @invariant()
    def same_as_model(self):
        if self.cache is None:
            return
        model = self.model
        for li in range(self.cfg.num_layers):
            assert self.cache.seq_len(li) == model.ref.seq_len(li)
            assert np.array_equal(self.cache.positions(li), model.positions(li)), li
            assert_bits_equal(self.cache.keys(li), model.keys(li), f"keys {li}")
            assert_bits_equal(self.cache.values(li), model.values(li), f"values {li}")
            got = self.cache.block_tiers(li)
            want = model.tiers(li)
            assert [row[:len(w)] for row, w in zip(got, want)] == want, (li, got, want)
            if any(t not in ("full", None) for row in got for t in row):
                event("a layer holds compressed blocks")
                B, kf = self.cfg.block_size, model.keep_first
                if any(t not in ("full", None) and j * B < kf for row in got
                       for j, t in enumerate(row)):
                    event("kept positions inside a compressed block")
            if model.ref.seq_len(li) > model.ref.capacity(li):
                event("a layer has wrapped")
        s = self.cache.stats()
        assert (s.hits, s.misses) == (model.hits, model.misses)
        assert (s.compressed_blocks, s.compressed_bytes) == model.compressed()
        assert 0.0 <= s.memory_efficiency <= 1.0
        assert s.memory_bytes >= s.compressed_bytes


# The profile's settings (HYPOTHESIS_PROFILE) apply as they are.

TestCompressionMachine = CompressionMachine.TestCase
