"""A snapshot of the pristine base model's module tree, taken once before any adapter is loaded.

Adapters are matched against these names and shapes, never against the live tree (which contains our
wrappers), so loading adapter B sees the same model that adapter A saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .targeting import all_linear_names


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class ModelIndex:
    modules: dict[str, nn.Module]  # module name -> original module object (root excluded)
    parents: dict[str, tuple[nn.Module, str]]  # module name -> (original parent object, attribute name)
    state: dict[str, TensorSpec]  # pristine state_dict key -> shape/dtype
    all_linear: set[str]

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelIndex:
        modules = {name: m for name, m in model.named_modules() if name}
        parents: dict[str, tuple[nn.Module, str]] = {}
        for name in modules:
            parent_name, _, attr = name.rpartition(".")
            parents[name] = (modules[parent_name] if parent_name else model, attr)
        state = {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
        output_name = None
        get_out = getattr(model, "get_output_embeddings", None)
        out_emb = get_out() if callable(get_out) else None
        if out_emb is not None:
            output_name = next((n for n, m in modules.items() if m is out_emb), None)
        return cls(modules, parents, state, all_linear_names(modules, output_name))

    def module_state(self, name: str) -> dict[str, TensorSpec]:
        """Pristine state_dict entries of one module, keys relative to it."""
        prefix = name + "."
        return {k[len(prefix):]: spec for k, spec in self.state.items() if k.startswith(prefix)}
