"""One adapter's tensors at one module, and the exact LoRA/DoRA forward math (PEFT_SPEC §2).

Every operation below follows PEFT's order of operations and dtype casts, so outputs match PEFT
bit for bit where PEFT's own single-adapter path is the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..base import ModuleAdapter
from .merged import merged_parameters
from .stacked import StackedLora


@dataclass(eq=False)
class LoraWeights(ModuleAdapter):
    """LoRA A/B of one adapter on one module (adapter compute dtype, module device): the LoRA `ModuleAdapter`
    (it implements `LoraFactors`, what the merge and stacking math read).

    linear: A (r, in), B (out, r); embedding: A (r, V), B (d, r).
    `dora_scale` is DoRA's m / ||W + s·BA|| precomputed once: the norm is detached and constant at
    inference, so caching it is exact and saves a (out, in) matmul per step.
    """

    kind: str  # "linear" | "embedding"
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    rank: int
    alpha: float
    bias: torch.Tensor | None = None  # lora_B bias (lora_bias=True), (out,)
    magnitude: torch.Tensor | None = None  # DoRA magnitude, (out,) or (d,)
    dora_scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.bias, self.magnitude, self.dora_scale) if t is not None]

    def adapt_output(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return apply_embedding(self, base, x, y)
        return apply_linear(self, base, x, y)

    def merged_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return merged_parameters(self, base)

    def merged_parameter_names(self, base: nn.Module) -> tuple[str, ...]:
        return ("weight", "bias") if self.bias is not None else ("weight",)

    @classmethod
    def stacked(cls, adapter_ids: tuple[str, ...], adapters: Sequence[ModuleAdapter]) -> StackedLora | None:
        loras = list(adapters)
        return StackedLora.build(adapter_ids, loras) if StackedLora.eligible(loras) else None


def embed_scale(base: nn.Module) -> torch.Tensor | None:
    """Scalar `embed_scale` of scaled embeddings (Gemma-style), as PEFT honours it."""
    scale = getattr(base, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


def init_dora(w: LoraWeights, base: nn.Module) -> None:
    """Precompute DoRA's magnitude/norm factor exactly as PEFT's forward computes it."""
    assert w.magnitude is not None
    if w.kind == "linear":
        eye = torch.eye(w.A.shape[1], device=w.A.device, dtype=w.A.dtype)
        lora_weight = F.linear(F.linear(eye, w.A), w.B).T  # == B @ A, via forward as PEFT does
        weight = base.weight.to(w.A.dtype)
        if isinstance(base, Conv1D):
            weight = weight.T  # Conv1D stores (in, out)
        summed = weight + w.scaling * lora_weight
        norm = torch.linalg.norm(summed, dim=1).to(summed.dtype)
        w.dora_scale = (w.magnitude / norm).view(1, -1)  # (1, out)
    else:
        lora_weight = (w.A.T @ w.B.T).T  # (d, V)
        summed = base.weight.T + w.scaling * lora_weight
        norm = torch.linalg.norm(summed, dim=1).to(summed.dtype)  # cast to the sum's dtype, as PEFT
        w.dora_scale = w.magnitude / norm  # (d,)


def apply_linear(w: LoraWeights, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = base(x) for these rows; returns y plus the adapter's contribution, in y's dtype."""
    xa = x if x.dtype == w.A.dtype else x.to(w.A.dtype)
    if w.dora_scale is None:
        delta = F.linear(F.linear(xa, w.A), w.B, w.bias).mul_(w.scaling)
        # y is this forward's own base output: adding in place is the same sum without another buffer.
        return y.add_(delta) if y.dtype == delta.dtype else (y + delta).to(y.dtype)
    lora = F.linear(F.linear(xa, w.A), w.B)
    base_result = y - base.bias if base.bias is not None else y
    g = w.dora_scale
    return (y + ((g - 1) * base_result + g * lora * w.scaling)).to(y.dtype)


def apply_embedding(w: LoraWeights, base: nn.Embedding, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = base(ids) for these rows; no input cast and no dropout on the embedding path (as PEFT)."""
    after_a = F.embedding(
        ids, w.A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )
    scale = embed_scale(base)
    if w.dora_scale is None:
        out = (after_a @ w.B.T) * w.scaling
        if scale is not None:
            out = out * scale.to(out.dtype)
        return (y + out).to(y.dtype)
    g = w.dora_scale
    dora = g * (after_a @ w.B.T) * w.scaling
    if scale is not None:
        dora = dora * scale.to(dora.dtype)
    return (g * y + dora).to(y.dtype)
