"""Typed errors of the adapter runtime and the load report they carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import AdapterExistsError, AdapterNotFoundError, ServiceError

__all__ = ["AdapterError", "AdapterExistsError", "AdapterNotFoundError", "AdapterValidationError", "LoadReport",
           "MixedBatchError", "ShapeMismatch"]


@dataclass
class ShapeMismatch:
    key: str
    expected: list[int]
    found: list[int]


@dataclass
class LoadReport:
    """Only adapter-relevant facts about one adapter checked against the live model.

    Base-model keys are never listed: `missing_keys` are adapter keys the config implies but the file lacks,
    `unexpected_keys` are file keys that belong to no targeted module.
    """

    adapter_id: str
    peft_type: str | None = None
    target_modules_matched: list[str] = field(default_factory=list)
    modules_to_save_matched: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[ShapeMismatch] = field(default_factory=list)
    dtype_errors: list[str] = field(default_factory=list)
    base_mismatches: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    config_errors: list[str] = field(default_factory=list)
    file_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Every problem as one readable line (warnings are not problems)."""
        lines = [f"config: {e}" for e in self.config_errors]
        lines += [f"file: {e}" for e in self.file_errors]
        lines += [f"unsupported: {e}" for e in self.unsupported]
        lines += [f"missing key: {k}" for k in self.missing_keys]
        lines += [f"unexpected key: {k}" for k in self.unexpected_keys]
        lines += [
            f"shape mismatch: {m.key} expected {m.expected}, found {m.found}" for m in self.shape_mismatches
        ]
        lines += [f"dtype: {e}" for e in self.dtype_errors]
        lines += [f"base mismatch: {e}" for e in self.base_mismatches]
        return lines

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["problems"] = self.problems
        return data


class AdapterError(ServiceError):
    """Base class of runtime errors; `code` is a stable machine-readable name."""

    code = "adapter_error"


class AdapterValidationError(AdapterError):
    """The adapter does not fit the live model; nothing was changed. Carries the full report."""

    code = "invalid_adapter"

    def __init__(self, report: LoadReport) -> None:
        problems = report.problems
        head = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        super().__init__(f"adapter '{report.adapter_id}' cannot be loaded: {head}", report.to_dict())
        self.report = report


class MixedBatchError(AdapterError):
    """A module cannot split its input by rows (its first dimension is not the batch)."""

    code = "mixed_batch_unsupported"
