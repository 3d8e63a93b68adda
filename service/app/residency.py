"""Which adapters are in model memory, and which are in use.

- Leases: every operation that reads an adapter's tensors or files (a generation, an export, a download, a
  merge source) holds a lease; delete waits until there is none, eviction never picks a leased adapter.
- Residency: at most `max_resident` adapters are attached; loading another evicts the least recently used
  idle one, or waits until one is idle (memory stays bounded).

Lock discipline: event loop thread only. `_room` (a Condition) is notified whenever a slot or an evictable
adapter may have become free; one lock per adapter id serialises its load against its detach.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ..engine import Engine
from ..memory import release_free_memory
from ..metrics import ServiceMetrics
from ..runtime import LoadedAdapter
from .registry import AdapterRecord, AdapterRegistry

log = logging.getLogger(__name__)


class Residency:
    def __init__(
        self, registry: AdapterRegistry, engine: Engine, max_resident: int, metrics: ServiceMetrics,
        pinned: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.max_resident = max_resident
        self.metrics = metrics
        self.pinned = pinned  # adapters never evicted (the fused active one)
        self._in_use: Counter[str] = Counter()
        self._idle: dict[str, asyncio.Event] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Condition()
        self._slots_reserved = 0  # loads that passed make_room but are not registered as resident yet

    @property
    def resident_count(self) -> int:
        return sum(r.loaded is not None for r in self.registry.records.values())

    # ---- leases ------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, adapter_id: str | None) -> AsyncIterator[AdapterRecord | None]:
        """Hold the adapter in use: neither delete nor eviction takes it away until the block ends."""
        if adapter_id is None:
            yield None
            return
        record = self.registry.get(adapter_id)
        self._in_use[adapter_id] += 1
        try:
            yield record
        finally:
            self._in_use[adapter_id] -= 1
            if self._in_use[adapter_id] == 0:
                del self._in_use[adapter_id]
                event = self._idle.get(adapter_id)
                if event is not None:
                    event.set()
                await self._room_changed()

    def in_use(self, adapter_id: str) -> bool:
        return bool(self._in_use.get(adapter_id))

    async def wait_unused(self, adapter_id: str) -> None:
        """Return once no lease holds the adapter (call after hiding it, so no new lease can start)."""
        if self._in_use.get(adapter_id):
            event = self._idle.setdefault(adapter_id, asyncio.Event())
            event.clear()
            await event.wait()
        self._idle.pop(adapter_id, None)

    # ---- loading and eviction ------------------------------------------------------------------------------

    def load_lock(self, adapter_id: str) -> asyncio.Lock:
        return self._load_locks.setdefault(adapter_id, asyncio.Lock())

    def forget(self, adapter_id: str) -> None:
        self._load_locks.pop(adapter_id, None)
        self._idle.pop(adapter_id, None)

    async def ensure_resident(self, adapter_id: str | None) -> None:
        """Load the adapter into model memory if it is not (call while holding a lease)."""
        if adapter_id is None:
            return
        record = self.registry.get(adapter_id)
        record.last_used = time.monotonic()
        if record.loaded is not None:
            return
        async with self.load_lock(adapter_id):
            if record.loaded is not None:
                return
            start = time.perf_counter()
            prepared = await asyncio.to_thread(self.engine.runtime.prepare, adapter_id, record.stored.path)
            # Registered as resident inside `attach`, before its slot is given back: counted by the next load.
            await self.attach(prepared, keep=adapter_id, then=lambda loaded: setattr(record, "loaded", loaded))
            record.load_ms = (time.perf_counter() - start) * 1000
            self.counted_load(record)
            log.info("adapter %s loaded on demand in %.1f ms", adapter_id, record.load_ms)

    async def attach(self, prepared: LoadedAdapter, keep: str, then: Callable[[LoadedAdapter], object] | None = None):
        """Attach a prepared adapter, making room first. `then(loaded)` runs (awaited if a coroutine) while the
        slot is still reserved, so the adapter counts as resident before another load can take the slot; if
        it raises, the adapter is detached again."""
        await self._make_room(keep)
        try:
            loaded = await self.engine.call(lambda rt: rt.attach(prepared))
            if then is not None:
                try:
                    outcome = then(loaded)
                    if asyncio.iscoroutine(outcome):
                        await outcome
                except BaseException:
                    await self.engine.call(lambda rt: rt.delete(loaded.adapter_id))
                    raise
            return loaded
        finally:
            self._slots_reserved -= 1
            await self._room_changed()

    async def detach(self, record: AdapterRecord) -> int:
        """Free the adapter's tensors (it stays registered and loads again on use); the bytes freed."""
        async with self.load_lock(record.id):
            if record.loaded is None:
                return 0
            record.loaded = None
            freed = await self.engine.call(lambda rt: rt.delete(record.id))
        await self._room_changed()
        return freed

    async def _make_room(self, keep: str) -> None:
        """Reserve a resident slot, evicting the least recently used idle adapter when all are taken."""
        async with self._room:
            while self.resident_count + self._slots_reserved >= self.max_resident:
                idle = [
                    r for r in self.registry.records.values()
                    if r.loaded is not None and r.id != keep and not self._in_use.get(r.id)
                    and not self.registry.hidden(r.id) and not self.pinned(r.id)
                ]
                if not idle:
                    await self._room.wait()
                    continue
                victim = min(idle, key=lambda r: r.last_used)
                victim.loaded = None  # from now on a request for it loads it again (after this delete runs)
                await self.engine.call(lambda rt, victim_id=victim.id: rt.delete(victim_id))
                victim.usage.evictions = (victim.usage.evictions or 0) + 1
                self.metrics.adapter_evictions.inc()
                await asyncio.to_thread(release_free_memory)
                log.info("evicted adapter %s (least recently used)", victim.id)
            self._slots_reserved += 1

    def counted_load(self, record: AdapterRecord) -> None:
        """Count a load into model memory (metrics and the adapter's usage); `record.load_ms` is its duration."""
        record.usage.loads = (record.usage.loads or 0) + 1
        self.metrics.adapter_loads.inc()
        if record.load_ms is not None:
            self.metrics.load_seconds.observe(record.load_ms / 1000)

    async def _room_changed(self) -> None:
        async with self._room:
            self._room.notify_all()
