"""OpenAI-compatible API (as vLLM and LoRAX serve it): `model` names an adapter or the base model."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from ..engine import GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from .auth import require
from .deps import ServiceState, State
from .errors import ApiError, error_body
from .generation import ClosingStreamingResponse, generate_events, generate_result
from .schemas_openai import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require("inference"))])

# Used when the tokenizer has no chat template (e.g. the demo model): role-prefixed lines.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _adapter_for(state: ServiceState, model: str) -> str | None:
    """The base model's name (or "base") means no adapter; anything else must be an adapter id."""
    if model in (state.base.name, "base"):
        return None
    return state.adapters.resolve(model)


@router.get("/models")
async def list_models(state: State) -> dict:
    """The base model and every adapter."""
    return model_list(state.base.name, [r.id for r in state.adapters.visible()])


def model_list(base_name: str, adapter_ids: list[str]) -> dict:
    """The /v1/models body: the base model, then every adapter (serve and the Ray ingress)."""
    created = int(time.time())
    base = {"id": base_name, "object": "model", "created": created, "owned_by": "adapter-service",
            "root": base_name, "parent": None}
    adapters = [{"id": adapter_id, "object": "model", "created": created, "owned_by": "adapter-service",
                 "root": base_name, "parent": base_name} for adapter_id in adapter_ids]
    return {"object": "list", "data": [base, *adapters]}


def _params(body, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=body.top_k, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos)


def _usage(results: list[GenerationResult]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, state: State):
    """Text completion for one or more prompts (strings or token ids)."""
    adapter_id = _adapter_for(state, body.model)
    request.state.adapter_id = adapter_id or "base"
    return await run_completion(state, body, adapter_id)


async def run_completion(state: ServiceState, body: CompletionRequest, adapter_id: str | None):
    """A /v1/completions answer (a dict, or an SSE response) once the adapter is known (serve, Ray replicas)."""
    prompts = _prompt_ids(state, body.prompt)
    params = _params(body, body.max_tokens or 16)
    created, completion_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
    if body.stream:
        if len(prompts) != 1:
            raise ApiError(422, "invalid_request", "streaming takes exactly one prompt")
        events = await generate_events(state, GenerationRequest(prompts[0], adapter_id, params))

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        return _stream(events, chunk)
    results = [await generate_result(state, GenerationRequest(ids, adapter_id, params)) for ids in prompts]
    return {
        "id": completion_id, "object": "text_completion", "created": created, "model": body.model,
        "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                    for i, r in enumerate(results)],
        "usage": _usage(results),
    }


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State):
    """Chat completion: messages rendered with the tokenizer's chat template (a plain default otherwise)."""
    adapter_id = _adapter_for(state, body.model)
    request.state.adapter_id = adapter_id or "base"
    return await run_chat_completion(state, body, adapter_id)


async def run_chat_completion(state: ServiceState, body: ChatCompletionRequest, adapter_id: str | None):
    """A /v1/chat/completions answer once the adapter is known (serve, Ray replicas)."""
    tokenizer = state.base.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=template is not None)["input_ids"]
    params = _params(body, body.max_completion_tokens or body.max_tokens or 256)
    created, completion_id = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
    generation = GenerationRequest(ids, adapter_id, params)
    if body.stream:
        events = await generate_events(state, generation)

        def chunk(text: str | None, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        return _stream(events, chunk, opening=chunk(None, None))
    result = await generate_result(state, generation)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": _usage([result]),
    }


def _prompt_ids(state: ServiceState, prompt) -> list[list[int]]:
    tokenizer = state.base.tokenizer
    if isinstance(prompt, str):
        return [tokenizer(prompt)["input_ids"]]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [tokenizer(p)["input_ids"] for p in prompt]
    raise ApiError(422, "invalid_request", "prompt must be a string, a list of strings, or token ids")


def _stream(events: AsyncIterator, chunk, opening: dict | None = None) -> ClosingStreamingResponse:
    """OpenAI's stream format: `data: {chunk}` lines, a final chunk with finish_reason, then `data: [DONE]`."""

    async def body() -> AsyncIterator[bytes]:
        try:
            if opening is not None:
                yield _sse(opening)
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield _sse(chunk(event.text, None))
                else:
                    yield _sse(chunk("", event.finish_reason))
            yield b"data: [DONE]\n\n"
        except ApiError as exc:
            yield _sse(error_body(exc.code, exc.message, exc.details))
        finally:
            await events.aclose()

    return ClosingStreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
