"""Many adapters' LoRA on one module in one shot, for the decode steps of a mixed batch.

The A of every adapter in the stack are concatenated along the rank axis, A: (R, in) with R the sum of the
ranks, and likewise B: (out, R). One decode step of the whole batch is then three kernels whatever the number
of adapters or rows:

    h = x @ A.T            # (N, R): every row against every adapter's A
    h *= row_mask          # (B, R): row i keeps only its own adapter's columns, times that adapter's scaling
    y += h @ B.T           # (N, out)

Each adapter's weights are read once per step however many rows use it, and nothing is gathered per row,
so a step costs (sum of the batch's ranks) x (in + out) of weight traffic, the floor for a bandwidth-bound
decode. The extra multiply-adds against other rows' adapters are exact zeros; results equal the per-group
path up to floating-point accumulation order (scaling is applied before B, not after). The stack is built
once when an adapter it lacks joins the batch (the wrapper keeps a stack that still holds adapters which
left, `adapted_module.py`), and the row mask once per batch layout, shared by every module with the same
`layout_key`. Prefill (many tokens per row) uses the per-group path, where the k-fold extra compute of the
mask would show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .factors import LoraFactors


@dataclass(eq=False)
class StackedLora:
    adapter_ids: tuple[str, ...]
    A: torch.Tensor  # (R, in): the adapters' A stacked along the rank axis
    B: torch.Tensor  # (out, R)
    col_owner: torch.Tensor  # (R,) int64: index into adapter_ids of each rank column
    col_scale: torch.Tensor  # (R,) the owner's scaling, in A's dtype
    bias: torch.Tensor | None  # (n + 1, out) each adapter's lora_B bias times its scaling (row n: zeros), or None
    layout_key: tuple  # equal keys give equal row masks: ((adapter id, rank, scaling), ...)

    @classmethod
    def build(cls, adapter_ids: tuple[str, ...], loras: list[LoraFactors]) -> StackedLora:
        a = torch.cat([w.A for w in loras], dim=0)
        b = torch.cat([w.B for w in loras], dim=1)
        owner = torch.cat([torch.full((w.rank,), k, dtype=torch.long) for k, w in enumerate(loras)]).to(a.device)
        scale = torch.cat([torch.full((w.rank,), float(w.scaling), dtype=a.dtype) for w in loras]).to(a.device)
        bias = None
        if any(w.bias is not None for w in loras):
            bias = b.new_zeros((len(loras) + 1, b.shape[0]))
            for k, w in enumerate(loras):
                if w.bias is not None:
                    bias[k] = w.bias * w.scaling
        key = tuple((i, w.rank, float(w.scaling), w.bias is not None) for i, w in zip(adapter_ids, loras, strict=True))
        return cls(adapter_ids, a, b, owner, scale, bias, key)

    @staticmethod
    def eligible(loras: list[LoraFactors]) -> bool:
        """Plain linear LoRA (DoRA and embedding LoRA keep the grouped path)."""
        return all(w.kind == "linear" and w.dora_scale is None for w in loras)

    @property
    def rank_total(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.col_owner, self.col_scale, self.bias) if t is not None]

    def row_mask(self, row_adapters: tuple[str | None, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R): each row's scaling on its adapter's rank columns, 0 elsewhere; and (B,) each row's index in
        `adapter_ids` (n for rows of other adapters). Depends only on `layout_key`, never on weights."""
        index = {adapter_id: k for k, adapter_id in enumerate(self.adapter_ids)}
        slot = torch.tensor([index.get(a, len(index)) for a in row_adapters], dtype=torch.long, device=self.A.device)
        return (slot[:, None] == self.col_owner[None, :]).to(self.A.dtype) * self.col_scale, slot

    def apply(self, x: torch.Tensor, y: torch.Tensor, row_mask: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: (B, ..., in) input, y: (B, ..., out) base output (updated in place when dtypes allow)."""
        mask, slot = row_mask
        rows = x.shape[0]
        xa = x.reshape(-1, x.shape[-1])
        if xa.dtype != self.A.dtype:
            xa = xa.to(self.A.dtype)
        h = F.linear(xa, self.A)  # (N, R)
        if h.shape[0] == rows:
            h.mul_(mask)
        else:
            h.view(rows, -1, h.shape[-1]).mul_(mask[:, None, :])
        if y.dtype == self.A.dtype and y.is_contiguous() and self.bias is None:
            y.view(-1, y.shape[-1]).addmm_(h, self.B.t())
            return y
        delta = F.linear(h, self.B).view(rows, -1, y.shape[-1])  # (B, T, out)
        if self.bias is not None:
            delta = delta + self.bias[slot][:, None, :]
        return (y + delta.view(y.shape)).to(y.dtype)
