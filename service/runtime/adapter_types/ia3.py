"""(IA)³ as an adapter type: learned vectors that rescale a module's output, or its input on feed-forward
modules (PEFT's `IA3Config`, `peft/tuners/ia3/layer.py` semantics, eval mode).

Keys: `<module>.ia3_l`, shape (out, 1), or (1, in) on modules listed in `feedforward_modules`. The vector
is upcast to fp32 (PEFT's autocast_adapter_dtype) and the product is cast back to the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import LoadReport
from ..module_patterns import fullmatch, whole_name
from .base import ADAPTER_DTYPE, AdapterKeys, AdapterType, ModuleAdapter, ModuleTarget, features
from .config_readers import AdapterConfigBase, ParsedConfig, parse_common_fields


@dataclass
class IA3Config(AdapterConfigBase):
    feedforward_modules: list[str] | str = field(default_factory=list)
    peft_type: str = "IA3"

    def is_feedforward(self, name: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; list entries match a plain suffix."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return fullmatch("feedforward_modules", ff, name)
        return any(name.endswith(entry) for entry in ff)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "feedforward_modules": self.feedforward_modules}

    def module_patterns(self) -> list[tuple[str, str, str]]:
        ff = self.feedforward_modules
        own = [("feedforward_modules", ff, whole_name(ff))] if isinstance(ff, str) else []
        return super().module_patterns() + own


@dataclass(eq=False)
class IA3Vector(ModuleAdapter):
    """One module's (IA)³ vector, flattened: scales the output features, or the input features when
    `feedforward` (then the base module runs on the rescaled input)."""

    vector: torch.Tensor  # (out,) or (in,), fp32
    feedforward: bool

    @property
    def changes_input(self) -> bool:  # type: ignore[override]
        return self.feedforward

    def adapt_input(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.feedforward:
            return x
        return (x.to(self.vector.dtype) * self.vector).to(x.dtype)

    def adapt_output(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return y
        return (y * self.vector).to(y.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.vector]

    def merged_parameter_names(self, base: nn.Module) -> tuple[str, ...]:
        scales_bias = not self.feedforward and getattr(base, "bias", None) is not None
        return ("weight", "bias") if scales_bias else ("weight",)

    def merged_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        # Scale the weight's output rows (or input columns); Conv1D stores the weight transposed.
        out_axis = 1 if isinstance(base, Conv1D) else 0
        axis = 1 - out_axis if self.feedforward else out_axis
        shape = [1, 1]
        shape[axis] = -1
        merged = {"weight": torch.mul(base.weight, self.vector.view(shape)).to(base.weight.dtype)}
        if "bias" in self.merged_parameter_names(base):
            merged["bias"] = torch.mul(base.bias, self.vector).to(base.bias.dtype)
        return merged


class IA3Type(AdapterType):
    peft_type = "IA3"
    module_types = (nn.Linear, Conv1D)

    def parse_config(self, raw: dict[str, Any]) -> ParsedConfig:
        errors: list[str] = []
        cfg = IA3Config(raw=raw)
        parse_common_fields(raw, cfg, errors)
        ff = raw.get("feedforward_modules")
        if ff is None:
            errors.append("feedforward_modules is missing (PEFT fills it in before saving; name the modules "
                          "whose input IA3 scales, or [] for none)")
        elif isinstance(ff, str) or (isinstance(ff, list) and all(isinstance(m, str) for m in ff)):
            cfg.feedforward_modules = ff
        else:
            errors.append(f"feedforward_modules must be a string (regex) or a list of module names, got {ff!r}")
        if isinstance(cfg.feedforward_modules, list) and isinstance(cfg.target_modules, list):
            extra = sorted(set(cfg.feedforward_modules) - set(cfg.target_modules))
            if extra:
                errors.append(f"feedforward_modules must be a subset of target_modules; not targeted: {extra}")
        return ParsedConfig(None if errors else cfg, errors)

    def plan_module(self, config: IA3Config, name: str, module: nn.Module, keys: AdapterKeys,
                    report: LoadReport) -> ModuleTarget:
        n_in, n_out = features(module)
        feedforward = config.is_feedforward(name)
        key = keys.expect(f"{name}.ia3_l", (1, n_in) if feedforward else (n_out, 1))
        return ModuleTarget(name, {"ia3_l": key} if key else {}, {"feedforward": feedforward})

    def build_module(self, config: IA3Config, target: ModuleTarget, tensors: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], base: nn.Module, report: LoadReport) -> IA3Vector:
        return IA3Vector(tensors["ia3_l"].to(ADAPTER_DTYPE).flatten(), target.info["feedforward"])
