"""`AdapterService` for a Ray Serve cluster: the ingress side. It holds no model.

Admin operations write the shared store (the ingress is its one writer) and the cluster state; uploads are
validated once, by any replica, before the commit. Generations and exports run on a replica, reached with
the multiplexed model id `adapter_id@version` so Serve prefers a replica that holds it. Replies from
replicas are plain dicts: `{"error": wire}` is raised here again as the same typed error.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError as ServeReplicaUnavailable

from ..app import (
    BASE,
    Activation,
    AdapterUsage,
    AdapterView,
    Deletion,
    Export,
    Generation,
    GenerationInput,
    Health,
    Listing,
)
from ..app.registry import adapter_view, claim_adapter_id
from ..app.sources import SourceRegistry
from ..app.staged_files import owned_file
from ..app.storage_errors import storage_errors
from ..app.usage import MeteredEvents
from ..engine import GenerationResult, TokenEvent, TokenLogprob
from ..errors import (
    AdapterExistsError,
    AdapterLimitError,
    AdapterNotFoundError,
    InvalidMergeError,
    NotSupportedError,
    ReplicaUnavailableError,
    ServiceError,
)
from ..merging import MergeSpec
from ..metrics import ServiceMetrics
from ..settings import Settings
from ..store import AdapterStore, StagedAdapter
from .cluster_state import adapter_version, model_id, stored_entry

log = logging.getLogger(__name__)

_RETRYABLE = (RayActorError, ServeReplicaUnavailable)  # the replica died or went away before answering


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    """A replica's reply, or its error raised as the typed error it was on the replica."""
    if "error" in reply:
        raise ServiceError.from_wire(reply["error"])
    return reply


def event_from_wire(item: dict[str, Any]) -> TokenEvent | GenerationResult:
    if "error" in item:
        raise ServiceError.from_wire(item["error"])
    if "result" in item:
        result = dict(item["result"])
        if result.get("logprobs") is not None:
            result["logprobs"] = [_logprob_from_wire(lp) for lp in result["logprobs"]]
        return GenerationResult(**result)
    logprob = item.get("logprob")
    return TokenEvent(item["token_id"], item["text"], None if logprob is None else _logprob_from_wire(logprob))


def _logprob_from_wire(data: dict[str, Any]) -> TokenLogprob:
    return TokenLogprob(int(data["token_id"]), str(data["text"]), float(data["logprob"]),
                        tuple((int(i), str(t), float(v)) for i, t, v in data.get("top") or ()))


class ClusterAdapterService:
    def __init__(self, settings: Settings, replicas: Any, state: Any, base_name: str) -> None:
        self.settings = settings
        self.replicas = replicas
        self.state = state
        self.model_name = base_name
        self.store = AdapterStore(settings.store)  # the one writer, so its crash clean-up is safe here
        self.metrics = ServiceMetrics()
        self.sources = SourceRegistry.from_settings(settings)
        self._in_use: Counter[str] = Counter()  # downloads, exports and merges reading an adapter here
        self._unused = asyncio.Condition()
        # Usage of the generations this ingress relayed; loads and evictions happen on replicas: None here.
        self._usage: dict[str, AdapterUsage] = {}

    async def call_replica(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await a replica call; if its replica died first, send it again (Serve routes it to a live one)."""
        for attempt in range(self.settings.replica_retries + 1):
            try:
                return await call()
            except _RETRYABLE as exc:
                log.warning("replica gone before answering (attempt %d): %s", attempt + 1, type(exc).__name__)
        raise ReplicaUnavailableError("no model replica answered; retry later")

    async def _entry(self, adapter_id: str) -> dict[str, Any]:
        entry = await self.state.lookup.remote(adapter_id)
        if entry is None:
            listing = await self.state.listing.remote()
            raise AdapterNotFoundError(adapter_id, [e["id"] for e in listing["adapters"]])
        return entry

    @asynccontextmanager
    async def _lease(self, adapter_id: str) -> AsyncIterator[dict[str, Any]]:
        """Hold an adapter in use on the ingress: a delete removes its files only after the lease ends."""
        entry = await self._entry(adapter_id)
        self._in_use[adapter_id] += 1
        try:
            yield entry
        finally:
            self._in_use[adapter_id] -= 1
            if not self._in_use[adapter_id]:
                del self._in_use[adapter_id]
            async with self._unused:
                self._unused.notify_all()

    # ---- reads -------------------------------------------------------------------------------------------

    def _adapter_usage(self, adapter_id: str) -> AdapterUsage:
        return self._usage.setdefault(adapter_id, AdapterUsage(loads=None, evictions=None))

    def _view(self, entry: dict[str, Any], active: str | None, resident: set[str]) -> AdapterView:
        is_resident = model_id(entry["id"], entry["version"]) in resident
        return adapter_view(entry["summary"], adapter_id=entry["id"], sha256=entry["sha256"],
                            created_at=entry["created_at"], active=entry["id"] == active, resident=is_resident,
                            resident_bytes=entry["resident_bytes"] if is_resident else 0, load_ms=None,
                            usage=replace(self._adapter_usage(entry["id"])))

    async def get(self, adapter_id: str) -> AdapterView:
        entry = await self._entry(adapter_id)
        listing = await self.state.listing.remote()
        return self._view(entry, listing["active"], set(listing["resident"]))

    async def list(self) -> Listing:
        listing = await self.state.listing.remote()
        resident = set(listing["resident"])
        return Listing([self._view(e, listing["active"], resident) for e in listing["adapters"]], listing["active"])

    # ---- residency: each replica keeps its own LRU (Serve multiplexing) -------------------------------------

    async def pin(self, adapter_id: str) -> AdapterView:
        await self._refuse_residency(adapter_id, "pinning")

    async def unpin(self, adapter_id: str) -> AdapterView:
        await self._refuse_residency(adapter_id, "unpinning")

    async def prefetch(self, adapter_id: str) -> AdapterView:
        await self._refuse_residency(adapter_id, "prefetching")

    async def _refuse_residency(self, adapter_id: str, what: str) -> NoReturn:
        await self._entry(adapter_id)  # an unknown id is a 404 here too
        raise NotSupportedError(
            f"{what} adapters is not available on a Ray cluster: each replica keeps its own least recently used "
            f"set of up to {self.settings.max_adapters_per_replica} adapters (--max-adapters-per-replica) and "
            "loads the others on first use", {"adapter_id": adapter_id, "operation": what})

    async def health(self) -> Health:
        listing = await self.state.listing.remote()
        resident = set(listing["resident"])
        entries = listing["adapters"]
        return Health(
            status="ok", model=self.model_name, device=self.settings.device, active_adapter=listing["active"],
            adapters=len(entries), adapters_resident=len(resident),
            adapter_bytes=sum(e["resident_bytes"] for e in entries if model_id(e["id"], e["version"]) in resident),
            extra={"replicas": listing["replicas"]},  # replica id -> model ids it holds
        )

    # ---- changes -----------------------------------------------------------------------------------------

    async def upload(self, files: list[tuple[str, BinaryIO]], adapter_id: str | None) -> AdapterView:
        return await self._create(adapter_id, lambda: asyncio.to_thread(
            self.store.stage_files, files, self.settings.max_upload_bytes))

    async def load_from_source(self, adapter_id: str | None, source: str, replace: bool = False) -> AdapterView:
        """Fetched by the ingress (the store's one writer) into its staging area, then as an upload; taking
        over an id as `LocalAdapterService.load_from_source` does."""
        def stage() -> Awaitable[StagedAdapter]:
            return asyncio.to_thread(self.sources.stage, self.store, source, self.settings.max_upload_bytes)

        entry = await self.state.lookup.remote(adapter_id) if adapter_id is not None else None
        if entry is not None and not replace:
            raise AdapterExistsError(adapter_id)
        if adapter_id is None or not (entry is not None or await asyncio.to_thread(self._unloaded, adapter_id)):
            return await self._create(adapter_id, stage)
        with storage_errors():
            staged = await stage()
        try:
            if entry is not None and entry["version"] == adapter_version(staged.sha256, staged.config_sha256):
                return await self.get(adapter_id)  # the same files: nothing to do
            # Validated on a replica before the old adapter goes: a bad replacement changes nothing.
            checked(await self.call_replica(lambda: self.replicas.validate.remote(adapter_id, str(staged.path))))
            if entry is not None:
                await self.delete(adapter_id)
            else:
                with storage_errors():
                    await asyncio.to_thread(self.store.delete, adapter_id)

            async def staged_again() -> StagedAdapter:
                return staged

            return await self._create(adapter_id, staged_again)
        finally:
            await asyncio.to_thread(staged.discard)

    def _unloaded(self, adapter_id: str) -> bool:
        try:
            return self.store.exists(adapter_id) and not self.store.get(adapter_id).served
        except ServiceError:
            return False

    async def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], spec: MergeSpec) -> AdapterView:
        """A replica merges the sources' stored versions into a staging directory; committed like an upload."""
        if not sources:
            raise InvalidMergeError("a merge needs at least one source adapter")
        spec.weights = [weight for _, weight in sources]

        async def stage() -> StagedAdapter:
            names = [model_id(e["id"], e["version"]) for e in [await self._entry(s) for s, _ in sources]]
            directory = await asyncio.to_thread(tempfile.mkdtemp, prefix="merge-", dir=self.store.staging)
            try:
                checked(await self.call_replica(lambda: self.replicas.merge.remote(names, spec, directory)))
                return await asyncio.to_thread(self.store.stage_directory, Path(directory))
            finally:
                await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

        return await self._create(adapter_id, stage)

    async def _create(self, adapter_id: str | None, stage: Callable[[], Awaitable[StagedAdapter]]) -> AdapterView:
        """Reserve the id -> stage -> validate on a replica -> commit to the store -> publish the version;
        all or nothing."""
        adapter_id = claim_adapter_id(adapter_id, {self.model_name, BASE})
        code = await self.state.reserve.remote(adapter_id)
        if code == "adapter_exists":
            raise AdapterExistsError(adapter_id)
        if code is not None:
            raise AdapterLimitError(self.settings.max_adapters)
        staged = None
        committed = False
        try:
            with storage_errors():
                staged = await stage()
            reply = checked(await self.call_replica(
                lambda: self.replicas.validate.remote(adapter_id, str(staged.path))))
            with storage_errors():
                stored = await asyncio.to_thread(self.store.commit, adapter_id, staged, reply["summary"])
            committed = True
            entry = stored_entry(stored, reply["resident_bytes"])
            await self.state.register.remote(entry)  # visible to every replica from here on
        finally:
            if not committed:
                await self.state.release.remote(adapter_id)
                if staged is not None:
                    await asyncio.to_thread(staged.discard)
        listing = await self.state.listing.remote()
        return self._view(entry, listing["active"], set(listing["resident"]))

    async def delete(self, adapter_id: str) -> Deletion:
        """Hide at once, wait until every live replica freed it and the ingress's readers are done, then
        remove the files (an unloaded adapter's files at once)."""
        if await self.state.lookup.remote(adapter_id) is None and await asyncio.to_thread(self._unloaded, adapter_id):
            with storage_errors():
                await asyncio.to_thread(self.store.delete, adapter_id)
            return Deletion(adapter_id, 0)
        return await self._remove(adapter_id, keep_files=False)

    async def unload(self, adapter_id: str) -> Deletion:
        """As a delete, except that the files stay in the store, marked not served."""
        return await self._remove(adapter_id, keep_files=True)

    async def _remove(self, adapter_id: str, keep_files: bool) -> Deletion:
        begun = await self.state.begin_delete.remote(adapter_id)
        if begun is None:
            raise AdapterNotFoundError(adapter_id)
        epoch, entry = begun
        try:
            name = model_id(adapter_id, entry["version"])
            timeout = self.settings.request_timeout_s + 2 * self.settings.replica_lease_s
            acks = await self.state.wait_acked.remote(epoch, name, timeout)
            if acks["pending"]:
                log.error("replicas %s did not confirm freeing %s; they refuse it anyway", acks["pending"], name)
            async with self._unused:
                await self._unused.wait_for(lambda: not self._in_use.get(adapter_id))
            with storage_errors():
                if keep_files:
                    await asyncio.to_thread(self.store.set_served, adapter_id, False)
                else:
                    await asyncio.to_thread(self.store.delete, adapter_id)
        except BaseException:
            await self.state.abort_delete.remote(adapter_id)
            raise
        await self.state.finish_delete.remote(adapter_id)
        self._usage.pop(adapter_id, None)
        self.metrics.forget_adapter(adapter_id)
        return Deletion(adapter_id, sum(acks["freed"].values()))

    async def activate(self, adapter_id: str, fuse: bool = False) -> Activation:
        """The cluster-wide default; with `fuse`, every replica runs it on merged weights once it holds it
        (checked on a replica first: not_mergeable for adapter types that cannot merge)."""
        entry = await self._entry(adapter_id)
        if fuse:
            name = model_id(entry["id"], entry["version"])
            checked(await self.call_replica(lambda: self.replicas.check_fusable.remote(name)))
        await self._switch(adapter_id, fuse)
        return Activation(adapter_id, fuse)

    async def deactivate(self) -> Activation:
        await self._switch(None, False)
        return Activation(None)

    async def _switch(self, adapter_id: str | None, fuse: bool) -> None:
        """Cluster state and store pointer change together: a store failure puts the state back."""
        listing = await self.state.listing.remote()
        previous = (listing["active"], await self.state.fused_model.remote() is not None)
        if not await self.state.activate.remote(adapter_id, fuse):
            raise AdapterNotFoundError(adapter_id or "")
        try:
            with storage_errors():
                await asyncio.to_thread(self.store.set_active, adapter_id, fuse)  # restored at a cluster restart
        except BaseException:
            await self.state.activate.remote(*previous)
            raise

    # ---- reading an adapter's files ----------------------------------------------------------------------

    async def download(self, adapter_id: str) -> Path:
        async with self._lease(adapter_id):
            stored = await asyncio.to_thread(self.store.get, adapter_id)
            with storage_errors():
                return await owned_file(asyncio.to_thread(self.store.zip_copy, stored))

    async def export(self, adapter_id: str) -> Export:
        """The merged checkpoint's tar, built and streamed by a replica from the stored version."""
        lease = self._lease(adapter_id)
        entry = await lease.__aenter__()
        try:
            name = model_id(entry["id"], entry["version"])
            chunks, head = await self._stream(lambda: self.replicas.options(stream=True).export_stream.remote(name))
        except BaseException:
            await lease.__aexit__(None, None, None)
            raise
        return Export(_relay(chunks, lambda item: item, lease), served_by=head["replica"])

    # ---- generation --------------------------------------------------------------------------------------

    async def generate(self, request: GenerationInput) -> Generation:
        status, entry, fused = await self.state.route.remote(request.adapter)
        if status != "ok":
            listing = await self.state.listing.remote()
            raise AdapterNotFoundError(request.adapter or "", [e["id"] for e in listing["adapters"]])
        name = model_id(entry["id"], entry["version"]) if entry else ""
        streaming = self.replicas.options(multiplexed_model_id=name, stream=True)
        wire = {**request.to_wire(), "adapter": entry["id"] if entry else BASE}
        chunks, head = await self._stream(lambda: streaming.generate_stream.remote(wire, fused))
        adapter_id = entry["id"] if entry else None
        generation = Generation(adapter_id, _relay(chunks, event_from_wire), served_by=head["replica"])
        usage = self._adapter_usage(adapter_id) if adapter_id is not None else None
        generation.events = MeteredEvents(generation.events, adapter_id or BASE, self.metrics, usage,
                                          generation.tokens)
        return generation

    async def _stream(self, start: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """Start a replica's streaming method; its first item is a head (an error raises here)."""
        chunks = None

        async def first() -> Any:
            nonlocal chunks
            chunks = start()
            return await chunks.__anext__()

        head = checked(await self.call_replica(first))  # retried only before the first item
        return chunks, head


async def _relay(chunks: Any, convert: Callable[[Any], Any], lease=None) -> AsyncIterator[Any]:
    """The rest of a replica's stream; closing it cancels the replica's work (the client went away)."""
    try:
        async for item in chunks:
            yield convert(item)
    finally:
        chunks.cancel()
        if lease is not None:
            await lease.__aexit__(None, None, None)
