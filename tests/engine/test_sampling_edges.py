"""Sampling stays a valid distribution at the edges of the accepted settings (found by the API fuzz test)."""

from __future__ import annotations

import torch

from service.engine.requests import SamplingParams
from service.engine.sampling import greedy_tokens, pick_token, row_generator


def test_tiny_temperature_samples_the_argmax_instead_of_failing():
    logits = torch.tensor([1.0, 7.5, -3.0, 7.0])
    for temperature in (1.401298464324817e-45, 5e-324, 1e-30):
        params = SamplingParams(temperature=temperature, top_p=5e-324, top_k=3, seed=0)
        assert pick_token(logits, params, row_generator(params, torch.device("cpu"))) == 1


def test_tiny_top_p_keeps_the_best_token():
    logits = torch.tensor([1.0, 7.5, -3.0, 7.0])
    for top_p in (5e-324, 1e-46):
        params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
        assert pick_token(logits, params, row_generator(params, torch.device("cpu"))) == 1


def test_blockwise_greedy_choice_is_argmax_with_its_ties_infinities_and_nans() -> None:
    """greedy_tokens takes the maximum by blocks (fast on CPU): the same index as argmax, the first maximum of each
    row, wherever its ties fall (same block, other blocks), for rows of -inf, +inf or NaN, and for any vocabulary."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(12, 32000, generator=gen)
    scores[1, [5, 6]] = 9.0  # a tie inside one block
    scores[2, [300, 31999]] = 9.0  # a tie across blocks
    scores[3, [127, 128]] = 9.0  # on either side of a block's edge
    scores[4] = float("-inf")  # everything masked (a grammar that allows nothing)
    scores[5, 7000] = float("inf")
    scores[6, [40, 20000]] = float("nan")
    scores[7] = 0.0  # all equal
    scores[8, 31999] = 9.0  # the very last score
    assert greedy_tokens(scores).tolist() == scores.argmax(dim=-1).tolist()
    assert greedy_tokens(scores)[:4].tolist() == [scores[0].argmax().item(), 5, 300, 127]
    half = scores.to(torch.bfloat16)
    assert greedy_tokens(half).tolist() == half.argmax(dim=-1).tolist()
    odd = scores[:, :1000]  # a vocabulary that is no multiple of the block: argmax itself
    assert greedy_tokens(odd).tolist() == odd.argmax(dim=-1).tolist()
    strided = torch.randn(3, 2, 32000, generator=gen)[:, -1, :]  # the last position's logits, not contiguous
    assert greedy_tokens(strided).tolist() == strided.argmax(dim=-1).tolist()
