"""A key/value cache that decodes without copying itself: transformers' DynamicLayer grows by ``torch.cat``, a
copy of every row's whole cache for each decoded token (for 16 rows of 3,000 tokens, ~60 ms a token on 2 cores
for SmolLM2-135M); ``GrowingLayer`` keeps its keys and values in a buffer with room for the tokens to come and
writes each new one in place. Used on CPU only: on a GPU the room would be reserved up front, where the
concatenating cache only grows as far as the answers do."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer (same interface: ``keys``/``values`` hold the cached states) whose states are leading views
    of a buffer with ``room`` free positions; a full buffer is doubled. Anything that replaces ``keys`` (cropping
    keeps the view; reordering or selecting rows makes a new tensor) is taken over at the next update."""

    def __init__(self, room: int = 0) -> None:
        super().__init__()
        self.room = max(0, room)
        self._k: Any = None
        self._v: Any = None

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.numel() else 0
        m = key_states.shape[-2]
        if not self._holds_keys():
            self._reserve(n, n + m + self.room, key_states, value_states)
        elif n + m > self._k.shape[-2]:  # out of room: doubled, so that growing stays linear
            self._reserve(n, 2 * (n + m) + self.room, key_states, value_states)
        self._k[:, :, n:n + m].copy_(key_states)
        self._v[:, :, n:n + m].copy_(value_states)
        self.keys, self.values = self._k[:, :, :n + m], self._v[:, :, :n + m]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()

    def adopt(self, keys: Any, values: Any, n: int) -> None:
        """Take ``keys``/``values`` (B, heads, capacity, d) as the buffer, its first ``n`` positions cached."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v = keys, values
        self.keys, self.values = keys[:, :, :n], values[:, :, :n]

    def _holds_keys(self) -> bool:
        """Whether ``keys``/``values`` are still the leading views of the buffer (nothing replaced them)."""
        if self._k is None or not self.keys.numel():
            return False
        return all(t.data_ptr() == b.data_ptr() and t.stride() == b.stride() and t.shape[:2] == b.shape[:2]
                   for t, b in ((self.keys, self._k), (self.values, self._v)))

    def _reserve(self, n: int, capacity: int, key_states: Any, value_states: Any) -> None:
        """New buffers of ``capacity`` positions holding the first ``n`` cached ones."""
        k = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        if n:
            k[:, :, :n].copy_(self.keys)
            v[:, :, :n].copy_(self.values)
        self._k, self._v = k, v


def takes_a_cache(model: Any) -> bool:
    """Whether ``generate`` takes a DynamicCache from the caller for this model: not when its generation config
    names a cache implementation (transformers refuses both) nor for models without the default dynamic cache."""
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    return (getattr(model.generation_config, "cache_implementation", None) is None
            and (supports is None or bool(supports())))


def growing_cache(model: Any, room: int) -> Any:
    """An empty DynamicCache of ``GrowingLayer``s with ``room`` positions to spare past what its first update
    brings, for a CPU model that ``takes_a_cache``; None otherwise, and for models whose cache is not all full
    attention (sliding-window or hybrid layers keep transformers' own cache)."""
    from transformers import DynamicCache

    if model.device.type != "cpu" or not takes_a_cache(model):
        return None
    cache = DynamicCache(config=model.config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(room) for _ in cache.layers]
    return cache


def left_padded_cache(model: Any, rows: list[list[tuple[Any, Any]]], width: int, room: int) -> Any:
    """One batch's cache from per-row caches (``rows[r][layer]`` = (keys, values) of one unpadded prompt,
    batch 1, at most ``width`` positions), each row left-padded with zeros to ``width``: on CPU a
    ``growing_cache`` with ``room`` positions to spare, each row copied once into its buffer; elsewhere a plain
    DynamicCache. The caller's tensors are never written to."""
    import torch
    from transformers import DynamicCache

    cache = growing_cache(model, room)
    if cache is None:
        layers = [tuple(torch.cat([torch.nn.functional.pad(row[i][j], (0, 0, width - row[i][j].shape[-2], 0))
                                   for row in rows]) for j in (0, 1)) for i in range(len(rows[0]))]
        return DynamicCache(ddp_cache_data=layers, config=model.config)
    for i, layer in enumerate(cache.layers):
        k0, v0 = rows[0][i]
        k = k0.new_empty((len(rows), k0.shape[1], width + room, k0.shape[-1]))
        v = v0.new_empty((len(rows), v0.shape[1], width + room, v0.shape[-1]))
        for r, row in enumerate(rows):
            rk, rv = row[i]
            pad = width - rk.shape[-2]
            # padding is masked, but zeros, not whatever the memory held: a masked NaN would still reach the output
            k[r, :, :pad].zero_()
            v[r, :, :pad].zero_()
            k[r, :, pad:width].copy_(rk[0])
            v[r, :, pad:width].copy_(rv[0])
        layer.adopt(k, v, width)
    return cache
