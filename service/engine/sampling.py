"""Next-token choice for each row of a batch, each row with its own settings and random generator."""

from __future__ import annotations

import torch

from .requests import SamplingParams


def row_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator per request: the same seed gives the same tokens whatever else is batched."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def pick_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """logits: (V,) float for one row."""
    if params.greedy:
        return int(torch.argmax(logits))
    # Shift so the best score is 0 before dividing: a tiny temperature then sends the rest to -inf (the greedy
    # limit) instead of overflowing every score to inf, which made softmax NaN (a 500 found by fuzzing).
    scores = logits.float()
    scores = (scores - scores.max()) / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop tokens once the mass before them already reaches top_p (the first token always stays)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop[0] = False  # explicitly: a top_p that rounds to 0 in float32 would drop it too (all -inf: NaN)
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
