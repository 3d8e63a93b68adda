"""OpenAI-compatible API (as vLLM and LoRAX serve it): `model` names an adapter or the base model."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from ..app import BASE, AdapterService, Generation, GenerationInput
from ..engine import SamplingParams, TokenLogprob, submitted_together
from ..errors import InvalidRequestError, RequestLimitError
from .auth import require
from .deps import Config, Svc
from .disconnect import ClientDisconnected, disconnected_response, unless_disconnected
from .middleware import count_tokens
from .openai_format import chat_logprobs, completion_logprobs, results, stream, usage
from .schemas_openai import ChatCompletionRequest, CompletionRequest
from .streaming import served_by_header, sse_response

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require("inference"))])


def _adapter_for(service: AdapterService, model: str) -> str:
    """The base model's name (or "base") means no adapter; anything else must be an adapter id."""
    return BASE if model in (service.model_name, BASE) else model


@router.get("/models")
async def list_models(service: Svc) -> dict:
    """The base model and every served adapter (not the unloaded ones)."""
    listing = await service.list()
    created = int(time.time())
    base = {"id": service.model_name, "object": "model", "created": created, "owned_by": "adapter-service",
            "root": service.model_name, "parent": None}
    adapters = [{"id": view.id, "object": "model", "created": created, "owned_by": "adapter-service",
                 "root": service.model_name, "parent": service.model_name} for view in listing.adapters
                if view.served]
    return {"object": "list", "data": [base, *adapters]}


def _params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        seed=body.seed, stop=body.stop_strings(), ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias_pairs(), min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=logprobs,
        json_schema=body.response_format.schema_text() if body.response_format is not None else None,
    )


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


def _copies(inputs: list[GenerationInput], n: int) -> list[GenerationInput]:
    """n copies of each input in OpenAI's choice order (choice i*n + j is copy j of prompt i). Copy j of a
    seeded request samples with seed + j (as vLLM), so the copies differ and the request stays reproducible."""
    def seeded(params: SamplingParams, j: int) -> SamplingParams:
        return params if params.seed is None or j == 0 else replace(params, seed=(params.seed + j) % 2**63)

    return [replace(item, params=seeded(item.params, j)) for item in inputs for j in range(n)]


async def _admit_all(service: AdapterService, inputs: list[GenerationInput], request: Request) -> list[Generation]:
    """Admit every choice before any runs, so a refusal answers the whole request (and frees the others)."""
    admitted: list[Generation] = []
    try:
        with submitted_together():  # one admission step: the n copies of a prompt share one prefill
            for item in inputs:
                admitted.append(await service.generate(item))
                count_tokens(request, admitted[-1])
    except BaseException:
        for generation in admitted:
            await generation.events.aclose()  # type: ignore[attr-defined]
        raise
    return admitted


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, response: Response, service: Svc,
                      settings: Config):
    """Text completion for one or more prompts (strings or token ids), n choices each; all run in one batch."""
    request.state.adapter_id = body.model
    params = _params(body, body.max_tokens or 16, body.logprobs)
    inputs = _copies(_inputs(body.prompt, _adapter_for(service, body.model), params,
                             settings.max_prompts_per_request), body.n)
    generations = await _admit_all(service, inputs, request)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        offsets = [0] * len(generations)  # text_offset of each choice's next token

        def chunk(index: int, text: str, finish: str | None, logprobs: list[TokenLogprob] | None) -> dict:
            formatted = None
            if logprobs is not None:
                formatted = completion_logprobs(logprobs, offsets[index])
                offsets[index] += sum(len(lp.text) for lp in logprobs)
            return {**head, "choices": [{"index": index, "text": text, "finish_reason": finish,
                                         "logprobs": formatted}]}

        return sse_response(stream(generations, chunk, body.n, head, include_usage=_include_usage(body)),
                            served_by_header(generations[0]))
    response.headers.update(served_by_header(generations[0]))
    try:  # a client that leaves frees its rows, as a streaming one does
        done = await unless_disconnected(request, results(generations))
    except ClientDisconnected:
        return disconnected_response()
    return {
        **head,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                     "logprobs": None if r.logprobs is None else completion_logprobs(r.logprobs)}
                    for i, r in enumerate(done)],
        "usage": usage(done, body.n),
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
    params = _params(body, body.max_completion_tokens or body.max_tokens or 256, body.top_logprob_count())
    inputs = _copies([GenerationInput(params, _adapter_for(service, body.model), messages=messages)], body.n)
    generations = await _admit_all(service, inputs, request)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        def chunk(index: int, text: str | None, finish: str | None, logprobs: list[TokenLogprob] | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            formatted = None if logprobs is None else chat_logprobs(logprobs)
            return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                         "logprobs": formatted}]}

        openings = [chunk(i, None, None, None) for i in range(len(generations))]
        return sse_response(stream(generations, chunk, body.n, head, openings, _include_usage(body)),
                            served_by_header(generations[0]))
    response.headers.update(served_by_header(generations[0]))
    try:  # a client that leaves frees its rows, as a streaming one does
        done = await unless_disconnected(request, results(generations))
    except ClientDisconnected:
        return disconnected_response()
    return {
        **head, "object": "chat.completion",
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason,
                     "logprobs": None if r.logprobs is None else chat_logprobs(r.logprobs)}
                    for i, r in enumerate(done)],
        "usage": usage(done, body.n),
    }
