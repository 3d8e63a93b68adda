"""An independent MoLoRA reference (per-token loops over plain tensors) and an adapter writer for tests.

Written from the format in examples/molora's docstring, not from the plug-in's code, so that a bug in
the plug-in's vectorised forward or key handling cannot be mirrored here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "base_model.model."


@dataclass
class Expertise:
    A: list[torch.Tensor]  # per expert (r, in)
    B: list[torch.Tensor]  # per expert (out, r)
    router_weight: torch.Tensor  # (E, in)
    router_bias: torch.Tensor | None


def random_molora(model: torch.nn.Module, modules: list[str], *, r: int = 4, experts: int = 4, seed: int = 0,
                  with_bias: tuple[str, ...] = ()) -> dict[str, Expertise]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        linear = model.get_submodule(name)
        n_out, n_in = linear.weight.shape

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * 0.3

        out[name] = Expertise(
            [noise(r, n_in) for _ in range(experts)], [noise(n_out, r) for _ in range(experts)],
            noise(experts, n_in) * 3, noise(experts) if name in with_bias else None,
        )
    return out


def write_molora(out_dir: Path, adapter: dict[str, Expertise], *, lora_alpha: float, top_k: int,
                 temperature: float | None = None, extra: dict[str, torch.Tensor] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, ex in adapter.items():
        for e, (a, b) in enumerate(zip(ex.A, ex.B, strict=True)):
            tensors[f"{PREFIX}{name}.experts.{e}.lora_A.weight"] = a
            tensors[f"{PREFIX}{name}.experts.{e}.lora_B.weight"] = b
        tensors[f"{PREFIX}{name}.router.weight"] = ex.router_weight
        if ex.router_bias is not None:
            tensors[f"{PREFIX}{name}.router.bias"] = ex.router_bias
    if temperature is not None:
        tensors[f"{PREFIX}molora.router_temperature"] = torch.tensor([temperature])
    tensors.update(extra or {})
    first = next(iter(adapter.values()))
    config = {"peft_type": "MOLORA", "r": first.A[0].shape[0], "lora_alpha": lora_alpha,
              "num_experts": len(first.A), "top_k": top_k, "target_modules": sorted(adapter)}
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, out_dir / "adapter_model.safetensors")
    return out_dir


def reference_model(base: torch.nn.Module, adapter: dict[str, Expertise], *, lora_alpha: float, top_k: int,
                    temperature: float | None = None) -> torch.nn.Module:
    """A copy of `base` whose targeted modules add the mixture of experts, token by token."""
    model = copy.deepcopy(base)
    for name, ex in adapter.items():
        scaling = lora_alpha / ex.A[0].shape[0]

        def hook(module, inputs, output, ex=ex, scaling=scaling):
            x = inputs[0]
            flat_x, flat_y = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]).clone()
            for t in range(flat_x.shape[0]):
                v = flat_x[t].float()
                logits = ex.router_weight @ v + (ex.router_bias if ex.router_bias is not None else 0)
                probs = torch.softmax(logits / (temperature or 1.0), dim=0)
                chosen = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:top_k]
                total = sum(probs[e] for e in chosen)
                for e in chosen:
                    flat_y[t] += (probs[e] / total) * scaling * (ex.B[e] @ (ex.A[e] @ v))
            return flat_y.reshape(output.shape)

        model.get_submodule(name).register_forward_hook(hook)
    return model.eval()
