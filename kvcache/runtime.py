"""Which compiled kernels kvcache uses, and why.

kvcache's attention kernel is built once per ISA (scalar everywhere; AVX2 and
AVX-512 on x86; NEON on AArch64) and one is chosen at import from the CPU's
features, as NumPy chooses its SIMD loops:

* ``KVCACHE_BACKEND=avx2`` (or ``avx512``, ``neon``, ``scalar``) asks for a
  variant; one this CPU cannot run is ignored with a ``RuntimeWarning``.
* ``KVCACHE_DISABLE_SIMD=1`` forces the scalar kernels (attention and the
  tier codecs), the kill switch for a suspected SIMD problem.
* :func:`set_backend` switches at run time (not while other threads are
  inside an attention call; they finish with the kernel they started with).

A geometry a variant's fast paths do not cover (``head_dim`` not a multiple
of two vectors, say) runs on the next variant down that covers it.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np

from . import _core

__all__ = ["backend", "available_backends", "compiled_backends", "set_backend",
           "cpu_features", "runtime_info", "show_runtime"]

backend = _core.backend
available_backends = _core.available_backends
compiled_backends = _core.compiled_backends
set_backend = _core.set_backend
cpu_features = _core.cpu_features


def runtime_info() -> dict[str, object]:
    """What was built, what this CPU runs, and what is in use."""
    from . import __version__

    return {
        "kvcache": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "compiled_backends": compiled_backends(),
        "available_backends": available_backends(),
        "attention_backend": backend(),
        "codec_backend": _core.codec_backend(),
        "cpu_features": cpu_features(),
        "environment": {k: os.environ[k] for k in ("KVCACHE_BACKEND", "KVCACHE_DISABLE_SIMD")
                        if k in os.environ},
    }


def show_runtime() -> None:
    """Print :func:`runtime_info` as a short report (like ``numpy.show_runtime``)."""
    info = runtime_info()
    feats = info.pop("cpu_features")
    env = info.pop("environment")
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    print(f"{'cpu_features':<{width}}  " +
          ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in feats.items()))
    print(f"{'environment':<{width}}  " +
          (", ".join(f"{k}={v}" for k, v in env.items()) or "(no KVCACHE_* overrides)"))
