"""Requests join and leave the running batch at every step; outputs do not depend on batch composition."""

from __future__ import annotations

import asyncio

from service.engine import GenerationRequest, SamplingParams, TokenEvent

PROMPTS = ["Hi", "The quick brown fox", "a", "Serving many adapters at once", "xyz123", "Once upon a time there"]


def request(tokenizer, prompt: str, adapter: str | None, **params) -> GenerationRequest:
    return GenerationRequest(tokenizer(prompt)["input_ids"], adapter, SamplingParams(**params))


def test_staggered_requests_match_peft_greedy(make_engine, demo_tokenizer, peft_greedy) -> None:
    """Each new request is submitted while the previous ones are mid-generation (after their first token),
    with different prompt lengths, adapters and lengths: every output is PEFT's greedy output alone."""
    engine = make_engine(max_batch_size=4)
    jobs = [(p, a, n) for p, a, n in zip(PROMPTS, ["a", "b", None, "c", "b", "a"], [20, 7, 15, 12, 25, 3], strict=True)]

    async def scenario() -> list[list[int]]:
        handles, first_tokens = [], []
        for prompt, adapter, n in jobs:
            handle = engine.submit(request(demo_tokenizer, prompt, adapter, max_new_tokens=n))
            events = handle.events()
            first = await anext(events)  # this request is now in the running batch
            handles.append((handle, events))
            first_tokens.append([first.token_id] if isinstance(first, TokenEvent) else [])
        results = []
        for (_, events), tokens in zip(handles, first_tokens, strict=True):
            async for event in events:
                if isinstance(event, TokenEvent):
                    tokens.append(event.token_id)
                else:
                    assert event.token_ids == tokens
            results.append(tokens)
        return results

    results = asyncio.run(scenario())
    for (prompt, adapter, n), tokens in zip(jobs, results, strict=True):
        assert tokens == peft_greedy(adapter, prompt, n), (prompt, adapter)


def test_more_requests_than_slots(make_engine, demo_tokenizer, peft_greedy) -> None:
    engine = make_engine(max_batch_size=2)

    async def scenario():
        return await asyncio.gather(*[
            engine.generate(request(demo_tokenizer, p, a, max_new_tokens=10))
            for p, a in zip(PROMPTS, ["c", None, "a", "b", "a", "c"], strict=True)
        ])

    results = asyncio.run(scenario())
    for p, a, r in zip(PROMPTS, ["c", None, "a", "b", "a", "c"], results, strict=True):
        assert r.token_ids == peft_greedy(a, p, 10)


def test_same_seed_same_text_whatever_the_batch(make_engine, demo_tokenizer) -> None:
    engine = make_engine(max_batch_size=8)
    sampled = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)

    async def alone():
        return await engine.generate(request(demo_tokenizer, "Sampling test", "b", **sampled))

    async def crowded():
        others = [engine.generate(request(demo_tokenizer, p, "a", max_new_tokens=30, temperature=1.0, seed=i))
                  for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(engine.generate(request(demo_tokenizer, "Sampling test", "b", **sampled)),
                                       *others)
        return results[0]

    first = asyncio.run(alone())
    assert asyncio.run(crowded()).token_ids == first.token_ids
    other_seed = asyncio.run(engine.generate(request(demo_tokenizer, "Sampling test", "b", **{**sampled, "seed": 5})))
    assert other_seed.token_ids != first.token_ids


def test_cancel_frees_the_slot(make_engine, demo_tokenizer) -> None:
    engine = make_engine(max_batch_size=1)

    async def scenario():
        long = engine.submit(request(demo_tokenizer, "long", "a", max_new_tokens=4000, ignore_eos=True))
        events = long.events()
        await anext(events)  # running
        waiting = engine.submit(request(demo_tokenizer, "next", None, max_new_tokens=3))
        long.cancel()
        result = await asyncio.wait_for(waiting.result(), 60)
        return result, await engine.call(lambda _: engine.running_requests)  # read between engine steps

    result, running = asyncio.run(scenario())
    assert len(result.token_ids) <= 3 and running == 0


def test_stop_strings_and_streamed_text(make_engine, demo_tokenizer) -> None:
    engine = make_engine()

    async def scenario():
        full = await engine.generate(request(demo_tokenizer, "Stop here", "c", max_new_tokens=20))
        stop = full.text[3:5]
        handle = engine.submit(request(demo_tokenizer, "Stop here", "c", max_new_tokens=20, stop=(stop,)))
        streamed = ""
        async for event in handle.events():
            if isinstance(event, TokenEvent):
                streamed += event.text
            else:
                return full, stop, streamed, event

    full, stop, streamed, final = asyncio.run(scenario())
    assert final.finish_reason == "stop" and final.text == full.text[: full.text.find(stop)]
    assert streamed == final.text, "streamed deltas add up to the final text and never include the stop string"


def test_prefill_computes_logits_of_the_last_prompt_position_only(make_engine, demo_tokenizer, peft_greedy) -> None:
    """The LM head sees one position per row in a prefill, not every prompt token (a third of a prefill's time), and
    the tokens stay PEFT's."""
    engine = make_engine(max_batch_size=4)
    seen: list[tuple[int, ...]] = []  # the LM head's input shape at each call: (rows, positions, hidden)
    engine.batcher.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: seen.append(tuple(args[0].shape)))

    async def scenario():
        return await asyncio.gather(*[engine.generate(request(demo_tokenizer, p, a, max_new_tokens=3))
                                      for p, a in [(PROMPTS[1], "a"), (PROMPTS[3], None)]])

    results = asyncio.run(scenario())
    assert results[0].token_ids == peft_greedy("a", PROMPTS[1], 3)
    assert results[1].token_ids == peft_greedy(None, PROMPTS[3], 3)
    assert seen and all(shape[1] == 1 for shape in seen), seen
