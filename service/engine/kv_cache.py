"""Batch surgery on a Hugging Face DynamicCache: rows join (left-padded merge), leave, and dead columns go.

Every cache layer holds keys/values of shape (B, heads, L, head_dim); rows are left-padded, and the
attention mask (B, L) marks real positions with 1.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge(
    cache: DynamicCache, mask: torch.Tensor, new_cache: DynamicCache, new_mask: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Append the rows of (new_cache, new_mask) after the rows of (cache, mask)."""
    length = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, length, 2), _pad_left(new_layer.keys, length, 2)])
        layer.values = torch.cat([_pad_left(layer.values, length, 2), _pad_left(new_layer.values, length, 2)])
    return cache, torch.cat([_pad_left(mask, length, 1), _pad_left(new_mask, length, 1)])


def select_rows(cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep only rows `keep` (in place for the cache), then drop leading columns that are padding in
    every remaining row. Returns the new mask."""
    mask = mask[keep]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[keep, :, start:]
        layer.values = layer.values[keep, :, start:]
    return mask[:, start:]
