"""Task-vector merge functions (task arithmetic, magnitude pruning, TIES, DARE), PEFT_SPEC §5.1.

Each takes the per-source tensors (same shape), the per-source weights and returns one tensor. Semantics and
order of operations follow PEFT's `merge_utils` so deterministic methods are bit-exact; DARE draws its masks
from an explicit `torch.Generator` (PEFT uses the global RNG), in the same order, so a seed reproduces it.
"""

from __future__ import annotations

import torch


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each source (dim 0) by its weight."""
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_pruned(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest-magnitude entries."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def random_pruned(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(magnitude >= 0, 1, -1)


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def task_arithmetic(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    return _weighted(torch.stack(tensors), weights).sum(dim=0)


def magnitude_prune(tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([magnitude_pruned(t, density) for t in tensors], weights)


def dare_linear(tensors, weights, density: float, generator: torch.Generator | None) -> torch.Tensor:
    return task_arithmetic([random_pruned(t, density, generator) for t in tensors], weights)


def _ties_from_pruned(pruned: list[torch.Tensor], weights: torch.Tensor, sign_method: str) -> torch.Tensor:
    stacked = torch.stack(pruned)
    mask = _majority_sign_mask(stacked, sign_method)  # from the unweighted tensors, as PEFT
    return _disjoint_merge(_weighted(stacked, weights), mask)


def ties(tensors, weights, density: float, sign_method: str = "total") -> torch.Tensor:
    return _ties_from_pruned([magnitude_pruned(t, density) for t in tensors], weights, sign_method)


def dare_ties(tensors, weights, density: float, sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    return _ties_from_pruned([random_pruned(t, density, generator) for t in tensors], weights, sign_method)


def combine(
    kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """kind: linear (plain weighted sum), ties, dare_linear, dare_ties or magnitude_prune."""
    if kind == "linear":
        return task_arithmetic(tensors, weights)
    assert density is not None
    if kind == "ties":
        return ties(tensors, weights, density, sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method, generator)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    raise ValueError(f"unknown merge kind {kind}")
