"""Text generation with any adapter, the base model, or the active adapter; JSON or server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from ..engine import GenerationRequest, GenerationResult, SamplingParams
from .auth import require
from .deps import State
from .errors import ApiError, error_body
from .generation import ClosingStreamingResponse, generate_events, generate_result
from .schemas import GenerateRequest, GenerateResponse, Usage

router = APIRouter(tags=["generate"], dependencies=[Depends(require("inference"))])


def generate_response(result: GenerationResult, adapter_id: str | None) -> GenerateResponse:
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
    request.state.adapter_id = adapter_id or "base"
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
    )
    generation = GenerationRequest(state.base.tokenizer(body.prompt)["input_ids"], adapter_id, params)
    if not body.stream:
        return generate_response(await generate_result(state, generation), adapter_id)
    events = await generate_events(state, generation)
    return ClosingStreamingResponse(sse_stream(events, adapter_id), media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache"})


async def sse_stream(events: AsyncIterator, label: str) -> AsyncIterator[bytes]:
    """The server-sent events of one streamed completion: a token per event, then the final summary."""
    try:
        async for event in events:
            if isinstance(event, GenerationResult):
                final = generate_response(event, label)
                yield sse_event({"finish_reason": final.finish_reason, "usage": final.usage.model_dump(),
                                 "text": final.text, "adapter_id": final.adapter_id})
            else:
                yield sse_event({"token_id": event.token_id, "text": event.text})
    except ApiError as exc:  # headers are gone: the error becomes the last event
        yield sse_event(error_body(exc.code, exc.message, exc.details))
    finally:
        await events.aclose()


def sse_event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
