"""Preemption: when every resident slot holds an adapter in use, a load swaps one out (its requests parked) instead
of waiting for a whole request; the parked requests resume exactly (PEFT's greedy tokens), a delete still waits
for them, a cancelled one is dropped, one whose adapter cannot come back gets the error, pins are never parked.

The quantum (how long an adapter stays before it may be preempted) runs on a fake clock: no test waits on time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from service.app import GenerationInput, preemption
from service.engine import SamplingParams, TokenEvent

from .test_pinning import _run, _upload
from .test_residency import _generate, _manager, _resident

QUANTUM_S = 1000.0  # fake seconds: nothing is preempted unless a test moves the clock on


def _preempting_manager(base, tokenizer, store_root):
    """Two slots, preemption on with a quantum of QUANTUM_S fake seconds."""
    return _manager(base, tokenizer, store_root, max_resident=2, preempt_adapters=True, preemption_quantum_s=QUANTUM_S)
A, B, C = ("The quick brown fox", 20), ("Serving many adapters at once", 40), ("Once upon", 12)


@pytest.fixture()
def clock(monkeypatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(preemption, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


async def _start(manager, adapter: str, prompt: str, n: int) -> tuple[object, list[int]]:
    """A generation's event iterator once its first token has come, and that token."""
    generation = await manager.generate(GenerationInput(SamplingParams(max_new_tokens=n), adapter, prompt=prompt))
    events = aiter(generation.events)
    first = await anext(events)
    assert isinstance(first, TokenEvent)
    return events, [first.token_id]


async def _rest(events, tokens: list[int]) -> list[int]:
    try:
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
        return tokens
    finally:
        await events.aclose()  # as the HTTP layer does when its client goes away


async def _c_preempts_a(manager, demo_adapters, clock: list[float]):
    """2 slots: a and b (pinned) decoding, then a request for c. Returns a's and b's tasks (reading the rest of
    their tokens) and c's events once c's first token has come."""
    await _upload(manager, demo_adapters, "a", "b", "c")  # resident: b, c
    await manager.pin("b")
    a = asyncio.create_task(_rest(*await _start(manager, "a", *A)))  # a's load evicts c (idle)
    b = asyncio.create_task(_rest(*await _start(manager, "b", *B)))
    assert _resident(manager) == {"a", "b"} and manager.residency.in_use("a") and manager.residency.in_use("b")
    clock[0] += QUANTUM_S  # a has been resident a quantum: it may be preempted
    c = await _start(manager, "c", *C)
    return a, b, c


def _preemptions(manager) -> float:
    return manager.metrics.adapter_preemptions._value.get()


async def _parked(manager, adapter_id: str) -> int:
    """How many of the adapter's requests the engine holds parked (read on the engine thread)."""
    batcher = manager.engine.batcher
    return await manager.engine.call(lambda rt: len(batcher.parked[adapter_id]) if adapter_id in batcher.parked
                                     else 0)


def test_a_load_preempts_an_adapter_in_use(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path,
                                           clock) -> None:
    """c's request gets its first token while a's and b's requests still run (before, c waited for one of them to
    end): a, not the pinned b, was swapped out; once c's request ends a comes back and every output is PEFT's."""
    manager = _preempting_manager(demo_base, demo_tokenizer, tmp_path / "store")

    async def scenario() -> None:
        a, b, (c_events, c_tokens) = await _c_preempts_a(manager, demo_adapters, clock)
        assert not a.done(), "c's first token came before a's request ended"
        assert await _parked(manager, "a") == 1 and _resident(manager) == {"b", "c"}
        assert _preemptions(manager) == 1 and manager.registry.records["a"].usage.evictions == 2
        assert manager.registry.records["b"].usage.evictions == 0, "a pinned adapter is never preempted"
        assert await _rest(c_events, c_tokens) == peft_greedy("c", *C)
        # c's lease has ended: a's reload takes c's slot (c is idle now) and a's request goes on where it stopped.
        assert await a == peft_greedy("a", *A)
        assert await b == peft_greedy("b", *B)
        assert _resident(manager) == {"a", "b"} and await _parked(manager, "a") == 0
        assert _preemptions(manager) == 1

    _run(manager, scenario)


def test_delete_waits_for_parked_requests(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path,
                                          clock) -> None:
    """Deleting a preempted adapter hides it at once and waits for its parked request, as for any request in
    flight: the adapter comes back for it, it ends with PEFT's tokens, then the delete goes through."""
    manager = _preempting_manager(demo_base, demo_tokenizer, tmp_path / "store")

    async def scenario() -> None:
        a, b, (c_events, c_tokens) = await _c_preempts_a(manager, demo_adapters, clock)
        delete = asyncio.create_task(manager.delete("a"))
        while not manager.registry.hidden("a"):  # the delete has started (each pass yields to the loop)
            await asyncio.sleep(0)
        assert await _parked(manager, "a") == 1 and not delete.done()
        await _rest(c_events, c_tokens)
        assert await a == peft_greedy("a", *A)
        assert (await delete).freed_bytes > 0
        assert "a" not in manager.registry.records and "a" not in manager.engine.runtime.adapters
        await b

    _run(manager, scenario)


def test_cancelled_parked_request_is_dropped(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path,
                                             clock) -> None:
    """A parked request whose caller goes away gives its lease back at once and leaves the engine at the next
    step; the adapter serves later requests as before."""
    manager = _preempting_manager(demo_base, demo_tokenizer, tmp_path / "store")

    async def scenario() -> None:
        a, b, (c_events, c_tokens) = await _c_preempts_a(manager, demo_adapters, clock)
        a.cancel()  # the caller is gone: its events are closed
        with pytest.raises(asyncio.CancelledError):
            await a
        assert not manager.residency.in_use("a"), "its lease ended with its caller: a delete would not wait"
        await _rest(c_events, c_tokens)
        assert await _generate(manager, demo_tokenizer, "a", "after") == peft_greedy("a", "after", 6)
        assert await _parked(manager, "a") == 0
        await b

    _run(manager, scenario)


def test_parked_requests_get_the_error_when_their_adapter_cannot_come_back(demo_base, demo_tokenizer, demo_adapters,
                                                                            tmp_path, clock) -> None:
    manager = _preempting_manager(demo_base, demo_tokenizer, tmp_path / "store")
    runtime = manager.engine.runtime
    prepare = runtime.prepare

    def failing_prepare(adapter_id, path):
        if adapter_id == "a" and _preemptions(manager):
            raise OSError("the store's disk is gone")
        return prepare(adapter_id, path)

    async def scenario() -> None:
        runtime.prepare = failing_prepare
        a, b, (c_events, c_tokens) = await _c_preempts_a(manager, demo_adapters, clock)
        await _rest(c_events, c_tokens)  # a's reload may take c's slot now, and fails
        with pytest.raises(OSError, match="disk is gone"):
            await a
        assert not manager.residency.in_use("a") and await _parked(manager, "a") == 0
        await b

    _run(manager, scenario)


def test_more_adapters_in_flight_than_slots(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path) -> None:
    """3 adapters, 2 slots, no quantum: requests swap each other out as they come; every output is PEFT's."""
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=2, preempt_adapters=True,
                       preemption_quantum_s=0)
    jobs = [(adapter, prompt) for prompt in ("one", "two more", "x") for adapter in "abc"]

    async def scenario() -> list[list[int]]:
        await _upload(manager, demo_adapters, "a", "b", "c")
        return await asyncio.gather(*(_generate(manager, demo_tokenizer, a, p) for a, p in jobs))

    manager.engine.start()
    try:
        results = asyncio.run(scenario())
    finally:
        manager.engine.stop()
    for (adapter, prompt), tokens in zip(jobs, results, strict=True):
        assert tokens == peft_greedy(adapter, prompt, 6), (adapter, prompt)
    assert manager.engine.batcher.parked == {} or all(not p for p in manager.engine.batcher.parked.values())
