"""The update's plan step (``_plan_write`` in kvcache/_write.pxi), tested on its
own through its shim against a set-based statement of the update rule.

The plan is a pure function of a layer's extent (window ``[lo, n)``, ``S``
sinks, capacity ``cap``) and the call (``t`` tokens, new length ``m``): it
must reject exactly the calls the rule forbids, evict exactly the positions
the ring drops and write exactly the positions still held afterwards.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvcache import _core

OK, NEGATIVE, SHORT, HOLE, EVICTED, FULL = range(6)


def reference(S, n, lo, cap, batch, ring, t, m):
    """(status, lo_new, evicted, written positions) from the rule, with sets."""
    if m < 0:
        return NEGATIVE, None, None, None
    start = m - t
    if start < 0:
        return SHORT, None, None, None
    if start > n:
        return HOLE, None, None, None
    n_t, lo_t = min(n, m), min(lo, m)
    held_t = set(range(min(S, lo_t))) | set(range(lo_t, n_t))
    if any(p not in held_t for p in range(start, n_t)):
        return EVICTED, None, None, None
    lo_new = lo_t
    if min(S, lo_t) + m - lo_t > cap:
        if not ring:
            return FULL, None, None, None
        lo_new = m - (cap - S)
    after = set(range(min(S, lo_new))) | set(range(lo_new, m))
    evicted = len((held_t | set(range(n_t, m))) - after) * batch
    written = {p for p in range(start, m) if p in after}
    return OK, lo_new, evicted, written


@st.composite
def layer_and_call(draw):
    S = draw(st.integers(0, 8))
    cap = draw(st.integers(S + 1, 64))
    n = draw(st.integers(0, 160))
    # a layer state the cache can be in: the sinks and the window fit the capacity
    lo = draw(st.integers(0 if n <= cap else n - (cap - S), n))
    t = draw(st.integers(0, 80))
    m = draw(st.integers(-2, 240))
    batch = draw(st.integers(1, 3))
    ring = draw(st.booleans())
    return S, n, lo, cap, batch, ring, t, m


@given(layer_and_call())
def test_plan_follows_the_update_rule(args):
    S, n, lo, cap, batch, ring, t, m = args
    plan = _core._plan_write_shim(*args)
    status, lo_new, evicted, written = reference(*args)
    assert plan["status"] == status, (args, plan)
    if status != OK:
        return
    assert plan["lo_new"] == lo_new
    assert plan["evicted"] == evicted
    assert plan["start"] == m - t
    got = set(range(plan["a0"], plan["b0"])) | set(range(plan["a1"], plan["b1"]))
    assert got == written, (args, plan)
    # the two ranges never overlap (each position is copied once)
    assert plan["written"] == len(written)
    assert plan["held_after"] == min(S, min(lo, m)) + m - min(lo, m)


def test_plan_statuses_each_reached():
    """One hand-made call per status (the property above checks them in bulk)."""
    assert _core._plan_write_shim(0, 10, 0, 64, 1, True, 1, -1)["status"] == NEGATIVE
    assert _core._plan_write_shim(0, 10, 0, 64, 1, True, 5, 3)["status"] == SHORT
    assert _core._plan_write_shim(0, 10, 0, 64, 1, True, 1, 12)["status"] == HOLE
    # a wrapped ring (S=2, cap=8, window [90, 96)) rewriting position 50
    assert _core._plan_write_shim(2, 96, 90, 8, 1, True, 47, 97)["status"] == EVICTED
    assert _core._plan_write_shim(0, 64, 0, 64, 1, False, 1, 65)["status"] == FULL
    plan = _core._plan_write_shim(4, 64, 0, 64, 2, True, 1, 65)
    assert plan["status"] == OK and plan["lo_new"] == 5 and plan["evicted"] == 2
