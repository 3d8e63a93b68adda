"""Generation admission: limits, tokenizing off the event loop, the adapter's lease and residency, the engine's
queue, the timeout and cancellation (per-adapter metrics and usage: usage.py).

Shared by the single-process service and the Ray replicas, so every front door admits the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, Protocol

from ..engine import Engine, GenerationRequest, GenerationResult, QueueFullError, RequestHandle
from ..engine.grammar import Grammar, GrammarError, Grammars
from ..errors import GenerationTimeoutError, InvalidRequestError, OverloadedError, RequestLimitError, coded
from ..settings import Settings
from .interface import GenerationEvent, GenerationInput

# Used when the tokenizer has no chat template (e.g. the demo model): role-prefixed lines.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# A prompt is refused as too long, before it is tokenized, when its UTF-8 size exceeds max_prompt_tokens times
# the most bytes one token can stand for: the longest vocabulary entry, and never less than this floor (a
# tokenizer without byte fallback may turn a run of unknown characters into one token).
MIN_BYTES_PER_TOKEN = 16
# How long a request waits for its response_format grammar, queue included (one compile runs at a time, each
# bounded by grammar.COMPILE_TIMEOUT_S); a queued compile is dropped when its request gives up.
GRAMMAR_WAIT_S = 30.0


def bytes_per_token(tokenizer: Any) -> int:
    """An upper bound of the UTF-8 bytes one token covers (vocabulary entries as stored: byte-level and
    sentencepiece markers take at least as many bytes as what they decode to)."""
    try:
        longest = max((len(token.encode("utf-8", "replace")) for token in tokenizer.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError):
        longest = 0
    return max(longest, MIN_BYTES_PER_TOKEN)


def prompt_bytes(request: GenerationInput) -> int:
    """UTF-8 bytes of the text a client sent (prompt or chat messages); token ids count 0 (checked as tokens)."""
    if request.messages is not None:
        return sum(len(str(m.get("role", "")).encode()) + len(str(m.get("content", "")).encode())
                   for m in request.messages)
    return len(request.prompt.encode()) if request.prompt is not None else 0


class Leases(Protocol):
    """Holds an adapter in use and makes it resident (the local residency, or a replica's resident set)."""

    def lease(self, adapter_id: str | None, parkable: bool = False) -> AbstractAsyncContextManager[Any]: ...

    async def ensure_resident(self, adapter_id: str | None) -> None: ...


def prompt_ids(tokenizer: Any, request: GenerationInput) -> list[int]:
    """The prompt's token ids (chat messages rendered with the model's template, or a plain default)."""
    if request.prompt_ids is not None:
        return list(request.prompt_ids)
    if request.messages is not None:
        template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(request.messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=template is not None)["input_ids"]
    if request.prompt is None:
        raise InvalidRequestError("a generation needs a prompt, prompt token ids or chat messages")
    return tokenizer(request.prompt)["input_ids"]


class Admission:
    def __init__(self, engine: Engine, leases: Leases, settings: Settings) -> None:
        self.engine = engine
        self.leases = leases
        self.settings = settings
        self.vocab_size = engine.model.config.get_text_config().vocab_size  # an adapter may wrap the embedding
        self.max_prompt_bytes = settings.max_prompt_tokens * bytes_per_token(engine.tokenizer)
        self.grammars = Grammars(engine.tokenizer, self.vocab_size)  # the logits' width

    async def tokenize(self, request: GenerationInput) -> list[int]:
        """Token ids, off the event loop; a text too large to fit max_prompt_tokens is refused first, by bytes."""
        size = prompt_bytes(request)
        if size > self.max_prompt_bytes:
            limit = self.settings.max_prompt_tokens
            raise RequestLimitError("prompt_too_long", f"the prompt is {size} bytes; it cannot fit the limit of "
                                    f"{limit} tokens (at most {self.max_prompt_bytes} bytes)",
                                    {"max_prompt_tokens": limit, "max_prompt_bytes": self.max_prompt_bytes})
        return await asyncio.to_thread(prompt_ids, self.engine.tokenizer, request)

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request over a limit before it holds anything."""
        limits = self.settings
        if not request.prompt_ids:
            raise RequestLimitError("empty_prompt", "the prompt is empty")
        if len(request.prompt_ids) > limits.max_prompt_tokens:
            raise RequestLimitError("prompt_too_long", f"the prompt has {len(request.prompt_ids)} tokens; the limit "
                                    f"is {limits.max_prompt_tokens}", {"max_prompt_tokens": limits.max_prompt_tokens})
        if not all(0 <= token < self.vocab_size for token in request.prompt_ids):  # ids sent by OpenAI clients
            raise RequestLimitError("invalid_token_id", f"prompt token ids must lie in [0, {self.vocab_size})",
                                    {"vocab_size": self.vocab_size})
        params = request.params
        out_of_range = sorted({t for t in (*(t for t, _ in params.logit_bias), *params.stop_token_ids)
                               if not 0 <= t < self.vocab_size})
        if out_of_range:
            raise RequestLimitError("invalid_token_id", f"logit_bias and stop_token_ids name token ids outside "
                                    f"[0, {self.vocab_size}): {out_of_range[:8]}", {"vocab_size": self.vocab_size})
        if request.params.max_new_tokens > limits.max_new_tokens:
            raise RequestLimitError("max_new_tokens_too_large", f"{request.params.max_new_tokens} new tokens asked; "
                                    f"this server allows at most {limits.max_new_tokens} per request "
                                    "(its --max-new-tokens)", {"max_new_tokens": limits.max_new_tokens})

    async def start(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Token events then the result. Admission errors raise here, before any event; the row and the
        adapter's lease are released when the returned iterator is closed."""
        self.check(request)
        if request.params.json_schema is not None and request.grammar is None:
            request.grammar = await self.grammar(request.params.json_schema)
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self.leases.lease(request.adapter_id, parkable=True))
            await self.leases.ensure_resident(request.adapter_id)
            try:
                handle = self.engine.submit(request)
            except QueueFullError as exc:
                raise OverloadedError(exc.waiting) from None
        except BaseException:
            await stack.aclose()
            raise
        return self._events(handle, stack)

    async def grammar(self, schema_text: str) -> Grammar:
        """The compiled grammar of a response_format schema (422 naming response_format when unusable)."""
        future = self.grammars.submit(schema_text)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), GRAMMAR_WAIT_S)
        except GrammarError as exc:
            raise InvalidRequestError(f"response_format: {exc}") from None
        except TimeoutError:
            raise coded("overloaded", f"response_format: other schemas are compiling; no grammar within "
                        f"{GRAMMAR_WAIT_S:.0f} s; retry later", {"waiting": 0}) from None

    async def _events(self, handle: RequestHandle, stack: AsyncExitStack) -> AsyncIterator[GenerationEvent]:
        timeout = self.settings.request_timeout_s
        deadline = time.perf_counter() + timeout
        try:
            iterator = aiter(handle.events())
            while True:
                try:
                    event = await asyncio.wait_for(anext(iterator), max(deadline - time.perf_counter(), 0))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise GenerationTimeoutError(timeout) from None
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            handle.cancel()  # no-op when finished; frees the row on disconnect, timeout or error
            await stack.aclose()
