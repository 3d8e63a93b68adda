"""Typed errors of the adapter store; each carries a stable `code`, an HTTP `status` and `details`.

The HTTP layer maps any `StoreError` once to `{"error": {"code", "message", "details"}}` with `status`.
"""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """Base class of store errors."""

    code = "store_error"
    status = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidAdapterIdError(StoreError):
    code = "invalid_adapter_id"
    status = 422

    def __init__(self, adapter_id: str, reason: str) -> None:
        details = {"adapter_id": adapter_id, "reason": reason}
        super().__init__(f"invalid adapter id {adapter_id!r}: {reason}", details)


class AdapterNotFoundError(StoreError):
    code = "adapter_not_found"
    status = 404

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter '{adapter_id}' is not in the store", {"adapter_id": adapter_id})


class AdapterExistsError(StoreError):
    code = "adapter_exists"
    status = 409

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter '{adapter_id}' already exists in the store", {"adapter_id": adapter_id})


class UploadTooLargeError(StoreError):
    code = "upload_too_large"
    status = 413

    def __init__(self, max_bytes: int, what: str = "upload") -> None:
        super().__init__(f"{what} exceeds the limit of {max_bytes} bytes", {"max_bytes": max_bytes})


class InvalidUploadError(StoreError):
    """The uploaded files are not a PEFT adapter the store accepts (names, archive layout, format)."""

    code = "invalid_upload"
    status = 422
