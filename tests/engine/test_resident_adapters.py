"""At most --max-resident-adapters adapters live in model memory; the rest load on first use (LRU, never
evicting one in use)."""

from __future__ import annotations

import asyncio
import copy
import random
from contextlib import ExitStack
from pathlib import Path

from service.adapter_manager import AdapterManager
from service.engine import Engine, GenerationRequest, SamplingParams
from service.runtime import AdapterRuntime
from service.store import AdapterStore

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _files(adapter_dir: Path, stack: ExitStack):
    return [(name, stack.enter_context((adapter_dir / name).open("rb"))) for name in FILES]


def _manager(base, tokenizer, store_root: Path, max_resident: int) -> AdapterManager:
    model = copy.deepcopy(base)
    engine = Engine(model, tokenizer, AdapterRuntime(model), max_batch_size=4)
    return AdapterManager(AdapterStore(store_root), engine, 1 << 30, max_resident=max_resident)


async def _generate(manager: AdapterManager, tokenizer, adapter_id: str, prompt: str = "LRU") -> list[int]:
    async with manager.serving(adapter_id):
        await manager.ensure_resident(adapter_id)
        request = GenerationRequest(tokenizer(prompt)["input_ids"], adapter_id, SamplingParams(max_new_tokens=6))
        return (await manager.engine.generate(request)).token_ids


def _resident(manager: AdapterManager) -> set[str]:
    assert set(manager.engine.runtime.adapters) == {r.id for r in manager.records.values() if r.loaded}
    return set(manager.engine.runtime.adapters)


def test_lru_eviction_step_by_step(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path) -> None:
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=2)
    manager.engine.start()

    async def scenario() -> None:
        for name in ("a", "b"):
            with ExitStack() as stack:
                await manager.upload(_files(demo_adapters[name], stack), name)
        assert _resident(manager) == {"a", "b"}
        with ExitStack() as stack:
            await manager.upload(_files(demo_adapters["c"], stack), "c")
        assert _resident(manager) == {"b", "c"}, "uploading c evicts a, the least recently used"
        assert await _generate(manager, demo_tokenizer, "a") == peft_greedy("a", "LRU", 6)
        assert _resident(manager) == {"c", "a"}, "a loads on first use and evicts b"
        assert manager.records["a"].load_ms is not None
        async with manager.serving("c"):  # c is in use (and the least recently used)
            assert await _generate(manager, demo_tokenizer, "b") == peft_greedy("b", "LRU", 6)
            assert _resident(manager) == {"c", "b"}, "c is in use, so a is evicted instead"
        assert await _generate(manager, demo_tokenizer, "c") == peft_greedy("c", "LRU", 6)
        assert (await manager.delete("a")) == 0, "a non-resident adapter frees nothing more"
        assert set(manager.records) == {"b", "c"}

    try:
        asyncio.run(scenario())
    finally:
        manager.engine.stop()


def test_a_thousand_registered_adapters(demo_base, demo_tokenizer, demo_adapters, peft_greedy, tmp_path) -> None:
    store = AdapterStore(tmp_path / "store")
    source = {}
    for i in range(1000):
        name = "abc"[i % 3]
        with ExitStack() as stack:
            staged = store.stage_files(_files(demo_adapters[name], stack), 1 << 30)
        store.commit(f"adapter-{i:04d}", staged, {"peft_type": "LORA", "r": 4})
        source[f"adapter-{i:04d}"] = name
    manager = _manager(demo_base, demo_tokenizer, tmp_path / "store", max_resident=8)
    manager.restore()
    assert len(manager.records) == 1000 and len(_resident(manager)) == 8
    largest = max(r.loaded.resident_bytes for r in manager.records.values() if r.loaded)
    manager.engine.start()
    picks = random.Random(0).sample(sorted(source), 24)

    async def scenario() -> list[list[int]]:
        return await asyncio.gather(*[_generate(manager, demo_tokenizer, a) for a in picks])

    try:
        results = asyncio.run(scenario())
        assert len(_resident(manager)) <= 8
        assert sum(a.resident_bytes for a in manager.engine.runtime.adapters.values()) <= 8 * largest
    finally:
        manager.engine.stop()
    for adapter_id, tokens in zip(picks, results, strict=True):
        assert tokens == peft_greedy(source[adapter_id], "LRU", 6), adapter_id
    loads = [r.load_ms for r in manager.records.values() if r.load_ms is not None]
    assert loads and all(ms > 0 for ms in loads)
