"""One model replica: the same base model, runtime and continuous-batching engine as `python -m service serve`,
with adapters loaded on demand from the shared store through Serve's model multiplexing.

The multiplexed model id of a request is `adapter_id@version` ("" for the base model); Serve routes it to a
replica that already holds it when one does, and each replica keeps at most `max_adapters_per_replica`
resident (least recently used evicted and freed). A background task follows the cluster state and frees
deleted adapters, acknowledging each delete.

Replies are plain dicts (`{"status", "body", "replica"}`), never exceptions: an error keeps its status code
and JSON body across the Ray boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from ..adapter_manager import merge_adapters
from ..api.deps import ServiceState
from ..api.errors import ApiError, error_body, runtime_error_status
from ..api.generation import generate_events, generate_result
from ..api.routes_generate import generate_response, sse_stream
from ..api.routes_openai import run_chat_completion, run_completion
from ..api.schemas import GenerateRequest
from ..api.schemas_openai import ChatCompletionRequest, CompletionRequest
from ..engine import Engine, GenerationRequest, SamplingParams
from ..failpoints import failpoint
from ..merging import MergeSpec
from ..merging.adapter_files import write_peft_adapter
from ..merging.export import MergedCheckpoint, stream_checkpoint_tar
from ..metrics import ServiceMetrics
from ..model_loading import load_base_model
from ..runtime import AdapterError, AdapterRuntime
from ..runtime.adapter_types.base import NotMergeableError
from ..settings import Settings
from .cluster_state import split_model_id, state_actor
from .resident import ResidentAdapter, ResidentAdapters
from .shared_store import SharedDirectorySource, StaleAdapterError

log = logging.getLogger(__name__)

_MULTIPLEXER_ATTR = "__serve_multiplex_wrapper"  # where serve.multiplexed keeps its LRU (ray/serve/api.py)


def reply(status: int, body: Any, replica: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {"status": status, "body": body, "replica": replica, "headers": headers or {}}


class AdapterReplica:
    """The model deployment (wrapped by `serve.deployment` in app.py, with the settings' options)."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings(**settings)
        base = load_base_model(self.settings)
        runtime = AdapterRuntime(base.model, max_rank=self.settings.max_adapter_rank)
        engine = Engine(base.model, base.tokenizer, runtime, max_batch_size=self.settings.max_batch_size,
                        max_waiting=self.settings.max_waiting_requests,
                        prefill_token_budget=self.settings.prefill_token_budget)
        engine.start()
        self.adapters = ResidentAdapters(engine)
        self.service = ServiceState(self.settings, base, engine, self.adapters, ServiceMetrics())  # type: ignore[arg-type]
        self.source = SharedDirectorySource(self.settings.store)
        self.state = state_actor(self.settings.store, self.settings.max_adapters, self.settings.replica_lease_s)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

        # A closure, not a bound method: serve.multiplexed stores its LRU as an attribute of the function.
        async def load(model_id: str) -> ResidentAdapter:
            return await self._load(model_id)

        self._load_fn = load
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=self.settings.max_adapters_per_replica)(load)
        self._follower = asyncio.get_running_loop().create_task(self._follow_state())
        log.info("replica %s ready (model %s)", self.replica_id, base.name)

    # ---- loading -----------------------------------------------------------------------------------------

    async def _load(self, model_id: str) -> ResidentAdapter:
        """Load one adapter version from the shared store (Serve's multiplexer calls this on a miss)."""
        adapter_id, version = split_model_id(model_id)
        async with self.adapters.lock(model_id):
            # Checked under the lock a delete's free also takes: either the delete is seen here, or it
            # waits for this load and frees the result.
            entry = await self.state.lookup.remote(adapter_id)
            if entry is None or entry["version"] != version:
                raise ApiError(404, "adapter_not_found", f"adapter '{adapter_id}' does not exist",
                               {"adapter_id": adapter_id})
            path = await self._fetch(model_id)
            prepared = await asyncio.to_thread(self.service.engine.runtime.prepare, model_id, path)
            failpoint("replica.loading")
            record = await self.adapters.attach(prepared)
            log.info("replica %s loaded adapter %s", self.replica_id, model_id)
            return record

    async def _fetch(self, model_id: str) -> Path:
        """The directory of one adapter version in the shared store; 404 if the store holds another."""
        adapter_id, version = split_model_id(model_id)
        try:
            stored = await asyncio.to_thread(self.source.fetch, adapter_id, version)
        except StaleAdapterError as exc:
            raise ApiError(404, "adapter_not_found", str(exc), {"adapter_id": adapter_id}) from None
        return stored.path

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
        return await self.service.engine.call(lambda rt: sorted(rt.adapters))

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
        runtime = self.service.engine.runtime
        if runtime.fused == (fused if fused in runtime.adapters else None):  # the usual case: nothing to do
            return

        def follow(rt: AdapterRuntime) -> None:
            if fused is not None and fused in rt.adapters:
                rt.fuse(fused)
            else:
                rt.unfuse()

        await self.service.engine.call(follow)

    async def _request(self, body: dict[str, Any], fused: str | None) -> tuple[GenerationRequest, str]:
        """The engine request for a /generate body, its adapter loaded; (request, adapter id as reported)."""
        parsed = GenerateRequest(**body)
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._get_adapter(model_id)
        await self._follow_fused(fused)
        params = SamplingParams(
            max_new_tokens=parsed.max_new_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
            top_k=parsed.top_k, seed=parsed.seed, stop=tuple(parsed.stop), ignore_eos=parsed.ignore_eos,
        )
        prompt_ids = self.service.base.tokenizer(parsed.prompt)["input_ids"]
        label = split_model_id(model_id)[0] if model_id else "base"
        return GenerationRequest(prompt_ids, model_id or None, params), label

    def _error(self, exc: Exception) -> dict[str, Any]:
        if isinstance(exc, ApiError):
            return reply(exc.status, error_body(exc.code, exc.message, exc.details), self.replica_id, exc.headers)
        if isinstance(exc, AdapterError):
            details = dict(exc.details)
            if isinstance(details.get("adapter_id"), str):  # the runtime knows the model id; users know the id
                details["adapter_id"] = split_model_id(details["adapter_id"])[0]
            return reply(runtime_error_status(exc.code), error_body(exc.code, exc.message, details),
                         self.replica_id)
        raise exc

    async def generate(self, body: dict[str, Any], fused: str | None = None) -> dict[str, Any]:
        """One completion: reply with the /generate JSON body (`fused`: the cluster's fused model id)."""
        try:
            request, label = await self._request(body, fused)
            result = await generate_result(self.service, request)
        except (ApiError, AdapterError) as exc:
            return self._error(exc)
        return reply(200, generate_response(result, label).model_dump(), self.replica_id)

    async def generate_stream(self, body: dict[str, Any],
                              fused: str | None = None) -> AsyncIterator[dict[str, Any] | bytes]:
        """A streamed completion: first a reply (its status decides the HTTP answer), then SSE chunks."""
        try:
            request, label = await self._request(body, fused)
            events = await generate_events(self.service, request)
        except (ApiError, AdapterError) as exc:
            yield self._error(exc)
            return
        yield reply(200, None, self.replica_id)
        async for chunk in sse_stream(events, label):
            yield chunk

    async def _openai(self, kind: str, body: dict[str, Any], fused: str | None) -> Any:
        """Run serve's /v1 handler body on this replica (the adapter: the request's multiplexed model id)."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._get_adapter(model_id)
        await self._follow_fused(fused)
        if kind == "chat":
            return await run_chat_completion(self.service, ChatCompletionRequest(**body), model_id or None)
        return await run_completion(self.service, CompletionRequest(**body), model_id or None)

    async def openai(self, kind: str, body: dict[str, Any], fused: str | None = None) -> dict[str, Any]:
        """A /v1/completions (`kind` "completion") or /v1/chat/completions ("chat") JSON answer."""
        try:
            return reply(200, await self._openai(kind, body, fused), self.replica_id)
        except (ApiError, AdapterError) as exc:
            return self._error(exc)

    async def openai_stream(self, kind: str, body: dict[str, Any],
                            fused: str | None = None) -> AsyncIterator[dict[str, Any] | bytes]:
        """The streamed variant: first a reply (its status decides the HTTP answer), then OpenAI's SSE chunks."""
        try:
            response = await self._openai(kind, body, fused)
        except (ApiError, AdapterError) as exc:
            yield self._error(exc)
            return
        yield reply(200, None, self.replica_id)
        chunks = response.body_iterator
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # frees the batch row when the client went away

    # ---- admin -------------------------------------------------------------------------------------------

    async def validate(self, adapter_id: str, staged: str) -> dict[str, Any]:
        """Check staged upload files against the model (nothing is attached); the summary to store."""
        try:
            prepared = await asyncio.to_thread(self.service.engine.runtime.prepare, adapter_id, Path(staged))
        except AdapterError as exc:
            return self._error(exc)
        summary = {**prepared.config.summary(), "rank": prepared.rank}
        return reply(200, {"summary": summary, "resident_bytes": prepared.resident_bytes}, self.replica_id)

    async def merge(self, sources: list[str], spec: MergeSpec, directory: str) -> dict[str, Any]:
        """Merge adapter versions (model ids, in order) read from the shared store and write the result's PEFT
        files into `directory` (the ingress's staging area); the ingress validates and commits them."""
        runtime = self.service.engine.runtime
        try:
            loaded = [await asyncio.to_thread(runtime.prepare, model_id, await self._fetch(model_id))
                      for model_id in sources]
            merged = await asyncio.to_thread(merge_adapters, loaded, spec, runtime.index.modules)
        except (ApiError, AdapterError) as exc:
            return self._error(exc)
        await asyncio.to_thread(write_peft_adapter, merged, Path(directory))
        return reply(200, None, self.replica_id)

    async def export_stream(self, model_id: str) -> AsyncIterator[dict[str, Any] | bytes]:
        """The tar of the base model with this adapter version merged in (as serve's export): first a reply
        (its status decides the HTTP answer, e.g. 422 not_mergeable), then the tar's chunks."""
        adapter_id = split_model_id(model_id)[0]
        runtime = self.service.engine.runtime
        try:
            loaded = await asyncio.to_thread(runtime.prepare, adapter_id, await self._fetch(model_id))
            checkpoint = MergedCheckpoint(runtime.model, runtime.index, loaded)
        except (ApiError, AdapterError) as exc:
            yield self._error(exc)
            return
        yield reply(200, None, self.replica_id)
        chunks = stream_checkpoint_tar(checkpoint, self.service.base.tokenizer, f"{adapter_id}-merged")
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:  # tensors copied off the loop
            yield chunk

    async def check_fusable(self, model_id: str) -> dict[str, Any]:
        """Whether this adapter version can be fused (before a fused activation): 422 not_mergeable if not."""
        adapter_id = split_model_id(model_id)[0]
        try:
            loaded = await asyncio.to_thread(self.service.engine.runtime.prepare, adapter_id,
                                             await self._fetch(model_id))
            blocker = loaded.merge_blocker()
            if blocker is not None:
                raise NotMergeableError(f"adapter '{adapter_id}' cannot be fused: {blocker}",
                                        {"adapter_id": adapter_id})
        except (ApiError, AdapterError) as exc:
            return self._error(exc)
        return reply(200, None, self.replica_id)

    def fused_adapter(self) -> tuple[str, str | None]:
        """(this replica, the model id its runtime holds fused): for tests and debugging."""
        return self.replica_id, self.service.engine.runtime.fused
