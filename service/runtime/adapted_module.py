"""The wrapper put in place of a base module that at least one loaded adapter changes.

A wrapper keeps the original module as `base_layer` (its only registered child, so parameters and
buffers stay those of the base model) and, per adapter, either the adapter type's `ModuleAdapter` (LoRA
weights, an IA3 vector, ...) or a whole replacement copy (modules_to_save), and, for an adapter whose file
carries its own embedding weights, the copy its rows run on in place of `base_layer`. Adapter tensors live in plain
dicts on purpose: they never appear in `named_parameters()`, and removing the dict entry is all it takes
to free them. When the last adapter leaves, the runtime puts `base_layer` back where the wrapper was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter_types.base import ModuleAdapter
from .errors import MixedBatchError
from .routing import Router, RowAssignment


class AdaptedModule(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, router: Router) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        # Not registered as a submodule: the router is shared by every wrapper of the model.
        object.__setattr__(self, "router", router)
        self.adapters: dict[str, ModuleAdapter] = {}
        self.replacements: dict[str, nn.Module] = {}
        self.bases: dict[str, nn.Module] = {}  # adapter id -> its own copy of the base module
        # The latest batch's adapters in their type's stacked form (e.g. adapter_types/lora/stacked.py), and their ids.
        self._stack: Any = None
        self._stack_ids: tuple[str, ...] | None = None
        # The fused adapter's merged copy of the base module: its rows run at bare-module speed.
        self.fused: tuple[str, nn.Module] | None = None

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)
        self.replacements.pop(adapter_id, None)
        self.bases.pop(adapter_id, None)
        self._stack = None  # it may hold a copy of the adapter's weights
        if self.fused is not None and self.fused[0] == adapter_id:
            self.fused = None

    @property
    def fused_id(self) -> str | None:
        return self.fused[0] if self.fused is not None else None

    @property
    def adapter_ids(self) -> set[str]:
        return set(self.adapters) | set(self.replacements) | set(self.bases)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        assignment = self.router.current()
        if assignment.groups is None:
            return self._forward_one(assignment.uniform, x, *args, **kwargs)
        groups = [g for g in assignment.groups if g.adapter_id in self.adapter_ids]
        if not groups:
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != assignment.batch_size:
            raise MixedBatchError(
                f"module '{self.module_name}' got input with first dimension {x.shape[0]}, not the batch size "
                f"{assignment.batch_size}; adapters on it cannot be mixed within one batch"
            )
        if args or kwargs or any(self._whole_module(g.adapter_id) for g in groups):
            return self._forward_split(assignment, x, *args, **kwargs)
        # Output-side adapters only: run the base once for the whole batch, then adapt each row group.
        y = self.base_layer(x)
        stacked = self._stacked(assignment, groups)
        if stacked is not None:
            stack, slots = stacked
            return stack.apply(x, y, slots)
        for g in groups:
            y[g.rows] = self.adapters[g.adapter_id].adapt_output(self.base_layer, x[g.rows], y[g.rows])
        return y

    def _whole_module(self, adapter_id: str | None) -> bool:
        """Whether these rows need their own run of a module: a copy, a fused copy, or a changed input."""
        if adapter_id in self.replacements or adapter_id in self.bases or adapter_id == self.fused_id:
            return True
        adapter = self.adapters.get(adapter_id) if adapter_id is not None else None
        return adapter is not None and adapter.changes_input

    def _stacked(self, assignment: RowAssignment, groups: list) -> tuple[Any, torch.Tensor] | None:
        """The stacked form of this batch's adapters and each row's slot, or None for the grouped path."""
        ids = tuple(g.adapter_id for g in groups)
        adapters = [self.adapters[i] for i in ids]
        kind = type(adapters[0])
        if len(ids) < 2 or any(type(a) is not kind for a in adapters):
            return None
        if self._stack is None or self._stack_ids != ids:
            stack = kind.stacked(ids, adapters)
            if stack is None:
                return None
            self._stack, self._stack_ids = stack, ids
        # Row -> slot map, shared by every module with the same adapters in this forward.
        slots = assignment.memo.get(ids)
        if slots is None:
            slots = torch.full((assignment.batch_size,), len(ids), dtype=torch.long, device=groups[0].rows.device)
            for k, g in enumerate(groups):
                slots[g.rows] = k
            assignment.memo[ids] = slots
        return self._stack, slots

    def _forward_one(self, adapter_id: str | None, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if adapter_id is None:
            return self.base_layer(x, *args, **kwargs)
        if adapter_id == self.fused_id:
            return self.fused[1](x, *args, **kwargs)
        replacement = self.replacements.get(adapter_id)
        if replacement is not None:
            return replacement(x, *args, **kwargs)
        base = self.bases.get(adapter_id, self.base_layer)
        adapter = self.adapters.get(adapter_id)
        if adapter is None:
            return base(x, *args, **kwargs)
        base_input = adapter.adapt_input(base, x) if adapter.changes_input else x
        y = base(base_input, *args, **kwargs)
        return adapter.adapt_output(base, x, y)

    def _forward_split(self, assignment: RowAssignment, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run every row group on its own (replacement copies are whole modules), then reassemble rows.

        Inner wrapped modules see a uniform assignment for their sub-batch.
        """
        batch = x.shape[0]
        out: torch.Tensor | None = None
        for g in assignment.groups or ():
            sub_args = [_rows(a, g.rows, batch) for a in args]
            sub_kwargs = {k: _rows(v, g.rows, batch) for k, v in kwargs.items()}
            with self.router.use(RowAssignment(uniform=g.adapter_id)):
                sub_out = self._forward_one(g.adapter_id, x[g.rows], *sub_args, **sub_kwargs)
            if not isinstance(sub_out, torch.Tensor):
                raise MixedBatchError(
                    f"module '{self.module_name}' returns {type(sub_out).__name__}, not a tensor; "
                    "its modules_to_save copies cannot be mixed within one batch"
                )
            if out is None:
                out = sub_out.new_empty((batch, *sub_out.shape[1:]))
            out[g.rows] = sub_out
        return out

    def extra_repr(self) -> str:
        return (f"name={self.module_name!r}, adapters={sorted(self.adapters)}, replaced={sorted(self.replacements)}, "
                f"own_base={sorted(self.bases)}")


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Select batch rows of tensor arguments; other arguments pass through unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    return value
