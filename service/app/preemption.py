"""Preemption of adapters in use (LoRAX-style adapter cycling), so a load never waits for a whole request.

When every resident slot holds an adapter in use, a load may take the slot of one whose leases are all
generations (their rows can be parked; an export or a download reading its tensors cannot be), unpinned, not
kept, and resident for at least `quantum_s` (so two loads do not swap each other out before either decodes).
Among those: the one with the fewest requests, then the least recently used (whose latest request started
first; "resident the longest" picked the popular adapters, which never leave, and bounced their next requests).

Its requests leave the batch, each row keeping its keys/values, mask row, position and next token (swap, not
recompute: a resumed row decodes exactly what it would have), and its weights are detached, both in one engine
call queued ahead of the new adapter's attach (`Engine.swap_out`). Their leases stay held, so a delete still
waits for them. A background task loads it again, first come, first served like any load; it takes a slot that
comes free (a request ending), and preempts another only after RESUME_WAIT_QUANTA quanta or once a new request
for it waits too (new loads may preempt past it meanwhile). Swapping adapters in and out in turn, each after
one quantum, would spend the engine's time on batch surgery (bench/results.md, goal 2). The engine puts the
parked requests back in the same pause as the attach. If it cannot come back (its load failed), they end with
that error.

Lock discipline: the residency's (event loop thread only); the engine state changes only on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from ..engine import Engine
from ..metrics import ServiceMetrics
from .registry import AdapterRecord

log = logging.getLogger(__name__)

RESUME_WAIT_QUANTA = 10


class Residency(Protocol):
    """What preemption uses of the residency (residency.py), which owns it."""

    engine: Engine
    metrics: ServiceMetrics

    def leases(self, adapter_id: str) -> tuple[int, int]: ...

    def in_use(self, adapter_id: str) -> bool: ...

    def evict(self, victim: AdapterRecord, park: bool = False) -> None: ...

    async def load(self, record: AdapterRecord, parked_since: float | None = None) -> None: ...

    def in_background(self, work: Coroutine[Any, Any, None]) -> None: ...

    async def room_changed(self) -> None: ...


class Preemption:
    def __init__(self, residency: Residency, quantum_s: float) -> None:
        self.residency = residency
        self.quantum_s = quantum_s
        self._attached_at: dict[str, float] = {}  # adapter id -> when it was last attached (monotonic)
        self._timer: asyncio.Handle | None = None  # wakes waiting loads when a quantum ends (uvloop: a Handle)
        self._timer_due = 0.0  # its loop time

    def attached(self, adapter_id: str) -> None:
        self._attached_at[adapter_id] = time.monotonic()

    def may_preempt(self, parked_since: float | None) -> bool:
        """Whether a load may preempt: a new one may; one bringing a preempted adapter back only once it has waited
        RESUME_WAIT_QUANTA quanta (until then it waits for a slot to come free; a timer wakes it)."""
        if parked_since is None:
            return True
        left = parked_since + RESUME_WAIT_QUANTA * self.quantum_s - time.monotonic()
        if left > 0:
            self._wake_in(left)
        return left <= 0

    def victim(self, in_use: list[AdapterRecord]) -> AdapterRecord | None:
        """The adapter to preempt among resident, unpinned ones in use; None if none may be preempted now (a
        timer then wakes the waiting loads when the first quantum ends)."""
        now = time.monotonic()
        parkable = [r for r in in_use if self._parkable(r.id)]
        ready = [r for r in parkable if now - self._attached_at.get(r.id, 0.0) >= self.quantum_s]
        if ready:
            return min(ready, key=lambda r: (self.residency.leases(r.id)[0], r.last_used))
        if parkable:
            self._wake_in(min(self._attached_at.get(r.id, 0.0) for r in parkable) + self.quantum_s - now)
        return None

    def forget(self, adapter_id: str) -> None:
        self._attached_at.pop(adapter_id, None)

    def _parkable(self, adapter_id: str) -> bool:
        """In use by generations only (a lease that reads its tensors or files otherwise is not parked)."""
        held, generations = self.residency.leases(adapter_id)
        return held == generations > 0

    def preempt(self, record: AdapterRecord) -> None:
        """Swap the adapter out now, its requests parked, and bring it back in the background."""
        self.residency.evict(record, park=True)
        self.residency.metrics.adapter_preemptions.inc()
        self.forget(record.id)
        self.residency.in_background(self._resume(record))
        log.info("preempted adapter %s (%d request(s) parked)", record.id, self.residency.leases(record.id)[0])

    async def _resume(self, record: AdapterRecord) -> None:
        if not self.residency.in_use(record.id):
            return  # its requests have all ended; it loads again on its next use
        try:
            await self.residency.load(record, parked_since=time.monotonic())
        except Exception as exc:  # its parked requests end with the error (their callers hear it), never hang
            log.warning("preempted adapter %s could not be loaded again: %s", record.id, exc)
            await self.residency.engine.fail_parked(record.id, exc)

    def _wake_in(self, delay: float) -> None:
        """Wake the waiting loads in `delay` seconds (one timer: the earliest asked for)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(delay, 0.0)
        if self._timer is not None and self._timer_due <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = loop.call_later(max(delay, 0.0), self._wake), due

    def _wake(self) -> None:
        self._timer = None
        self.residency.in_background(self.residency.room_changed())
