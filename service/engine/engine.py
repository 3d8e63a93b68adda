"""The single owner of the model: one worker thread runs generation batches and adapter changes.

Callers (the asyncio HTTP layer) submit work and await a future. Adapter attach/detach/activate run on the
worker between batches, so a forward pass never sees a half-changed model (STYLE rule 2).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..runtime import AdapterRuntime
from .batch_generation import generate_batch
from .requests import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


@dataclass
class _Generate:
    request: GenerationRequest
    future: Future


@dataclass
class _Call:
    fn: Callable[[AdapterRuntime], Any]
    future: Future


_STOP = object()


class Engine:
    def __init__(self, model: nn.Module, tokenizer, runtime: AdapterRuntime, max_batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.running_requests = 0  # rows in the batch being decoded (read by /health)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        future: Future = Future()
        self._queue.put(_Generate(request, future))
        return await asyncio.wrap_future(future)

    async def call(self, fn: Callable[[AdapterRuntime], Any]) -> Any:
        """Run fn(runtime) on the engine thread between batches."""
        future: Future = Future()
        self._queue.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def call_sync(self, fn: Callable[[AdapterRuntime], Any]) -> Any:
        """Blocking variant for start-up code that runs outside the event loop."""
        if not self._thread.is_alive():
            return fn(self.runtime)
        future: Future = Future()
        self._queue.put(_Call(fn, future))
        return future.result()

    # ---- worker ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch: list[_Generate] = []
            deferred: list[Any] = []
            while True:  # drain what is queued now: calls run at once, generations form one batch
                if isinstance(item, _Call):
                    self._execute(item)
                elif isinstance(item, _Generate):
                    if item.future.set_running_or_notify_cancel():
                        batch.append(item)
                elif item is _STOP:
                    deferred.append(item)
                    break
                if len(batch) >= self.max_batch_size:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._generate(batch)
            if deferred:
                return

    def _execute(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn(self.runtime))
        except BaseException as exc:  # handed to the awaiting caller
            call.future.set_exception(exc)

    def _generate(self, batch: list[_Generate]) -> None:
        self.running_requests = len(batch)
        try:
            results = generate_batch(self.model, self.runtime, self.tokenizer, [g.request for g in batch])
        except BaseException as exc:
            log.exception("generation batch of %d failed", len(batch))
            for g in batch:
                g.future.set_exception(exc)
        else:
            for g, result in zip(batch, results, strict=True):
                g.future.set_result(result)
        finally:
            self.running_requests = 0
