"""The one error hierarchy of the service: every error has a stable `code`, a `message` and `details`.

No HTTP here: `service/api/errors.py` holds the only code -> status table. Errors cross process boundaries
(Ray replicas -> ingress) as `to_wire()` dicts and come back as the same typed class with `from_wire`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, ClassVar

MAX_ECHO_CHARS = 200  # how much of a client's input an error message repeats


def echo(value: object) -> str:
    """`repr` of client input, cut so that an error never repeats a huge value back."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + f"... ({len(text)} chars)"


class StartupFailure(Exception):
    """The server cannot start (its model does not load, a start-up adapter fails): `serve` prints the message
    as one line and exits non-zero. Not a ServiceError: no request is answered with it."""


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    code: ClassVar[str] = "service_error"
    _by_code: ClassVar[dict[str, type[ServiceError]]] = {}

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ServiceError._by_code.setdefault(cls.code, cls)  # the first class declaring a code owns it

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> ServiceError:
        """The typed error for a wire dict (a plain ServiceError carrying the code if no class declares it)."""
        cls = ServiceError._by_code.get(data.get("code", ""), ServiceError)
        error = cls.__new__(cls)
        ServiceError.__init__(error, str(data.get("message", "")), dict(data.get("details") or {}))
        if cls is ServiceError:
            error.code = str(data.get("code", ServiceError.code))  # type: ignore[misc]
        return error


def coded(code: str, message: str, details: dict[str, Any] | None = None) -> ServiceError:
    """A ServiceError with the class registered for `code` (or a plain one carrying it)."""
    return ServiceError.from_wire({"code": code, "message": message, "details": details or {}})


# ---- adapters --------------------------------------------------------------------------------------------

class AdapterNotFoundError(ServiceError):
    code = "adapter_not_found"

    def __init__(self, adapter_id: str, known: Iterable[str] = ()) -> None:
        close = difflib.get_close_matches(adapter_id, list(known), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"no adapter {echo(adapter_id)}{hint}",
                         {"adapter_id": adapter_id[:MAX_ECHO_CHARS], "close_matches": close})


class AdapterExistsError(ServiceError):
    code = "adapter_exists"

    def __init__(self, adapter_id: str) -> None:
        super().__init__(f"adapter '{adapter_id}' already exists", {"adapter_id": adapter_id})


class AdapterLimitError(ServiceError):
    code = "adapter_limit_reached"

    def __init__(self, max_adapters: int) -> None:
        super().__init__(f"the store holds its limit of {max_adapters} adapters; delete one first",
                         {"max_adapters": max_adapters})


class PinLimitError(ServiceError):
    """Pins fill the resident limit: no more can be pinned, or (every slot pinned) no other adapter can load."""

    code = "pin_limit_reached"

    def __init__(self, max_resident: int, pinned: Iterable[str], adapter_id: str) -> None:
        pinned = sorted(pinned)
        super().__init__(f"all {max_resident} resident slots (--max-resident-adapters) hold pinned adapters "
                         f"({', '.join(pinned)}); unpin one to make room for adapter '{adapter_id}'",
                         {"max_resident_adapters": max_resident, "pinned": pinned, "adapter_id": adapter_id})


class InvalidAdapterIdError(ServiceError):
    code = "invalid_adapter_id"

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"invalid adapter id {echo(adapter_id)}: {reason}",
                         {"adapter_id": adapter_id[:MAX_ECHO_CHARS], "reason": reason})


class InvalidMergeError(ServiceError):
    code = "invalid_merge"


class IncompatibleSourcesError(ServiceError):
    """The adapters of a merge cannot be combined (see merging/)."""

    code = "incompatible_sources"


# ---- uploads and files ------------------------------------------------------------------------------------

class UploadTooLargeError(ServiceError):
    code = "upload_too_large"

    def __init__(self, max_bytes: int, what: str = "upload", read_bytes: int | None = None) -> None:
        # read_bytes: how much was read before refusing (an archive is refused while being decompressed)
        details = {"max_bytes": max_bytes} if read_bytes is None else {"max_bytes": max_bytes, "read_bytes": read_bytes}
        super().__init__(f"{what} exceeds the limit of {max_bytes} bytes", details)


class InvalidUploadError(ServiceError):
    """The uploaded files are not a PEFT adapter the store accepts (names, archive layout, format)."""

    code = "invalid_upload"


class InsufficientStorageError(ServiceError):
    """The disk under the store is full (ENOSPC/EDQUOT); nothing was changed."""

    code = "insufficient_storage"


class StoreError(ServiceError):
    """The store cannot do what was asked (e.g. a corrupt entry)."""

    code = "store_error"


class StoreLockedError(ServiceError):
    """Another server process holds the store (its lock, see service/store_lock.py)."""

    code = "store_locked"

    def __init__(self, root: object, pid: int | None) -> None:
        holder = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"the store {root} is in use by another server{holder}", {"store": str(root), "pid": pid})


# ---- server paths (vLLM's load_lora_adapter) --------------------------------------------------------------

class PathLoadingDisabledError(ServiceError):
    code = "path_loading_disabled"


class PathNotAllowedError(ServiceError):
    code = "path_not_allowed"


class PathNotFoundError(ServiceError):
    code = "path_not_found"


class InvalidPathError(ServiceError):
    code = "invalid_path"


# ---- adapter sources (hub, object storage, local directories: service/app/sources) -------------------------

class InvalidSourceError(ServiceError):
    """A source location no source understands (unknown scheme, malformed repo id or bucket)."""

    code = "invalid_source"


class SourceNotFoundError(ServiceError):
    """The source answered, and holds no such repo, revision, bucket or object (or an offline cache lacks it)."""

    code = "source_not_found"


class SourceAccessDeniedError(ServiceError):
    """The source refused the credentials (or there were none): HF_TOKEN, AWS_* and friends."""

    code = "source_access_denied"


class SourceUnavailableError(ServiceError):
    """The source could not be reached (network, endpoint down); nothing was changed."""

    code = "source_unavailable"


# ---- requests ---------------------------------------------------------------------------------------------

class InvalidRequestError(ServiceError):
    code = "invalid_request"


class RequestLimitError(ServiceError):
    """A request exceeds a configured limit (prompt length, new tokens, ...); `code` names which one."""

    code = "request_limit"

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, details)
        self.code = code  # type: ignore[misc]


class OverloadedError(ServiceError):
    code = "overloaded"

    def __init__(self, waiting: int) -> None:
        super().__init__(f"the server is busy ({waiting} requests waiting); retry later", {"waiting": waiting})


class GenerationTimeoutError(ServiceError):
    code = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"generation did not finish within {timeout_s} s", {"timeout_s": timeout_s})


class GenerationFailedError(ServiceError):
    """The engine failed this request (e.g. its adapter produced non-finite scores)."""

    code = "generation_failed"


class NonFiniteLogitsError(GenerationFailedError):
    """The model's scores for this request are NaN or infinite (its adapter's weights overflow); only this
    request fails, the rest of the batch goes on."""

    code = "non_finite_logits"

    def __init__(self, adapter_id: str | None, generated: int) -> None:
        which = f"adapter {echo(adapter_id)}" if adapter_id is not None else "the base model"
        super().__init__(f"{which} produced NaN or infinite scores after {generated} generated token(s); its "
                         "weights overflow in this model's dtype", {"adapter_id": adapter_id, "generated": generated})


class ReplicaUnavailableError(ServiceError):
    code = "replica_unavailable"


class NotSupportedError(ServiceError):
    """This deployment does not offer the operation (the message says why and what to use instead)."""

    code = "not_supported"


class UnauthorizedError(ServiceError):
    code = "unauthorized"


class ForbiddenError(ServiceError):
    code = "forbidden"
