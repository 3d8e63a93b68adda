"""Adapter lifecycle across the store and the engine: upload, restore, activate, delete, and which adapter a
request uses.

Upload order (a failure at any step leaves nothing behind): stream to staging -> validate and build tensors
off the engine thread -> attach on the engine thread -> atomic commit into the store (undo the attach if
the commit fails). Delete order: refuse new requests at once -> wait for requests already admitted ->
detach on the engine thread -> remove the files.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import BinaryIO

from .api.errors import ApiError
from .engine import Engine
from .runtime import AdapterNotFoundError, LoadedAdapter
from .store import AdapterStore, StoredAdapter, new_adapter_id, validate_adapter_id

log = logging.getLogger(__name__)

BASE = "base"


@dataclass
class AdapterRecord:
    stored: StoredAdapter
    loaded: LoadedAdapter

    @property
    def id(self) -> str:
        return self.loaded.adapter_id


class AdapterManager:
    def __init__(self, store: AdapterStore, engine: Engine, max_upload_bytes: int) -> None:
        self.store = store
        self.engine = engine
        self.max_upload_bytes = max_upload_bytes
        self.records: dict[str, AdapterRecord] = {}
        self.active: str | None = None
        self._reserved: set[str] = set()  # ids with an upload in progress
        self._deleting: set[str] = set()
        self._in_flight: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}

    # ---- start-up --------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load every stored adapter again; a corrupt or invalid entry is logged and skipped."""
        stored, corrupt = self.store.scan()
        for entry in corrupt:
            log.error("skipping corrupt store entry %s: %s", entry.id, entry.reason)
        for item in stored:
            try:
                loaded = self.engine.call_sync(lambda rt, item=item: rt.load(item.id, item.path))
            except Exception as exc:  # a stored adapter that no longer fits must not stop start-up
                log.error("skipping stored adapter %s: %s", item.id, exc)
                continue
            self.records[item.id] = AdapterRecord(item, loaded)
        active = self.store.get_active()
        if active is not None and active in self.records:
            self.engine.call_sync(lambda rt: rt.activate(active))
            self.active = active
        elif active is not None:
            log.error("active adapter %s is not available; serving the base model by default", active)
        log.info("restored %d adapter(s) from %s; active: %s", len(self.records), self.store.root, self.active)

    # ---- queries -----------------------------------------------------------------------------------------

    def visible(self) -> list[AdapterRecord]:
        return [r for r in self.records.values() if r.id not in self._deleting]

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
        """Marks a request in flight so that a delete waits for it."""
        if adapter_id is None:
            yield
            return
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

    # ---- changes -----------------------------------------------------------------------------------------

    async def upload(self, files: Iterable[tuple[str, BinaryIO]], adapter_id: str | None) -> AdapterRecord:
        adapter_id = adapter_id or new_adapter_id()
        validate_adapter_id(adapter_id)
        if adapter_id in self.records or adapter_id in self._reserved:
            raise ApiError(409, "adapter_exists", f"adapter '{adapter_id}' already exists", {"adapter_id": adapter_id})
        self._reserved.add(adapter_id)
        staged = None
        try:
            staged = await asyncio.to_thread(self.store.stage_files, files, self.max_upload_bytes)
            runtime = self.engine.runtime
            prepared = await asyncio.to_thread(runtime.prepare, adapter_id, staged.path)
            loaded = await self.engine.call(lambda rt: rt.attach(prepared))
            try:
                stored = await asyncio.to_thread(self.store.commit, adapter_id, staged, loaded.config.summary())
            except BaseException:
                await self.engine.call(lambda rt: rt.delete(adapter_id))
                raise
            staged = None
            record = AdapterRecord(stored, loaded)
            self.records[adapter_id] = record
            log.info("adapter %s loaded (%d bytes resident)", adapter_id, loaded.resident_bytes)
            return record
        finally:
            self._reserved.discard(adapter_id)
            if staged is not None:
                await asyncio.to_thread(staged.discard)

    async def activate(self, adapter_id: str | None) -> str | None:
        if adapter_id is not None:
            self.get(adapter_id)
        await self.engine.call(lambda rt: rt.activate(adapter_id))
        await asyncio.to_thread(self.store.set_active, adapter_id)
        self.active = adapter_id
        return adapter_id

    async def delete(self, adapter_id: str) -> int:
        self.get(adapter_id)
        self._deleting.add(adapter_id)  # new requests get 404 from now on
        try:
            if self.active == adapter_id:
                await self.activate(None)
            if self._in_flight.get(adapter_id):
                event = self._idle.setdefault(adapter_id, asyncio.Event())
                await event.wait()
            freed = await self.engine.call(lambda rt: rt.delete(adapter_id))
            await asyncio.to_thread(self.store.delete, adapter_id)
            del self.records[adapter_id]
            log.info("adapter %s deleted (%d bytes freed)", adapter_id, freed)
            return freed
        finally:
            self._deleting.discard(adapter_id)
            self._idle.pop(adapter_id, None)
