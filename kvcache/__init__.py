"""kvcache: a compiled, paged key/value cache for transformer inference on the CPU."""

try:
    from ._core import CacheFullError
except ImportError as exc:  # pragma: no cover - depends on how it was installed
    import os as _os

    if _os.path.exists(_os.path.join(_os.path.dirname(__file__), "_core.pyx")):
        raise ImportError(
            "kvcache's compiled core is not built in this source tree "
            f"({_os.path.dirname(__file__)}): Python imported the checkout instead of "
            "the installed package.  Run from outside the checkout, or build in place "
            "with `pip install -e .`."
        ) from exc
    raise
from ._version import __version__  # noqa: F401
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .compression import CompressionStats, CompressionStrategy
from .config import CacheConfig
from .fileformat import CacheFormatError
from .growth import GrowthStrategy
from .runtime import (
    available_backends,
    backend,
    compiled_backends,
    cpu_features,
    runtime_info,
    set_backend,
    show_runtime,
)
from .stats import CacheStats

__all__ = ["KVCache", "CacheConfig", "GrowthStrategy", "CacheStats", "CacheFullError",
           "CacheFormatError", "CompressionStrategy", "CompressionStats", "DEFAULT_BLOCK_SIZE",
           "backend", "available_backends", "compiled_backends", "set_backend",
           "cpu_features", "runtime_info", "show_runtime"]
