"""Our merge functions against PEFT's merge_utils, with the same random state for DARE."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from service.merging import merge_functions as ours


@pytest.fixture()
def tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 10, generator=gen) for _ in range(3)]


WEIGHTS = torch.tensor([0.5, -1.2, 0.8])


@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_deterministic_functions(tensors, density, sign) -> None:
    assert torch.equal(ours.task_arithmetic(tensors, WEIGHTS), merge_utils.task_arithmetic(tensors, WEIGHTS))
    assert torch.equal(ours.magnitude_prune(tensors, WEIGHTS, density),
                       merge_utils.magnitude_prune(tensors, WEIGHTS, density))
    assert torch.equal(ours.ties(tensors, WEIGHTS, density, sign), merge_utils.ties(tensors, WEIGHTS, density, sign))


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_dare_with_the_same_random_state(tensors, density) -> None:
    torch.manual_seed(42)
    expected_linear = merge_utils.dare_linear(tensors, WEIGHTS, density)
    expected_ties = merge_utils.dare_ties(tensors, WEIGHTS, density, "total")
    gen = torch.Generator().manual_seed(42)
    assert torch.equal(ours.dare_linear(tensors, WEIGHTS, density, gen), expected_linear)
    assert torch.equal(ours.dare_ties(tensors, WEIGHTS, density, "total", gen), expected_ties)
