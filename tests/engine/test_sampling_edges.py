"""Sampling stays a valid distribution at the edges of the accepted settings (found by the API fuzz test)."""

from __future__ import annotations

import torch

from service.engine.requests import SamplingParams
from service.engine.sampling import pick_token, row_generator


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
