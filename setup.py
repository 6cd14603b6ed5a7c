"""Build the compiled core.

Everything is compiled for the baseline of the target architecture: the
wheels run on any CPU of that architecture.  ``KVCACHE_NATIVE=1`` opts in to
``-march=native`` for a build that will only ever run on the machine that
built it (it has crashed other projects' users with SIGILL when such a build
was shipped, so it is never the default).  ``KVCACHE_DEBUG=1`` turns Cython's
bounds and wraparound checks back on and builds without optimisation.
"""

import os
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("KVCACHE_DEBUG") == "1"
NATIVE = os.environ.get("KVCACHE_NATIVE") == "1"
# Coverage build (tools/coverage.sh --cython): line tracing, also inside nogil
# blocks.  Much slower; never for a release build.
COVERAGE = os.environ.get("KVCACHE_COVERAGE") == "1"

compile_args = []
if sys.platform != "win32":
    compile_args += ["-O0", "-g"] if DEBUG else ["-O3"]
    # No fused multiply-add contraction: the tier codecs must round exactly
    # like their numpy reference (q * scale + zero in two roundings).
    compile_args.append("-ffp-contract=off")
    # Lets branch-free codec loops compute a division whose result a select
    # then discards; changes no value (nothing here reads FP exception flags).
    compile_args.append("-fno-trapping-math")
    if NATIVE:
        compile_args.append("-march=native")
    # The hot loops rely on no strict-aliasing tricks, but numpy's headers
    # emit deprecation warnings we cannot fix here.
    compile_args.append("-Wno-unused-function")

extensions = [
    Extension(
        "kvcache._core",
        # One design for both compiled families: a body written once
        # (src/kv_tiers_impl.h: the tier codecs; src/kv_attn_impl.h: the
        # attention kernel) compiled once per ISA by kv_tiers_<isa>.c and
        # kv_attn_<isa>.c, each in its own target region (empty where the
        # compiler or architecture lacks it); kv_tiers.c and kv_attn.c hold the
        # tables, kv_cpu.c detects the CPU and picks from them at run time.
        sources=["kvcache/_core.pyx", "src/kv_cpu.c",
                 "src/kv_tiers.c", "src/kv_tiers_scalar.c", "src/kv_tiers_avx2.c",
                 "src/kv_attn.c", "src/kv_attn_scalar.c", "src/kv_attn_avx2.c",
                 "src/kv_attn_avx512.c", "src/kv_attn_neon.c"],
        include_dirs=[numpy.get_include(), "include", "src"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")] if COVERAGE else []),
        extra_compile_args=compile_args,
        depends=["include/kv_platform.h", "include/kv_tiers.h", "include/kv_attn.h",
                 "include/kv_cpu.h",
                 "src/kv_tiers_impl.h", "src/kv_attn_impl.h", "src/kv_attn_blocks.h",
                 "src/kv_attn_exp.h", "src/kv_simd_exp.h",
                 "src/kv_simd_scalar.h", "src/kv_simd_avx2.h", "src/kv_simd_avx512.h",
                 "src/kv_simd_neon.h", "kvcache/_core.pxd"]
        + [os.path.join("kvcache", f) for f in sorted(os.listdir("kvcache"))
           if f.endswith(".pxi")],
    )
]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
    "linetrace": COVERAGE,
}

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
