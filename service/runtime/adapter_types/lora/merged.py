"""A module's weights with one adapter merged in (PEFT's `merge`, PEFT_SPEC §5.2), computed off to the side.

Used to export a standalone merged checkpoint and to fuse the active adapter; the base module itself is never
written, so "unmerging" is dropping the merged copy (bit-exact, no subtract-and-hope). The order of
operations follows PEFT's unsafe merge, so a model holding these weights equals PEFT's merged model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .factors import LoraFactors


def delta_weight(lora: LoraFactors, base: nn.Module) -> torch.Tensor:
    """s·B@A in the base weight's layout: transposed for Conv1D (in, out) and embeddings (V, d)."""
    ba = lora.B @ lora.A
    if lora.kind == "embedding" or isinstance(base, Conv1D):
        ba = ba.T
    return ba * lora.scaling


def merged_parameters(lora: LoraFactors, base: nn.Module) -> dict[str, torch.Tensor]:
    """New values of the base module's `weight` (and `bias` with lora_bias), in the base dtype."""
    weight = base.weight
    delta = delta_weight(lora, base)
    if lora.magnitude is None:
        merged = torch.add(weight, delta).to(weight.dtype)  # fp32 add, one rounding (PEFT's in-place +=)
    else:
        merged = _dora_merged(lora, base, delta)
    out = {"weight": merged}
    if lora.bias is not None:
        out["bias"] = torch.add(base.bias, lora.bias * lora.scaling).to(base.bias.dtype)
    return out


def _dora_merged(lora: LoraFactors, base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """W' = m/‖W + ΔW‖ ⊙ (W + ΔW), norms per output feature, as PEFT's DoRA merge computes them."""
    weight = base.weight
    if lora.kind == "embedding":
        summed = weight.T + 1 * delta.T  # (d, V)
        factor = (lora.magnitude / torch.linalg.norm(summed, dim=1).to(summed.dtype)).view(1, -1)
    else:
        conv1d = isinstance(base, Conv1D)
        summed = (weight.T if conv1d else weight) + 1 * (delta.T if conv1d else delta)  # (out, in)
        factor = (lora.magnitude / torch.linalg.norm(summed, dim=1).to(summed.dtype)).view(-1, 1)
        if conv1d:
            factor = factor.T
    return (factor * (weight + delta)).to(weight.dtype)
