"""Combine loaded adapters into one new LoRA adapter (PEFT's `add_weighted_adapter`, PEFT_SPEC §5.1).

Deterministic methods reproduce PEFT's new A/B exactly; where PEFT is wrong we do the right thing:
- rsLoRA sources: PEFT keeps `use_rslora` on the result, whose scaling then is √r instead of 1 (the
  sources' scalings are already folded into the new weights); the result here is plain LoRA, scaling 1.
- modules_to_save: PEFT gives the result a fresh copy of the *base* module; here the result carries the
  source's trained copy (two sources with a copy of the same module: an error, as in PEFT).
- DoRA magnitudes and lora_B biases cannot be combined by these formulas (PEFT silently drops them): such
  sources are refused.
- an existing id is a conflict, not a silent no-op (checked by the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import IncompatibleSourcesError
from ..peft_format import FILE_PREFIX
from ..runtime import LoadedAdapter
from ..runtime.adapter_types.lora import LoraWeights
from .merge_functions import combine

LINEAR_KINDS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_KINDS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*LINEAR_KINDS, "cat", *SVD_KINDS)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", *SVD_KINDS[1:])


class MergeError(IncompatibleSourcesError):
    """The sources cannot be combined with this method; `reasons` says why."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons), {"reasons": reasons})
        self.reasons = reasons


@dataclass
class MergeSpec:
    method: str
    weights: list[float]
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    seed: int | None = None


@dataclass
class MergedAdapter:
    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # file keys -> tensors


def _rank(adapter: LoadedAdapter) -> int:
    cfg = adapter.config
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def check(sources: list[LoadedAdapter], spec: MergeSpec) -> tuple[str, int]:
    """Validate; return (effective method, new rank)."""
    reasons: list[str] = []
    method = "linear" if len(sources) == 1 else spec.method
    if spec.method not in METHODS:
        reasons.append(f"unknown method '{spec.method}' (one of {', '.join(METHODS)})")
    if method in NEEDS_DENSITY and spec.density is None:
        reasons.append(f"method '{method}' needs 'density'")
    if spec.density is not None and not 0 <= spec.density <= 1:
        reasons.append("density must be in [0, 1]")
    elif spec.density == 0 and method.startswith("dare"):
        # DARE keeps each entry with probability `density` and divides the kept ones by it: 0/0 everywhere.
        reasons.append(f"density must be above 0 for method '{method}' (DARE rescales the kept entries by "
                       "1/density, so density 0 keeps nothing and divides by zero)")
    if spec.majority_sign_method not in ("total", "frequency"):
        reasons.append("majority_sign_method must be 'total' or 'frequency'")
    unsupported = [f"'{a.adapter_id}' is {a.adapter_type.peft_type}" for a in sources
                   if not a.adapter_type.supports_weighted_merge]
    if unsupported:
        raise MergeError([f"weighted merging combines LoRA adapters only: {', '.join(unsupported)}"])
    for a in sources:
        if a.config.use_dora or a.config.lora_bias:
            reasons.append(f"adapter '{a.adapter_id}' uses DoRA or lora_bias, which weighted merging cannot combine")
    for a in sources:
        if a.base_overrides:
            reasons.append(f"adapter '{a.adapter_id}' carries its own weights for {sorted(a.base_overrides)} "
                           "(saved with save_embedding_layers, different from the served model's), which "
                           "weighted merging cannot combine")
    bases = {a.config.base_model_name_or_path for a in sources if a.config.base_model_name_or_path}
    if len(bases) > 1:
        reasons.append(f"the sources were trained on different base models: {sorted(bases)}")
    owners: dict[str, list[str]] = {}
    for a in sources:
        for name in a.replacements:
            owners.setdefault(name, []).append(a.adapter_id)
    for name, ids in owners.items():
        if len(ids) > 1:
            reasons.append(f"adapters {ids} each have a trained copy of '{name}' (modules_to_save); keep one")
    ranks = [_rank(a) for a in sources]
    if method in LINEAR_KINDS and len(set(ranks)) > 1:
        reasons.append(f"method '{method}' needs every source to have the same rank, got {ranks}; use cat or svd")
    if reasons:
        raise MergeError(reasons)
    if method == "cat":
        return method, sum(ranks)
    if method in SVD_KINDS:
        return method, spec.svd_rank or max(ranks)
    return method, ranks[0]


def merge(sources: list[LoadedAdapter], spec: MergeSpec, modules: dict[str, nn.Module]) -> MergedAdapter:
    """`modules` is the model index (name -> pristine module), iterated in model order like PEFT."""
    method, new_rank = check(sources, spec)
    generator = torch.Generator().manual_seed(spec.seed) if spec.seed is not None else None
    out = MergedAdapter(config={})
    targets: list[str] = []
    for name in modules:
        present = [(a, w) for a, w in zip(sources, spec.weights, strict=True) if name in a.modules]
        if not present:
            continue
        targets.append(name)
        loras = [a.modules[name] for a, _ in present]
        weights = [w for _, w in present]
        kind = loras[0].kind
        if method == "cat":
            a_new, b_new = _cat(loras, weights, new_rank)
        elif method in SVD_KINDS:
            a_new, b_new = _svd(method, loras, weights, new_rank, spec, generator, modules[name])
        else:
            a_new, b_new = _linear(method, loras, weights, spec, generator)
        keys = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        out.tensors[f"{FILE_PREFIX}{name}.{keys[0]}"] = a_new.contiguous()
        out.tensors[f"{FILE_PREFIX}{name}.{keys[1]}"] = b_new.contiguous()
    saved: list[str] = []
    for a in sources:
        for name, copy_module in a.replacements.items():
            saved.append(name)
            for key, tensor in copy_module.state_dict().items():
                out.tensors[f"{FILE_PREFIX}{name}.{key}"] = tensor.detach().clone()
    first = sources[0].config.raw
    out.config = {
        "peft_type": "LORA",
        "r": new_rank,
        "lora_alpha": new_rank,  # scaling 1: each source's scaling is folded into the new weights
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "bias": "none",
        "target_modules": targets,
        "modules_to_save": saved or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "inference_mode": True,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
    return out


def _cat(loras: list[LoraWeights], weights: list[float], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = cat(w_i·s_i·A_i), B = cat(B_i): B@A = Σ w_i s_i B_i A_i exactly; unused rank rows stay zero."""
    a_parts = [w.A * weight * w.scaling for w, weight in zip(loras, weights, strict=True)]
    b_parts = [w.B for w in loras]
    a = a_parts[0].new_zeros((new_rank, a_parts[0].shape[1]))
    b = b_parts[0].new_zeros((b_parts[0].shape[0], new_rank))
    cat_a, cat_b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
    a[: cat_a.shape[0]] = cat_a
    b[:, : cat_b.shape[1]] = cat_b
    return a, b


def _linear(method, loras, weights, spec, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge A and B separately; the signed √|w·s| goes to A, √|w·s| to B (PEFT's split)."""
    weights_a, weights_b = [], []
    for w, weight in zip(loras, weights, strict=True):
        ws = weight * w.scaling
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        weights_b.append(math.sqrt(abs(ws)))
    a = combine(method, [w.A for w in loras], torch.tensor(weights_a), spec.density, spec.majority_sign_method,
                generator)
    b = combine(method, [w.B for w in loras], torch.tensor(weights_b), spec.density, spec.majority_sign_method,
                generator)
    return a.to(loras[0].A.dtype), b.to(loras[0].B.dtype)


def _svd(method, loras, weights, new_rank, spec, generator, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine full deltas in PEFT's weight layout, then factor back to rank `new_rank` with an SVD."""
    transposed = loras[0].kind == "embedding" or not isinstance(module, nn.Linear)  # Conv1D / embedding layout
    deltas = [((w.B @ w.A).T if transposed else w.B @ w.A) * w.scaling for w in loras]
    kind = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = combine(kind, deltas, torch.tensor(weights), spec.density, spec.majority_sign_method, generator)
    if transposed:
        delta = delta.T
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    return vh[:new_rank, :], u
