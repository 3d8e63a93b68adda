"""The running batch's KV cache and its batch surgery: rows join (left-padded merge), leave, dead columns go.

Every cache layer holds keys/values of shape (B, heads, L, head_dim); rows are left-padded, and the
attention mask (B, L) marks real positions with 1.

`GrowingCache` keeps each layer's keys/values as a view of the first L columns of a buffer with spare
columns: a decode step writes its one new column in place instead of concatenating (copying) the whole
cache, as transformers' `DynamicLayer` does. Only a join (merge) or a leave (row selection) copies the cache,
and each leaves spare columns again.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

SPARE_COLUMNS = 64  # free columns left after each (re)allocation; a decode step then writes in place


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `keys`/`values` are views of buffers with spare columns (shapes as DynamicLayer's).

    Assigning `keys`/`values` adopts the tensor as the buffer (no spare); the next update that needs room
    reallocates with `SPARE_COLUMNS` free columns.
    """

    def __init__(self, **kwargs) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0  # columns in use
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k if self._k is None or self._k.dim() != 4 else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._n = value.shape[-2] if value is not None and value.dim() == 4 else 0

    @property
    def values(self) -> torch.Tensor | None:
        return self._v if self._v is None or self._v.dim() != 4 else self._v[:, :, : self._n]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Use (B, heads, capacity, head_dim) buffers whose first `length` columns hold the cache."""
        self._k, self._v, self._n = keys, values, length

    def initialize(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Set device and dtype from the first states, once (transformers' lazy initialization)."""
        if not getattr(self, "is_initialized", self._k is not None):  # the flag exists from transformers 4.57
            try:
                self.lazy_initialization(key_states, value_states)
            except TypeError:  # transformers 4.56: lazy_initialization(key_states)
                self.lazy_initialization(key_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.initialize(key_states, value_states)
        new = key_states.shape[-2]
        k, v, n = self._k, self._v, self._n
        if k is None or k.dim() != 4 or n + new > k.shape[-2] or k.shape[0] != key_states.shape[0]:
            k, v = _with_room(k, n, key_states, n + new), _with_room(v, n, value_states, n + new)
        k[:, :, n: n + new] = key_states
        v[:, :, n: n + new] = value_states
        self.adopt(k, v, n + new)
        return self.keys, self.values


def _with_room(old: torch.Tensor | None, used: int, like: torch.Tensor, needed: int) -> torch.Tensor:
    """A buffer shaped like `like` with `needed + SPARE_COLUMNS` columns, the first `used` copied from `old`."""
    b, h, _, d = like.shape
    buf = like.new_empty((b, h, needed + SPARE_COLUMNS, d))
    if used:
        buf[:, :, :used] = old[:, :, :used]
    return buf


class GrowingCache(DynamicCache):
    """A DynamicCache of `GrowingLayer`s (layers are created on first use, as a DynamicCache without config)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer, offloading=False, offload_only_non_sliding=False)


def prefilled(keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> GrowingCache:
    """A cache whose layer i already holds `length` columns: the first columns of keys[i]/values[i], each a
    (B, heads, capacity, head_dim) buffer with room for the tokens the next forward adds."""
    cache = GrowingCache()
    for k, v in zip(keys, values, strict=True):
        layer = GrowingLayer()
        layer.initialize(k, v)
        layer.adopt(k, v, length)
        cache.layers.append(layer)
    return cache


def merge(
    cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor,
    order: list[int] | None = None,
) -> tuple[DynamicCache, torch.Tensor]:
    """Append the rows of (new_cache, new_mask) after the rows of (cache, mask), both right-aligned; with
    `order`, row i of the result is row order[i] of that concatenation (written there in the same copy)."""
    length = max(mask.shape[1], new_mask.shape[1])
    old_rows, rows = mask.shape[0], mask.shape[0] + new_mask.shape[0]
    old_at: slice | torch.Tensor = slice(0, old_rows)
    new_at: slice | torch.Tensor = slice(old_rows, rows)
    index = None if order is None else torch.tensor(order, dtype=torch.long, device=mask.device)
    if index is not None:
        at = torch.empty(rows, dtype=torch.long, device=mask.device)  # each concatenated row's place in the result
        at[index] = torch.arange(rows, device=mask.device)
        old_at, new_at = at[:old_rows], at[old_rows:]
    for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
        merged = []
        for old, new in ((layer.keys, new_layer.keys), (layer.values, new_layer.values)):
            b, h, _, d = old.shape
            buf = old.new_zeros((rows, h, length + SPARE_COLUMNS, d))
            buf[old_at, :, length - old.shape[2]: length] = old
            buf[new_at, :, length - new.shape[2]: length] = new
            merged.append(buf)
        _set(layer, merged[0], merged[1], length)
    merged_mask = torch.cat([_pad_left(mask, length, 1), _pad_left(new_mask, length, 1)])
    if index is not None:
        merged_mask = merged_mask[index]
    return cache, merged_mask


def select_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only rows `keep` (in place for the cache), then drop leading columns that are padding in
    every remaining row. Returns the new mask."""
    mask = mask[keep]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    length = mask.shape[1] - start
    for layer in cache.layers:
        kept = []
        for t in (layer.keys, layer.values):
            b, h, _, d = t.shape
            buf = t.new_empty((keep.shape[0], h, length + SPARE_COLUMNS, d))
            buf[:, :, :length] = t[keep, :, start:]
            kept.append(buf)
        _set(layer, kept[0], kept[1], length)
    return mask[:, start:]


def take_rows(cache: DynamicCache, mask: torch.Tensor, index: torch.Tensor) -> tuple[GrowingCache, torch.Tensor]:
    """Copies of rows `index` as a cache of their own, leading all-padding columns dropped; `cache` is left as it
    was. Returns (the new cache, its (len(index), L') mask)."""
    part = prefilled([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], mask.shape[1])
    return part, select_rows(part, mask, index)


def _set(layer, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
    if isinstance(layer, GrowingLayer):
        layer.adopt(keys, values, length)
    else:
        layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
