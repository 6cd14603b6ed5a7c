"""Growth strategies: how much capacity a layer gains when it runs out.

Capacity is a bound, not a reservation: blocks are allocated as tokens are
written, so growing only lengthens the layer's block table (metadata) and
never moves a stored token.  A strategy therefore trades how often growth
events happen against how far past the live data the bound reaches.  Every
strategy rounds its answer up to whole blocks and to at least ``needed``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

__all__ = ["GrowthStrategy", "Exponential", "Linear", "Adaptive"]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class GrowthStrategy:
    """Base class; build one with the factory methods below."""

    @staticmethod
    def exponential(factor: float = 1.5) -> Exponential:
        """Multiply capacity by ``factor`` (> 1) until it fits."""
        return Exponential(factor)

    @staticmethod
    def linear(increment: int) -> Linear:
        """Add ``increment`` tokens (>= 1) until it fits."""
        return Linear(increment)

    @staticmethod
    def adaptive(horizon_s: float = 2.0, min_factor: float = 1.125,
                 max_factor: float = 2.0) -> Adaptive:
        """Grow by what the observed append rate will use in ``horizon_s`` seconds,
        between ``min_factor`` and ``max_factor`` times the current capacity."""
        return Adaptive(horizon_s, min_factor, max_factor)

    def _propose(self, current: int, needed: int, layer_idx: int) -> int:
        raise NotImplementedError

    def next_capacity(self, current: int, needed: int, block_size: int = 1,
                      layer_idx: int = 0) -> int:
        """The capacity to grow ``current`` to so that ``needed`` tokens fit."""
        proposed = max(int(self._propose(current, needed, layer_idx)), needed, current + 1)
        return _round_up(proposed, block_size)


@dataclass(frozen=True)
class Exponential(GrowthStrategy):
    """Multiplies capacity by ``factor`` (> 1) until the tokens fit."""

    factor: float = 1.5

    def __post_init__(self) -> None:
        if not (isinstance(self.factor, (int, float)) and 1.0 < self.factor < math.inf):
            raise ValueError(f"exponential growth needs a finite factor > 1, got {self.factor!r}")

    def _propose(self, current: int, needed: int, layer_idx: int) -> int:
        cap = max(current, 1)
        while cap < needed:
            cap = int(cap * self.factor) + 1
        return cap


@dataclass(frozen=True)
class Linear(GrowthStrategy):
    """Adds ``increment`` tokens (>= 1) at a time until the tokens fit."""

    increment: int = 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.increment, int) and self.increment >= 1):
            raise ValueError(f"linear growth needs an integer increment >= 1, "
                             f"got {self.increment!r}")

    def _propose(self, current: int, needed: int, layer_idx: int) -> int:
        steps = max(1, -(-(needed - current) // self.increment))
        return current + steps * self.increment


@dataclass
class Adaptive(GrowthStrategy):
    """Sizes each step from the append rate seen since the layer's last growth.

    A fast decode loop gets large steps (few growth events); a slow one gets
    small steps (capacity stays close to the data).  The first growth of a
    layer, with no rate observed yet, uses ``max_factor``.
    """

    horizon_s: float = 2.0
    min_factor: float = 1.125
    max_factor: float = 2.0
    clock: callable = field(default=time.perf_counter, repr=False)
    _last: dict[int, tuple[float, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.horizon_s < math.inf:
            raise ValueError(f"horizon_s must be > 0, got {self.horizon_s!r}")
        if not 1.0 < self.min_factor <= self.max_factor < math.inf:
            raise ValueError("need 1 < min_factor <= max_factor < inf, got "
                             f"{self.min_factor!r} and {self.max_factor!r}")

    def _propose(self, current: int, needed: int, layer_idx: int) -> int:
        now = self.clock()
        last: tuple[float, int] | None = self._last.get(layer_idx)
        if last is None or now <= last[0]:
            factor = self.max_factor
        else:
            rate = (needed - last[1]) / (now - last[0])        # tokens per second
            wanted = needed + rate * self.horizon_s
            factor = min(self.max_factor, max(self.min_factor, wanted / max(current, 1)))
        self._last[layer_idx] = (now, needed)
        return max(needed, int(max(current, 1) * factor))
