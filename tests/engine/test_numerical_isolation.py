"""An adapter whose finite but huge weights overflow the model's scores fails its own request only."""

from __future__ import annotations

import asyncio

import pytest
from oracle import huge_copy

from service.engine import GenerationRequest, SamplingParams, TokenEvent
from service.errors import NonFiniteLogitsError


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_only_the_overflowing_request_fails(make_engine, demo_tokenizer, demo_adapters, peft_greedy, tmp_path,
                                            temperature) -> None:
    engine = make_engine(max_batch_size=4)
    engine.call_sync(lambda runtime: runtime.load("huge", huge_copy(demo_adapters["c"], tmp_path / "huge")))
    prompt = "Serving many adapters at once"
    ids = demo_tokenizer(prompt)["input_ids"]

    async def scenario():
        healthy = engine.submit(GenerationRequest(ids, "b", SamplingParams(max_new_tokens=12)))
        first = await anext(aiter(healthy.events()))  # the healthy row is running before the bad one joins
        bad = engine.submit(GenerationRequest(ids, "huge", SamplingParams(max_new_tokens=12, temperature=temperature,
                                                                           seed=1)))
        with pytest.raises(NonFiniteLogitsError) as failure:
            await bad.result()
        tokens = [first.token_id] if isinstance(first, TokenEvent) else []
        async for event in healthy.events():
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
        after = await engine.generate(GenerationRequest(ids, "a", SamplingParams(max_new_tokens=5)))
        return failure.value, tokens, after.token_ids

    error, tokens, after = asyncio.run(scenario())
    assert error.code == "non_finite_logits" and "'huge'" in error.message and error.details["adapter_id"] == "huge"
    assert tokens == peft_greedy("b", prompt, 12), "the other row goes on, PEFT-exact"
    assert after == peft_greedy("a", prompt, 5), "the engine keeps serving"


def test_finite_rows_flags_nan_and_infinities_only() -> None:
    """The cheap check (each row's sum) never passes a NaN or an infinity, and finite logits whose sum overflows
    (row 1) are not failed."""
    import torch

    from service.engine.scheduler import finite_rows

    big = torch.finfo(torch.float32).max
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 2.0, 3.0], [big, big, 1.0], [1.0, nan, 2.0], [inf, -inf, 0.0], [-inf, 1.0, 1.0]])
    assert finite_rows(logits) == [True, True, False, False, False]
    assert finite_rows(logits[[0, 1]]) == [True, True]
    assert finite_rows(logits.to(torch.bfloat16)) == [True, False, False, False, False]  # big overflows bf16
