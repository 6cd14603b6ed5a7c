"""LOSSLESS with the optional zstd codec (the `zstandard` package, in the test extra)."""

import numpy as np
import pytest

from kvcache import KVCache

zstandard = pytest.importorskip("zstandard", reason="lossless_codec='zstd' needs zstandard")

DATA = np.load(__file__.rsplit("/", 1)[0] + "/data/smollm2_kv_prose.npz")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_zstd_round_trip_is_exact_and_recorded_per_block(dtype):
    k = DATA["k_L0"][None].astype(dtype)
    v = DATA["v_L0"][None].astype(dtype)
    ratios = {}
    for codec in ("lz4", "zstd"):
        cache = KVCache(1, 3, 64, max_seq_len=2048, dtype=dtype, compression="lossless",
                        lossless_codec=codec)
        cache.update(0, k, v, k.shape[2])
        st = cache.compress_old_entries(0)
        assert st.blocks > 0
        ratios[codec] = st.compression_ratio
        assert np.array_equal(cache.keys(0).view(np.uint8), k.view(np.uint8))
        assert np.array_equal(cache.values(0).view(np.uint8), v.view(np.uint8))
        assert cache.stats().misses > 0
    assert ratios["zstd"] > 1.0


def test_codec_is_read_from_the_block_not_the_cache():
    """Blocks packed by lz4 still decode after the cache switches to zstd."""
    k = DATA["k_L0"][None]
    cache = KVCache(1, 3, 64, max_seq_len=2048, compression="lossless")
    cache.update(0, k[:, :, :1000], k[:, :, :1000], 1000)
    cache.compress_old_entries(0)
    cache._set_lossless_codec("zstd")
    cache.update(0, k[:, :, 1000:], k[:, :, 1000:], k.shape[2])
    cache.compress_old_entries(0)
    assert np.array_equal(cache.keys(0), np.concatenate([k[:, :, :1000], k[:, :, 1000:]], 2))


def test_bad_codec_name():
    with pytest.raises(ValueError, match="lossless_codec"):
        KVCache(1, 1, 8, compression="lossless", lossless_codec="brotli")
