"""Text generation with any adapter, the base model, or the active adapter; JSON or server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response

from ..app import BASE, GenerationEvent, GenerationInput
from ..engine import GenerationResult, SamplingParams
from .auth import require
from .deps import Svc
from .disconnect import ClientDisconnected, disconnected_response, unless_disconnected
from .middleware import count_tokens
from .schemas import GenerateRequest, GenerateResponse, Usage
from .streaming import error_event, served_by_header, sse_event, sse_response

router = APIRouter(tags=["generate"], dependencies=[Depends(require("inference"))])


def generate_response(result: GenerationResult, label: str) -> GenerateResponse:
    return GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        adapter_id=label,
        finish_reason=result.finish_reason,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
    )


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, response: Response, service: Svc):
    """Generate a completion; concurrent requests (any adapters) share the running batch.

    With `"stream": true` the response is server-sent events: one `{"token_id", "text"}` event per token,
    then a final event with `finish_reason` and `usage` (or an `error` event if the generation fails).
    """
    request.state.adapter_id = body.adapter_id or ""  # what was asked for, in the access log even on a 404
    params = SamplingParams(
        max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
        json_schema=json.dumps(body.json_schema) if body.json_schema is not None else None,
    )
    generation = await service.generate(GenerationInput(params, adapter=body.adapter_id, prompt=body.prompt))
    count_tokens(request, generation)
    label = generation.adapter_id or BASE
    request.state.adapter_id = label
    headers = served_by_header(generation)
    if not body.stream:
        response.headers.update(headers)
        try:
            return generate_response(await unless_disconnected(request, generation.result()), label)
        except ClientDisconnected:
            return disconnected_response()
    return sse_response(generate_sse(generation.events, label), headers)


async def generate_sse(events: AsyncIterator[GenerationEvent], label: str) -> AsyncIterator[bytes]:
    """The events of one streamed completion: a token per event, then the final summary or an error."""
    try:
        async for event in events:
            if isinstance(event, GenerationResult):
                final = generate_response(event, label)
                yield sse_event({"finish_reason": final.finish_reason, "usage": final.usage.model_dump(),
                                 "text": final.text, "adapter_id": final.adapter_id})
            else:
                yield sse_event({"token_id": event.token_id, "text": event.text})
    except Exception as exc:  # headers are gone: the error becomes the last event
        yield error_event(exc)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
