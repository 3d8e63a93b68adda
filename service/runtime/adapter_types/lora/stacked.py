"""Many adapters' LoRA on one module in a few kernels, for the decode steps of a mixed batch.

The A of every adapter in the stack are concatenated along the rank axis, A: (R, in) with R the sum of the
ranks, and likewise B, kept transposed as Bt: (R, out) so that any run of adapters is a contiguous block of
rows of both. One decode step of the whole batch can then be three kernels whatever the number of adapters
or rows:

    h = x @ A.T            # (N, R): every row against every adapter's A
    h *= mask              # (N, R): row i keeps only its own adapter's columns, times that adapter's scaling
    y += h @ Bt            # (N, out)

Each adapter's weights are read once per step however many rows use it, and nothing is gathered per row.
But every row also multiplies against every other adapter's columns (exact zeros after the mask): N x R x
(in + out) multiply-adds where the rows need only the sum of their own ranks x (in + out). With many
adapters of large ranks on a CPU, where a small matmul is compute-bound, that waste costs more than the base
layer itself. So a batch layout is cut into segments, runs of adapters that are adjacent in the stack
(built in descending rank order, so that similar ranks sit together), each applied to only its own rows:

    xs = x[perm]                                  # (n, in): rows sorted by segment
    for each segment (rows r0:r1, columns c0:c1):
        h = xs[r0:r1] @ A[c0:c1].T; h *= mask     # (rows, cols)
        delta[r0:r1] = h @ Bt[c0:c1]              # (rows, out)
    y += delta[unperm]                            # back in batch order; rows without an adapter add 0

When each adapter's rows are one contiguous run of the batch (the engine keeps its rows grouped by adapter,
`engine/scheduler.py`), a CPU step needs neither the sort nor the mask: two kernels per adapter, each on its own
rows and its own columns only, adding into the base output in place (prefills take the per-group path, on
slices of rows too: `adapted_module.py`):

    for each adapter with rows (rows r0:r1, columns c0:c1):
        y[r0:r1] += scaling * ((x[r0:r1] @ A[c0:c1].T) @ Bt[c0:c1])

and k adapters of one rank r, scaling and row count m that sit side by side both in the batch and in the stack
(adapters trained with one recipe) take two batched matmuls for all of them, as views, no copy:

    y[r0:r1].view(k, m, out) += scaling * bmm(bmm(x[r0:r1].view(k, m, in), A[c0:c1].view(k, r, in).T), Bt[...])

Otherwise each extra segment costs a few kernel launches; `partition` picks the cut that minimises multiply-adds plus
launches priced at `launch_cost(device)` multiply-adds (high on CUDA, where one stack of three kernels stays
best). Results equal the per-group path up to floating-point accumulation order (scaling is applied before
B, not after). The stack is built once when an adapter it lacks joins the batch (the wrapper keeps a stack
that still holds adapters which left, `adapted_module.py`), and the layout once per batch layout, shared by
every module with the same `layout_key`. Prefill (many tokens per row) uses the per-group path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .factors import LoraFactors

# What one more kernel launch (with its Python around it) costs, in multiply-adds of a small fp32 matmul: about
# 6 us against about 25 multiply-adds per ns on one CPU core (measured on the engine_bench model). On other
# devices launches dominate at decode sizes: one segment.
LAUNCH_COST_MACS = {"cpu": 150_000.0}
DEFAULT_LAUNCH_COST_MACS = 1e12
# A cut must promise at least this much less work than the whole-batch stack: its smaller matmuls run slower per
# multiply-add than the cost model assumes, so near-ties measured worse (8 rank-16 adapters, 2 rows each).
CUT_GAIN = 0.8


def launch_cost(device: torch.device) -> float:
    return LAUNCH_COST_MACS.get(device.type, DEFAULT_LAUNCH_COST_MACS)


@dataclass(eq=False)
class StackLayout:
    """How one batch layout runs on a stack: `runs` (row start, row end, column start, column end, scaling,
    adapters) per block of adapters whose rows are contiguous (`_blocks`); else `segments` None for the
    whole-batch path (three kernels), or (row start, row end, column start, column end, mask) per segment over
    the rows sorted by `perm`."""

    mask: torch.Tensor  # whole batch: (B, R); segments: unused (empty)
    slot: torch.Tensor  # (B,) each row's index in adapter_ids (n for rows of other adapters), for the bias
    perm: torch.Tensor | None = None  # (n,) the batch rows that use the stack, grouped by segment
    unperm: torch.Tensor | None = None  # (B,) each batch row's position in perm (n: a zero row, no adapter here)
    segments: tuple[tuple[int, int, int, int, torch.Tensor], ...] | None = None
    runs: tuple[tuple[int, int, int, int, float, int], ...] | None = None


@dataclass(eq=False)
class StackedLora:
    adapter_ids: tuple[str, ...]
    A: torch.Tensor  # (R, in): the adapters' A stacked along the rank axis
    Bt: torch.Tensor  # (R, out): the adapters' B, transposed and stacked likewise
    ranks: tuple[int, ...]  # each adapter's rank, in stack order
    scalings: tuple[float, ...]
    col_owner: torch.Tensor  # (R,) int64: index into adapter_ids of each rank column
    col_scale: torch.Tensor  # (R,) the owner's scaling, in A's dtype
    bias: torch.Tensor | None  # (n + 1, out) each adapter's lora_B bias times its scaling (row n: zeros), or None
    layout_key: tuple  # equal keys give equal layouts: ((adapter id, rank, scaling), ...) and the module's shape

    @classmethod
    def build(cls, adapter_ids: tuple[str, ...], loras: list[LoraFactors]) -> StackedLora:
        # Descending rank (stable): segments are runs of adjacent adapters, and similar ranks belong together.
        order = sorted(range(len(loras)), key=lambda k: -loras[k].rank)
        adapter_ids, loras = tuple(adapter_ids[k] for k in order), [loras[k] for k in order]
        a = torch.cat([w.A for w in loras], dim=0)
        bt = torch.cat([w.B.t() for w in loras], dim=0)  # contiguous (R, out)
        owner = torch.cat([torch.full((w.rank,), k, dtype=torch.long) for k, w in enumerate(loras)]).to(a.device)
        scale = torch.cat([torch.full((w.rank,), float(w.scaling), dtype=a.dtype) for w in loras]).to(a.device)
        bias = None
        if any(w.bias is not None for w in loras):
            bias = bt.new_zeros((len(loras) + 1, bt.shape[1]))
            for k, w in enumerate(loras):
                if w.bias is not None:
                    bias[k] = w.bias * w.scaling
        members = tuple((i, w.rank, float(w.scaling), w.bias is not None)
                        for i, w in zip(adapter_ids, loras, strict=True))
        key = (members, a.shape[1], bt.shape[1], a.device)  # in/out features: the cost of a cut depends on them
        return cls(adapter_ids, a, bt, tuple(w.rank for w in loras), tuple(float(w.scaling) for w in loras),
                   owner, scale, bias, key)

    @staticmethod
    def eligible(loras: list[LoraFactors]) -> bool:
        """Plain linear LoRA (DoRA and embedding LoRA keep the grouped path)."""
        return all(w.kind == "linear" and w.dora_scale is None for w in loras)

    @property
    def rank_total(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.Bt, self.col_owner, self.col_scale, self.bias) if t is not None]

    def layout(self, row_adapters: tuple[str | None, ...]) -> StackLayout:
        """How this batch layout runs (row_adapters: each row's adapter id or None, in batch order). Depends only
        on `layout_key`, never on weights."""
        index = {adapter_id: k for k, adapter_id in enumerate(self.adapter_ids)}
        n = len(index)
        slots = [index.get(a, n) for a in row_adapters]
        device = self.A.device
        slot = torch.tensor(slots, dtype=torch.long, device=device)
        counts = [0] * n
        for s in slots:
            if s < n:
                counts[s] += 1
        starts = [0]
        for r in self.ranks:
            starts.append(starts[-1] + r)
        runs = _runs(slots, n) if self.bias is None else None
        width, launch = self.A.shape[1] + self.Bt.shape[1], launch_cost(device)
        if runs is not None:
            blocks = _blocks(runs, self.ranks, starts, self.scalings)
            # Two launches per block and only its adapters' own multiply-adds, against the whole-batch stack's
            # three launches and every row times every column (many adapters of large rank: runs; 8 rank-16
            # adapters of 2 rows each: one block).
            if (2 * launch * len(blocks) + sum(counts[k] * self.ranks[k] for k in runs) * width
                    < 3 * launch + len(slots) * self.rank_total * width):
                return StackLayout(self.A.new_empty(0), slot, runs=blocks)
        segments = None if self.bias is not None else partition(counts, self.ranks, width, len(slots), launch)
        if segments is None:
            mask = (slot[:, None] == self.col_owner[None, :]).to(self.A.dtype) * self.col_scale  # (B, R)
            return StackLayout(mask, slot)
        rows: list[int] = []
        out = []
        for first, last in segments:  # adapters first..last-1
            r0 = len(rows)
            segment_rows = [i for i, s in enumerate(slots) if first <= s < last]
            rows += segment_rows
            c0, c1 = starts[first], starts[last]
            seg_slot = slot[segment_rows]
            mask = (seg_slot[:, None] == self.col_owner[None, c0:c1]).to(self.A.dtype) * self.col_scale[c0:c1]
            out.append((r0, len(rows), c0, c1, mask))
        unperm = [len(rows)] * len(slots)
        for position, row in enumerate(rows):
            unperm[row] = position
        return StackLayout(self.A.new_empty(0), slot, torch.tensor(rows, dtype=torch.long, device=device),
                           torch.tensor(unperm, dtype=torch.long, device=device), tuple(out))

    def apply(self, x: torch.Tensor, y: torch.Tensor, layout: StackLayout) -> torch.Tensor:
        """One decode step: x (B, ..., in) input with one token per row, y (B, ..., out) base output (updated in
        place when dtypes allow)."""
        xa = x.reshape(x.shape[0], x.shape[-1])
        if xa.dtype != self.A.dtype:
            xa = xa.to(self.A.dtype)
        in_place = y.dtype == self.A.dtype and y.is_contiguous()
        # (B, out): y itself, or a copy in the adapter dtype (half bases add in fp32 and round once, as PEFT)
        acc = y.view(y.shape[0], y.shape[-1]) if in_place else y.reshape(y.shape[0], y.shape[-1]).to(
            self.A.dtype, copy=True)
        if layout.runs is not None:
            for r0, r1, c0, c1, scaling, k in layout.runs:
                if k == 1:  # (rows, in) @ (in, cols) @ (cols, out), into y's rows
                    acc[r0:r1].addmm_(F.linear(xa[r0:r1], self.A[c0:c1]), self.Bt[c0:c1], alpha=scaling)
                    continue
                # k adapters of m rows and rank r each, side by side in rows and columns: one batched matmul each
                m, r = (r1 - r0) // k, (c1 - c0) // k
                h = torch.bmm(xa[r0:r1].reshape(k, m, -1), self.A[c0:c1].view(k, r, -1).transpose(1, 2))  # (k, m, r)
                acc[r0:r1].view(k, m, -1).baddbmm_(h, self.Bt[c0:c1].view(k, r, -1), alpha=scaling)  # (k, m, out)
        elif layout.segments is None:
            h = F.linear(xa, self.A).mul_(layout.mask)  # (B, R)
            if self.bias is None:
                acc.addmm_(h, self.Bt)
            else:
                acc += torch.mm(h, self.Bt) + self.bias[layout.slot]
        else:
            xs = xa.index_select(0, layout.perm)  # (n, in)
            delta = acc.new_empty((xs.shape[0] + 1, acc.shape[1]))  # (n + 1, out); row n stays zero
            delta[-1] = 0
            for r0, r1, c0, c1, mask in layout.segments:
                h = F.linear(xs[r0:r1], self.A[c0:c1]).mul_(mask)  # (rows, cols)
                torch.mm(h, self.Bt[c0:c1], out=delta[r0:r1])
            acc.add_(delta.index_select(0, layout.unperm))  # back in batch order (a gather beats index_add_)
        if in_place:
            return y
        return acc.to(y.dtype).view(y.shape)


def _runs(slots: list[int], n: int) -> dict[int, tuple[int, int]] | None:
    """Each stack adapter's rows as one run [r0, r1) of the batch (slot n: a row without an adapter here), or
    None when some adapter's rows are not contiguous."""
    runs: dict[int, tuple[int, int]] = {}
    for row, k in enumerate(slots):
        if k == n:
            continue
        r0, r1 = runs.get(k, (row, row))
        if r1 != row:
            return None
        runs[k] = (r0, row + 1)
    return runs


def _blocks(runs: dict[int, tuple[int, int]], ranks: tuple[int, ...], starts: list[int],
            scalings: tuple[float, ...]) -> tuple[tuple[int, int, int, int, float, int], ...]:
    """The runs (stack adapter k -> its rows [r0, r1), in batch order) as blocks (row start, row end, column
    start, column end, scaling, adapters): adapters next to each other both in the batch and in the stack, of
    one rank, row count and scaling, join one block that two batched matmuls apply (equal-rank adapters are
    adjacent in the stack, in the order the batch had when it was built)."""
    blocks: list[list] = []
    previous = -1
    for k, (r0, r1) in runs.items():
        last = blocks[-1] if blocks else None
        if (last is not None and k == previous + 1 and r0 == last[1] and ranks[k] == ranks[previous]
                and r1 - r0 == (last[1] - last[0]) // last[5] and scalings[k] == last[4]):
            last[1], last[3], last[5] = r1, starts[k + 1], last[5] + 1
        else:
            blocks.append([r0, r1, starts[k], starts[k + 1], scalings[k], 1])
        previous = k
    return tuple(tuple(b) for b in blocks)


def partition(counts: list[int], ranks: tuple[int, ...], width: int, batch: int,
              launch: float) -> list[tuple[int, int]] | None:
    """Runs [first, last) of adapters (in stack order) to apply separately, or None for the whole-batch path.

    counts[k] = rows of adapter k in the batch, ranks[k] its rank, width = in + out features. The whole-batch
    path costs batch x R x width multiply-adds and three launches; a cut costs two launches (sort the rows, add
    the result back) plus, per segment, three launches and its rows x its ranks x width, and is taken only when
    it costs under `CUT_GAIN` of the whole. Adapters without rows between segments cost nothing; within one they
    cost their columns.
    """
    n = len(counts)
    whole = 3 * launch + batch * sum(ranks) * width
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cover of the rows of adapters 0..j-1
    back: list[tuple[int, bool]] = [(0, False)] * (n + 1)  # (i, whether i..j-1 is a segment)
    for j in range(1, n + 1):
        if counts[j - 1] == 0:
            best[j], back[j] = best[j - 1], (j - 1, False)  # adapter j-1 left out
        rows = cols = 0
        for i in range(j - 1, -1, -1):
            rows, cols = rows + counts[i], cols + ranks[i]
            if rows and best[i] + 3 * launch + rows * cols * width < best[j]:
                best[j], back[j] = best[i] + 3 * launch + rows * cols * width, (i, True)
    if best[n] + 2 * launch >= CUT_GAIN * whole:
        return None
    segments = []
    j = n
    while j > 0:
        i, is_segment = back[j]
        if is_segment:
            segments.append((i, j))
        j = i
    return segments[::-1]
