"""Many adapters' LoRA on one module in one shot: gather each row's A/B and use batched matmuls.

The grouped path costs a handful of small kernels per (module, adapter) pair, so a batch mixing eight
adapters pays eight times the Python and dispatch overhead. Here the A/B of every adapter in the batch
are stacked once (zero-padded to the largest rank; one extra all-zero slot for rows without LoRA on this
module) and each step runs two `bmm`s per module whatever the number of adapters, as in punica/S-LoRA's
gathered matmul. Zero padding adds exact zeros, so results equal the grouped path up to matmul
accumulation order (well within 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .factors import LoraFactors


@dataclass(eq=False)
class StackedLora:
    adapter_ids: tuple[str, ...]
    A: torch.Tensor  # (n + 1, r_max, in), slot n is all zeros
    B: torch.Tensor  # (n + 1, out, r_max)
    bias: torch.Tensor | None  # (n + 1, out) or None when no adapter has a lora_B bias
    scaling: torch.Tensor  # (n + 1,)

    @classmethod
    def build(cls, adapter_ids: tuple[str, ...], loras: list[LoraFactors]) -> StackedLora:
        first = loras[0]
        r_max = max(w.rank for w in loras)
        n_in, n_out = first.A.shape[1], first.B.shape[0]
        a = first.A.new_zeros((len(loras) + 1, r_max, n_in))
        b = first.B.new_zeros((len(loras) + 1, n_out, r_max))
        for i, w in enumerate(loras):
            a[i, : w.rank] = w.A
            b[i, :, : w.rank] = w.B
        bias = None
        if any(w.bias is not None for w in loras):
            bias = first.B.new_zeros((len(loras) + 1, n_out))
            for i, w in enumerate(loras):
                if w.bias is not None:
                    bias[i] = w.bias
        scaling = torch.tensor([w.scaling for w in loras] + [0.0], dtype=first.A.dtype, device=first.A.device)
        return cls(adapter_ids, a, b, bias, scaling)

    @staticmethod
    def eligible(loras: list[LoraFactors]) -> bool:
        """Plain linear LoRA only (DoRA and embedding LoRA keep the grouped path)."""
        return all(w.kind == "linear" and w.dora_scale is None for w in loras)

    _rows: tuple | None = None  # (slots, A_t, B_t, bias, scaling) gathered for the latest row layout

    def _gathered(self, slots: torch.Tensor) -> tuple:
        """Per-row weights; decode steps reuse the same `slots` tensor, so the gather runs once per layout."""
        if self._rows is None or self._rows[0] is not slots:
            bias = self.bias[slots][:, None, :] if self.bias is not None else None
            self._rows = (
                slots,
                self.A[slots].transpose(1, 2),  # (B, in, r)
                self.B[slots].transpose(1, 2),  # (B, r, out)
                bias,
                self.scaling[slots][:, None, None],
            )
        return self._rows[1:]

    def apply(self, x: torch.Tensor, y: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x: (B, ..., in) input, y: (B, ..., out) base output, slots: (B,) stack slot of each row."""
        a_t, b_t, bias, scaling = self._gathered(slots)
        xa = x.to(self.A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        delta = torch.bmm(torch.bmm(xa, a_t), b_t)  # (B, T, out)
        if bias is not None:
            delta = delta + bias
        delta = delta * scaling
        return (y + delta.reshape(y.shape)).to(y.dtype)
