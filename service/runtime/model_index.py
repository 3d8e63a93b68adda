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
    # The input and output embedding modules (PEFT's save_embedding_layers writes their full weights).
    embeddings: tuple[str, ...] = ()

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelIndex:
        modules = {name: m for name, m in model.named_modules() if name}
        parents: dict[str, tuple[nn.Module, str]] = {}
        for name in modules:
            parent_name, _, attr = name.rpartition(".")
            parents[name] = (modules[parent_name] if parent_name else model, attr)
        state = {k: TensorSpec(tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
        input_name, output_name = (_module_name(model, modules, getter)
                                   for getter in ("get_input_embeddings", "get_output_embeddings"))
        embeddings = tuple(n for n in (input_name, output_name) if n is not None and f"{n}.weight" in state)
        return cls(modules, parents, state, all_linear_names(modules, output_name), embeddings)

    @property
    def vocab_size(self) -> int | None:
        """Rows of the input (else output) embedding: the served model's vocabulary."""
        return self.state[f"{self.embeddings[0]}.weight"].shape[0] if self.embeddings else None

    def module_state(self, name: str) -> dict[str, TensorSpec]:
        """Pristine state_dict entries of one module, keys relative to it."""
        prefix = name + "."
        return {k[len(prefix):]: spec for k, spec in self.state.items() if k.startswith(prefix)}


def _module_name(model: nn.Module, modules: dict[str, nn.Module], getter: str) -> str | None:
    """Name of the module a transformers getter (`get_input_embeddings`, ...) returns, if any."""
    get = getattr(model, getter, None)
    try:
        found = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # a model class that does not implement the getter
        return None
    return next((n for n, m in modules.items() if m is found), None) if found is not None else None
