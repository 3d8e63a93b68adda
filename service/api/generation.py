"""Running one generation for an HTTP handler: admission, residency, timeout, cancellation and metrics.

Shared by `/generate` and the OpenAI-compatible endpoints, so every front door behaves the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anyio
from fastapi.responses import StreamingResponse

from ..engine import GenerationRequest, GenerationResult, QueueFullError, RequestHandle, TokenEvent
from .deps import ServiceState
from .errors import ApiError


def _submit(state: ServiceState, request: GenerationRequest) -> RequestHandle:
    try:
        return state.engine.submit(request)
    except QueueFullError as exc:
        raise ApiError(429, "overloaded", f"the server is busy ({exc.waiting} requests waiting); retry later",
                       {"waiting": exc.waiting}, headers={"Retry-After": "1"}) from None


def _label(request: GenerationRequest) -> str:
    return request.adapter_id or "base"


async def generate_events(
    state: ServiceState, request: GenerationRequest
) -> AsyncIterator[TokenEvent | GenerationResult]:
    """Token events then the result. Admission errors (404, 429) raise before the first event, so a
    streaming handler can still answer with a status code; the row is freed when the iterator closes."""
    _check_limits(state, request)
    timeout = state.settings.request_timeout_s
    serving = state.adapters.serving(request.adapter_id)
    await serving.__aenter__()
    try:
        await state.adapters.ensure_resident(request.adapter_id)
        handle = _submit(state, request)
    except BaseException:
        await serving.__aexit__(None, None, None)
        raise
    return _events(state, request, handle, serving, time.perf_counter() + timeout, timeout)


def _check_limits(state: ServiceState, request: GenerationRequest) -> None:
    settings = state.settings
    if len(request.prompt_ids) > settings.max_prompt_tokens:
        raise ApiError(422, "prompt_too_long", f"the prompt has {len(request.prompt_ids)} tokens; the limit is "
                       f"{settings.max_prompt_tokens}", {"max_prompt_tokens": settings.max_prompt_tokens})
    if not request.prompt_ids:
        raise ApiError(422, "empty_prompt", "the prompt is empty")
    vocab = state.base.model.config.get_text_config().vocab_size  # the embedding may be wrapped by an adapter
    if not all(0 <= token < vocab for token in request.prompt_ids):  # token ids sent by OpenAI clients
        raise ApiError(422, "invalid_token_id", f"prompt token ids must lie in [0, {vocab})", {"vocab_size": vocab})
    if request.params.max_new_tokens > settings.max_new_tokens:
        raise ApiError(422, "max_new_tokens_too_large", f"at most {settings.max_new_tokens} new tokens per request",
                       {"max_new_tokens": settings.max_new_tokens})


async def _events(state, request, handle: RequestHandle, serving, deadline: float, timeout: float):
    start, first = time.perf_counter(), True
    metrics = state.metrics
    try:
        iterator = aiter(handle.events())
        while True:
            try:
                event = await asyncio.wait_for(anext(iterator), max(deadline - time.perf_counter(), 0))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ApiError(504, "timeout", f"generation did not finish within {timeout} s") from None
            if isinstance(event, TokenEvent):
                if first:
                    metrics.ttft.labels(_label(request)).observe(time.perf_counter() - start)
                    first = False
                metrics.tokens.labels(_label(request)).inc()
            yield event
    finally:
        handle.cancel()  # no-op when finished; frees the row on disconnect, timeout or error
        await serving.__aexit__(None, None, None)


async def generate_result(state: ServiceState, request: GenerationRequest) -> GenerationResult:
    events = await generate_events(state, request)
    try:
        async for event in events:
            if isinstance(event, GenerationResult):
                return event
    finally:
        await events.aclose()
    raise ApiError(500, "internal_error", "the engine ended the request without a result")


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator however the response ends.

    When the client hangs up while a chunk is being sent, Starlette cancels the send and leaves the body
    generator suspended; only the garbage collector would close it (and the generation it drives), late,
    with the finalizers of the nested generators racing each other ("asynchronous generator is already
    running"). Closing it here frees the batch row and the adapter at once.
    """

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # runs while the response is being cancelled
                await self.body_iterator.aclose()
