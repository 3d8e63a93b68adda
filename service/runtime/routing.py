"""Which adapter each row of the batch in flight uses.

One `Router` is shared by every wrapped module of a model. Before a forward pass the runtime pushes a
`RowAssignment`; wrapped modules read it to pick, per row group, the adapter to apply. Assignments form a
stack so that a module that runs a sub-batch through an inner module (a modules_to_save copy holding
LoRA-wrapped children) can narrow the assignment to that sub-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowGroup:
    adapter_id: str | None  # None = base model
    rows: torch.Tensor  # (n,) int64 row indices into the batch, on the model device
    span: tuple[int, int] | None = None  # (first, stop) when the rows are contiguous: slices instead of gathers


@dataclass(frozen=True)
class RowAssignment:
    """Either one adapter for the whole batch (`groups` is None) or disjoint row groups."""

    uniform: str | None = None
    groups: tuple[RowGroup, ...] | None = None
    batch_size: int | None = None
    row_adapters: tuple[str | None, ...] = ()  # each row's adapter, in batch order (mixed batches only)
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # per-forward values modules share

    @property
    def adapter_ids(self) -> set[str | None]:
        if self.groups is None:
            return {self.uniform}
        return {g.adapter_id for g in self.groups}

    @staticmethod
    def for_rows(row_adapters: Sequence[str | None], device: torch.device) -> RowAssignment:
        """Group rows by adapter, keeping first-seen order; one adapter for all rows stays uniform."""
        positions: dict[str | None, list[int]] = {}
        for i, adapter_id in enumerate(row_adapters):
            positions.setdefault(adapter_id, []).append(i)
        if len(positions) == 1:
            return RowAssignment(uniform=next(iter(positions)))
        groups = tuple(
            RowGroup(adapter_id, torch.tensor(rows, dtype=torch.long, device=device),
                     (rows[0], rows[-1] + 1) if rows[-1] - rows[0] == len(rows) - 1 else None)
            for adapter_id, rows in positions.items()
        )
        return RowAssignment(groups=groups, batch_size=len(row_adapters), row_adapters=tuple(row_adapters))


class Router:
    """Holds the current row assignment; the default is the active adapter for every row."""

    def __init__(self) -> None:
        self.active: str | None = None
        self._stack: list[RowAssignment] = []
        # Bumped whenever an adapter is attached, removed, fused or unfused: wrappers drop what they cached
        # for a batch layout (which adapters run where) when it changes.
        self.generation = 0

    def current(self) -> RowAssignment:
        return self._stack[-1] if self._stack else RowAssignment(uniform=self.active)

    @contextmanager
    def use(self, assignment: RowAssignment) -> Iterator[None]:
        self._stack.append(assignment)
        try:
            yield
        finally:
            self._stack.pop()
