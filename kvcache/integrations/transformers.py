"""kvcache as a Hugging Face transformers cache, and its attention kernel as
an attention implementation.

One line to use the cache::

    from kvcache.integrations.transformers import TransformersKVCache
    out = model.generate(input_ids, cache=TransformersKVCache(model.config))
    # (transformers < 5.24: past_key_values=TransformersKVCache(model.config))

and one more to have the model's attention read the blocks where they lie
instead of materializing K and V every step::

    model.set_attn_implementation("kvcache")   # or attn_implementation="kvcache" when loading

Options are :class:`kvcache.KVCache`'s: ``dtype`` ("float32" keeps results
identical to ``DynamicCache``; "float16" halves the memory), ``window`` and
``sink_tokens`` (a StreamingLLM ring), ``compression`` with ``residual_tokens``
and ``auto_compress`` (compressed tiers), ``block_size``, ...

How it fits transformers' cache protocol: :class:`TransformersKVCache` is a
``transformers.Cache`` whose layers (:class:`KVCacheLayer`) all write into one
``KVCache``, created at the first ``update`` (when the batch size is known).
``update`` accepts the ``cache_kwargs`` dict of transformers 4.x and the
``kwargs=`` form of 5.x; a ``cache_position`` there places the tokens
(overwriting, as speculative decoding needs), otherwise they are appended.
With the ``"kvcache"`` attention ``update`` returns the new states only, and
the attention function calls :meth:`KVCache.attention` on the layer;
otherwise it returns the held keys and values as tensors (a copy, as
``DynamicCache`` concatenates one), so any attention implementation works.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:
    import torch
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvcache.integrations.transformers needs torch and transformers: "
        "pip install 'kvcache[hf]'") from exc

from ..cache import KVCache
from ..growth import GrowthStrategy

__all__ = ["TransformersKVCache", "KVCacheLayer", "ATTN_IMPLEMENTATION",
           "kvcache_attention_forward"]

#: The name to pass as ``attn_implementation``.
ATTN_IMPLEMENTATION = "kvcache"

_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


class KVCacheLayer(CacheLayerMixin):
    """One model layer's view of the shared :class:`KVCache`."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, owner: TransformersKVCache, layer_idx: int) -> None:
        # Not CacheLayerMixin.__init__: ``keys``/``values`` are read-only
        # properties here (the data lives in the owner's KVCache).
        self._owner = owner
        self.layer_idx = layer_idx
        self.is_sliding = owner.window is not None

    def __repr__(self) -> str:
        return f"KVCacheLayer({self.layer_idx})"

    @property
    def is_initialized(self) -> bool:
        return self._owner.store is not None

    @property
    def batch_size(self) -> int:
        return self._owner.store.batch_size if self._owner.store is not None else -1

    @property
    def keys(self):
        """The held keys as a tensor (a copy), or None before the first update."""
        store = self._owner.store
        return None if store is None else torch.from_numpy(store.keys(self.layer_idx))

    @property
    def values(self):
        store = self._owner.store
        return None if store is None else torch.from_numpy(store.values(self.layer_idx))

    def lazy_initialization(self, key_states, value_states) -> None:
        self._owner._ensure_store(key_states)

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner._update(self.layer_idx, key_states, value_states, args, kwargs)

    def get_seq_length(self) -> int:
        store = self._owner.store
        return 0 if store is None else store.seq_len(self.layer_idx)

    def get_max_length(self) -> int:
        return self._owner.get_max_length()

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(kv_length, kv_offset) of the keys attention sees after this step:
        what is held once ``query_length`` tokens are appended, as the last
        positions before the new end (exact for a full cache; for a ring,
        exact in decode and in prefills that do not wrap it)."""
        if isinstance(query_length, torch.Tensor):       # older signature: cache_position
            query_length = int(query_length.shape[0])
        end = self.get_seq_length() + int(query_length)
        window = self._owner.window
        if window is None:
            return end, 0
        held = min(end, self._owner.sink_tokens + window)
        return held, end - held

    def reset(self) -> None:
        self._owner.reset()

    def crop(self, tokens_to_remove: int) -> None:
        self._owner._crop_layer(self.layer_idx, tokens_to_remove)

    def reorder_cache(self, beam_idx) -> None:
        self._owner.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._owner.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self._owner.batch_select_indices(indices)


class TransformersKVCache(Cache):
    """A ``transformers.Cache`` backed by one :class:`kvcache.KVCache`.

    ``config``: the model's config (layers, KV heads and head size are read
    from it, and whether its attention implementation is ``"kvcache"``).
    ``window``: keep ``sink_tokens`` + ``window`` positions (a ring: the
    first ``sink_tokens`` and the most recent ones); None keeps everything.
    ``max_seq_len``: initial capacity (default the model's
    ``max_position_embeddings``); the cache grows past it unless ``window``
    is set, and memory follows the tokens held, not the capacity.
    ``dtype``: the storage type, "float32" (default for float32 models) or
    "float16".  Other keyword options go to :class:`kvcache.KVCache`
    (``compression``, ``residual_tokens``, ``auto_compress``, ``block_size``,
    ``keep_first``, ...).  With ``compression`` set, ``auto_compress``
    defaults to True: blocks leaving the ``residual_tokens`` window are
    compressed as the model decodes.
    """

    def __init__(self, config, *, dtype: str | None = None, window: int | None = None,
                 sink_tokens: int = 0, max_seq_len: int | None = None,
                 **options: Any) -> None:
        text = _text_config(config)
        self.config = config
        self.num_layers = int(text.num_hidden_layers)
        q_heads = int(text.num_attention_heads)
        # Which config attributes gave the KV shape: a mismatch with the
        # model's states names them (see _check_shape).
        kv_heads = getattr(text, "num_key_value_heads", None)
        head_dim = getattr(text, "head_dim", None)
        self.num_kv_heads = int(kv_heads or q_heads)
        self.head_dim = int(head_dim or text.hidden_size // q_heads)
        self._shape_from = ("num_key_value_heads" if kv_heads else "num_attention_heads",
                            "head_dim" if head_dim else "hidden_size // num_attention_heads")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        self.window = window
        self.sink_tokens = int(sink_tokens)
        self._dtype = dtype
        if max_seq_len is None:
            max_seq_len = int(getattr(text, "max_position_embeddings", 0) or 4096)
        self._max_seq_len = (self.sink_tokens + window) if window is not None else max_seq_len
        if options.get("compression") not in (None, "none") and "auto_compress" not in options:
            options["auto_compress"] = True
        self._options = options
        self.store: KVCache | None = None
        super().__init__(layers=[KVCacheLayer(self, i) for i in range(self.num_layers)])

    # ------------------------------------------------------------ store

    @property
    def attends_in_place(self) -> bool:
        """Whether the model's attention is kvcache's (update then returns
        the new states only)."""
        return getattr(self.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION

    def _ensure_store(self, key_states) -> KVCache:
        if self.store is None:
            dtype = self._dtype or _NP_DTYPES.get(key_states.dtype, "float32")
            self.store = KVCache(
                self.num_layers, self.num_kv_heads, self.head_dim,
                max_seq_len=self._max_seq_len, batch_size=int(key_states.shape[0]),
                dtype=dtype, sink_tokens=self.sink_tokens,
                overflow="ring" if self.window is not None else "error", **self._options)
            if self.window is None:
                self.store.enable_dynamic_growth(GrowthStrategy.exponential(2.0))
        return self.store

    def _check_shape(self, layer_idx: int, key_states) -> None:
        """The model's states must have the shape the config promised; else
        say so in the config's terms (the store's own error would not)."""
        heads, dim = int(key_states.shape[1]), int(key_states.shape[-1])
        if (heads, dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"TransformersKVCache was built from a config with {self.num_kv_heads} KV heads "
                f"(config.{self._shape_from[0]}) of head_dim {self.head_dim} "
                f"(config.{self._shape_from[1]}), but the model's layer {layer_idx} produced "
                f"{heads} KV heads of head_dim {dim}: build the cache from the model's own "
                f"config (TransformersKVCache(model.config))")

    def _update(self, layer_idx: int, key_states, value_states, args, kwargs):
        self._check_shape(layer_idx, key_states)
        store = self._ensure_store(key_states)
        t = int(key_states.shape[-2])
        seq_len = store.seq_len(layer_idx) + t
        position = _cache_position(args, kwargs)
        if position is not None and position.numel():
            seq_len = int(position.reshape(-1)[-1]) + 1
        store.update(layer_idx, _as_numpy(key_states), _as_numpy(value_states), seq_len)
        if self.attends_in_place:
            # The attention function finds the cache through the tensor.
            key_states._kvcache = (self, layer_idx)
            return key_states, value_states
        keys = torch.from_numpy(store.keys(layer_idx))
        values = torch.from_numpy(store.values(layer_idx))
        if keys.dtype != key_states.dtype:
            keys, values = keys.to(key_states.dtype), values.to(value_states.dtype)
        return keys, values

    # ------------------------------------------------------------ protocol

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write the new states of ``layer_idx`` and return what attention
        reads (see the module docstring).  Accepts ``update(k, v, layer,
        cache_kwargs)`` and ``update(k, v, layer, kwargs=...)``."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(
                f"TransformersKVCache was built from a config with {self.num_layers} layers "
                f"(config.num_hidden_layers), but the model wrote layer {layer_idx}: build "
                f"the cache from the model's own config (TransformersKVCache(model.config))")
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.store is None or layer_idx >= self.num_layers:
            return 0
        return self.store.seq_len(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: the cache grows without bound (no window); else the tokens a
        ring holds."""
        return -1 if self.window is None else self.sink_tokens + self.window

    @property
    def max_cache_len(self) -> int:
        return self.get_max_length()

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset); ``query_length`` may also be the older
        ``cache_position`` tensor."""
        return self.layers[min(layer_idx, self.num_layers - 1)].get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()

    def crop(self, max_length: int) -> None:
        """Drop positions: a negative value removes that many from the end, a
        positive one keeps the first ``max_length`` (both spellings
        transformers has used); 0 removes nothing (transformers 5 calls
        ``crop(0)`` when assisted decoding accepts every candidate)."""
        for i in range(self.num_layers):
            self._crop_layer(i, max_length)

    def _crop_layer(self, layer_idx: int, max_length: int) -> None:
        if self.store is None:
            return
        n = self.store.seq_len(layer_idx)
        keep = n + max_length if max_length <= 0 else max_length
        if keep < n:
            self.store.truncate(max(keep, 0), layer_idx)

    def reorder_cache(self, beam_idx) -> None:
        if self.store is not None:
            self.store.reorder_batch(_as_index(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.reorder_batch(np.repeat(np.arange(self.store.batch_size), int(repeats)))

    def batch_select_indices(self, indices) -> None:
        if self.store is not None:
            self.store.reorder_batch(_as_index(indices))

    # ------------------------------------------------------------ save/load

    def save(self, path, prefix: int | None = None) -> int:
        """Save the held states (:meth:`kvcache.KVCache.save`); ``prefix``:
        only the first positions, e.g. a system prompt's, to reuse with
        :meth:`load` across calls and processes.  Returns the file's size."""
        if self.store is None:
            raise ValueError("nothing to save: the cache has not been written yet")
        return self.store.save(path, prefix=prefix)

    @classmethod
    def load(cls, path, config, *, mmap: bool = False) -> TransformersKVCache:
        """A cache for the model of ``config`` holding what :meth:`save` wrote
        (the storage dtype, window, sinks and compression come from the file).
        Pass it to ``generate`` with the full prompt: generation starts after
        the positions already held."""
        store = KVCache.load(path, mmap=mmap)
        text = _text_config(config)
        cache = cls(config, dtype=str(store.dtype),
                    window=(store.max_seq_len - store.sink_tokens
                            if store.overflow == "ring" else None),
                    sink_tokens=store.sink_tokens)
        want = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
        got = (store.num_layers, store.num_kv_heads, store.head_dim)
        if want != got:
            store.close()
            raise ValueError(f"{path} holds a cache of {got[0]} layers, {got[1]} KV heads, "
                             f"head_dim {got[2]}; the model "
                             f"({getattr(text, 'model_type', '?')}) has {want[0]}, {want[1]}, "
                             f"{want[2]}")
        cache.store = store
        return cache

    def stats(self):
        """The underlying cache's :class:`kvcache.CacheStats` (None before
        the first update)."""
        return None if self.store is None else self.store.stats()

    def __repr__(self) -> str:
        return (f"TransformersKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, window={self.window}, store={self.store!r})")


def _cache_position(args, kwargs):
    """The ``cache_position`` tensor of either update() form, if any."""
    for d in (args[0] if args and isinstance(args[0], dict) else None,
              kwargs.get("cache_kwargs"), kwargs.get("kwargs"), kwargs):
        if isinstance(d, dict):
            pos = d.get("cache_position")
            if isinstance(pos, torch.Tensor):
                return pos
    return None


def _as_numpy(t) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in _NP_DTYPES:
        t = t.float()
    return t.numpy()


def _as_index(idx) -> np.ndarray:
    """Row indices from an index tensor/sequence or a boolean row mask."""
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    idx = np.asarray(idx)
    if idx.dtype == bool:
        return np.flatnonzero(idx)
    return idx.astype(np.int64)


def kvcache_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """The ``"kvcache"`` attention: :meth:`KVCache.attention` over the
    layer's blocks (causal by absolute position), or SDPA where it cannot
    serve the call (another cache, a padding mask, dropout)."""
    tag = getattr(key, "_kvcache", None)
    if tag is None:
        # Another cache (or none): SDPA on what it returned.  kvcache_mask
        # left plain causal order unmasked; with more keys than queries SDPA's
        # is_causal would align them top-left, so the mask is spelled out.
        q_len, kv_len = query.shape[-2], key.shape[-2]
        if attention_mask is None and 1 < q_len < kv_len:
            attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool,
                                        device=query.device).tril(kv_len - q_len)
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    cache, layer_idx = tag
    store = cache.store
    if attention_mask is not None or dropout:
        # A real mask (padding): attend over materialized states.
        keys = torch.from_numpy(store.keys(layer_idx)).to(query.dtype)
        values = torch.from_numpy(store.values(layer_idx)).to(query.dtype)
        return sdpa_attention_forward(module, query, keys, values, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = store.attention(layer_idx, _as_numpy(query), scale=scale)
    return torch.from_numpy(out).to(query.dtype).transpose(1, 2), None


def kvcache_mask(*args, **kwargs):
    """The ``"kvcache"`` attention's mask: None when plain causal order by
    position is all there is to mask (the kernel applies it itself, for a
    prefill chunk over a non-empty cache too), else SDPA's mask (padding, or
    a model's sliding/chunked pattern), which sends the call to SDPA."""
    padding = kwargs.get("attention_mask", args[6] if len(args) > 6 else None)
    mask_function = kwargs.get("mask_function", args[5] if len(args) > 5 else causal_mask_function)
    if mask_function is causal_mask_function and (padding is None or bool(padding.all())):
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, kvcache_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvcache_mask)
