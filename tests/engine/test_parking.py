"""Parked rows (an adapter swapped out mid-generation) resume exactly: token for token PEFT's greedy output."""

from __future__ import annotations

import asyncio

from service.engine import GenerationRequest, GenerationResult, SamplingParams, TokenEvent

# Different prompt lengths, so rows are left-padded differently in the batch before and after the pause.
JOBS = [("The quick brown fox", "a", 24), ("Hi", "a", 20), ("Serving many adapters at once", "b", 40),
        ("xyz123", None, 40), ("Once upon", "c", 40)]


def _request(tokenizer, prompt: str, adapter: str | None, n: int) -> GenerationRequest:
    return GenerationRequest(tokenizer(prompt)["input_ids"], adapter, SamplingParams(max_new_tokens=n))


async def _tokens(events, tokens: list[int]) -> list[int]:
    async for event in events:
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        else:
            assert isinstance(event, GenerationResult) and event.token_ids == tokens
    return tokens


def test_swapped_out_rows_resume_exactly(make_engine, demo_tokenizer, demo_adapters, peft_greedy) -> None:
    """Adapter a's two rows are parked and its weights detached after their first tokens; the other adapters'
    rows go on meanwhile, a request for a submitted while it is away waits; once a is attached again every row
    gives PEFT's greedy tokens."""
    engine = make_engine(max_batch_size=8)

    async def scenario() -> list[list[int]]:
        handles = [engine.submit(_request(demo_tokenizer, *job)) for job in JOBS]
        streams = [h.events() for h in handles]
        firsts = [[(await anext(s)).token_id] for s in streams]  # every row is in the batch now
        freed = await engine.swap_out("a")
        assert freed > 0 and "a" not in engine.runtime.adapters
        assert len(engine.batcher.parked["a"].rows) == 2 and len(engine.batcher.running) == 3
        # Read on the engine thread (between steps): queue depth and backpressure count parked requests.
        assert await engine.call(lambda _: engine.waiting_requests) == 2
        emitted = [h._events.qsize() for h in handles[:2]]  # every event before the park has arrived
        late = engine.submit(_request(demo_tokenizer, "Late", "a", 12))  # held, not failed: a is parked
        for _ in range(3):  # the other rows decode meanwhile ...
            firsts[2].append((await anext(streams[2])).token_id)
        assert [h._events.qsize() for h in handles[:2]] == emitted, "... the parked ones do not"
        assert await engine.call(lambda _: engine.waiting_requests) == 3, "the late request is parked too"
        await engine.call(lambda rt: rt.load("a", demo_adapters["a"]))  # back: its requests go on
        assert "a" not in engine.batcher.parked
        return await asyncio.gather(*(_tokens(s, f) for s, f in zip(streams, firsts, strict=True)),
                                    _tokens(late.events(), []))

    results = asyncio.run(scenario())
    for (prompt, adapter, n), tokens in zip([*JOBS, ("Late", "a", 12)], results, strict=True):
        assert tokens == peft_greedy(adapter, prompt, n), (prompt, adapter)


def test_cancelled_parked_row_is_dropped(make_engine, demo_tokenizer, demo_adapters, peft_greedy) -> None:
    """A parked row cancelled by its caller leaves the parked set at the next step (its keys/values freed); the
    other parked row resumes exactly."""
    engine = make_engine(max_batch_size=4)

    async def scenario() -> list[int]:
        gone, kept, other = (engine.submit(_request(demo_tokenizer, *job)) for job in (JOBS[0], JOBS[1], JOBS[2]))
        streams = [h.events() for h in (gone, kept, other)]
        firsts = [[(await anext(s)).token_id] for s in streams]
        await engine.swap_out("a")
        gone.cancel()
        await engine.call(lambda rt: None)  # every event emitted before the cancel is queued now
        for _ in range(other._events.qsize() + 1):  # ... then one from a step after it
            firsts[2].append((await anext(streams[2])).token_id)
        parked = await engine.call(lambda rt: engine.batcher.parked["a"])
        assert parked.rows == [kept.sequence]
        assert parked.mask.shape[0] == 1 and parked.cache.layers[0].keys.shape[0] == 1, "its keys/values are freed"
        await engine.call(lambda rt: rt.load("a", demo_adapters["a"]))
        assert "a" not in engine.batcher.parked and kept.sequence in engine.batcher.running
        kept_tokens, _ = await asyncio.gather(_tokens(streams[1], firsts[1]), _tokens(streams[2], firsts[2]))
        return kept_tokens

    assert asyncio.run(scenario()) == peft_greedy("a", JOBS[1][0], JOBS[1][2])


def test_failed_and_failing_parked_requests_get_their_error(make_engine, demo_tokenizer) -> None:
    """`fail_parked` (the adapter will not come back) and `fail_all` (a step failed) reach parked requests."""
    engine = make_engine(max_batch_size=4)

    async def scenario() -> None:
        first, second = (engine.submit(_request(demo_tokenizer, *job)) for job in (JOBS[0], JOBS[4]))
        streams = [first.events(), second.events()]
        for s in streams:
            await anext(s)
        await asyncio.gather(engine.swap_out("a"), engine.swap_out("c"))
        assert await engine.fail_parked("a", RuntimeError("gone")) == 1
        await engine.call(lambda rt: engine.batcher.fail_all(RuntimeError("step failed")))
        for stream, message in zip(streams, ("gone", "step failed"), strict=True):
            try:
                await _tokens(stream, [])
            except RuntimeError as exc:
                assert str(exc) == message
            else:
                raise AssertionError("no error event")
        assert engine.batcher.parked == {}

    asyncio.run(scenario())
