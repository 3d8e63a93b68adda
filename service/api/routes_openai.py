"""OpenAI-compatible API (as vLLM and LoRAX serve it): `model` names an adapter or the base model."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from ..app import BASE, AdapterService, Generation, GenerationInput
from ..engine import GenerationResult, SamplingParams, TokenEvent
from ..errors import InvalidRequestError, RequestLimitError
from .auth import require
from .deps import Config, Svc
from .disconnect import ClientDisconnected, disconnected_response, unless_disconnected
from .schemas_openai import ChatCompletionRequest, CompletionRequest
from .streaming import error_event, served_by_header, sse_event, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require("inference"))])


def _adapter_for(service: AdapterService, model: str) -> str:
    """The base model's name (or "base") means no adapter; anything else must be an adapter id."""
    return BASE if model in (service.model_name, BASE) else model


@router.get("/models")
async def list_models(service: Svc) -> dict:
    """The base model and every adapter."""
    listing = await service.list()
    created = int(time.time())
    base = {"id": service.model_name, "object": "model", "created": created, "owned_by": "adapter-service",
            "root": service.model_name, "parent": None}
    adapters = [{"id": view.id, "object": "model", "created": created, "owned_by": "adapter-service",
                 "root": service.model_name, "parent": service.model_name} for view in listing.adapters]
    return {"object": "list", "data": [base, *adapters]}


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _inputs(prompt: Any, adapter: str, params: SamplingParams, max_prompts: int) -> list[GenerationInput]:
    """One generation per prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) > max_prompts:
        raise RequestLimitError("too_many_prompts", f"{len(prompt)} prompts in one request; the limit is "
                                f"{max_prompts}", {"max_prompts_per_request": max_prompts})
    if isinstance(prompt, str):
        return [GenerationInput(params, adapter, prompt=prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [GenerationInput(params, adapter, prompt_ids=list(prompt))]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [GenerationInput(params, adapter, prompt_ids=list(p)) for p in prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [GenerationInput(params, adapter, prompt=p) for p in prompt]
    raise InvalidRequestError("prompt must be a string, a list of strings, or token ids")


async def _admit_all(service: AdapterService, inputs: list[GenerationInput]) -> list[Generation]:
    """Admit every prompt before any runs, so a refusal answers the whole request (and frees the others)."""
    admitted: list[Generation] = []
    try:
        for item in inputs:
            admitted.append(await service.generate(item))
    except BaseException:
        for generation in admitted:
            await generation.events.aclose()  # type: ignore[attr-defined]
        raise
    return admitted


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, response: Response, service: Svc,
                      settings: Config):
    """Text completion for one or more prompts (strings or token ids); the prompts run in one batch."""
    request.state.adapter_id = body.model
    inputs = _inputs(body.prompt, _adapter_for(service, body.model), _params(body, body.max_tokens or 16),
                     settings.max_prompts_per_request)
    created, completion_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        if len(inputs) != 1:
            raise InvalidRequestError("streaming takes exactly one prompt")
        generation = await service.generate(inputs[0])

        def chunk(text: str | None, finish: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        return sse_response(_stream(generation, chunk), served_by_header(generation))
    generations = await _admit_all(service, inputs)
    response.headers.update(served_by_header(generations[0]))
    try:
        results = await unless_disconnected(request, asyncio.gather(*(g.result() for g in generations)))
    except ClientDisconnected:
        return disconnected_response()
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                    for i, r in enumerate(results)],
        "usage": _usage(list(results)),
    }


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, response: Response, service: Svc,
                           settings: Config):
    """Chat completion: messages rendered with the tokenizer's chat template (a plain default otherwise)."""
    request.state.adapter_id = body.model
    if len(body.messages) > settings.max_chat_messages:
        raise RequestLimitError("too_many_messages", f"{len(body.messages)} messages in one request; the limit is "
                                f"{settings.max_chat_messages}", {"max_chat_messages": settings.max_chat_messages})
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    params = _params(body, body.max_completion_tokens or body.max_tokens or 256)
    generation = await service.generate(GenerationInput(params, _adapter_for(service, body.model), messages=messages))
    created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        def chunk(text: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        return sse_response(_stream(generation, chunk, opening=chunk(None, None)), served_by_header(generation))
    response.headers.update(served_by_header(generation))
    try:
        result = await unless_disconnected(request, generation.result())
    except ClientDisconnected:
        return disconnected_response()
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage([result]),
    }


async def _stream(generation: Generation, chunk: Callable[[str | None, str | None], dict],
                  opening: dict | None = None) -> AsyncIterator[bytes]:
    """OpenAI's stream format: `data: {chunk}` lines, a final chunk with finish_reason, then `data: [DONE]`
    (or an error event)."""
    events = generation.events
    try:
        if opening is not None:
            yield sse_event(opening)
        async for event in events:
            if isinstance(event, TokenEvent):
                if event.text:
                    yield sse_event(chunk(event.text, None))
            else:
                yield sse_event(chunk("", event.finish_reason))
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        yield error_event(exc)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
