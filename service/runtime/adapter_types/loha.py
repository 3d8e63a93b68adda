"""LoHa (low-rank Hadamard product, LyCORIS) as an adapter type, for Linear modules (PEFT's `LoHaConfig`,
`peft/tuners/loha/layer.py` semantics, eval mode).

ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) · alpha / r, added to the base output as F.linear(x, ΔW). ΔW is
rebuilt on every forward, as PEFT does: caching it would hold a dense (out, in) matrix per module and
adapter, defeating the point of a low-rank adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LoadReport
from ..targeting import resolve_alpha, resolve_rank
from .base import ADAPTER_DTYPE, AdapterKeys, AdapterType, ModuleAdapter, ModuleTarget
from .config_readers import (
    AdapterConfigBase,
    ParsedConfig,
    TypedReader,
    parse_common_fields,
    parse_rank_patterns,
    read_rank_and_alpha,
)

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LoHaConfig(AdapterConfigBase):
    r: int = 8
    alpha: float = 8
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    peft_type: str = "LOHA"

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "r": self.r, "alpha": self.alpha}


@dataclass(eq=False)
class LoHaWeights(ModuleAdapter):
    w1_a: torch.Tensor  # (out, r)
    w1_b: torch.Tensor  # (r, in)
    w2_a: torch.Tensor  # (out, r)
    w2_b: torch.Tensor  # (r, in)
    scaling: float
    rank: int

    def delta_weight(self) -> torch.Tensor:
        scale = torch.tensor(self.scaling)  # PEFT scales by a 0-dim fp32 tensor
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * scale

    def adapt_output(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight()
        return (y + F.linear(x.to(delta.dtype), delta)).to(x.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w1_a, self.w1_b, self.w2_a, self.w2_b]

    def merged_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": torch.add(base.weight, self.delta_weight()).to(base.weight.dtype)}


class LoHaType(AdapterType):
    peft_type = "LOHA"
    module_types = (nn.Linear,)

    def parse_config(self, raw: dict[str, Any]) -> ParsedConfig:
        errors: list[str] = []
        typed = TypedReader(raw, errors)
        cfg = LoHaConfig(raw=raw)
        cfg.r, cfg.alpha = read_rank_and_alpha(typed, "alpha")
        parse_common_fields(raw, cfg, errors)
        parse_rank_patterns(raw, cfg, errors)
        return ParsedConfig(None if errors else cfg, errors)

    def plan_module(self, config: LoHaConfig, name: str, module: nn.Module, keys: AdapterKeys,
                    report: LoadReport) -> ModuleTarget:
        w1_a = keys.shape(f"{name}.hada_w1_a")
        file_rank = w1_a[1] if w1_a is not None and len(w1_a) == 2 else None
        rank, corrected_key = resolve_rank(config.rank_pattern, config.r, name, file_rank)
        alpha = resolve_alpha(config.alpha_pattern, config.alpha, name, corrected_key)
        n_out, n_in = module.weight.shape
        shapes = {"hada_w1_a": (n_out, rank), "hada_w1_b": (rank, n_in),
                  "hada_w2_a": (n_out, rank), "hada_w2_b": (rank, n_in)}
        file_keys = {f: keys.expect(f"{name}.{f}", shapes[f]) for f in _FACTORS}
        info = {"rank": rank, "scaling": alpha / rank}
        return ModuleTarget(name, {f: k for f, k in file_keys.items() if k is not None}, info)

    def build_module(self, config: LoHaConfig, target: ModuleTarget, tensors: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], base: nn.Module, report: LoadReport) -> LoHaWeights:
        t = {f: tensors[f].to(ADAPTER_DTYPE) for f in _FACTORS}
        return LoHaWeights(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                           target.info["scaling"], target.info["rank"])
