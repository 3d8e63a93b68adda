"""LoRA (and its DoRA, rsLoRA, lora_bias and embedding variants) as an adapter type (PEFT_SPEC §1-§2): which
file keys each targeted module claims, with which shapes, and how its `LoraWeights` are built."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import LoadReport
from ...targeting import LORA_MODULE_TYPES, resolve_alpha, resolve_rank
from ..base import ADAPTER_DTYPE, AdapterKeys, AdapterType, ModuleTarget, features
from ..config_readers import ParsedConfig
from .config import LoraAdapterConfig, parse_lora_config, scaling
from .weights import LoraWeights, init_dora


class LoraType(AdapterType):
    peft_type = "LORA"
    module_types = LORA_MODULE_TYPES
    supports_weighted_merge = True

    def parse_config(self, raw: dict[str, Any]) -> ParsedConfig:
        return parse_lora_config(raw)

    def plan_module(self, config: LoraAdapterConfig, name: str, module: nn.Module, keys: AdapterKeys,
                    report: LoadReport) -> ModuleTarget:
        kind = "embedding" if isinstance(module, nn.Embedding) else "linear"
        fields = (
            {"A": f"{name}.lora_embedding_A", "B": f"{name}.lora_embedding_B"}
            if kind == "embedding"
            else {"A": f"{name}.lora_A.weight", "B": f"{name}.lora_B.weight"}
        )
        if config.lora_bias:
            if kind == "embedding":
                report.unsupported.append(f"lora_bias on embedding module '{name}'")
            fields["bias"] = f"{name}.lora_B.bias"
        if config.use_dora:
            fields["magnitude"] = f"{name}.lora_magnitude_vector"
        a_shape = keys.shape(fields["A"])
        file_rank = a_shape[0] if a_shape is not None and len(a_shape) == 2 else None
        rank, corrected_key = resolve_rank(config.rank_pattern, config.r, name, file_rank)
        if corrected_key is not None:
            report.warnings.append(
                f"{name}: rank {rank} taken from rank_pattern '{corrected_key}' (the first matching pattern in "
                "file order gives another rank; PEFT would fail to load this file)"
            )
        alpha = resolve_alpha(config.alpha_pattern, config.lora_alpha, name, corrected_key)
        n_in, n_out = features(module)
        shapes = {"A": (rank, n_in), "B": (n_out, rank), "bias": (n_out,), "magnitude": (n_out,)}
        file_keys = {f: keys.expect(key, shapes[f]) for f, key in fields.items()}
        info = {"kind": kind, "rank": rank, "alpha": alpha, "scaling": scaling(config.use_rslora, rank, alpha)}
        return ModuleTarget(name, {f: k for f, k in file_keys.items() if k is not None}, info)

    def build_module(self, config: LoraAdapterConfig, target: ModuleTarget, tensors: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], base: nn.Module, report: LoadReport) -> LoraWeights:
        fields = {f: t.to(ADAPTER_DTYPE) for f, t in tensors.items()}
        info = target.info
        weights = LoraWeights(
            kind=info["kind"], A=fields["A"], B=fields["B"], scaling=info["scaling"], rank=info["rank"],
            alpha=info["alpha"], bias=fields.get("bias"), magnitude=fields.get("magnitude"),
        )
        if weights.magnitude is not None:
            with torch.no_grad():
                init_dora(weights, base)
            if not torch.isfinite(weights.dora_scale).all():
                report.dtype_errors.append(f"{target.name}: DoRA norm is zero or not finite")
        return weights
