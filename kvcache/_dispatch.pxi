# Kernel dispatch: which attention kernel (and with it which tier codecs)
# this CPU runs (included by _core.pyx).  The kernels are a table whose
# entries carry the CPU features they need (src/kv_attn.c); detection is
# done once, in src/kv_cpu.c.

# The attention kernel in use (a variant kv_attn.c built and this CPU runs).
cdef const kv_attn_kernel *_attn_kernel = NULL


cdef const kv_attn_kernel *_kernel_for(const kv_attn_geom *g) noexcept:
    """The kernel in use, or the next runnable variant below it whose fast
    paths cover this geometry (the scalar one covers every geometry)."""
    cdef int i = 0
    cdef const kv_attn_kernel *k
    if _attn_kernel.supports(g):
        return _attn_kernel
    while kv_attn_kernels[i] != _attn_kernel:
        i += 1
    while True:
        k = kv_attn_kernels[i]
        if kv_attn_runnable(k) and k.supports(g):
            return k
        i += 1


def available_backends():
    """Kernel variants this build has and this CPU runs, best first."""
    cdef int i = 0
    out = []
    while kv_attn_kernels[i] != NULL:
        if kv_attn_runnable(kv_attn_kernels[i]):
            out.append(kv_attn_kernels[i].name.decode())
        i += 1
    return out


def compiled_backends():
    """Kernel variants this build has, best first (some may not run here)."""
    cdef int i = 0
    out = []
    while kv_attn_kernels[i] != NULL:
        out.append(kv_attn_kernels[i].name.decode())
        i += 1
    return out


def backend():
    """Name of the attention kernel in use ("avx512", "avx2", "neon" or
    "scalar")."""
    return _attn_kernel.name.decode()


def set_backend(name=None):
    """Use the kernel variant `name` (None: the best this CPU runs) for
    attention, and the matching tier codecs (SIMD ones unless "scalar").

    Raises ValueError naming the variants available when `name` is not
    built or this CPU cannot run it.  Not meant to race with calls running
    on other threads (they keep the kernel they started with).
    """
    global _attn_kernel, _codecs
    cdef int i = 0
    cdef const kv_attn_kernel *k
    if name is None:
        name = kv_attn_select(1).name.decode()      # the pick rule the codecs use too
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    while kv_attn_kernels[i] != NULL:
        k = kv_attn_kernels[i]
        if k.name.decode() == name:
            if not kv_attn_runnable(k):
                raise ValueError(f"backend {name!r} is built but this CPU (or OS) cannot run "
                                 f"it; available: {available_backends()}")
            _attn_kernel = k
            _codecs = kv_codecs_select(name != "scalar")
            return name
        i += 1
    raise ValueError(f"unknown backend {name!r}; this build has {compiled_backends()}")


def cpu_features():
    """What detection found: ISA extensions usable here (the OS saves their
    registers, checked with xgetbv on x86)."""
    cdef int f = kv_cpu_features()
    return {"avx2_fma_f16c": bool(f & KV_CPU_AVX2), "avx512": bool(f & KV_CPU_AVX512),
            "avx512_vnni": bool(f & KV_CPU_AVX512_VNNI), "neon": bool(f & KV_CPU_NEON),
            "os_saves_ymm": bool(f & KV_CPU_OS_YMM), "os_saves_zmm": bool(f & KV_CPU_OS_ZMM),
            "prefetch_builtin": bool(KV_HAVE_PREFETCH)}


def _init_backend():
    """Import-time choice: KVCACHE_DISABLE_SIMD=1 forces scalar;
    KVCACHE_BACKEND=name asks for a variant (a warning and the best one if
    it cannot be used); otherwise the best this CPU runs."""
    if os.environ.get("KVCACHE_DISABLE_SIMD", "").lower() in ("1", "true", "yes"):
        return set_backend("scalar")
    want = os.environ.get("KVCACHE_BACKEND", "").strip().lower()
    if want:
        try:
            return set_backend(want)
        except ValueError as exc:
            warnings.warn(f"KVCACHE_BACKEND={want!r} ignored: {exc}", RuntimeWarning,
                          stacklevel=2)
    return set_backend(None)


