"""An in-place replace (vLLM's load_inplace) is atomic for requests: each runs wholly on the old or wholly on
the new version, none gets a 404. Steps are held open with events, so every interleaving here is forced."""

from __future__ import annotations

import asyncio
import threading

from service.app import GenerationInput
from service.engine import GenerationRequest, SamplingParams
from service.engine.requests import GenerationResult

from .test_atomicity import NEW_TOKENS, PROMPT, build_service, greedy, upload_files


def test_requests_during_a_replace_run_on_one_version(demo_base, demo_tokenizer, demo_adapters, peft_greedy,
                                                      tmp_path, monkeypatch) -> None:
    service = build_service(demo_base, demo_tokenizer, tmp_path / "store")
    old, new = peft_greedy("a", PROMPT, NEW_TOKENS), peft_greedy("c", PROMPT, NEW_TOKENS)
    assert old != new
    service.start()

    async def scenario() -> None:
        await service.upload(upload_files(demo_adapters["a"]), "x")
        await service.activate("x")
        loop = asyncio.get_running_loop()
        in_store, release = asyncio.Event(), threading.Event()
        real = service.store.replace

        def held_replace(*args, **kwargs):
            loop.call_soon_threadsafe(in_store.set)
            assert release.wait(60), "the test never released the store step"
            return real(*args, **kwargs)

        monkeypatch.setattr(service.store, "replace", held_replace)
        replacing = asyncio.ensure_future(service.lifecycle.replace(
            "x", lambda: service.store.stage_files(upload_files(demo_adapters["c"]), 1 << 30)))
        await asyncio.wait_for(in_store.wait(), 60)  # new files validated and built; the store step is held

        # A request that passed the gate before it closed and takes its lease now (as one compiling a grammar
        # would): it runs on the old weights, and the swap waits for it.
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        ids = await service.admission.tokenize(GenerationInput(params, "x", prompt=PROMPT))
        events = await service.admission.start(GenerationRequest(ids, "x", params))
        # Requests arriving now wait at the gate (no 404) for the new version, named or by the active adapter.
        waiting = [asyncio.ensure_future(greedy(service, adapter)) for adapter in ("x", None)]
        assert not replacing.done()

        release.set()
        result = [e async for e in events if isinstance(e, GenerationResult)][0]
        assert result.token_ids == old, "the request that held a lease finished on the old version"
        await replacing
        assert [await w for w in waiting] == [new, new]
        assert await greedy(service, "x") == new and service.active == "x"
        assert (await service.get("x")).sha256 == service.store.get("x").sha256

    try:
        asyncio.run(scenario())
    finally:
        service.stop()
