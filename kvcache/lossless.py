"""The LOSSLESS tier's byte codecs: LZ4 (the ``lz4`` package's block format)
and zstd (the optional ``zstandard`` package).

One module for every user of the codecs: the compiled core packs and
unpacks blocks through it, and the save-file loader checks stored payloads
with it.  The core byte-shuffles a block (``src/kv_tiers.c``) before it is
packed here, so equal bytes of neighbouring values sit together.

A payload is packed without its size (the block size is known to both
sides), so :func:`unpack` takes the size it must produce and raises
:class:`ValueError` for anything that does not unpack to exactly that.
"""

from __future__ import annotations

__all__ = ["CODECS", "LZ4_MAX_RATIO", "pack", "unpack", "require"]

# Codec names, in the order a block's ZSTD flag selects them (0: lz4).
CODECS = ("lz4", "zstd")

# The LZ4 block format cannot expand data more than ~255-fold: a payload
# claiming more is corrupt, and is rejected before anything is allocated.
LZ4_MAX_RATIO = 255

_modules: dict = {}


def require(codec: str):
    """The module behind ``codec`` ("lz4" or "zstd"), imported on first use;
    ImportError naming the package to install where it is missing."""
    mod = _modules.get(codec)
    if mod is not None:
        return mod
    if codec == "lz4":
        try:
            import lz4.block as mod
        except ImportError as exc:
            raise ImportError("the LOSSLESS tier needs the lz4 package (pip install lz4)") from exc
    elif codec == "zstd":
        try:
            import zstandard as mod
        except ImportError as exc:
            raise ImportError("lossless_codec='zstd' needs the zstandard package "
                              "(pip install 'kvcache[zstd]')") from exc
    else:
        raise ValueError(f"lossless codec must be one of {', '.join(CODECS)}, got {codec!r}")
    _modules[codec] = mod
    return mod


def pack(data, codec: str = "lz4") -> bytes:
    """``data`` (a bytes-like block) packed with ``codec``, without its size."""
    mod = require(codec)
    if codec == "zstd":
        # A compressor per call: they are not safe to share between the
        # threads that compress different layers at once.
        return mod.ZstdCompressor(level=3).compress(data)
    return mod.compress(data, store_size=False)


def unpack(data, size: int, codec: str = "lz4") -> bytes:
    """The ``size`` bytes ``data`` packs; ValueError when it is not a valid
    payload of ``codec`` or does not unpack to exactly ``size`` bytes."""
    mod = require(codec)
    if codec == "zstd":
        try:
            declared = mod.get_frame_parameters(data).content_size
            if declared != size:
                raise ValueError(f"zstd frame declares {declared} bytes, expected {size}")
            plain = mod.ZstdDecompressor().decompress(data, max_output_size=size)
        except mod.ZstdError as exc:
            raise ValueError(f"invalid zstd payload: {exc}") from None
    else:
        if size > LZ4_MAX_RATIO * len(data) + 16:
            raise ValueError(f"{len(data)} LZ4 bytes cannot unpack to {size} bytes")
        try:
            plain = mod.decompress(data, uncompressed_size=size)
        except mod.LZ4BlockError as exc:
            raise ValueError(f"invalid LZ4 payload: {exc}") from None
    if len(plain) != size:
        raise ValueError(f"unpacks to {len(plain)} bytes, expected {size}")
    return plain
