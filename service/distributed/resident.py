"""A replica's adapters in model memory: what Serve's multiplexer caches, which requests use each one, and
freeing them (on LRU eviction or on a cluster-wide delete) only once their running requests have ended.

Names are model ids `adapter_id@version`, used as the runtime's adapter names too, so two versions of one
id are never confused. `ResidentAdapters` offers `lease` and `ensure_resident` like the local residency, so
the replica admits generations through the same `service/app/admission.py` as the single-process server.
All of it runs on the replica's event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..engine import Engine
from ..errors import AdapterNotFoundError
from ..memory import release_free_memory
from ..runtime import LoadedAdapter

log = logging.getLogger(__name__)


class ResidentAdapter:
    """One adapter version attached to this replica's runtime: the object Serve's multiplexer caches."""

    def __init__(self, book: ResidentAdapters, name: str, resident_bytes: int) -> None:
        self.name = name
        self.resident_bytes = resident_bytes
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.freeing = False  # set once a free began: no new request may use it
        self._book = book
        # Serve's multiplexer calls `model.__del__` when it evicts the least recently used model, awaiting
        # it when it is a coroutine function. An instance attribute, unlike a method, is never called by
        # garbage collection, so only a real eviction frees the adapter.
        self.__del__ = self._evicted

    async def _evicted(self) -> None:
        log.info("evicting adapter %s (least recently used on this replica)", self.name)
        await self._book.free(self.name)


class ResidentAdapters:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.records: dict[str, ResidentAdapter] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        """Held while a model id loads or frees, so a free never misses a load that was under way."""
        return self._locks.setdefault(name, asyncio.Lock())

    @property
    def names(self) -> list[str]:
        return sorted(self.records)

    async def attach(self, prepared: LoadedAdapter) -> ResidentAdapter:
        """Put a prepared adapter into the model (on the engine thread, between decode steps)."""
        loaded = await self.engine.call(lambda rt: rt.attach(prepared))
        record = self.records[loaded.adapter_id] = ResidentAdapter(self, loaded.adapter_id, loaded.resident_bytes)
        return record

    async def free(self, name: str) -> int:
        """Detach the adapter once its running requests end; the bytes freed (0 if it was not resident)."""
        record = self.records.get(name)
        if record is None:
            return 0
        record.freeing = True
        await record.idle.wait()
        if self.records.get(name) is not record:  # freed meanwhile by a concurrent eviction or delete
            return 0
        del self.records[name]
        freed = await self.engine.call(lambda rt: rt.delete(name))
        await asyncio.to_thread(release_free_memory)  # give its pages back to the OS
        log.info("adapter %s freed (%d bytes)", name, freed)
        return freed

    # ---- the leases that service/app/admission.py takes --------------------------------------------------

    @asynccontextmanager
    async def lease(self, name: str | None, parkable: bool = False) -> AsyncIterator[None]:
        """Marks a request in flight so that neither eviction nor delete frees its adapter under it (a replica
        never preempts an adapter in use: `parkable` is not used)."""
        if name is None:
            yield
            return
        record = self.records.get(name)
        if record is None or record.freeing:
            raise AdapterNotFoundError(name.rpartition("@")[0])
        record.in_flight += 1
        record.idle.clear()
        try:
            yield
        finally:
            record.in_flight -= 1
            if record.in_flight == 0:
                record.idle.set()

    async def ensure_resident(self, name: str | None) -> None:
        """Nothing to do: the replica loads through Serve's multiplexer before a request reaches here."""
