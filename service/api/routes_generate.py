"""Text generation with any adapter, the base model, or the active adapter; JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import GenerationRequest, GenerationResult, QueueFullError, RequestHandle, SamplingParams
from .deps import State
from .errors import ApiError, error_body
from .schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"])


def _response(result: GenerationResult, adapter_id: str | None) -> GenerateResponse:
    return GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        adapter_id=adapter_id or "base",
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, state: State):
    """Generate a completion; concurrent requests (any adapters) share the running batch.

    With `"stream": true` the response is server-sent events: one `{"token_id", "text"}` event per token,
    then a final event with `finish_reason` and `usage`.
    """
    adapter_id = state.adapters.resolve(body.adapter_id)
    prompt_ids = state.base.tokenizer(body.prompt)["input_ids"]
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
    )
    timeout = state.settings.request_timeout_s
    if body.stream:
        return await _stream(state, request, GenerationRequest(prompt_ids, adapter_id, params), timeout)
    async with state.adapters.serving(adapter_id):
        await state.adapters.ensure_resident(adapter_id)
        handle = _submit(state, GenerationRequest(prompt_ids, adapter_id, params))
        try:
            result = await asyncio.wait_for(handle.result(), timeout)
        except TimeoutError:
            raise ApiError(504, "timeout", f"generation did not finish within {timeout} s") from None
        finally:
            handle.cancel()  # no-op when finished; frees the slot on timeout or client disconnect
    return _response(result, adapter_id)


def _submit(state, request: GenerationRequest) -> RequestHandle:
    try:
        return state.engine.submit(request)
    except QueueFullError as exc:
        raise ApiError(429, "overloaded", f"the server is busy ({exc.waiting} requests waiting); retry later",
                       {"waiting": exc.waiting}, headers={"Retry-After": "1"}) from None


async def _stream(state, http_request: Request, request: GenerationRequest, timeout: float) -> StreamingResponse:
    serving = state.adapters.serving(request.adapter_id)
    await serving.__aenter__()
    try:
        await state.adapters.ensure_resident(request.adapter_id)
        handle = _submit(state, request)
    except BaseException:
        await serving.__aexit__(None, None, None)
        raise

    async def events() -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async for event in _with_deadline(handle.events(), deadline):
                if isinstance(event, GenerationResult):
                    final = _response(event, request.adapter_id).model_dump()
                    yield _sse({"finish_reason": event.finish_reason, "usage": final["usage"], "text": event.text,
                                "adapter_id": final["adapter_id"]})
                else:
                    yield _sse({"token_id": event.token_id, "text": event.text})
        except TimeoutError:
            yield _sse(error_body("timeout", f"generation did not finish within {timeout} s"))
        finally:
            handle.cancel()  # the client went away or the stream ended: free the slot
            await serving.__aexit__(None, None, None)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _with_deadline(events: AsyncIterator, deadline: float) -> AsyncIterator:
    loop = asyncio.get_running_loop()
    iterator = aiter(events)
    while True:
        try:
            event = await asyncio.wait_for(anext(iterator), max(deadline - loop.time(), 0))
        except StopAsyncIteration:
            return
        yield event


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
