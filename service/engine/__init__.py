"""Generation engine: owns the model; continuous batching and adapter changes on one worker thread."""

from .engine import Engine, QueueFullError, RequestHandle, submitted_together
from .requests import MAX_LOGPROBS, GenerationRequest, GenerationResult, SamplingParams, TokenLogprob
from .sequence import TokenEvent

__all__ = [
    "MAX_LOGPROBS", "Engine", "GenerationRequest", "GenerationResult", "QueueFullError", "RequestHandle",
    "SamplingParams", "TokenEvent", "TokenLogprob", "submitted_together",
]
