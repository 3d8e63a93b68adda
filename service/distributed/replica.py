"""One model replica: the same base model, runtime and continuous-batching engine as `python -m service serve`,
with adapters loaded on demand from the shared store through Serve's model multiplexing.

The multiplexed model id of a request is `adapter_id@version` ("" for the base model); Serve routes it to a
replica that already holds it when one does, and each replica keeps at most `max_adapters_per_replica`
resident (least recently used evicted and freed). A background task follows the cluster state and frees
deleted adapters, acknowledging each delete.

Replies are plain dicts, never exceptions: an error crosses the Ray boundary as `{"error": {code, message,
details}}` and the ingress raises it again as the same typed error (service/errors.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray import serve

from ..app.admission import Admission
from ..app.interface import GenerationInput
from ..cpu import configure_threads
from ..engine import Engine, GenerationRequest, GenerationResult
from ..errors import AdapterNotFoundError, ServiceError
from ..failpoints import failpoint
from ..memory import configure_allocator
from ..merging import MergeSpec, merge
from ..merging.adapter_files import write_peft_adapter
from ..merging.export import MergedCheckpoint, stream_checkpoint_tar
from ..model_loading import load_base_model
from ..runtime import AdapterRuntime
from ..runtime.adapter_types.base import NotMergeableError
from ..settings import MiB, Settings
from .cluster_state import split_model_id, state_actor
from .resident import ResidentAdapter, ResidentAdapters
from .shared_store import SharedDirectorySource, StaleAdapterError

log = logging.getLogger(__name__)

_MULTIPLEXER_ATTR = "__serve_multiplex_wrapper"  # where serve.multiplexed keeps its LRU (ray/serve/api.py)


def error_reply(exc: ServiceError) -> dict[str, Any]:
    """A typed error as a reply; the runtime names adapters by model id, users know the adapter id."""
    wire = exc.to_wire()
    if isinstance(wire["details"].get("adapter_id"), str):
        wire["details"] = {**wire["details"], "adapter_id": split_model_id(wire["details"]["adapter_id"])[0]}
    return {"error": wire}


def event_to_wire(event: Any) -> dict[str, Any]:
    if isinstance(event, GenerationResult):
        logprobs = None if event.logprobs is None else [asdict(lp) for lp in event.logprobs]
        return {"result": {"token_ids": event.token_ids, "text": event.text, "finish_reason": event.finish_reason,
                           "prompt_tokens": event.prompt_tokens, "logprobs": logprobs}}
    return {"token_id": event.token_id, "text": event.text,
            "logprob": None if event.logprob is None else asdict(event.logprob)}


class AdapterReplica:
    """The model deployment (wrapped by `serve.deployment` in app.py, with the settings' options)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        configure_allocator()  # before the model's tensors: freed adapters' memory goes back to the OS
        configure_threads()  # Ray sets OMP_NUM_THREADS from num_cpus; respected
        self.base = load_base_model(self.settings)
        runtime = AdapterRuntime(self.base.model, max_rank=self.settings.max_adapter_rank,
                                 model_name=self.base.name)
        self.engine = Engine(self.base.model, self.base.tokenizer, runtime, max_batch_size=self.settings.max_batch_size,
                             max_waiting=self.settings.max_waiting_requests,
                             prefill_token_budget=self.settings.prefill_token_budget,
                             prefix_cache_bytes=self.settings.prefix_cache_mb * MiB)
        self.engine.start()
        self.adapters = ResidentAdapters(self.engine)
        self.admission = Admission(self.engine, self.adapters, self.settings)
        self.source = SharedDirectorySource(self.settings.store)
        self.state = state_actor(self.settings.store, self.settings.max_adapters, self.settings.replica_lease_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        # A closure, not a bound method: serve.multiplexed stores its LRU as an attribute of the function.
        async def load(model_id: str) -> ResidentAdapter:
            return await self._load(model_id)

        self._load_fn = load
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters_per_replica)(load)
        self._follower = asyncio.get_running_loop().create_task(self._follow_state())
        log.info("replica %s ready (model %s)", self.replica_id, self.base.name)

    # ---- loading -----------------------------------------------------------------------------------------

    async def _load(self, model_id: str) -> ResidentAdapter:
        """Load one adapter version from the shared store (Serve's multiplexer calls this on a miss)."""
        adapter_id, version = split_model_id(model_id)
        async with self.adapters.lock(model_id):
            # Checked under the lock a delete's free also takes: either the delete is seen here, or it
            # waits for this load and frees the result.
            entry = await self.state.lookup.remote(adapter_id)
            if entry is None or entry["version"] != version:
                raise AdapterNotFoundError(adapter_id)
            path = await self._fetch(model_id)
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, model_id, path)
            failpoint("replica.loading")
            record = await self.adapters.attach(prepared)
            log.info("replica %s loaded adapter %s", self.replica_id, model_id)
            return record

    async def _fetch(self, model_id: str) -> Path:
        """The directory of one adapter version in the shared store; not found if the store holds another."""
        adapter_id, version = split_model_id(model_id)
        try:
            stored = await asyncio.to_thread(self.source.fetch, adapter_id, version)
        except StaleAdapterError:
            raise AdapterNotFoundError(adapter_id) from None
        return stored.path

    async def _prepared(self, model_id: str):
        """A fresh copy of an adapter version's tensors from the store (not attached)."""
        return await asyncio.to_thread(self.engine.runtime.prepare, split_model_id(model_id)[0],
                                       await self._fetch(model_id))

    def _forget(self, model_id: str) -> None:
        """Drop a freed model id from Serve's LRU (private structure: guarded, so a change only costs a slot)."""
        multiplexer = getattr(self._load_fn, _MULTIPLEXER_ATTR, None)
        models = getattr(multiplexer, "models", None)
        if isinstance(models, dict):
            models.pop(model_id, None)
            multiplexer._push_multiplexed_replica_info = True  # tell the router this replica no longer has it

    # ---- following the cluster state -------------------------------------------------------------------

    async def _follow_state(self) -> None:
        """Heartbeat and change feed: free what deletes name, then acknowledge (frees run beside the
        heartbeat, so a delete waiting for running requests never makes this replica look dead)."""
        seen, incarnation = 0, None
        drops: asyncio.Queue = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._free_dropped(drops))
        while True:
            try:
                resident = await self._runtime_adapters()
                current, epoch, names = await self.state.poll.remote(
                    self.replica_id, incarnation, seen, resident, self.settings.replica_lease_s / 4)
            except Exception:  # the state actor restarting: keep trying (a pause, not a synchronisation)
                log.exception("replica %s cannot reach the cluster state", self.replica_id)
                await asyncio.sleep(self.settings.replica_lease_s / 4)
                continue
            if current != incarnation:  # registered (again, if the state actor restarted): count from here
                incarnation, seen = current, epoch
            elif epoch > seen:
                drops.put_nowait((incarnation, epoch, names))
                seen = epoch

    async def _runtime_adapters(self) -> list[str]:
        """What the runtime itself holds (read on the engine thread): the residency this replica reports, so
        /health shows memory as it is, not as the bookkeeping believes it to be."""
        return await self.engine.call(lambda rt: sorted(rt.adapters))

    async def _free_dropped(self, drops: asyncio.Queue) -> None:
        while True:
            incarnation, epoch, names = await drops.get()
            freed: dict[str, int] = {}
            for model_id in names:
                async with self.adapters.lock(model_id):
                    freed[model_id] = await self.adapters.free(model_id)
                self._forget(model_id)
            try:
                await self.state.ack.remote(self.replica_id, incarnation, epoch, freed, await self._runtime_adapters())
            except Exception:
                log.exception("replica %s could not acknowledge epoch %d", self.replica_id, epoch)

    # ---- requests ----------------------------------------------------------------------------------------

    async def _follow_fused(self, fused: str | None) -> None:
        """Fuse the cluster's fused model id if it is resident here, else unfuse (on the engine thread).

        Fusing changes speed, never outputs: a fused adapter's rows run on merged copies of its modules,
        everything else on the unchanged base weights (see runtime.fuse)."""
        runtime = self.engine.runtime
        if runtime.fused == (fused if fused in runtime.adapters else None):  # the usual case: nothing to do
            return

        def follow(rt: AdapterRuntime) -> None:
            if fused is not None and fused in rt.adapters:
                rt.fuse(fused)
            else:
                rt.unfuse()

        await self.engine.call(follow)

    async def generate_stream(self, wire: dict[str, Any], fused: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """One generation (any front door: /generate, /v1/*): first a head (`{"replica"}` or `{"error"}`),
        then its events as dicts, ending with the result or an error."""
        request = GenerationInput.from_wire(wire)
        model_id = serve.get_multiplexed_model_id() or None
        try:
            ids = await self.admission.tokenize(request)
            async with AsyncExitStack() as hold:
                if model_id:
                    await self._get_adapter(model_id)
                    # Leased at once (no await in between): an LRU eviction can no longer free it under us.
                    await hold.enter_async_context(self.adapters.lease(model_id))
                await self._follow_fused(fused)
                events = await self.admission.start(GenerationRequest(ids, model_id, request.params))
        except ServiceError as exc:
            yield error_reply(exc)
            return
        yield {"replica": self.replica_id}
        try:
            async for event in events:
                yield event_to_wire(event)
        except ServiceError as exc:
            yield error_reply(exc)
        except Exception as exc:  # the engine failed this request: the stream still ends with an error
            yield {"error": {"code": "generation_failed", "message": f"{type(exc).__name__}: {exc}", "details": {}}}
        finally:
            await events.aclose()  # frees the batch row when the client went away

    # ---- admin -------------------------------------------------------------------------------------------

    async def validate(self, adapter_id: str, staged: str) -> dict[str, Any]:
        """Check staged upload files against the model (nothing is attached); the summary to store."""
        try:
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, Path(staged))
        except ServiceError as exc:
            return error_reply(exc)
        summary = {**prepared.config.summary(), "rank": prepared.rank, "warnings": prepared.report.warnings}
        return {"summary": summary, "resident_bytes": prepared.resident_bytes, "replica": self.replica_id}

    async def merge(self, sources: list[str], spec: MergeSpec, directory: str) -> dict[str, Any]:
        """Merge adapter versions (model ids, in order) read from the shared store and write the result's PEFT
        files into `directory` (the ingress's staging area); the ingress validates and commits them."""
        runtime = self.engine.runtime
        try:
            loaded = [await self._prepared(name) for name in sources]
            merged = await asyncio.to_thread(merge, loaded, spec, runtime.index.modules)
        except ServiceError as exc:
            return error_reply(exc)
        await asyncio.to_thread(write_peft_adapter, merged, Path(directory))
        return {"replica": self.replica_id}

    async def export_stream(self, model_id: str) -> AsyncIterator[dict[str, Any] | bytes]:
        """The tar of the base model with this adapter version merged in: first a head (an error, e.g.
        not_mergeable, or `{"replica"}`), then the tar's chunks."""
        adapter_id = split_model_id(model_id)[0]
        runtime = self.engine.runtime
        try:
            checkpoint = MergedCheckpoint(runtime.model, runtime.index, await self._prepared(model_id))
        except ServiceError as exc:
            yield error_reply(exc)
            return
        yield {"replica": self.replica_id}
        chunks = stream_checkpoint_tar(checkpoint, self.base.tokenizer, f"{adapter_id}-merged")
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:  # tensors copied off the loop
            yield chunk

    async def check_fusable(self, model_id: str) -> dict[str, Any]:
        """Whether this adapter version can be fused (before a fused activation): not_mergeable if not."""
        adapter_id = split_model_id(model_id)[0]
        try:
            blocker = (await self._prepared(model_id)).merge_blocker()
            if blocker is not None:
                raise NotMergeableError(f"adapter '{adapter_id}' cannot be fused: {blocker}",
                                        {"adapter_id": adapter_id})
        except ServiceError as exc:
            return error_reply(exc)
        return {"replica": self.replica_id}

    def fused_adapter(self) -> tuple[str, str | None]:
        """(this replica, the model id its runtime holds fused): for tests and debugging."""
        return self.replica_id, self.engine.runtime.fused
