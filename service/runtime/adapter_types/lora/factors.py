"""What the merge and stacking math read from one module's LoRA: a structural type, so that `merged.py` and
`stacked.py` do not import `LoraWeights` (which imports them to implement its `ModuleAdapter` methods)."""

from __future__ import annotations

from typing import Protocol

import torch


class LoraFactors(Protocol):
    """One adapter's LoRA at one module (`LoraWeights` is the implementation; see its docstring for shapes)."""

    kind: str  # "linear" | "embedding"
    A: torch.Tensor  # (r, in); embedding: (r, V)
    B: torch.Tensor  # (out, r); embedding: (d, r)
    scaling: float
    rank: int
    bias: torch.Tensor | None  # lora_B bias, (out,)
    magnitude: torch.Tensor | None  # DoRA magnitude, (out,) or (d,)
    dora_scale: torch.Tensor | None  # DoRA's precomputed m / ||W + s·BA||
