"""What the engine is asked to generate, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

# Scores are divided by the temperature in float32; a smaller temperature would round to 0 there (0/0 = NaN),
# and sampling at it is the greedy limit anyway.
GREEDY_BELOW = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, load tests)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter_id: str | None  # resolved: an adapter id, or None for the base model
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "length" | "stop"
    prompt_tokens: int
