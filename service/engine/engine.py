"""The single owner of the model: one worker thread runs the continuous batcher and adapter changes.

Callers (the asyncio HTTP layer) submit requests and get a `RequestHandle` whose events arrive on their
event loop. Adapter attach/detach/activate run on the worker between decode steps, so a forward pass never
sees a half-changed model (STYLE rule 2).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..runtime import AdapterRuntime
from .prefix_cache import PrefixCache, PrefixCacheStats
from .requests import GenerationRequest, GenerationResult
from .scheduler import ContinuousBatcher
from .sequence import Sequence, TokenEvent

log = logging.getLogger(__name__)

_STOP = object()

# Submissions held by `submitted_together` in the current task: (engine, sequence) pairs.
_held: ContextVar[list[tuple[Engine, Sequence]] | None] = ContextVar("held_submissions", default=None)


@contextmanager
def submitted_together() -> Iterator[None]:
    """Requests submitted in the block (by this task) reach their engine at once when it ends, so they are
    admitted in one step: the copies of one prompt (OpenAI's n) then share one prefill. Without it, each copy's
    tokenizing lets the engine start a step on the copies before it."""
    held: list[tuple[Engine, Sequence]] = []
    token = _held.set(held)
    try:
        yield
    finally:  # also on error: the engine counts them as queued (a cancelled one is dropped at its next step)
        _held.reset(token)
        for engine in dict.fromkeys(e for e, _ in held):
            engine._inbox.put([s for e, s in held if e is engine])


class QueueFullError(Exception):
    """More requests are waiting than the engine admits; the caller should retry later."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting


@dataclass
class _Call:
    fn: Callable[[AdapterRuntime], Any]
    future: Future


class RequestHandle:
    """The caller's side of one request: stream events, await the result, or cancel."""

    def __init__(self, engine: Engine, request: GenerationRequest) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._engine = engine
        self.sequence = Sequence(request, self._emit)

    def _emit(self, event: TokenEvent | GenerationResult | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Token events, then the final result; raises the engine's error if the batch failed."""
        while True:
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, GenerationResult):
                return

    async def result(self) -> GenerationResult:
        async for event in self.events():
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("the engine ended the request without a result")

    def cancel(self) -> None:
        """Stop generating (client gone or timed out); the row leaves the batch at the next step."""
        self.sequence.cancelled = True
        self._engine._wake()


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        runtime: AdapterRuntime,
        max_batch_size: int = 16,
        max_waiting: int = 256,
        prefill_token_budget: int = 2048,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.max_waiting = max_waiting
        prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.batcher = ContinuousBatcher(model, tokenizer, runtime, max_batch_size, prefill_token_budget, prefix_cache)
        self._inbox: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet admitted to the batch

    # ---- caller side (event loop thread) ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()

    @property
    def running_requests(self) -> int:
        return len(self.batcher.running)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters and size (None: the cache is off); read from any thread."""
        cache = self.batcher.prefix_cache
        return None if cache is None else cache.stats

    @property
    def waiting_requests(self) -> int:
        """Submitted requests not in the running batch: queued, waiting for a row, or parked (`swap_out`)."""
        return self._queued + len(self.batcher.waiting) + self.batcher.parked_requests

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError beyond `max_waiting` (backpressure)."""
        with self._lock:
            waiting = self._queued + len(self.batcher.waiting) + self.batcher.parked_requests
            if waiting >= self.max_waiting:
                raise QueueFullError(waiting)
            self._queued += 1
        handle = RequestHandle(self, request)
        held = _held.get()
        if held is None:
            self._inbox.put(handle.sequence)
        else:
            held.append((self, handle.sequence))
        return handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        handle = self.submit(request)
        try:
            return await handle.result()
        finally:
            handle.cancel()  # no-op when finished; stops the row if the caller was cancelled

    async def call(self, fn: Callable[[AdapterRuntime], Any]) -> Any:
        """Run fn(runtime) on the engine thread between decode steps."""
        return await self.call_soon(fn)

    def call_soon(self, fn: Callable[[AdapterRuntime], Any]) -> asyncio.Future:
        """Queue fn(runtime) now, without waiting: calls run in the order queued, each before the first decode
        step that starts after the engine has seen it queued (calls queued together normally share one pause).
        Await the returned future for the result."""
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        return asyncio.wrap_future(future)

    def swap_out(self, adapter_id: str) -> asyncio.Future:
        """Queue, as `call_soon`, one call that parks the adapter's requests (each row keeps its state:
        `ContinuousBatcher.park`) and detaches it; the future gives the bytes freed. Its requests go on, exactly
        where they stopped, as soon as it is attached again (`_execute`), or end with `fail_parked`."""

        def swap(rt: AdapterRuntime) -> int:
            self.batcher.park(adapter_id)
            return rt.delete(adapter_id)

        return self.call_soon(swap)

    def fail_parked(self, adapter_id: str, exc: BaseException) -> asyncio.Future:
        """Queue `ContinuousBatcher.fail_parked`: the adapter's parked requests end with `exc`."""
        return self.call_soon(lambda _: self.batcher.fail_parked(adapter_id, exc))

    def call_sync(self, fn: Callable[[AdapterRuntime], Any]) -> Any:
        """Blocking variant for start-up code that runs outside the event loop."""
        if not self._thread.is_alive():
            result = fn(self.runtime)
            self.batcher.forget_changed_adapters()
            return result
        future: Future = Future()
        self._inbox.put(_Call(fn, future))
        return future.result()

    def _wake(self) -> None:
        self._inbox.put(None)

    # ---- worker ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            block = self.batcher.idle
            # Take what is queued now (blocking only when there is nothing to decode), not what arrives meanwhile:
            # a stream of calls (adapters swapped in and out) must not hold decoding up.
            for _ in range(max(self._inbox.qsize(), 1)):
                try:
                    item = self._inbox.get(block=block)
                except queue.Empty:
                    break
                block = False
                if item is _STOP:
                    return
                if isinstance(item, _Call):
                    self._execute(item)
                elif isinstance(item, (Sequence, list)):
                    items = item if isinstance(item, list) else [item]
                    with self._lock:
                        self._queued -= len(items)
                    self.batcher.waiting.extend(items)
            if self.batcher.idle:
                continue
            try:
                self.batcher.step()
            except Exception as exc:  # a failed step must not kill the engine thread
                log.exception("decode step failed; failing %d request(s)", len(self.batcher.running))
                self.batcher.fail_all(exc)

    def _execute(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            result, error = call.fn(self.runtime), None
        except BaseException as exc:  # handed to the awaiting caller
            result, error = None, exc
        # An adapter the call deleted, replaced or (un)fused loses its cached prefixes before the caller hears
        # back: its stale keys/values are freed now, and never reused.
        self.batcher.forget_changed_adapters()
        self.batcher.unpark_attached()  # parked requests of an adapter attached again go on from the next step
        if error is None:
            call.future.set_result(result)
        else:
            call.future.set_exception(error)
