"""A request whose prefill raises gets the error at once (it used to wait for its timeout: found by fuzzing)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import GenerationRequest, SamplingParams


def test_failed_prefill_fails_its_request_and_the_engine_goes_on(make_engine, demo_tokenizer) -> None:
    engine = make_engine(max_batch_size=4)
    vocab = engine.model.config.vocab_size  # the API refuses such ids with a 422 before they get here

    async def scenario():
        with pytest.raises(IndexError):
            await asyncio.wait_for(engine.generate(GenerationRequest([1, vocab + 5], None, SamplingParams())), 30)
        ok = GenerationRequest(demo_tokenizer("Hi")["input_ids"], "a", SamplingParams(max_new_tokens=3))
        return await asyncio.wait_for(engine.generate(ok), 30)

    assert len(asyncio.run(scenario()).token_ids) == 3
