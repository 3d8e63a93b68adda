"""A replica's resident adapters without Ray: an evicted adapter (Serve's multiplexer calls `__del__`) is
really deleted from the runtime, its tensors freed, but only once the requests using it have ended."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from oracle import make_peft_adapter

from service.devtools.demo_model import build_demo_model, build_demo_tokenizer
from service.distributed.resident import ResidentAdapters
from service.engine import Engine
from service.runtime import AdapterNotFoundError, AdapterRuntime


def test_eviction_waits_for_requests_then_frees_every_tensor(tmp_path) -> None:
    model = build_demo_model().eval()
    adapter_dir = make_peft_adapter(model, tmp_path / "x", seed=3, r=4, lora_alpha=8, target_modules=["q_proj"])
    runtime = AdapterRuntime(model)
    engine = Engine(model, build_demo_tokenizer(), runtime)
    engine.start()
    refs: list[weakref.ref] = []

    async def scenario() -> None:
        book = ResidentAdapters(engine)
        record = await book.attach(runtime.prepare("x@v1", adapter_dir))
        refs.extend(weakref.ref(t) for t in runtime.adapters["x@v1"].tensors())
        assert record.resident_bytes > 0 and book.names == ["x@v1"]
        async with book.lease("x@v1"):
            eviction = asyncio.create_task(record.__del__())  # what Serve's LRU eviction awaits
            while not record.freeing:  # let the eviction start
                await asyncio.sleep(0)
            assert not eviction.done() and "x@v1" in runtime.adapters, "a running request keeps its adapter"
            with pytest.raises(AdapterNotFoundError):  # but no new request may start on it
                async with book.lease("x@v1"):
                    pass
        await eviction
        assert "x@v1" not in runtime.adapters and book.names == []
        assert await book.free("x@v1") == 0  # idempotent: a delete after an eviction frees nothing more

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()
    gc.collect()
    assert refs and all(ref() is None for ref in refs), "every tensor of the evicted adapter is freed"
