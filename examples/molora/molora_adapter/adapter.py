"""The adapter type: config parsing, the keys each module claims, and the per-module forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.runtime.adapter_types.base import AdapterKeys, AdapterType, ModuleAdapter, ModuleTarget
from service.runtime.adapter_types.config_readers import (
    AdapterConfigBase,
    ParsedConfig,
    TypedReader,
    parse_common_fields,
    read_rank_and_alpha,
)
from service.runtime.errors import LoadReport
from service.runtime.model_index import ModelIndex

TEMPERATURE_KEY = "molora.router_temperature"


@dataclass
class MoLoraConfig(AdapterConfigBase):
    r: int = 8
    lora_alpha: float = 8
    num_experts: int = 4
    top_k: int = 2
    peft_type: str = "MOLORA"

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "r": self.r, "lora_alpha": self.lora_alpha,
                "num_experts": self.num_experts, "top_k": self.top_k}


@dataclass(eq=False)
class MoLoraModule(ModuleAdapter):
    """One module's experts and router (fp32, on the module's device)."""

    A: torch.Tensor  # (E, r, in)
    B: torch.Tensor  # (E, out, r)
    router_weight: torch.Tensor  # (E, in)
    router_bias: torch.Tensor | None  # (E,)
    temperature: torch.Tensor | None  # (1,), shared by every module of the adapter
    top_k: int
    scaling: float
    rank: int

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) mixing weights: softmax over the router logits, top-k kept and renormalised."""
        logits = nn.functional.linear(x, self.router_weight, self.router_bias)
        if self.temperature is not None:
            logits = logits / self.temperature
        probs = torch.softmax(logits, dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, index, top / top.sum(dim=-1, keepdim=True))

    def adapt_output(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.A.dtype)
        hidden = torch.einsum("...i,eri->...er", xf, self.A)  # every expert's A x: (..., E, r)
        experts = torch.einsum("...er,eor->...eo", hidden, self.B)  # (..., E, out)
        delta = torch.einsum("...e,...eo->...o", self.gates(xf), experts) * self.scaling
        return (y + delta).to(y.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.router_weight, self.router_bias, self.temperature) if t is not None]

    def merge_blocker(self) -> str | None:
        if self.A.shape[0] == 1:
            return None  # one expert: the gate is always 1, so this is a plain LoRA
        return "MoLoRA mixes its experts per token with input-dependent gates, so no single weight delta exists"

    def merged_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        blocker = self.merge_blocker()
        if blocker is not None:
            return super().merged_parameters(base)  # raises NotMergeableError with the reason
        delta = (self.B[0] @ self.A[0]) * self.scaling
        return {"weight": torch.add(base.weight, delta).to(base.weight.dtype)}


class MoLoraType(AdapterType):
    peft_type = "MOLORA"
    module_types = (nn.Linear,)

    def parse_config(self, raw: dict[str, Any]) -> ParsedConfig:
        errors: list[str] = []
        typed = TypedReader(raw, errors)
        cfg = MoLoraConfig(raw=raw)
        cfg.r, cfg.lora_alpha = read_rank_and_alpha(typed, "lora_alpha")
        cfg.num_experts = typed("num_experts", (int,), 4)
        cfg.top_k = typed("top_k", (int,), 2)
        parse_common_fields(raw, cfg, errors)
        if cfg.num_experts <= 0:
            errors.append(f"num_experts must be positive, got {cfg.num_experts}")
        if not 0 < cfg.top_k <= max(cfg.num_experts, 1):
            errors.append(f"top_k must be between 1 and num_experts ({cfg.num_experts}), got {cfg.top_k}")
        return ParsedConfig(None if errors else cfg, errors)

    def plan_module(self, config: MoLoraConfig, name: str, module: nn.Module, keys: AdapterKeys,
                    report: LoadReport) -> ModuleTarget:
        n_out, n_in = module.weight.shape
        r, experts = config.r, config.num_experts
        fields: dict[str, str | None] = {}
        for e in range(experts):
            fields[f"A{e}"] = keys.expect(f"{name}.experts.{e}.lora_A.weight", (r, n_in))
            fields[f"B{e}"] = keys.expect(f"{name}.experts.{e}.lora_B.weight", (n_out, r))
        fields["router_weight"] = keys.expect(f"{name}.router.weight", (experts, n_in))
        fields["router_bias"] = keys.expect(f"{name}.router.bias", (experts,), optional=True)
        return ModuleTarget(name, {f: k for f, k in fields.items() if k is not None},
                            {"rank": r, "experts": experts})

    def plan_shared(self, config: MoLoraConfig, index: ModelIndex, keys: AdapterKeys,
                    report: LoadReport) -> dict[str, str]:
        key = keys.expect(TEMPERATURE_KEY, (1,), optional=True)
        return {"temperature": key} if key is not None else {}

    def build_module(self, config: MoLoraConfig, target: ModuleTarget, tensors: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], base: nn.Module, report: LoadReport) -> MoLoraModule:
        experts = range(target.info["experts"])
        f32 = {f: t.to(torch.float32) for f, t in tensors.items()}
        temperature = shared.get("temperature")
        if temperature is not None:
            temperature = temperature.to(device=base.weight.device, dtype=torch.float32)
            if not bool(temperature.item() > 0):
                report.config_errors.append(f"{TEMPERATURE_KEY} must be positive, got {temperature.item()}")
        return MoLoraModule(
            A=torch.stack([f32[f"A{e}"] for e in experts]), B=torch.stack([f32[f"B{e}"] for e in experts]),
            router_weight=f32["router_weight"], router_bias=f32.get("router_bias"), temperature=temperature,
            top_k=config.top_k, scaling=config.lora_alpha / config.r, rank=config.r,
        )
