"""Pins, prefetch and loads under a resident limit: pinned adapters are never evicted and count toward the limit;
an eviction storm keeps every greedy output equal to PEFT's; a load waiting for a slot holds up no other row."""

from __future__ import annotations

import asyncio
import random
from contextlib import ExitStack

import pytest
from oracle import PeftGreedy, make_peft_adapter

from service.app import GenerationInput
from service.engine import SamplingParams, TokenEvent
from service.errors import AdapterNotFoundError, PinLimitError

from .test_residency import _files, _generate, _manager, _resident


async def _upload(manager, demo_adapters, *names: str) -> None:
    for name in names:
        with ExitStack() as stack:
            await manager.upload(_files(demo_adapters[name], stack), name)


def _run(manager, scenario) -> None:
    manager.engine.start()
    try:
        asyncio.run(scenario())
    finally:
        manager.engine.stop()


def test_pin_unpin_prefetch(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path) -> None:
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=2)

    async def scenario() -> None:
        await _upload(manager, demo_adapters, "a", "b", "c")
        assert _resident(manager) == {"b", "c"}
        view = await manager.pin("a")  # loads it, evicting b (the least recently used)
        assert view.pinned and view.resident and _resident(manager) == {"c", "a"}
        assert (await manager.pin("a")).pinned, "pinning twice is a no-op"
        assert await _generate(manager, demo_tokenizer, "b") == peft_greedy("b", "LRU", 6)
        assert _resident(manager) == {"a", "b"}, "c is evicted, never the pinned a (though least recently used)"
        await manager.pin("b")
        with pytest.raises(PinLimitError) as refused:
            await manager.pin("c")
        assert refused.value.details["max_resident_adapters"] == 2 and "--max-resident-adapters" in str(refused.value)
        assert "c" not in manager.residency.pins
        with pytest.raises(PinLimitError):  # every slot holds a pinned adapter: c can never load, said at once
            await _generate(manager, demo_tokenizer, "c")
        assert {v.id: v.pinned for v in (await manager.list()).adapters} == {"a": True, "b": True, "c": False}
        assert not (await manager.unpin("b")).pinned
        assert not (await manager.unpin("b")).pinned, "unpinning twice is a no-op"
        assert await _generate(manager, demo_tokenizer, "c") == peft_greedy("c", "LRU", 6)
        assert _resident(manager) == {"a", "c"}
        view = await manager.prefetch("b")
        assert view.resident and not view.pinned and _resident(manager) == {"a", "b"}
        for call in (manager.pin, manager.unpin, manager.prefetch):
            with pytest.raises(AdapterNotFoundError):
                await call("nope")
        # Deleting a pinned adapter works and frees it, pin included: another can take its place.
        assert (await manager.delete("a")).freed_bytes > 0
        assert "a" not in manager.residency.pins and "a" not in manager.engine.runtime.adapters
        assert (await manager.pin("c")).pinned and (await manager.pin("b")).pinned
        assert await _generate(manager, demo_tokenizer, "c") == peft_greedy("c", "LRU", 6)

    _run(manager, scenario)


def test_concurrent_prefetch_and_delete(demo_base, demo_tokenizer, demo_adapters, tmp_path) -> None:
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=1)

    async def scenario() -> None:
        for first in ("prefetch", "delete"):
            await _upload(manager, demo_adapters, "a", "b")  # b resident, a not
            calls = {"prefetch": manager.prefetch("a"), "delete": manager.delete("a")}
            later = "delete" if first == "prefetch" else "prefetch"
            prefetch, deletion = await asyncio.gather(calls[first], calls[later], return_exceptions=True)
            if first == "delete":
                prefetch, deletion = deletion, prefetch
            assert deletion.deleted == "a"
            assert prefetch.id == "a" if first == "prefetch" else isinstance(prefetch, AdapterNotFoundError)
            assert "a" not in manager.registry.records and "a" not in manager.engine.runtime.adapters
            assert _resident(manager) <= {"b"}
            await manager.delete("b")

    _run(manager, scenario)


@pytest.fixture(scope="module")
def five_adapters(demo_base, demo_adapters, tmp_path_factory):
    """The three demo adapters and two more plain LoRAs, with their PEFT oracle."""
    root = tmp_path_factory.mktemp("more-adapters")
    extra = {"d": make_peft_adapter(demo_base, root / "d", seed=41, r=2, lora_alpha=4, target_modules=["k_proj"]),
             "e": make_peft_adapter(demo_base, root / "e", seed=42, r=6, lora_alpha=6,
                                    target_modules=["up_proj", "down_proj"])}
    return {**demo_adapters, **extra}


def test_eviction_storm_keeps_outputs_exact(demo_base, demo_tokenizer, five_adapters, tmp_path) -> None:
    """5 adapters over 2 resident slots, requests in random order, several at once: every adapter is evicted and
    reloaded many times, and every output equals PEFT's."""
    oracle = PeftGreedy(demo_base, demo_tokenizer, five_adapters)
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=2)
    names = sorted(five_adapters)
    prompts = ["storm", "eviction order", "x"]
    rng = random.Random(3)
    waves = [[(rng.choice(names), rng.choice(prompts)) for _ in range(6)] for _ in range(5)]
    outputs: list[list[list[int]]] = []

    async def scenario() -> None:
        await _upload(manager, five_adapters, *names)
        for wave in waves:
            outputs.append(await asyncio.gather(*[_generate(manager, demo_tokenizer, a, p) for a, p in wave]))
            assert len(_resident(manager)) <= 2

    _run(manager, scenario)
    evictions = sum(r.usage.evictions for r in manager.registry.records.values())
    assert evictions >= 10, f"only {evictions} evictions: the storm did not storm"
    for wave, results in zip(waves, outputs, strict=True):
        for (adapter, prompt), tokens in zip(wave, results, strict=True):
            assert tokens == oracle.tokens(adapter, prompt, 6), (adapter, prompt)


def test_a_waiting_load_does_not_hold_up_resident_rows(demo_base, demo_tokenizer, demo_adapters, peft_greedy,
                                                        tmp_path) -> None:
    """One slot, held by a running request for a: a request for b waits for it; meanwhile more requests for a
    (resident) start, decode and finish, and b's load goes first once a's last row is done. (Preemption off: a
    load waits so whenever no adapter in use may be preempted.)"""
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=1)
    manager.residency.preemption = None
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)

    async def scenario() -> None:
        await _upload(manager, demo_adapters, "b", "a")
        long_a = await manager.generate(GenerationInput(params, "a", prompt="hold"))
        events = aiter(long_a.events)
        assert isinstance(await anext(events), TokenEvent)  # a is decoding: its slot is in use
        waiting_b = asyncio.create_task(_generate(manager, demo_tokenizer, "b"))
        while not manager.residency._queue:  # b's load has asked for a slot (each pass yields to the loop)
            await asyncio.sleep(0)
        for prompt in ("LRU", "meanwhile"):
            assert await _generate(manager, demo_tokenizer, "a", prompt) == peft_greedy("a", prompt, 6)
        assert not waiting_b.done() and manager.residency._queue, "b still waits for the slot a holds"
        async for _ in events:  # a's long request runs to its end; then b's load takes the slot
            pass
        assert await waiting_b == peft_greedy("b", "LRU", 6)
        assert _resident(manager) == {"b"}

    _run(manager, scenario)


def test_waiting_loads_get_slots_first_come_first_served(demo_base, demo_tokenizer, demo_adapters,
                                                         tmp_path) -> None:
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=1)
    residency = manager.residency
    loaded: list[str] = []

    async def load(adapter_id: str) -> None:
        async with residency.lease(adapter_id):
            await residency.ensure_resident(adapter_id)
            loaded.append(adapter_id)

    async def scenario() -> None:
        await _upload(manager, demo_adapters, "b", "c", "a")  # a resident
        held = residency.lease("a")
        await held.__aenter__()  # a in use: every load waits
        tasks = []
        for adapter_id in ("b", "c"):
            tasks.append(asyncio.create_task(load(adapter_id)))
            while len(residency._queue) < len(tasks):  # queued in this order (each pass yields to the loop)
                await asyncio.sleep(0)
        await held.__aexit__(None, None, None)
        await asyncio.gather(*tasks)
        assert loaded == ["b", "c"] and _resident(manager) == {"c"}

    _run(manager, scenario)
