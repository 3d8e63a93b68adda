"""The single-process service: one base model, its engine, and the adapter store on local disk.

Composes the registry (ids), residency (leases, LRU), lifecycle (create, delete, activate, restore) and
admission (generations) into the `AdapterService` interface.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import BinaryIO

from ..cpu import configure_threads
from ..engine import Engine, GenerationRequest
from ..errors import AdapterExistsError, InvalidMergeError
from ..failpoints import failpoint
from ..memory import configure_allocator
from ..merging import MergeSpec, merge
from ..merging.adapter_files import write_peft_adapter
from ..merging.export import MergedCheckpoint, stream_checkpoint_tar
from ..metrics import ServiceMetrics
from ..model_loading import BaseModel, load_base_model
from ..runtime import AdapterRuntime, LoadedAdapter
from ..settings import MiB, Settings
from ..store import AdapterStore, StagedAdapter
from .admission import Admission
from .interface import BASE, Activation, AdapterView, Deletion, Export, Generation, GenerationInput, Health, Listing
from .lifecycle import Lifecycle
from .registry import AdapterRecord, AdapterRegistry, record_view, unloaded_view
from .residency import Residency
from .sources import SourceRegistry
from .staged_files import owned_file
from .storage_errors import storage_errors
from .usage import MeteredEvents

log = logging.getLogger(__name__)


class LocalAdapterService:
    """`AdapterService` for one process (`python -m service serve`)."""

    def __init__(self, settings: Settings, base: BaseModel, engine: Engine, store: AdapterStore,
                 metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.base = base
        self.model_name = base.name
        self.engine = engine
        self.store = store
        self.metrics = metrics or ServiceMetrics()
        self.registry = AdapterRegistry(settings.max_adapters, {base.name})
        self.residency = Residency(self.registry, engine, settings.max_resident_adapters, self.metrics,
                                   kept=self._kept,
                                   preemption_quantum_s=settings.preemption_quantum_s if settings.preempt_adapters
                                   else None)
        self.lifecycle = Lifecycle(self.registry, self.residency, store, engine, self.metrics)
        self.admission = Admission(engine, self.residency, settings)
        self.sources = SourceRegistry.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: ServiceMetrics | None = None) -> LocalAdapterService:
        """Load the model, open (and recover) the store, restore its adapters; the engine is not started."""
        configure_allocator()  # before the model's tensors: freed adapters' memory goes back to the OS
        configure_threads()
        base = load_base_model(settings)
        runtime = AdapterRuntime(base.model, max_rank=settings.max_adapter_rank, model_name=base.name)
        engine = Engine(base.model, base.tokenizer, runtime, max_batch_size=settings.max_batch_size,
                        max_waiting=settings.max_waiting_requests, prefill_token_budget=settings.prefill_token_budget,
                        prefix_cache_bytes=settings.prefix_cache_mb * MiB)
        service = cls(settings, base, engine, AdapterStore(settings.store), metrics)
        service.lifecycle.restore()
        service.metrics.bind(
            queue_depth=lambda: engine.waiting_requests, batch_size=lambda: engine.running_requests,
            resident=lambda: service.residency.resident_count, registered=lambda: len(service.registry.records),
            adapter_bytes=lambda: sum(r.resident_bytes for r in service.registry.records.values()),
        )
        service.metrics.bind_prefix_cache(lambda: engine.prefix_cache_stats)
        return service

    def _kept(self, adapter_id: str) -> bool:
        """Never evicted: the fused active adapter (its merged copies would be rebuilt on every load), and one
        being replaced in place (its swap expects it attached)."""
        return (self.lifecycle.fused and adapter_id == self.lifecycle.active) or adapter_id in self.lifecycle.replacing

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    # ---- reads -------------------------------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        return self.lifecycle.active

    @property
    def fused(self) -> bool:
        return self.lifecycle.fused

    def _view(self, record: AdapterRecord) -> AdapterView:
        return record_view(record, self.lifecycle.active, record.id in self.residency.pins)

    async def get(self, adapter_id: str) -> AdapterView:
        unloaded = self.registry.unloaded.get(adapter_id)
        if unloaded is not None and adapter_id not in self.registry.records:
            return unloaded_view(unloaded)
        return self._view(self.registry.get(adapter_id))

    async def list(self) -> Listing:
        """Served adapters and unloaded ones (`served` false), oldest first."""
        views = [self._view(r) for r in self.registry.visible()]
        views += [unloaded_view(s) for i, s in self.registry.unloaded.items() if i not in self.registry.records]
        return Listing(sorted(views, key=lambda v: (v.created_at, v.id)), self.lifecycle.active)

    async def health(self) -> Health:
        records = self.registry.visible()
        return Health(
            status="ok", model=self.base.name, device=str(self.base.device), active_adapter=self.lifecycle.active,
            adapters=len(records), adapter_bytes=sum(r.resident_bytes for r in records),
            adapters_resident=self.residency.resident_count, requests_running=self.engine.running_requests,
            requests_waiting=self.engine.waiting_requests,
        )

    # ---- changes -----------------------------------------------------------------------------------------

    async def upload(self, files: list[tuple[str, BinaryIO]], adapter_id: str | None) -> AdapterView:
        return await self._create(adapter_id, lambda: self.store.stage_files(files, self.settings.max_upload_bytes))

    async def load_from_source(self, adapter_id: str | None, source: str, replace: bool = False) -> AdapterView:
        def stage() -> StagedAdapter:
            return self.sources.stage(self.store, source, self.settings.max_upload_bytes)

        if adapter_id is not None and adapter_id in self.registry.records:
            if not replace:
                raise AdapterExistsError(adapter_id)
            return self._view(await self.lifecycle.replace(adapter_id, stage))
        return await self._create(adapter_id, stage)  # an unloaded adapter's kept files are replaced

    async def _create(self, adapter_id: str | None, stage: Callable[[], StagedAdapter]) -> AdapterView:
        adapter_id = self.registry.reserve(adapter_id)
        try:
            record = await self.lifecycle.create(adapter_id, stage)
        finally:
            self.registry.release(adapter_id)
        return self._view(record)

    async def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], spec: MergeSpec) -> AdapterView:
        if not sources:
            raise InvalidMergeError("a merge needs at least one source adapter")
        adapter_id = self.registry.reserve(adapter_id)
        try:
            async with AsyncExitStack() as held:  # every source stays in use until the result is committed
                loaded = [await self._tensors(held, source_id) for source_id, _ in sources]
                spec.weights = [weight for _, weight in sources]
                merged = await asyncio.to_thread(merge, loaded, spec, self.engine.runtime.index.modules)
                with storage_errors(), tempfile.TemporaryDirectory(dir=self.store.staging) as tmp:
                    directory = await asyncio.to_thread(write_peft_adapter, merged, Path(tmp))
                    failpoint("merge.written")
                    record = await self.lifecycle.create(adapter_id, lambda: self.store.stage_directory(directory))
        finally:
            self.registry.release(adapter_id)
        return self._view(record)

    async def activate(self, adapter_id: str, fuse: bool = False) -> Activation:
        active, fused = await self.lifecycle.activate(adapter_id, fuse)
        return Activation(active, fused)

    async def deactivate(self) -> Activation:
        await self.lifecycle.activate(None)
        return Activation(None)

    async def pin(self, adapter_id: str) -> AdapterView:
        await self.residency.pin(adapter_id)
        return await self.get(adapter_id)

    async def unpin(self, adapter_id: str) -> AdapterView:
        await self.residency.unpin(adapter_id)
        return await self.get(adapter_id)

    async def prefetch(self, adapter_id: str) -> AdapterView:
        async with self.residency.lease(adapter_id) as record:
            await self.residency.ensure_resident(adapter_id)
            return self._view(record)

    async def delete(self, adapter_id: str) -> Deletion:
        if adapter_id not in self.registry.records and adapter_id in self.registry.unloaded:
            with storage_errors():  # unloaded: only its files are left
                await asyncio.to_thread(self.store.delete, adapter_id)
            self.registry.unloaded.pop(adapter_id, None)
            return Deletion(adapter_id, 0)
        return Deletion(adapter_id, await self.lifecycle.delete(adapter_id))

    async def unload(self, adapter_id: str) -> Deletion:
        return Deletion(adapter_id, await self.lifecycle.delete(adapter_id, keep_files=True))

    # ---- reading an adapter's tensors or files -------------------------------------------------------------

    async def _tensors(self, held: AsyncExitStack, adapter_id: str) -> LoadedAdapter:
        """The adapter's tensors, leased in `held`: the resident copy, or one built from the store (not
        attached). The lease keeps eviction and delete away until `held` closes."""
        await self.lifecycle.replaced(adapter_id)
        record = await held.enter_async_context(self.residency.lease(adapter_id))
        if record.loaded is not None:
            return record.loaded
        return await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, record.stored.path)

    async def download(self, adapter_id: str) -> Path:
        """A zip of the adapter's files in the store's staging area; the caller removes it once sent."""
        await self.lifecycle.replaced(adapter_id)
        async with self.residency.lease(adapter_id) as record:
            with storage_errors():
                return await owned_file(asyncio.to_thread(self.store.zip_copy, record.stored))

    async def export(self, adapter_id: str) -> Export:
        held = AsyncExitStack()
        try:
            loaded = await self._tensors(held, adapter_id)
            checkpoint = MergedCheckpoint(self.engine.runtime.model, self.engine.runtime.index, loaded)
        except BaseException:
            await held.aclose()
            raise
        tar = stream_checkpoint_tar(checkpoint, self.base.tokenizer, f"{adapter_id}-merged")
        return Export(_held_chunks(tar, held))

    # ---- generation --------------------------------------------------------------------------------------

    def _resolve(self, requested: str | None) -> str | None:
        """The adapter a request runs on: None -> the active one, 'base' -> None (the base model)."""
        if requested is None:
            return self.lifecycle.active
        if requested == BASE:
            return None
        return self.registry.get(requested).id

    async def generate(self, request: GenerationInput) -> Generation:
        adapter_id = self._resolve(request.adapter)
        ids = await self.admission.tokenize(request)
        # An in-place replace of the adapter under way: wait for the new version. From here to the lease taken
        # in admission.start nothing suspends, so no lease can start while a replace swaps the weights.
        await self.lifecycle.replaced(adapter_id)
        # Looked up before the row starts: once started, nothing here may raise (the events would never be
        # closed: the row would run on, uncancelled, and its lease would never end).
        usage = self.registry.get(adapter_id).usage if adapter_id is not None else None
        events = await self.admission.start(GenerationRequest(ids, adapter_id, request.params))
        generation = Generation(adapter_id, events)
        generation.events = MeteredEvents(events, adapter_id or BASE, self.metrics, usage, generation.tokens,
                                          prompt_tokens=len(ids))
        return generation


async def _held_chunks(chunks, held: AsyncExitStack) -> AsyncIterator[bytes]:
    """The tar's chunks, each built off the event loop; the adapter's lease ends when the stream is closed."""
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk
    finally:
        await held.aclose()
