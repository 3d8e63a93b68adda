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
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from .adapter_types.base import ModuleAdapter
from .errors import MixedBatchError
from .routing import Router, RowAssignment, RowGroup

# A stack is kept while it holds at most this multiple of the rank the batch needs: adapters that left the
# batch cost reads of their weights each step until the next rebuild, and a rebuild costs one copy.
STACK_SLACK = 2.0


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
        # Adapters of recent batches in their type's stacked form (e.g. adapter_types/lora/stacked.py). It may
        # hold adapters that have left the batch: it is rebuilt only when an adapter it lacks joins.
        self._stack: Any = None
        # What this module does for one batch layout, computed at its first forward and reused by every decode
        # step with the same layout: (assignment, router generation, one token per row) -> _Plan.
        self._plan_key: tuple[RowAssignment, int, bool] | None = None
        self._plan: _Plan | None = None
        # The fused adapter's merged copy of the base module: its rows run at bare-module speed.
        self.fused: tuple[str, nn.Module] | None = None

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)
        self.replacements.pop(adapter_id, None)
        self.bases.pop(adapter_id, None)
        self._stack = None  # it may hold a copy of the adapter's weights
        self._plan_key = self._plan = None
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
        plan = self._plan
        decode = x.numel() == x.shape[0] * x.shape[-1]  # one token per row
        key = self._plan_key
        if key is None or key[0] is not assignment or key[1] != self.router.generation or key[2] != decode:
            plan = self._make_plan(assignment, decode)
        if plan.mode == "base":
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] != assignment.batch_size:
            raise MixedBatchError(
                f"module '{self.module_name}' got input with first dimension {x.shape[0]}, not the batch size "
                f"{assignment.batch_size}; adapters on it cannot be mixed within one batch"
            )
        if args or kwargs or plan.mode == "split":
            return self._forward_split(assignment, x, *args, **kwargs)
        # Output-side adapters only: run the base once for the whole batch, then adapt the rows.
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias) if plan.plain_linear else base(x)
        if plan.stack is not None:  # a decode step
            return plan.stack.apply(x, y, plan.layout)
        for g in plan.groups:
            adapter = self.adapters[g.adapter_id]
            if g.span is None:
                y[g.rows] = adapter.adapt_output(self.base_layer, x[g.rows], y[g.rows])
                continue
            rows = y[g.span[0]:g.span[1]]  # contiguous rows (the engine groups them): views, no gather or scatter
            out = adapter.adapt_output(self.base_layer, x[g.span[0]:g.span[1]], rows)
            if out is not rows:
                rows.copy_(out)
        return y

    def _make_plan(self, assignment: RowAssignment, decode: bool) -> _Plan:
        held = self.adapter_ids
        groups = [g for g in assignment.groups or () if g.adapter_id in held]
        if not groups:
            plan = _Plan("base", groups)
        elif any(self._whole_module(g.adapter_id) for g in groups):
            plan = _Plan("split", groups)
        else:
            plan = _Plan("rows", groups)
            # Decode steps only: a prefill's adapters differ from the running batch's, and building their stack
            # would cost a copy of their weights per module at every admission, then another at the next step.
            stack = self._stack_for(tuple(g.adapter_id for g in groups)) if decode else None
            if stack is not None:
                # The layout depends only on the rows' adapters and the stack's layout key: shared across modules.
                key = ("stack_layout", stack.layout_key)
                layout = assignment.memo.get(key)
                if layout is None:
                    layout = assignment.memo[key] = stack.layout(assignment.row_adapters)
                plan.stack, plan.layout = stack, layout
            plan.plain_linear = _plain_linear(self.base_layer)
        self._plan_key, self._plan = (assignment, self.router.generation, decode), plan
        return plan

    def _whole_module(self, adapter_id: str | None) -> bool:
        """Whether these rows need their own run of a module: a copy, a fused copy, or a changed input."""
        if adapter_id in self.replacements or adapter_id in self.bases or adapter_id == self.fused_id:
            return True
        adapter = self.adapters.get(adapter_id) if adapter_id is not None else None
        return adapter is not None and adapter.changes_input

    def _stack_for(self, ids: tuple[str, ...]) -> Any | None:
        """A stacked form holding at least these adapters, or None for the per-group path.

        The current stack is kept while it holds every adapter of the batch and at most `STACK_SLACK` times the
        rank the batch needs.
        """
        adapters = [self.adapters[i] for i in ids]
        kind = type(adapters[0])
        if any(type(a) is not kind for a in adapters):
            return None
        stack = self._stack
        if stack is not None:
            held = set(stack.adapter_ids)
            needed = sum(getattr(a, "rank", 1) for a in adapters)
            if held.issuperset(ids) and getattr(stack, "rank_total", 0) <= STACK_SLACK * needed:
                return stack
        self._stack = kind.stacked(ids, adapters)
        return self._stack

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


class _Plan:
    """What a wrapper does for one batch layout: run the base only, split the batch per adapter, or adapt
    the output of rows (`stack` and `layout` set when the adapters' stacked form applies)."""

    __slots__ = ("mode", "groups", "stack", "layout", "plain_linear")

    def __init__(self, mode: str, groups: list[RowGroup]) -> None:
        self.mode = mode  # "base" | "split" | "rows"
        self.groups = groups
        self.stack: Any = None
        self.layout: Any = None  # the stack's form of this batch layout (`ModuleAdapter.stacked`)
        self.plain_linear = False  # base_layer is a bare nn.Linear: call F.linear, skipping Module.__call__


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear (not a subclass) with no hooks of its own or global ones: `F.linear` on its weight and bias
    is exactly its forward."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not _torch_module._global_forward_hooks and not _torch_module._global_forward_pre_hooks)


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Select batch rows of tensor arguments; other arguments pass through unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    return value
