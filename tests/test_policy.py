"""Compression policies (kvcache.compression) over the core's mechanisms.

A policy is plain Python: it reads a layer's candidates, chooses, and hands
a plan to the core.  These tests write their own policies as a user would,
check the built-in ones against the reference codecs, and feed the core bad
or stale plans: each is refused with a clear error (or "busy") and changes
nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import quant_reference as qr
from kvhelpers import assert_unchanged, real_kv, snapshot

from kvcache import KVCache
from kvcache.compression import (
    CANDIDATE_DTYPE,
    LEAVE,
    Adaptive,
    Candidates,
    CompressionPolicy,
    CompressionStrategy,
    FixedTier,
    StalePlan,
    policy_for,
)

B = 16


def filled(n=160, dtype="float16", **kw) -> KVCache:
    """One layer of real SmolLM2 K/V, n positions, 16-token blocks."""
    cache = KVCache(1, 3, 64, max_seq_len=512, block_size=B, dtype=dtype, **kw)
    k, v = real_kv(8)
    cache.update(0, k[:, :, :n], v[:, :, :n], n)
    return cache


class AlternateInt8Fp16(CompressionPolicy):
    """A user's policy: even blocks to INT8, odd ones to FP16 (float32 cache)."""

    def choose(self, cache, blocks):
        return np.where(blocks.records["entry"] % 2 == 0, CompressionStrategy.INT8,
                        CompressionStrategy.FP16)


class OldestOnly(CompressionPolicy):
    """A user's policy that changes eligibility: only the oldest two blocks,
    to INT4, whatever the residual window says."""

    def eligible(self, cache, blocks, cutoff):
        r = blocks.records
        return (r["tier"] == 0) & (r["held"] == blocks.block_size) & (r["entry"] < 2)

    def choose(self, cache, blocks):
        return np.full(len(blocks), CompressionStrategy.INT4)


def test_custom_policy_is_applied_block_by_block():
    cache = filled(dtype="float32")
    ref = filled(dtype="float32")
    cache.compression_policy = AlternateInt8Fp16(residual_tokens=32, keep_first=0)
    stats = cache.compress_old_entries()
    # positions 0..127 are eligible (160 - 32): 8 blocks, alternating
    assert cache.block_tiers(0)[0][:10] == ["int8", "fp16"] * 4 + ["full"] * 2
    assert stats.by_strategy["int8"]["blocks"] == 4 and stats.by_strategy["fp16"]["blocks"] == 4
    k, v = ref.keys(0), ref.values(0)
    got_k, got_v = cache.keys(0), cache.values(0)
    for j in range(10):
        sl = slice(j * B, (j + 1) * B)
        block = np.stack([k[0, :, sl], v[0, :, sl]])
        tier = "int8" if j < 8 and j % 2 == 0 else "fp16" if j < 8 else None
        want = block if tier is None else qr.reconstruct(block, tier, np.float32)
        assert np.array_equal(np.stack([got_k[0, :, sl], got_v[0, :, sl]]), want), j


def test_custom_eligibility_and_auto_trigger():
    cache = KVCache(1, 3, 64, max_seq_len=512, block_size=B, compression="int8",
                    auto_compress=True, residual_tokens=64)
    cache.compression_policy = OldestOnly(residual_tokens=40)
    assert cache.compression_policy.trigger_lag == 40
    k, v = real_kv(1)
    for n in range(1, 60):
        cache.update(0, k[:, :, n - 1:n], v[:, :, n - 1:n], n)
        # The policy runs when a block boundary passes n - 40: at n = 24, 40,
        # 56 (n = 8 too, with nothing full yet); it ignores the residual window.
        compressed = 0 if n < 24 else 1 if n < 40 else 2
        assert cache.block_tiers(0)[0][:3].count("int4") == compressed, n
    assert cache.auto_compression_stats.by_strategy["int4"]["blocks"] == 2


def test_builtin_policies_match_strategies():
    assert policy_for("none") is None
    p = policy_for("int4", 8, 2)
    assert isinstance(p, FixedTier) and p.strategy is CompressionStrategy.INT4
    assert (p.residual_tokens, p.keep_first) == (8, 2)
    a = policy_for(CompressionStrategy.ADAPTIVE, error_budget=0.2)
    assert isinstance(a, Adaptive) and a.error_budget == 0.2
    cache = filled(compression="adaptive", residual_tokens=16)
    assert isinstance(cache.compression_policy, Adaptive)
    assert cache.compression_policy.residual_tokens == 16


def test_trial_errors_match_the_reference():
    cache = filled(dtype="float32")
    cands = Candidates.read(cache, 0, keep_first=0)
    assert cands.records.dtype == CANDIDATE_DTYPE and len(cands) == 10
    assert list(cands.records["entry"]) == list(range(10))
    assert (cands.records["held"] == B).all()
    assert list(cands.records["end"]) == [(j + 1) * B for j in range(10)]
    k, v = cache.keys(0), cache.values(0)
    for tier in ("fp16", "int8", "int4"):
        errs = cands.trial_errors(tier)
        for j in range(10):
            sl = slice(j * B, (j + 1) * B)
            block = np.stack([k[0, :, sl], v[0, :, sl]])
            want = qr.block_error(block, qr.reconstruct(block, tier))
            assert errs[j] == pytest.approx(want, rel=1e-6, abs=1e-9), (tier, j)
    assert cache.block_tiers(0)[0][:10] == ["full"] * 10      # trials store nothing


def test_adaptive_order_and_fallback():
    cache = filled(dtype="float32")
    errs = Candidates.read(cache, 0, 0).trial_errors("int4")
    budget = float(np.median(errs))                # about half the blocks pass INT4
    cache.compression_policy = Adaptive(budget, residual_tokens=0, keep_first=0,
                                        order=("int4", "int8"), fallback=None)
    cache.compress_old_entries()
    tiers = cache.block_tiers(0)[0][:10]
    assert [t == "int4" for t in tiers] == list(errs <= budget)
    assert set(tiers) <= {"int4", "int8", "full"}


def test_policy_validation():
    with pytest.raises(ValueError, match="residual_tokens"):
        FixedTier("int8", residual_tokens=-1)
    with pytest.raises(ValueError, match="FixedTier needs"):
        FixedTier("adaptive")
    with pytest.raises(ValueError, match="error_budget"):
        Adaptive(math.nan)
    with pytest.raises(ValueError, match="order"):
        Adaptive(order=("lossless",))
    cache = KVCache(1, 1, 3, max_seq_len=64, block_size=B)
    with pytest.raises(ValueError, match="INT4 needs an even head_dim"):
        cache.compression_policy = FixedTier("int4")
    with pytest.raises(TypeError, match="CompressionPolicy"):
        cache.compression_policy = "int8"
    auto = KVCache(1, 1, 64, compression="int8", auto_compress=True)
    with pytest.raises(ValueError, match="auto_compress needs"):
        auto.compression_policy = None


class Broken(CompressionPolicy):
    def __init__(self, answer):
        super().__init__(residual_tokens=0, keep_first=0)
        self.answer = answer

    def choose(self, cache, blocks):
        return self.answer(blocks)


@pytest.mark.parametrize("answer, error", [
    (lambda b: np.full(len(b) + 1, 2), "one tier per block"),
    (lambda b: np.full(len(b), 7), "tier must be one of"),
    (lambda b: np.full(len(b), 0), "tier must be one of"),
], ids=["length", "unknown-tier", "full-tier"])
def test_a_broken_policy_changes_nothing(answer, error):
    cache = filled()
    cache.compression_policy = Broken(answer)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=error):
        cache.compress_old_entries()
    assert_unchanged(cache, before)


def test_plans_the_core_refuses():
    cache = filled()
    epoch, _, _ = cache._candidates(0)
    other = filled()
    before = snapshot(cache)
    bad = [
        ([10_000], [2], [0], "not one of layer 0's blocks"),
        ([0], [2], [B], "exact rows must be in"),
        ([0], [2], [-1], "exact rows must be in"),
        ([0, 1], [2], [0], "one tier and one exact count per block"),
    ]
    for blocks, tiers, exacts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            cache._compress_blocks(0, epoch, blocks, tiers, exacts)
    with pytest.raises(ValueError, match="LOSSLESS is exact"):
        cache._trial_errors(0, epoch, [0], int(CompressionStrategy.LOSSLESS), [0])
    with pytest.raises(IndexError):
        cache._compress_blocks(1, epoch, [0], [2], [0])
    assert_unchanged(cache, before)
    del other


def test_stale_plan_is_busy_and_does_nothing():
    """A plan made before a truncation (the layer's epoch moved) is refused."""
    cache = filled()
    cands = Candidates.read(cache, 0, 0)
    cache.truncate(100)
    cache.update(0, *[x[:, :, 100:150] for x in real_kv(8)], 150)
    before = snapshot(cache)
    res = cache._compress_blocks(0, cands.epoch, cands.records["block"][:2], [2, 2], [0, 0])
    assert res == [("busy", 0, 0, 0)]
    with pytest.raises(StalePlan, match="layer 0 changed"):
        cands.trial_errors("int8")
    assert_unchanged(cache, before)


def test_appends_keep_a_plan_valid():
    """Plain appends do not move the epoch: a plan stays applicable."""
    cache = filled(96)
    cands = Candidates.read(cache, 0, 0)
    k, v = real_kv(8)
    cache.update(0, k[:, :, 96:97], v[:, :, 96:97], 97)
    res = cache._compress_blocks(0, cands.epoch, cands.records["block"][:2], [2, 2], [0, 0])
    assert [r[0] for r in res] == ["int8", "int8"]


def test_leave_skips_blocks():
    class Half(CompressionPolicy):
        def choose(self, cache, blocks):
            return np.where(blocks.records["entry"] < 3, CompressionStrategy.INT8, LEAVE)
    cache = filled()
    cache.compression_policy = Half(residual_tokens=0, keep_first=0)
    cache.compress_old_entries()
    assert cache.block_tiers(0)[0][:10] == ["int8"] * 3 + ["full"] * 7
