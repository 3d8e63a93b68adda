"""One error hierarchy: typed errors without HTTP, the only code -> status table in service/api, and errors
that cross a process boundary (Ray) as (code, message, details) come back as the same class."""

from __future__ import annotations

import pickle

import service.merging  # noqa: F401  (registers MergeError)
import service.runtime  # noqa: F401  (registers the runtime's errors)
from service.api.errors import STATUS_BY_CODE, status_of
from service.errors import AdapterNotFoundError, RequestLimitError, ServiceError
from service.merging import MergeError
from service.runtime.adapter_types.base import NotMergeableError


def _all_error_classes() -> list[type[ServiceError]]:
    found, todo = [], [ServiceError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_declared_code_has_one_status_and_no_error_carries_http() -> None:
    for cls in _all_error_classes():
        if cls in (ServiceError, RequestLimitError) or cls.code in ("adapter_error", "service_error"):
            continue  # abstract bases; RequestLimitError carries its code per instance
        assert cls.code in STATUS_BY_CODE, f"{cls.__name__} ({cls.code}) has no HTTP status"
        assert not hasattr(cls, "status"), f"{cls.__name__} carries an HTTP status in the core"
    for code in ("prompt_too_long", "empty_prompt", "invalid_token_id", "max_new_tokens_too_large"):
        assert status_of(code) == 422


def test_errors_cross_the_wire_as_the_same_typed_class() -> None:
    samples = [
        AdapterNotFoundError("x", ["y", "xx"]), NotMergeableError("cannot merge", {"adapter_id": "a"}),
        MergeError(["same rank needed"]), RequestLimitError("prompt_too_long", "too long", {"max_prompt_tokens": 4}),
    ]
    for error in samples:
        wire = pickle.loads(pickle.dumps(error.to_wire()))  # what a Ray reply carries
        again = ServiceError.from_wire(wire)
        assert (again.code, again.message, again.details) == (error.code, error.message, error.details)
        if not isinstance(error, RequestLimitError):
            assert type(again) is type(error) or issubclass(type(error), type(again)), type(again)
    assert isinstance(ServiceError.from_wire(samples[0].to_wire()), AdapterNotFoundError)
    unknown = ServiceError.from_wire({"code": "from_a_newer_replica", "message": "m", "details": {}})
    assert (type(unknown), unknown.code) == (ServiceError, "from_a_newer_replica")


def test_not_found_names_the_adapter_and_close_matches_and_caps_the_echo() -> None:
    error = AdapterNotFoundError("adaptr-1", ["adapter-1", "other"])
    assert error.message.startswith("no adapter 'adaptr-1'") and "adapter-1" in error.message
    assert error.details["close_matches"] == ["adapter-1"]
    huge = AdapterNotFoundError("x" * 1_000_000)
    assert len(huge.message) < 400 and len(huge.details["adapter_id"]) <= 200
