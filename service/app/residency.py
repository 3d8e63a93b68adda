"""Which adapters are in model memory, and which are in use.

- Leases: every operation that reads an adapter's tensors or files (a generation, an export, a download, a
  merge source) holds a lease; delete waits until there is none, eviction never picks a leased adapter.
- Residency: at most `max_resident` adapters are attached; loading another evicts the least recently used
  idle, unpinned one. When every one is in use, it preempts one whose leases are all generations (preemption.py:
  its requests are parked, keeping their state, and go on exactly where they stopped once it is back), or else
  waits until one is idle (memory stays bounded). Waiting loads get slots first come, first served, so none
  waits behind later ones.
- Pins: a pinned adapter is loaded and never evicted; it counts toward the limit, so at most `max_resident`
  are pinned (and while every slot holds a pinned adapter, a load of another fails at once: PinLimitError).
  Pins live in memory only: a restart starts with none.

A load's own path (measured in bench.residency_bench): its tensors are built on a worker thread while it waits
for a slot; the eviction that makes room is queued on the engine just before its attach, so both run in one
pause between two decode steps (a few milliseconds there at most); the allocator trim after an eviction
runs in the background. What a load mostly waits for is a slot: every resident adapter in use.

Lock discipline: event loop thread only. `_room` (a Condition) is notified whenever a slot or an evictable
adapter may have become free, and `_queue` orders the loads waiting on it; one lock per adapter id serialises
its load against its detach.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

from ..engine import Engine
from ..errors import PinLimitError
from ..memory import release_free_memory
from ..metrics import ServiceMetrics
from ..runtime import LoadedAdapter
from .preemption import Preemption
from .registry import AdapterRecord, AdapterRegistry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiter:
    """A load waiting for a slot; `parked_since`: a preempted adapter coming back for its parked requests;
    `prepared`: its tensors are built (it preempts only then: the victim's rows stop for the swap alone)."""

    keep: str
    parked_since: float | None = None
    prepared: Callable[[], bool] = lambda: True


class Residency:
    def __init__(
        self, registry: AdapterRegistry, engine: Engine, max_resident: int, metrics: ServiceMetrics,
        kept: Callable[[str], bool] = lambda _: False, preemption_quantum_s: float | None = None,
    ) -> None:
        self.registry = registry
        self.engine = engine
        self.max_resident = max_resident
        self.metrics = metrics
        self.kept = kept  # adapters never evicted besides the pinned ones (the fused active one)
        self.pins: set[str] = set()
        self._in_use: Counter[str] = Counter()
        self._parkable: Counter[str] = Counter()  # of those leases, generations' (their rows can be parked)
        self._idle: dict[str, asyncio.Event] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._room = asyncio.Condition()
        self._queue: deque[_Waiter] = deque()  # loads waiting for a slot, in arrival order
        self._slots_reserved = 0  # loads that passed make_room but are not registered as resident yet
        self._background: set[asyncio.Task] = set()  # eviction clean-ups, off every request's path
        # None: an adapter in use is never preempted (a load waits until one is idle instead).
        self.preemption = None if preemption_quantum_s is None else Preemption(self, preemption_quantum_s)

    @property
    def resident_count(self) -> int:
        return sum(r.loaded is not None for r in self.registry.records.values())

    # ---- leases ------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, adapter_id: str | None, parkable: bool = False) -> AsyncIterator[AdapterRecord | None]:
        """Hold the adapter in use: neither delete nor eviction takes it away until the block ends. `parkable`:
        a generation, whose rows the engine can park while the adapter is preempted (swapped out)."""
        if adapter_id is None:
            yield None
            return
        record = self.registry.get(adapter_id)
        self._in_use[adapter_id] += 1
        self._parkable[adapter_id] += parkable
        try:
            yield record
        finally:
            self._parkable[adapter_id] -= parkable
            if self._parkable[adapter_id] == 0:
                del self._parkable[adapter_id]
            self._in_use[adapter_id] -= 1
            if self._in_use[adapter_id] == 0:
                del self._in_use[adapter_id]
                event = self._idle.get(adapter_id)
                if event is not None:
                    event.set()
                await self.room_changed()

    def pinned(self, adapter_id: str) -> bool:
        """Never evicted: pinned, or kept by the service (the fused active adapter)."""
        return adapter_id in self.pins or self.kept(adapter_id)

    def in_use(self, adapter_id: str) -> bool:
        return bool(self._in_use.get(adapter_id))

    def leases(self, adapter_id: str) -> tuple[int, int]:
        """(leases held, of which generations')."""
        return self._in_use[adapter_id], self._parkable[adapter_id]

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
        """The adapter is gone (deleted or unloaded): its lock, idle event and pin go with it."""
        self.pins.discard(adapter_id)
        self._load_locks.pop(adapter_id, None)
        self._idle.pop(adapter_id, None)
        if self.preemption is not None:
            self.preemption.forget(adapter_id)

    async def ensure_resident(self, adapter_id: str | None) -> None:
        """Load the adapter into model memory if it is not (call while holding a lease)."""
        if adapter_id is None:
            return
        await self.load(self.registry.get(adapter_id))

    async def load(self, record: AdapterRecord, parked_since: float | None = None) -> None:
        """Load a registered adapter into model memory if it is not (a hidden one too: a preempted adapter that is
        being deleted comes back for its parked requests to finish, as delete waits for them). `parked_since`:
        when it was preempted, if this load brings it back for its parked requests."""
        adapter_id = record.id
        record.last_used = time.monotonic()
        if record.loaded is not None:
            return
        if parked_since is None and self._hurry(adapter_id):
            await self.room_changed()
        async with self.load_lock(adapter_id):
            if record.loaded is not None:
                return
            start = time.perf_counter()
            # Files read and tensors built on a worker thread while this load waits for a slot.
            prepared = asyncio.ensure_future(asyncio.to_thread(self.engine.runtime.prepare, adapter_id,
                                                               record.stored.path))
            # Registered as resident inside `attach`, before its slot is given back: counted by the next load.
            await self.attach(prepared, keep=adapter_id, then=lambda loaded: setattr(record, "loaded", loaded),
                              parked_since=parked_since)
            record.load_ms = (time.perf_counter() - start) * 1000
            self.counted_load(record)
            log.info("adapter %s loaded on demand in %.1f ms", adapter_id, record.load_ms)

    def _hurry(self, adapter_id: str) -> bool:
        """A new request waits for a preempted adapter that is coming back: its load may preempt now, as a new
        one's would. Whether it was waiting."""
        waiting = [w for w in self._queue if w.keep == adapter_id and w.parked_since is not None]
        for waiter in waiting:
            waiter.parked_since = None
        return bool(waiting)

    async def attach(self, prepared: LoadedAdapter | Awaitable[LoadedAdapter], keep: str,
                     then: Callable[[LoadedAdapter], object] | None = None,
                     parked_since: float | None = None) -> LoadedAdapter:
        """Attach a prepared adapter (or one still being prepared), making room first. `then(loaded)` runs
        (awaited if a coroutine) while the slot is still reserved, so the adapter counts as resident before
        another load can take the slot; if it raises, the adapter is detached again."""
        try:
            waiter = _Waiter(keep, parked_since)
            if isinstance(prepared, asyncio.Future):
                waiter.prepared = prepared.done
                prepared.add_done_callback(lambda _: self.in_background(self.room_changed()))
            await self._make_room(waiter)
        except BaseException:
            if isinstance(prepared, asyncio.Future):
                prepared.cancel()  # its thread finishes on its own; nothing of it is kept
            raise
        try:
            adapter = prepared if isinstance(prepared, LoadedAdapter) else await prepared
            loaded = await self.engine.call(lambda rt: rt.attach(adapter))
            if self.preemption is not None:
                self.preemption.attached(loaded.adapter_id)
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
            await self.room_changed()

    # ---- pins -------------------------------------------------------------------------------------------

    async def pin(self, adapter_id: str) -> None:
        """Load the adapter if it is not resident and never evict it (idempotent); PinLimitError when
        `max_resident` adapters are pinned already. The pin is undone if the load fails."""
        self.registry.get(adapter_id)
        new = adapter_id not in self.pins
        if new:
            pinned = self.pins | {r.id for r in self.registry.records.values() if self.kept(r.id)}
            if len(pinned - {adapter_id}) >= self.max_resident:
                raise PinLimitError(self.max_resident, pinned, adapter_id)
            self.pins.add(adapter_id)
        try:
            async with self.lease(adapter_id):
                await self.ensure_resident(adapter_id)
        except BaseException:
            if new:
                self.pins.discard(adapter_id)
                await self.room_changed()
            raise

    async def unpin(self, adapter_id: str) -> None:
        """The adapter may be evicted again (it stays resident until it is the least recently used); idempotent."""
        self.registry.get(adapter_id)
        if adapter_id in self.pins:
            self.pins.discard(adapter_id)
            await self.room_changed()

    async def detach(self, record: AdapterRecord) -> int:
        """Free the adapter's tensors (it stays registered and loads again on use); the bytes freed."""
        async with self.load_lock(record.id):
            if record.loaded is None:
                return 0
            record.loaded = None
            freed = await self.engine.call(lambda rt: rt.delete(record.id))
        await self.room_changed()
        return freed

    async def _make_room(self, waiter: _Waiter) -> None:
        """Reserve a resident slot, first come first served; when all are taken, evict the least recently used
        idle, unpinned adapter, or preempt one in use (preemption.py), or wait until one is idle."""
        async with self._room:
            self._queue.append(waiter)
            try:
                while not self._admit(waiter):
                    await self._room.wait()
            finally:
                self._queue.remove(waiter)
                self._room.notify_all()  # the next load in line may find room now

    def _admit(self, waiter: _Waiter) -> bool:
        """The first waiter takes a free slot, an idle adapter's, or (if it may) a preempted one's. A later one may
        preempt when no waiter ahead of it may (those wait for a slot to come free: a request ending)."""
        preempt = (self.preemption is not None and waiter.prepared()
                   and self.preemption.may_preempt(waiter.parked_since))
        if waiter is self._queue[0]:
            return self._take_slot(waiter.keep, preempt)
        if not preempt or any(self.preemption.may_preempt(w.parked_since)
                              for w in takewhile(lambda w: w is not waiter, self._queue)):
            return False
        return self._take_slot(waiter.keep, preempt, first=False)

    def _take_slot(self, keep: str, preempt: bool, first: bool = True) -> bool:
        """Reserve a slot if one is free or can be freed now (an eviction, or a preemption if `preempt`); only
        the `first` waiter takes a free one or an idle adapter's. False: wait for a lease to end (or a quantum)."""
        free = self.resident_count + self._slots_reserved < self.max_resident
        if free and first:
            self._slots_reserved += 1
            return True
        resident = [r for r in self.registry.records.values() if r.loaded is not None]
        evictable = [r for r in resident if r.id != keep and not self.registry.hidden(r.id) and not self.pinned(r.id)]
        idle = [r for r in evictable if not self._in_use.get(r.id)]
        if (free or idle) and not first:
            return False  # the first waiter's
        if idle:
            self.evict(min(idle, key=lambda r: r.last_used))
        elif preempt and (victim := self.preemption.victim(evictable)) is not None:
            self.preemption.preempt(victim)
        else:
            pinned = [r.id for r in resident if self.pinned(r.id)]
            if len(pinned) >= self.max_resident:  # no slot will ever come free by waiting
                raise PinLimitError(self.max_resident, pinned, keep)
            return False
        self._slots_reserved += 1
        return True

    def evict(self, victim: AdapterRecord, park: bool = False) -> None:
        """Take the adapter out of model memory now (it loads again on its next use); with `park`, its requests
        leave the batch first, each keeping its state (`Engine.swap_out`), in the same engine call."""
        victim.loaded = None  # from now on a request for it loads it again (queued after this delete)
        # Queued now, so it runs before the attach this slot is for (in the same pause between decode steps).
        deleted = (self.engine.swap_out(victim.id) if park
                   else self.engine.call_soon(lambda rt, victim_id=victim.id: rt.delete(victim_id)))
        victim.usage.evictions = (victim.usage.evictions or 0) + 1
        self.metrics.adapter_evictions.inc()
        self.in_background(self._after_eviction(victim.id, deleted))

    async def _after_eviction(self, adapter_id: str, deleted: Awaitable[int]) -> None:
        try:
            await deleted
        except Exception:  # the engine thread failed to detach it: said, never raised into a request
            log.exception("evicting adapter %s failed", adapter_id)
            return
        await asyncio.to_thread(release_free_memory)
        log.info("evicted adapter %s (least recently used)", adapter_id)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)  # a reference until it ends (the loop keeps only weak ones)
        task.add_done_callback(self._background.discard)

    def counted_load(self, record: AdapterRecord) -> None:
        """Count a load into model memory (metrics and the adapter's usage); `record.load_ms` is its duration."""
        record.usage.loads = (record.usage.loads or 0) + 1
        self.metrics.adapter_loads.inc()
        if record.load_ms is not None:
            self.metrics.load_seconds.observe(record.load_ms / 1000)

    async def room_changed(self) -> None:
        async with self._room:
            self._room.notify_all()
