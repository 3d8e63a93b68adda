"""What each generation costs, counted once for every front door: the per-adapter metrics, the adapter's usage
(shown by GET /adapters/{id}) and the request's token counts (in its access-log line).

Both services wrap the events of every admitted generation in `MeteredEvents`: the single-process one and the
Ray ingress (which sees the replicas' events as they pass through), so /metrics means the same on both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from ..engine import GenerationResult, TokenEvent
from ..metrics import ServiceMetrics
from .interface import AdapterUsage, GenerationEvent, TokenCounts


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MeteredEvents:
    """A generation's events, counted as they pass: the request is counted when it is admitted (here), tokens
    as they come (a client that goes away still used what was generated), durations at the end.

    A class rather than an async generator: a generation closed before its first event (a multi-prompt request
    refused half-way) must still close the events it wraps, which frees its batch row and adapter lease."""

    def __init__(self, events: AsyncIterator[GenerationEvent], label: str, metrics: ServiceMetrics,
                 usage: AdapterUsage | None, counts: TokenCounts, prompt_tokens: int | None = None) -> None:
        self._events = events
        self._label = label
        self._metrics = metrics
        self._usage = usage
        self._counts = counts
        self._start = time.perf_counter()
        self._first_token: float | None = None
        self._closed = False
        if usage is not None:
            usage.requests += 1
            usage.last_used = utc_now()
        if prompt_tokens is not None:  # known at admission locally; from the result on Ray
            self._add_prompt(prompt_tokens)

    def _add_prompt(self, tokens: int) -> None:
        self._counts.prompt = tokens
        self._metrics.prompt_tokens.labels(self._label).inc(tokens)
        if self._usage is not None:
            self._usage.prompt_tokens += tokens

    def _add_completion(self, tokens: int) -> None:
        self._counts.completion += tokens
        self._metrics.tokens.labels(self._label).inc(tokens)
        if self._usage is not None:
            self._usage.completion_tokens += tokens

    def __aiter__(self) -> MeteredEvents:
        return self

    async def __anext__(self) -> GenerationEvent:
        try:
            event = await anext(self._events)
        except BaseException:
            await self.aclose()
            raise
        now = time.perf_counter()
        if isinstance(event, TokenEvent):
            if self._first_token is None:
                self._first_token = now
                self._metrics.ttft.labels(self._label).observe(now - self._start)
            self._add_completion(1)
        elif isinstance(event, GenerationResult):
            if self._counts.prompt == 0:
                self._add_prompt(event.prompt_tokens)
            if len(event.token_ids) != self._counts.completion:  # the result's count is the one clients see
                self._add_completion(len(event.token_ids) - self._counts.completion)
            if self._first_token is not None and len(event.token_ids) > 1:
                per_token = (now - self._first_token) / (len(event.token_ids) - 1)
                self._metrics.time_per_output_token.labels(self._label).observe(per_token)
        return event

    async def aclose(self) -> None:
        """Close the wrapped events (idempotent); the generation's duration is observed once, here."""
        if self._closed:
            return
        self._closed = True
        self._metrics.generation_seconds.labels(self._label).observe(time.perf_counter() - self._start)
        await self._events.aclose()  # type: ignore[attr-defined]
