"""Write a MoLoRA adapter in the format `MoLoraType` reads (what a training script would call at the end)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import TEMPERATURE_KEY

PREFIX = "base_model.model."


def save_molora_adapter(
    out_dir: Path,
    experts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    routers: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    *,
    lora_alpha: float,
    top_k: int,
    temperature: float | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """`experts`: module name -> [(A (r, in), B (out, r)) per expert]; `routers`: module -> (weight, bias)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, pairs in experts.items():
        for e, (a, b) in enumerate(pairs):
            tensors[f"{PREFIX}{module}.experts.{e}.lora_A.weight"] = a.contiguous()
            tensors[f"{PREFIX}{module}.experts.{e}.lora_B.weight"] = b.contiguous()
        weight, bias = routers[module]
        tensors[f"{PREFIX}{module}.router.weight"] = weight.contiguous()
        if bias is not None:
            tensors[f"{PREFIX}{module}.router.bias"] = bias.contiguous()
    if temperature is not None:
        tensors[PREFIX + TEMPERATURE_KEY] = torch.tensor([temperature])
    first = next(iter(experts.values()))
    config = {
        "peft_type": "MOLORA", "r": first[0][0].shape[0], "lora_alpha": lora_alpha,
        "num_experts": len(first), "top_k": top_k, "target_modules": sorted(experts),
        "base_model_name_or_path": base_model_name_or_path,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    return out_dir
