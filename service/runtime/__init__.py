"""Adapter runtime: PEFT-format adapters on a live Hugging Face model, in plain torch (no peft import)."""

from .errors import (
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    AdapterValidationError,
    LoadReport,
    MixedBatchError,
)
from .runtime import AdapterRuntime, LoadedAdapter, storage_bytes

__all__ = [
    "AdapterError",
    "AdapterExistsError",
    "AdapterNotFoundError",
    "AdapterRuntime",
    "AdapterValidationError",
    "LoadReport",
    "LoadedAdapter",
    "MixedBatchError",
    "storage_bytes",
]
