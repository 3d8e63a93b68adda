"""What the engine is asked to generate, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, load tests)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
