"""One request's state while the engine decodes it, and the events it reports to its caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .grammar import GrammarState
from .requests import GenerationRequest, GenerationResult, TokenLogprob
from .sampling import TokenCounts


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the new text this token completed (may be empty while a character is incomplete)
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass(eq=False)
class Sequence:
    """Decoding state of one request. `emit` is called on the engine thread for every event."""

    request: GenerationRequest
    emit: Callable[[TokenEvent | GenerationResult | BaseException], None]
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    # Incremental detokenization (as vLLM/TGI): `text` = committed text + the decode of the tokens after
    # `read_offset`, taken as the difference between decoding tokens[prefix_offset:] and
    # tokens[prefix_offset:read_offset], so a tokenizer that treats a sequence's first token specially (a
    # leading-space marker) sees the same context in both. Each step decodes a few tokens, not the whole output.
    committed: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    cancelled: bool = False  # set from the caller's thread; the engine drops the row at its next step
    counts: TokenCounts | None = None  # what the penalties need (rows that process their scores)
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for
    grammar: GrammarState | None = None  # where the output stands in its request's grammar (if it has one)

    def add_token(self, token: int, eos: set[int], decode: Callable[[list[int]], str],
                  logprob: TokenLogprob | None = None) -> None:
        """Record one sampled token; emit the text that is now final; decide whether the row is done."""
        params = self.request.params
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            self.finish_reason = "stop"  # the end token is not part of the output (as vLLM)
            return
        self.tokens.append(token)
        if self.grammar is not None:
            self.grammar.advance(token)
        if logprob is not None:
            self.logprobs = self.logprobs if self.logprobs is not None else []
            self.logprobs.append(logprob)
        checked = len(self.text.rstrip("\ufffd"))  # text before this token that can no longer change
        self.text = self._detokenize(decode)
        stops = params.stop if len(self.tokens) >= params.min_tokens else ()
        for stop in stops:
            # only where this token may have completed it: an earlier one, before min_tokens, does not count
            cut = self.text.find(stop, max(checked - len(stop) + 1, 0)) if stop else -1
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
                break
        else:
            if self.grammar is not None and self.grammar.finished:  # a complete match: nothing may follow
                self.finish_reason = "stop"
            elif len(self.tokens) >= params.max_new_tokens:
                self.finish_reason = "length"
        self.emit(TokenEvent(token, self._final_text_delta(), logprob))

    def _detokenize(self, decode: Callable[[list[int]], str]) -> str:
        """The whole output's text so far (equal to decode(self.tokens)), decoding only the last few tokens."""
        window = self.tokens[self.prefix_offset:self.read_offset]
        before = decode(window) if window else ""
        after = decode(self.tokens[self.prefix_offset:])
        if not after.startswith(before):  # the window's text changed before the read offset: decode it all
            self.committed, self.prefix_offset, self.read_offset = "", 0, 0
            before, after = "", decode(self.tokens)
        pending = after[len(before):]
        if pending and not pending.endswith("\ufffd"):  # complete characters: commit them
            self.committed += pending
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return self.committed
        return self.committed + pending

    def _final_text_delta(self) -> str:
        """Text that can no longer change: not a partial UTF-8 character, not a possible stop-string prefix."""
        end = len(self.text)
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                end = len(self.text.rstrip("\ufffd"))
            longest_stop = max((len(s) for s in self.request.params.stop), default=0)
            end = min(end, len(self.text) - max(longest_stop - 1, 0))
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta

    def result(self) -> GenerationResult:
        return GenerationResult(self.tokens, self.text, self.finish_reason or "length", len(self.request.prompt_ids),
                                self.logprobs)
