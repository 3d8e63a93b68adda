"""Adapter lifecycle across store, runtime and engine: create, delete, activate, restore. All or nothing.

Create (upload, server path, merge): stage -> prepare (validate, build tensors off the engine thread) ->
attach (engine thread) -> commit (one atomic rename in the store) -> register. A failure at any step undoes
the earlier ones: nothing is left in the store, the model or the registry.

Create under the id of an unloaded adapter (files kept, not served) replaces those files in the store.

Replace (vLLM's load_inplace): stage -> prepare (the old version serves meanwhile; an invalid new one
changes nothing) -> close the id's gate (new requests wait, no 404) -> wait for the old version's leases
-> store replace (can fail: the old version serves on) -> swap old for new in the model in one engine
call -> open the gate. So every request runs wholly on the old version or wholly on the new one.

Delete: hide (new requests 404) -> wait for leases -> store delete (the one step that can fail; undone by
unhiding) -> detach from the model -> unregister. Unload is the same with the store step "mark not served"
(files kept; not restored at start-up). Activate/deactivate: engine switch -> store pointer; a
store failure switches the engine back.

Lock discipline: event loop thread only; `_activation` serialises activations so the engine, the store and
`active`/`fused` agree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import suppress

from ..engine import Engine
from ..errors import AdapterNotFoundError
from ..failpoints import failpoint
from ..memory import release_free_memory
from ..metrics import ServiceMetrics
from ..runtime import AdapterRuntime, LoadedAdapter
from ..runtime.adapter_types.base import NotMergeableError
from ..store import AdapterStore, StagedAdapter, StoredAdapter
from .registry import AdapterRecord, AdapterRegistry
from .residency import Residency
from .storage_errors import storage_errors

log = logging.getLogger(__name__)


class Lifecycle:
    def __init__(
        self, registry: AdapterRegistry, residency: Residency, store: AdapterStore, engine: Engine,
        metrics: ServiceMetrics,
    ) -> None:
        self.registry = registry
        self.residency = residency
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.active: str | None = None
        self.fused = False  # the active adapter runs from merged weights (see runtime.fuse)
        self._activation = asyncio.Lock()
        # Adapter id -> an event set when its replace ends; requests for that id wait for it (`replaced`).
        self.replacing: dict[str, asyncio.Event] = {}

    # ---- start-up ----------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Register every stored adapter; load the active one first, then the most recent up to the resident
        limit. A corrupt or invalid entry is logged and skipped, never stopping start-up."""
        stored, corrupt = self.store.scan()
        for entry in corrupt:
            log.error("skipping corrupt store entry %s: %s", entry.id, entry.reason)
        self.registry.unloaded = {item.id: item for item in stored if not item.served}
        if self.registry.unloaded:
            log.info("not serving %d unloaded adapter(s) kept in the store: %s", len(self.registry.unloaded),
                     ", ".join(self.registry.unloaded))
        stored = [item for item in stored if item.served]
        active = self.store.get_active()
        for item in sorted(stored, key=lambda s: (s.id != active, s.created_at)):
            record = AdapterRecord(item)
            if self.residency.resident_count < self.residency.max_resident:
                start = time.perf_counter()
                try:
                    record.loaded = self.engine.call_sync(lambda rt, item=item: rt.load(item.id, item.path))
                except Exception as exc:  # a stored adapter that no longer fits must not stop start-up
                    log.error("skipping stored adapter %s: %s", item.id, exc)
                    continue
                record.load_ms = (time.perf_counter() - start) * 1000
                self.residency.counted_load(record)
            self.registry.add(record)
        if active is not None and active in self.registry.records and self.registry.records[active].loaded:
            fused = self.store.get_active_fused()
            self.engine.call_sync(lambda rt: _switch(rt, active, fused))
            self.active, self.fused = active, fused
        elif active is not None:
            log.error("active adapter %s is not available; serving the base model by default", active)
        log.info("restored %d adapter(s) from %s (%d resident); active: %s", len(self.registry.records),
                 self.store.root, self.residency.resident_count, self.active)

    # ---- create ------------------------------------------------------------------------------------------

    async def create(self, adapter_id: str, stage: Callable[[], StagedAdapter]) -> AdapterRecord:
        """Stage -> prepare -> attach -> commit -> register (the id must be reserved by the caller)."""
        staged = None
        try:
            with storage_errors():
                staged = await asyncio.to_thread(stage)
            start = time.perf_counter()
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, staged.path)
            record: AdapterRecord | None = None

            async def commit(loaded: LoadedAdapter) -> None:
                nonlocal record, staged
                failpoint("upload.attached")
                with storage_errors():
                    stored = await asyncio.to_thread(self._commit, adapter_id, staged, _summary(loaded))
                staged = None
                self.registry.unloaded.pop(adapter_id, None)
                record = AdapterRecord(stored, loaded, time.monotonic(), (time.perf_counter() - start) * 1000)
                self.registry.add(record)  # resident from here on, before the slot is given back

            await self.residency.attach(prepared, keep=adapter_id, then=commit)
            assert record is not None
            self.residency.counted_load(record)
            log.info("adapter %s loaded (%d bytes resident, %.1f ms)", adapter_id, record.resident_bytes,
                     record.load_ms)
            return record
        finally:
            if staged is not None:
                await asyncio.to_thread(staged.discard)

    def _commit(self, adapter_id: str, staged: StagedAdapter, summary: dict) -> StoredAdapter:
        """Store a new adapter; under the id of an unloaded one, its kept files are replaced (store thread)."""
        if adapter_id in self.registry.unloaded:
            try:
                return self.store.replace(adapter_id, staged, summary)
            except AdapterNotFoundError:  # its files were deleted meanwhile: a plain commit then
                pass
        return self.store.commit(adapter_id, staged, summary)

    # ---- replace -----------------------------------------------------------------------------------------

    async def replaced(self, adapter_id: str | None) -> None:
        """Return once no replace of the adapter is under way (without suspending when none is)."""
        while adapter_id is not None and (event := self.replacing.get(adapter_id)) is not None:
            await event.wait()

    async def replace(self, adapter_id: str, stage: Callable[[], StagedAdapter]) -> AdapterRecord:
        """Serve new files under a served adapter's id; requests see the old version until the new one is
        committed, then the new one (see the module docstring). The same files are a no-op."""
        self.registry.get(adapter_id)  # 404 before any staging
        staged = None
        try:
            with storage_errors():
                staged = await asyncio.to_thread(stage)
            record = self.registry.get(adapter_id)
            if (record.stored.sha256, record.stored.config_sha256) == (staged.sha256, staged.config_sha256):
                return record
            start = time.perf_counter()
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, staged.path)
            await self.replaced(adapter_id)  # one replace of an id at a time: the later one wins
            done = self.replacing[adapter_id] = asyncio.Event()
            try:
                await self._drain(adapter_id)  # the old version's requests finish on it
                async with self._activation:
                    record = self.registry.get(adapter_id)  # a delete under way hides it: 404
                    fused = self.fused and self.active == adapter_id
                    blocker = prepared.merge_blocker() if fused else None
                    if blocker is not None:
                        raise NotMergeableError(f"adapter '{adapter_id}' is active and fused, and its new version "
                                                f"cannot be fused: {blocker}", {"adapter_id": adapter_id})
                    with storage_errors():
                        stored = await asyncio.to_thread(self.store.replace, adapter_id, staged, _summary(prepared))
                    staged = None
                    record.stored = stored
                    # A request that passed the gate before it closed may have taken its lease since (after
                    # compiling a grammar): it finishes on the weights it started with. From the last check to
                    # the swap's submission nothing suspends (the load lock is free: no lease, no delete).
                    await self._drain(adapter_id)
                    if record.loaded is not None:  # else (evicted) the new files load on first use
                        async with self.residency.load_lock(adapter_id):
                            await self.engine.call(lambda rt: _swap(rt, prepared))
                        record.loaded = prepared
                        record.load_ms = (time.perf_counter() - start) * 1000
                        self.residency.counted_load(record)
            finally:
                del self.replacing[adapter_id]
                done.set()
            await asyncio.to_thread(release_free_memory)  # the old version's tensors are gone
            log.info("adapter %s replaced in place (%d bytes resident)", adapter_id, record.resident_bytes)
            return record
        finally:
            if staged is not None:
                await asyncio.to_thread(staged.discard)

    async def _drain(self, adapter_id: str) -> None:
        """Return once no lease holds the adapter (returns without suspending when none does)."""
        while self.residency.in_use(adapter_id):
            await self.residency.wait_unused(adapter_id)

    # ---- delete ------------------------------------------------------------------------------------------

    async def delete(self, adapter_id: str, keep_files: bool = False) -> int:
        """Hide, wait for its users, remove the files, free the tensors; the bytes freed. With `keep_files`
        (an unload) the files stay in the store, marked not served, instead of being removed."""
        record = self.registry.hide(adapter_id)  # new requests get 404 from now on
        start = time.perf_counter()
        try:
            await self.residency.wait_unused(adapter_id)
            async with self._activation:  # an activation under way finishes first; none starts on a hidden id
                failpoint("delete.drained")
                with storage_errors():  # either also unsets the stored active pointer
                    if keep_files:
                        await asyncio.to_thread(self.store.set_served, adapter_id, False)
                    else:
                        await asyncio.to_thread(self.store.delete, adapter_id)
                if self.active == adapter_id:
                    await self.engine.call(lambda rt: _switch(rt, None, False))
                    self.active, self.fused = None, False
        except BaseException:
            self.registry.unhide(adapter_id)  # the store still holds it: so does everything else
            raise
        freed = await self.residency.detach(record)
        self.registry.remove(adapter_id)
        if keep_files:
            self.registry.unloaded[adapter_id] = dataclasses.replace(record.stored, served=False)
        self.residency.forget(adapter_id)
        self.metrics.delete_seconds.observe(time.perf_counter() - start)
        self.metrics.forget_adapter(adapter_id)
        del record
        await asyncio.to_thread(release_free_memory)  # its tensors are gone: give their pages back
        log.info("adapter %s %s (%d bytes freed)", adapter_id, "unloaded, files kept" if keep_files else "deleted",
                 freed)
        return freed

    # ---- activation ----------------------------------------------------------------------------------------

    async def activate(self, adapter_id: str | None, fuse: bool = False) -> tuple[str | None, bool]:
        """Make an adapter the default (None: the base model); with `fuse`, its requests run on merged
        weights. Engine and store change together or not at all."""
        async with self._activation:
            previous = (self.active, self.fused)
            if adapter_id is None:
                await self._switch(None, False, previous)
                return None, False
            async with self.residency.lease(adapter_id):  # a delete waits until the switch is recorded
                await self.residency.ensure_resident(adapter_id)
                await self._switch(adapter_id, fuse, previous)
            return adapter_id, fuse

    async def _switch(self, adapter_id: str | None, fuse: bool, previous: tuple[str | None, bool]) -> None:
        await self.engine.call(lambda rt: _switch(rt, adapter_id, fuse))
        try:
            with storage_errors():
                await asyncio.to_thread(self.store.set_active, adapter_id, fuse)
        except BaseException:
            with suppress(Exception):  # the previous state was valid a moment ago
                await self.engine.call(lambda rt: _switch(rt, *previous))
            raise
        self.active, self.fused = adapter_id, fuse and adapter_id is not None


def _summary(loaded: LoadedAdapter) -> dict:
    """What the store's manifest keeps of a loaded adapter (shown while it is not resident)."""
    return {**loaded.config.summary(), "rank": loaded.rank, "warnings": list(loaded.report.warnings)}


def _swap(rt: AdapterRuntime, new: LoadedAdapter) -> None:
    """Put a prepared adapter in place of the attached one of the same id, keeping it active and fused as the
    old one was (on the engine thread, between forward steps; nothing here fails for a prepared adapter)."""
    adapter_id = new.adapter_id
    active, fused = rt.active == adapter_id, rt.fused == adapter_id
    rt.delete(adapter_id)
    rt.attach(new)
    if active:
        rt.activate(adapter_id)
    if fused:
        rt.fuse(adapter_id)


def _switch(rt: AdapterRuntime, adapter_id: str | None, fuse: bool) -> None:
    """Set the runtime's default adapter and fused state (on the engine thread)."""
    if adapter_id is not None and fuse:
        rt.fuse(adapter_id)  # may raise NotMergeableError: nothing changed then
    else:
        rt.unfuse()
    rt.activate(adapter_id)
