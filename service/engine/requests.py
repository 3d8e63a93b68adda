"""What the engine is asked to generate, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grammar import Grammar

# Scores are divided by the temperature in float32; a smaller temperature would round to 0 there (0/0 = NaN),
# and sampling at it is the greedy limit anyway.
GREEDY_BELOW = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny

MAX_LOGPROBS = 20  # most alternatives reported per token (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings. Logit processing runs in this order (vLLM's): `min_tokens` masks the
    end tokens, `logit_bias` is added, `repetition_penalty` (prompt and output tokens), then
    `frequency_penalty` and `presence_penalty` (output tokens), then temperature, top-k and top-p."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, load tests)
    # OpenAI: subtract `frequency_penalty * count + presence_penalty * (count > 0)` for each generated token.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM: over prompt and generated tokens, positive scores are divided by it, negative multiplied.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its score)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the row (and stop strings are not checked) before
    stop_token_ids: tuple[int, ...] = ()  # generating one ends the row like EOS (the token is not in the output)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the k most likely alternatives
    # JSON text of a JSON schema the output must match (OpenAI's response_format; engine/grammar.py): compiled at
    # admission into `GenerationRequest.grammar`; only tokens that keep the output a prefix of a match are chosen.
    json_schema: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def processes_logits(self) -> bool:
        """Whether the scores are changed before the choice (else the model's scores are used as they are)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens or self.json_schema is not None)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter_id: str | None  # resolved: an adapter id, or None for the base model
    params: SamplingParams = field(default_factory=SamplingParams)
    grammar: Grammar | None = None  # params.json_schema compiled (set at admission)


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability (log-softmax of the model's raw scores, before any penalty or temperature, as vLLM's
    default) of the chosen token, and the `top` most likely tokens: (token id, text, logprob) each."""

    token_id: int
    text: str  # the token on its own, decoded
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "stop"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
