"""Decode one batch of requests together: left-padded prefill, then one token per row per step.

Each row may name a different adapter (the runtime routes rows), and has its own sampling settings and
stop conditions. Rows that finish early keep a slot until the batch ends (static batching).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime import AdapterRuntime
from .requests import GenerationRequest, GenerationResult
from .sampling import pick_token, row_generator


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return ids


@dataclass
class RowState:
    request: GenerationRequest
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def _advance(row: RowState, token: int, eos: set[int], tokenizer) -> None:
    """Record one token and decide whether the row is finished."""
    params = row.request.params
    if token in eos:
        row.finish_reason = "stop"
        return
    row.tokens.append(token)
    row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
    for stop in params.stop:
        cut = row.text.find(stop)
        if stop and cut >= 0:
            row.text = row.text[:cut]
            row.finish_reason = "stop"
            return
    if len(row.tokens) >= params.max_new_tokens:
        row.finish_reason = "length"


@torch.inference_mode()
def generate_batch(
    model: nn.Module, runtime: AdapterRuntime, tokenizer, requests: Sequence[GenerationRequest]
) -> list[GenerationResult]:
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    rows = [RowState(r, row_generator(r.params, device)) for r in requests]
    batch, width = len(requests), max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        n = len(r.prompt_ids)
        input_ids[i, width - n:] = torch.tensor(r.prompt_ids, device=device)
        attention[i, width - n:] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with runtime.route([r.adapter_id for r in requests]):
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        while True:
            logits = out.logits[:, -1, :]  # (B, V)
            next_ids = torch.full((batch, 1), pad_id, dtype=torch.long, device=device)
            for i, row in enumerate(rows):
                if row.finish_reason is None:
                    token = pick_token(logits[i], row.request.params, row.generator)
                    _advance(row, token, eos, tokenizer)
                    next_ids[i, 0] = token
            if all(row.finish_reason for row in rows):
                break
            attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=next_ids, attention_mask=attention, position_ids=positions,
                past_key_values=out.past_key_values, use_cache=True,
            )
    return [
        GenerationResult(row.tokens, row.text, row.finish_reason or "length", len(row.request.prompt_ids))
        for row in rows
    ]
