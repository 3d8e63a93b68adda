"""Generation engine: owns the model; continuous batching and adapter changes on one worker thread."""

from .engine import Engine, QueueFullError, RequestHandle
from .requests import GenerationRequest, GenerationResult, SamplingParams
from .sequence import TokenEvent

__all__ = [
    "Engine", "GenerationRequest", "GenerationResult", "QueueFullError", "RequestHandle", "SamplingParams",
    "TokenEvent",
]
