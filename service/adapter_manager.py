"""Adapter lifecycle across the store and the engine: upload, restore, activate, delete, which adapter a
request uses, and which adapters are resident in model memory.

Upload order (a failure at any step leaves nothing behind): stream to staging -> validate and build tensors
off the engine thread -> attach on the engine thread -> atomic commit into the store (undo the attach if
the commit fails). Delete order: refuse new requests at once -> wait for requests already admitted ->
detach on the engine thread -> remove the files.

Residency: at most `max_resident` adapters are loaded; the others stay in the store and are loaded on
first use, evicting the least recently used adapter that no request is using. All state here is touched
only from the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .api.errors import ApiError
from .engine import Engine
from .failpoints import failpoint
from .merging import MergedAdapter, MergeError, MergeSpec, merge
from .merging.adapter_files import write_peft_adapter
from .merging.export import MergedCheckpoint, stream_checkpoint_tar
from .metrics import ServiceMetrics
from .peft_format import CONFIG_FILE, WEIGHTS_FILE
from .runtime import AdapterNotFoundError, LoadedAdapter
from .store import AdapterStore, StagedAdapter, StoredAdapter, new_adapter_id, validate_adapter_id

log = logging.getLogger(__name__)

BASE = "base"


def merge_adapters(loaded: list[LoadedAdapter], spec: MergeSpec, modules: dict[str, Any]) -> MergedAdapter:
    """`merge` (see merging/), its MergeError as the API's 422 incompatible_sources (serve and Ray replicas)."""
    try:
        return merge(loaded, spec, modules)
    except MergeError as exc:
        raise ApiError(422, "incompatible_sources", str(exc), {"reasons": exc.reasons}) from None


@dataclass(eq=False)
class AdapterRecord:
    stored: StoredAdapter
    loaded: LoadedAdapter | None = None  # None while not resident
    last_used: float = 0.0
    load_ms: float | None = None  # duration of the latest load into model memory

    @property
    def id(self) -> str:
        return self.stored.id

    @property
    def summary(self) -> dict[str, Any]:
        return self.loaded.config.summary() if self.loaded else self.stored.config

    @property
    def rank(self) -> int:
        return self.loaded.rank if self.loaded else int(self.stored.config.get("rank", self.stored.config.get("r", 0)))

    @property
    def resident_bytes(self) -> int:
        return self.loaded.resident_bytes if self.loaded else 0


class AdapterManager:
    def __init__(
        self, store: AdapterStore, engine: Engine, max_upload_bytes: int, max_resident: int = 64,
        metrics: ServiceMetrics | None = None, max_adapters: int = 10_000,
    ) -> None:
        self.store = store
        self.max_adapters = max_adapters
        self.metrics = metrics or ServiceMetrics()
        self.engine = engine
        self.max_upload_bytes = max_upload_bytes
        self.max_resident = max_resident
        self.records: dict[str, AdapterRecord] = {}
        self.active: str | None = None
        self.fused = False  # the active adapter runs from merged weights (see runtime.fuse)
        self._reserved: set[str] = set()  # ids with an upload in progress
        self._deleting: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Condition()  # notified whenever a resident adapter may have become evictable
        self._slots_reserved = 0  # loads that passed _make_room but are not registered as resident yet
        self._activation = asyncio.Lock()

    # ---- start-up --------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Register every stored adapter and load the active one plus the most recent up to the resident
        limit; a corrupt or invalid entry is logged and skipped, never stopping start-up."""
        stored, corrupt = self.store.scan()
        for entry in corrupt:
            log.error("skipping corrupt store entry %s: %s", entry.id, entry.reason)
        active = self.store.get_active()
        order = sorted(stored, key=lambda s: (s.id != active, s.created_at), reverse=False)
        for item in order:
            record = AdapterRecord(item)
            if self.resident_count < self.max_resident:
                start = time.perf_counter()
                try:
                    record.loaded = self.engine.call_sync(lambda rt, item=item: rt.load(item.id, item.path))
                except Exception as exc:  # a stored adapter that no longer fits must not stop start-up
                    log.error("skipping stored adapter %s: %s", item.id, exc)
                    continue
                record.load_ms = (time.perf_counter() - start) * 1000
            self.records[item.id] = record
        if active is not None and active in self.records and self.records[active].loaded is not None:
            self.engine.call_sync(lambda rt: rt.activate(active))
            self.active = active
            if self.store.get_active_fused():
                self.engine.call_sync(lambda rt: rt.fuse(active))
                self.fused = True
        elif active is not None:
            log.error("active adapter %s is not available; serving the base model by default", active)
        log.info("restored %d adapter(s) from %s (%d resident); active: %s", len(self.records), self.store.root,
                 self.resident_count, self.active)

    # ---- queries -----------------------------------------------------------------------------------------

    @property
    def resident_count(self) -> int:
        return sum(r.loaded is not None for r in self.records.values())

    def visible(self) -> list[AdapterRecord]:
        records = [r for r in self.records.values() if r.id not in self._deleting]
        return sorted(records, key=lambda r: (r.stored.created_at, r.id))

    def get(self, adapter_id: str) -> AdapterRecord:
        record = self.records.get(adapter_id)
        if record is None or adapter_id in self._deleting:
            raise AdapterNotFoundError(adapter_id)
        return record

    def resolve(self, requested: str | None) -> str | None:
        """The adapter a request uses: None -> the active one, 'base' -> None (base model)."""
        if requested is None:
            return self.active
        if requested == BASE:
            return None
        return self.get(requested).id

    @asynccontextmanager
    async def serving(self, adapter_id: str | None) -> AsyncIterator[None]:
        """Marks a request in flight so that neither delete nor eviction takes its adapter away."""
        if adapter_id is None:
            yield
            return
        self.get(adapter_id)
        self._in_flight[adapter_id] += 1
        try:
            yield
        finally:
            self._in_flight[adapter_id] -= 1
            if self._in_flight[adapter_id] == 0:
                del self._in_flight[adapter_id]
                event = self._idle.get(adapter_id)
                if event is not None:
                    event.set()
                await self._room_changed()

    # ---- residency -----------------------------------------------------------------------------------------

    async def ensure_resident(self, adapter_id: str | None) -> None:
        """Load the adapter into model memory if it is not (call inside `serving`)."""
        if adapter_id is None:
            return
        record = self.get(adapter_id)
        record.last_used = time.monotonic()
        if record.loaded is not None:
            return
        lock = self._load_locks.setdefault(adapter_id, asyncio.Lock())
        async with lock:
            if record.loaded is not None:
                return
            start = time.perf_counter()
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, record.stored.path)
            await self._make_room(keep=adapter_id)
            try:
                record.loaded = await self.engine.call(lambda rt: rt.attach(prepared))
            finally:
                await self._release_slot()
            record.load_ms = (time.perf_counter() - start) * 1000
            self.metrics.load_seconds.observe(record.load_ms / 1000)
            log.info("adapter %s loaded on demand in %.1f ms", adapter_id, record.load_ms)

    async def _make_room(self, keep: str) -> None:
        """Reserve a resident slot, evicting the least recently used idle adapter when all are taken.

        When every resident adapter is in use, wait until one becomes idle: memory stays bounded by the
        limit. The caller must release the reservation (`_release_slot`) once the adapter is registered or failed.
        """
        async with self._room:
            while self.resident_count + self._slots_reserved >= self.max_resident:
                idle = [
                    r for r in self.records.values()
                    if r.loaded is not None and r.id != keep and not self._in_flight.get(r.id)
                    and r.id not in self._deleting and not (self.fused and r.id == self.active)
                ]
                if not idle:
                    await self._room.wait()
                    continue
                victim = min(idle, key=lambda r: r.last_used)
                victim.loaded = None  # from now on a request for it loads it again (after this delete runs)
                await self.engine.call(lambda rt, victim_id=victim.id: rt.delete(victim_id))
                log.info("evicted adapter %s (least recently used)", victim.id)
            self._slots_reserved += 1

    async def _release_slot(self) -> None:
        """Give back a `_make_room` reservation once its adapter counts as resident (or failed to load)."""
        self._slots_reserved -= 1
        await self._room_changed()  # fewer reserved, or the new adapter is idle and evictable

    async def _room_changed(self) -> None:
        """Wake the loads waiting in `_make_room` to count again (a slot or an evictable adapter may be free)."""
        async with self._room:
            self._room.notify_all()

    # ---- changes -----------------------------------------------------------------------------------------

    def _reserve(self, adapter_id: str | None) -> str:
        """Claim an id for an adapter being created (uploads and merges); 409 if it is taken."""
        adapter_id = adapter_id or new_adapter_id()
        validate_adapter_id(adapter_id)
        if adapter_id in self.records or adapter_id in self._reserved:
            raise ApiError(409, "adapter_exists", f"adapter '{adapter_id}' already exists", {"adapter_id": adapter_id})
        if len(self.records) + len(self._reserved) >= self.max_adapters:
            raise ApiError(409, "adapter_limit_reached", f"the store holds its limit of {self.max_adapters} adapters; "
                           "delete one first", {"max_adapters": self.max_adapters})
        self._reserved.add(adapter_id)
        return adapter_id

    async def upload(self, files: Iterable[tuple[str, BinaryIO]], adapter_id: str | None) -> AdapterRecord:
        adapter_id = self._reserve(adapter_id)
        try:
            return await self._create(adapter_id, lambda: self.store.stage_files(files, self.max_upload_bytes))
        finally:
            self._reserved.discard(adapter_id)

    async def load_from_path(self, adapter_id: str, directory: Path) -> AdapterRecord:
        """Register an adapter from a server-side directory (vLLM's load_lora_adapter); same checks as upload."""
        adapter_id = self._reserve(adapter_id)
        try:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                if not (directory / name).is_file():
                    raise ApiError(422, "invalid_upload", f"{directory} has no {name}", {"path": str(directory)})
            return await self._create(adapter_id, lambda: self.store.stage_directory(directory, self.max_upload_bytes))
        finally:
            self._reserved.discard(adapter_id)

    async def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], spec: MergeSpec) -> AdapterRecord:
        """A new stored adapter combining `sources` (PEFT's add_weighted_adapter, see merging/)."""
        if not sources:
            raise ApiError(422, "invalid_merge", "a merge needs at least one source adapter")
        adapter_id = self._reserve(adapter_id)
        try:
            loaded = [await self._loaded_or_prepared(source_id) for source_id, _ in sources]
            spec.weights = [weight for _, weight in sources]
            merged = await asyncio.to_thread(merge_adapters, loaded, spec, self.engine.runtime.index.modules)
            with tempfile.TemporaryDirectory(dir=self.store.staging) as tmp:  # cleaned at start-up too
                directory = await asyncio.to_thread(write_peft_adapter, merged, Path(tmp))
                failpoint("merge.written")
                return await self._create(adapter_id, lambda: self.store.stage_directory(directory))
        finally:
            self._reserved.discard(adapter_id)

    async def zip_adapter(self, adapter_id: str) -> Path:
        """A zip of the stored PEFT files in the staging area (the caller removes it after sending)."""
        return await asyncio.to_thread(self.store.zip_copy, self.get(adapter_id).stored)

    async def export(self, adapter_id: str, tokenizer) -> Iterator[bytes]:
        """Chunks of a tar holding the base model with this adapter merged in (see merging/export.py)."""
        loaded = await self._loaded_or_prepared(adapter_id)
        runtime = self.engine.runtime
        checkpoint = MergedCheckpoint(runtime.model, runtime.index, loaded)
        return stream_checkpoint_tar(checkpoint, tokenizer, f"{adapter_id}-merged")

    async def _loaded_or_prepared(self, adapter_id: str) -> LoadedAdapter:
        """The adapter's tensors: the resident copy, or a fresh one built from the store (not attached)."""
        record = self.get(adapter_id)
        if record.loaded is not None:
            return record.loaded
        return await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, record.stored.path)

    async def _create(self, adapter_id: str, stage: Callable[[], StagedAdapter]) -> AdapterRecord:
        """Stage -> validate and build -> attach -> commit; on any failure nothing is left behind."""
        staged = None
        try:
            staged = await asyncio.to_thread(stage)
            start = time.perf_counter()
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, staged.path)
            await self._make_room(keep=adapter_id)
            try:  # the slot stays reserved until the record exists: till then it is not counted as resident
                loaded = await self.engine.call(lambda rt: rt.attach(prepared))
                failpoint("upload.attached")
                load_ms = (time.perf_counter() - start) * 1000
                self.metrics.load_seconds.observe(load_ms / 1000)
                summary = {**loaded.config.summary(), "rank": loaded.rank}
                try:
                    stored = await asyncio.to_thread(self.store.commit, adapter_id, staged, summary)
                except BaseException:
                    await self.engine.call(lambda rt: rt.delete(adapter_id))
                    raise
                staged = None
                record = AdapterRecord(stored, loaded, time.monotonic(), load_ms)
                self.records[adapter_id] = record
            finally:
                await self._release_slot()
            log.info("adapter %s loaded (%d bytes resident, %.1f ms)", adapter_id, loaded.resident_bytes, load_ms)
            return record
        finally:
            if staged is not None:
                await asyncio.to_thread(staged.discard)

    async def activate(self, adapter_id: str | None, fuse: bool = False) -> str | None:
        """Make an adapter the default (None: the base model). With `fuse`, its requests run on merged weights
        at bare-model speed; any other fused adapter is unfused first."""
        async with self._activation:  # one at a time, so the engine, the store and `active` agree
            if adapter_id is None:
                await self.engine.call(lambda rt: (rt.activate(None), rt.unfuse()))
                await asyncio.to_thread(self.store.set_active, None, False)
                self.active, self.fused = None, False
                return None
            self.get(adapter_id)
            # The serving lease lasts until `active` is set: a concurrent delete waits for it, then sees
            # the adapter active and deactivates it (it never stays active once deleted).
            async with self.serving(adapter_id):
                await self.ensure_resident(adapter_id)

                def switch(rt) -> None:
                    rt.activate(adapter_id)
                    if fuse:
                        rt.fuse(adapter_id)
                    else:
                        rt.unfuse()

                await self.engine.call(switch)
                await asyncio.to_thread(self.store.set_active, adapter_id, fuse)
                self.active, self.fused = adapter_id, fuse
            return adapter_id

    async def delete(self, adapter_id: str) -> int:
        record = self.get(adapter_id)
        start = time.perf_counter()
        self._deleting.add(adapter_id)  # new requests get 404 from now on
        try:
            if self.active == adapter_id:
                await self.activate(None)
            if self._in_flight.get(adapter_id):
                event = self._idle.setdefault(adapter_id, asyncio.Event())
                await event.wait()
            if self.active == adapter_id:  # an activation that was in flight has just finished
                await self.activate(None)
            async with self._load_locks.setdefault(adapter_id, asyncio.Lock()):  # no load in progress
                freed = 0
                if record.loaded is not None:
                    record.loaded = None
                    freed = await self.engine.call(lambda rt: rt.delete(adapter_id))
                    await self._room_changed()
            failpoint("delete.detached")
            await asyncio.to_thread(self.store.delete, adapter_id)
            del self.records[adapter_id]
            self.metrics.delete_seconds.observe(time.perf_counter() - start)
            self.metrics.forget_adapter(adapter_id)
            log.info("adapter %s deleted (%d bytes freed)", adapter_id, freed)
            return freed
        finally:
            self._deleting.discard(adapter_id)
            self._idle.pop(adapter_id, None)
            self._load_locks.pop(adapter_id, None)
