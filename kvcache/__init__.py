"""kvcache: a compiled, paged key/value cache for transformer inference on the CPU."""

from ._core import CacheFullError
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .growth import GrowthStrategy
from .stats import CacheStats

__all__ = ["KVCache", "GrowthStrategy", "CacheStats", "CacheFullError", "DEFAULT_BLOCK_SIZE"]
__version__ = "0.1.0"
