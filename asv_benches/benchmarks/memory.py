"""Memory efficiency (live bytes / bytes allocated) at several contexts."""

from kvcache import KVCache

from ._common import BATCH, HEAD_DIM, HEADS, LAYERS, grid, prefill


class MemoryEfficiency:
    params = [
        # context: tokens held by each of the 30 layers (100 and 1000 leave a
        # partly filled last block; 1 is the worst case, one token per block);
        # quick profile: no 65536
        grid([1, 100, 1000, 4096, 65536], [1, 100, 1000, 4096]),
    ]
    param_names = ["context"]
    timeout = 120

    def setup(self, context):
        self.pre = prefill(context)

    def track_memory_efficiency(self, context):
        cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=context, batch_size=BATCH)
        for layer in range(LAYERS):
            cache.update(layer, self.pre, self.pre, context)
        return cache.stats().memory_efficiency

    track_memory_efficiency.unit = "ratio"

    def track_memory_bytes_per_token(self, context):
        """Bytes allocated per token held, all layers (ideal: 30 * 768 = 23040)."""
        cache = KVCache(LAYERS, HEADS, HEAD_DIM, max_seq_len=context, batch_size=BATCH)
        for layer in range(LAYERS):
            cache.update(layer, self.pre, self.pre, context)
        return cache.stats().memory_bytes / context

    track_memory_bytes_per_token.unit = "bytes"
