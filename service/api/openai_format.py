"""OpenAI's response shapes: logprobs (completions and chat), usage, and one SSE stream for many choices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..app import Generation, GenerationEvent
from ..engine import GenerationResult, TokenEvent, TokenLogprob
from .streaming import error_event, sse_event

_DONE = object()


def completion_logprobs(logprobs: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """Legacy completions: `tokens`, `token_logprobs`, `top_logprobs` (the k best and the chosen token) and
    `text_offset` (where each token starts in the completion's text, counted from `offset`)."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.text)
    return {
        "tokens": [lp.text for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{**{text: v for _, text, v in lp.top}, lp.text: lp.logprob} for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_logprobs(logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """Chat: `content`, one entry per token with its `top_logprobs` (the k most likely tokens)."""
    return {"content": [{**_chat_token(lp.text, lp.logprob), "top_logprobs": [_chat_token(t, v) for _, t, v in lp.top]}
                        for lp in logprobs]}


def usage(results: list[GenerationResult], n: int) -> dict[str, int]:
    """Token counts of a request: each prompt once (its n copies share it), every choice's tokens."""
    prompt = sum(r.prompt_tokens for i, r in enumerate(results) if i % n == 0)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def results(generations: list[Generation]) -> list[GenerationResult]:
    """Every generation's result; the first failure cancels the others (their rows leave the batch)."""
    tasks = [asyncio.ensure_future(g.result()) for g in generations]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """(choice index, event) of every generation as they arrive; the first error raises. The caller closes the
    generations' events."""
    if len(generations) == 1:
        async for event in generations[0].events:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[GenerationEvent]) -> None:
        try:
            async for event in events:
                queue.put_nowait((index, event))
            queue.put_nowait((index, _DONE))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, g.events)) for i, g in enumerate(generations)]
    try:
        finished = 0
        while finished < len(tasks):
            index, event = await queue.get()
            if event is _DONE:
                finished += 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()  # ends each generation (its rows leave the batch) before the caller closes them
        await asyncio.gather(*tasks, return_exceptions=True)


ChunkFn = Callable[[int, str, str | None, list[TokenLogprob] | None], dict[str, Any]]


async def stream(generations: list[Generation], chunk: ChunkFn, n: int, head: dict[str, Any],
                 openings: list[dict[str, Any]] = (), include_usage: bool = False) -> AsyncIterator[bytes]:
    """OpenAI's stream: `data: {chunk}` lines, each choice's last chunk with its finish_reason, a usage chunk
    when asked for (`choices: []`), then `data: [DONE]`; or an `error` event as the last event.
    `chunk(index, text, finish_reason, logprobs)` builds one chunk; `head` is what every chunk starts with."""
    done: dict[int, GenerationResult] = {}

    def with_usage(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "usage": None} if include_usage else data  # as OpenAI: null until the usage chunk

    try:
        for opening in openings:
            yield sse_event(with_usage(opening))
        async for index, event in merged(generations):
            if isinstance(event, TokenEvent):
                if event.text or event.logprob is not None:
                    logprobs = None if event.logprob is None else [event.logprob]
                    yield sse_event(with_usage(chunk(index, event.text, None, logprobs)))
            else:
                done[index] = event
                yield sse_event(with_usage(chunk(index, "", event.finish_reason, None)))
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": usage([done[i] for i in sorted(done)], n)})
        yield b"data: [DONE]\n\n"
    except Exception as exc:
        yield error_event(exc)
    finally:
        for generation in generations:
            await generation.events.aclose()  # type: ignore[attr-defined]
