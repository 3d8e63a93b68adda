"""Write a seeded random LoRA adapter in PEFT's on-disk format, without importing PEFT.

Used for demos, benchmarks and tests: the output is what `PeftModel.save_pretrained` would write for a
LoRA on the given modules (same config fields, same tensor keys and shapes), with random non-zero weights
so that the adapter visibly changes the base model's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ..peft_format import CONFIG_FILE, FILE_PREFIX, WEIGHTS_FILE

# B's std; A is scaled by 1/sqrt(in_features), so the LoRA delta is a few percent of the activations at any
# model width: visible in the logits, far from overflow.
B_STD = 0.05
MODULES_TO_SAVE_NOISE_STD = 0.02


def _matches_target(name: str, targets: Sequence[str]) -> bool:
    # PEFT's rule for a list of target names: the full name, or its last dotted components, equal a target.
    return any(name == t or name.endswith("." + t) for t in targets)


def _load_for_shapes(model_dir: Path, need_weights: bool) -> torch.nn.Module:
    """The base model; on the meta device (no weights read) unless modules_to_save need real values."""
    if need_weights:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _lora_tensors(
    model: torch.nn.Module, targets: Sequence[str], rank: int, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], bool]:
    """lora_A (r, in) and lora_B (out, r) for every targeted module; also whether they are Conv1D."""
    tensors: dict[str, torch.Tensor] = {}
    conv1d = False
    for name, module in sorted(model.named_modules()):
        if not _matches_target(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            in_features, out_features = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            # GPT-2 style: weight is (in, out); PEFT handles it with fan_in_fan_out=True.
            in_features, out_features = module.weight.shape
            conv1d = True
        else:
            kind = type(module).__name__
            raise ValueError(f"target module '{name}' is a {kind}; only Linear and Conv1D are supported")
        a = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        b = torch.randn(out_features, rank, generator=gen) * B_STD
        tensors[f"{FILE_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{FILE_PREFIX}{name}.lora_B.weight"] = b
    if not tensors:
        raise ValueError(f"no module of the model matches target_modules {list(targets)}")
    return tensors, conv1d


def _modules_to_save_tensors(
    model: torch.nn.Module, modules_to_save: Sequence[str], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Full, perturbed copies of every module whose name ends with a modules_to_save entry (PEFT's rule)."""
    tensors: dict[str, torch.Tensor] = {}
    for wanted in modules_to_save:
        matched = [name for name, _ in model.named_modules() if name and name.endswith(wanted)]
        if not matched:
            raise ValueError(f"no module of the model matches modules_to_save entry '{wanted}'")
        for name in sorted(matched):
            for param_name, tensor in sorted(model.get_submodule(name).state_dict().items()):
                noise = torch.randn(tensor.shape, generator=gen) * MODULES_TO_SAVE_NOISE_STD
                # .clone(): tied weights share storage, and safetensors refuses shared tensors.
                perturbed = (tensor.float() + noise).to(tensor.dtype).clone()
                tensors[f"{FILE_PREFIX}{name}.{param_name}"] = perturbed
    return tensors


def _adapter_config(
    model_dir: Path,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    modules_to_save: Sequence[str],
    conv1d: bool,
) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "modules_to_save": list(modules_to_save) or None,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def write_demo_adapter(
    out_dir: Path,
    model_dir: Path,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    modules_to_save: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """Write a seeded random PEFT LoRA adapter for the model saved in `model_dir`; returns `out_dir`.

    `alpha` defaults to `rank` (scaling 1). The same arguments always give byte-identical tensors. The files
    are written into a temporary sibling directory that is renamed into place; an existing non-empty
    `out_dir` is never overwritten (FileExistsError).
    """
    out_dir = Path(out_dir)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"refusing to overwrite non-empty {out_dir}")
    model = _load_for_shapes(Path(model_dir), need_weights=bool(modules_to_save))
    gen = torch.Generator().manual_seed(seed)
    tensors, conv1d = _lora_tensors(model, target_modules, rank, gen)
    tensors.update(_modules_to_save_tensors(model, modules_to_save, gen))
    alpha = float(alpha if alpha is not None else rank)
    config = _adapter_config(Path(model_dir), rank, alpha, target_modules, modules_to_save, conv1d)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        try:
            # Succeeds onto an absent or empty directory; fails if another writer filled out_dir meanwhile.
            os.rename(tmp, out_dir)
        except OSError as exc:
            raise FileExistsError(f"refusing to overwrite non-empty {out_dir}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
