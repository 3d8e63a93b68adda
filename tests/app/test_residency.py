"""At most --max-resident-adapters adapters live in model memory; the rest load on first use (LRU, never
evicting one in use)."""

from __future__ import annotations

import asyncio
import copy
import random
from contextlib import ExitStack
from pathlib import Path

import torch

from service.app import GenerationInput
from service.app.local import LocalAdapterService
from service.engine import Engine, SamplingParams
from service.model_loading import BaseModel
from service.runtime import AdapterRuntime
from service.settings import Settings
from service.store import AdapterStore

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _files(adapter_dir: Path, stack: ExitStack):
    return [(name, stack.enter_context((adapter_dir / name).open("rb"))) for name in FILES]


def _manager(base, tokenizer, store_root: Path, max_resident: int, **settings) -> LocalAdapterService:
    model = copy.deepcopy(base)
    engine = Engine(model, tokenizer, AdapterRuntime(model), max_batch_size=4)
    settings = Settings(store=store_root, max_resident_adapters=max_resident, max_upload_bytes=1 << 30, **settings)
    base_model = BaseModel(model, tokenizer, "demo", torch.device("cpu"), torch.float32)
    return LocalAdapterService(settings, base_model, engine, AdapterStore(store_root))


async def _generate(manager: LocalAdapterService, tokenizer, adapter_id: str, prompt: str = "LRU") -> list[int]:
    generation = await manager.generate(GenerationInput(SamplingParams(max_new_tokens=6), adapter_id, prompt=prompt))
    return (await generation.result()).token_ids


def _resident(manager: LocalAdapterService) -> set[str]:
    records = manager.registry.records
    assert set(manager.engine.runtime.adapters) == {r.id for r in records.values() if r.loaded}
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
        assert manager.registry.records["a"].load_ms is not None
        async with manager.residency.lease("c"):  # c is in use (and the least recently used)
            assert await _generate(manager, demo_tokenizer, "b") == peft_greedy("b", "LRU", 6)
            assert _resident(manager) == {"c", "b"}, "c is in use, so a is evicted instead"
        assert await _generate(manager, demo_tokenizer, "c") == peft_greedy("c", "LRU", 6)
        assert (await manager.delete("a")).freed_bytes == 0, "a non-resident adapter frees nothing more"
        assert set(manager.registry.records) == {"b", "c"}

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
    manager.lifecycle.restore()
    assert len(manager.registry.records) == 1000 and len(_resident(manager)) == 8
    largest = max(r.loaded.resident_bytes for r in manager.registry.records.values() if r.loaded)
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
    loads = [r.load_ms for r in manager.registry.records.values() if r.load_ms is not None]
    assert loads and all(ms > 0 for ms in loads)
