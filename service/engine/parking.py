"""Rows held out of the running batch while their adapter's weights are swapped out (preemption).

A parked row keeps everything the next decode step needs: its keys/values (only its real columns, left-padded as
in the batch), its attention-mask row, the position id and the token it decodes next. Its `Sequence` keeps the
rest (tokens, generator, grammar, penalty counts). Re-joining the batch goes through the same left-padded merge
as a prefill, so a resumed row decodes exactly the tokens it would have without the pause (swap, not recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import kv_cache
from .sequence import Sequence


@dataclass(eq=False)
class ParkedRows:
    """One adapter's parked requests: prefilled rows (with their batch state) and ones not prefilled yet."""

    rows: list[Sequence] = field(default_factory=list)  # in the order of the tensors below
    cache: kv_cache.GrowingCache | None = None  # per layer (P, heads, L, head_dim)
    mask: torch.Tensor | None = None  # (P, L) 1 = real position
    next_pos: torch.Tensor | None = None  # (P,) position id of each row's next token
    last: torch.Tensor | None = None  # (P,) the token each row feeds to its next decode step
    waiting: list[Sequence] = field(default_factory=list)  # parked before their prefill, in arrival order

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def all(self) -> list[Sequence]:
        return [*self.rows, *self.waiting]

    def add(self, rows: list[Sequence], cache: kv_cache.GrowingCache, mask: torch.Tensor, next_pos: torch.Tensor,
            last: torch.Tensor) -> None:
        """Hold more rows (taken out of the batch with `kv_cache.take_rows`)."""
        if self.cache is None:
            self.cache, self.mask, self.next_pos, self.last = cache, mask, next_pos, last
        else:
            self.cache, self.mask = kv_cache.merge(self.cache, self.mask, cache, mask)
            self.next_pos, self.last = torch.cat([self.next_pos, next_pos]), torch.cat([self.last, last])
        self.rows += rows

    def prune(self) -> None:
        """Drop cancelled requests (their callers have left or timed out) and free their keys/values."""
        self.waiting = [s for s in self.waiting if not s.cancelled]
        keep = [i for i, s in enumerate(self.rows) if not s.cancelled and s.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_pos = self.last = None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = kv_cache.select_rows(self.cache, self.mask, index)
        self.next_pos, self.last = self.next_pos[index], self.last[index]
