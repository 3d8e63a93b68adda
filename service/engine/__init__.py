"""Generation engine: owns the model and runs batches and adapter changes on one worker thread."""

from .engine import Engine
from .requests import GenerationRequest, GenerationResult, SamplingParams

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "SamplingParams"]
