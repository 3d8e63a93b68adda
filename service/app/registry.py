"""Which adapters exist, and which ids are taken by an operation still under way.

Lock discipline: touched only from the event loop thread, never across an `await`, so it needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import AdapterExistsError, AdapterLimitError, AdapterNotFoundError, InvalidAdapterIdError
from ..runtime import LoadedAdapter
from ..store import StoredAdapter, new_adapter_id, validate_adapter_id
from .interface import BASE, AdapterUsage, AdapterView


@dataclass(eq=False)
class AdapterRecord:
    """One registered adapter: its stored files and, while it is resident, its tensors in the model."""

    stored: StoredAdapter
    loaded: LoadedAdapter | None = None  # None while not resident
    last_used: float = 0.0
    load_ms: float | None = None  # duration of the latest load into model memory
    usage: AdapterUsage = field(default_factory=AdapterUsage)  # requests, tokens, loads, evictions since start

    @property
    def id(self) -> str:
        return self.stored.id

    @property
    def summary(self) -> dict[str, Any]:
        return {**self.stored.config, **(self.loaded.config.summary() if self.loaded else {})}

    @property
    def rank(self) -> int:
        return self.loaded.rank if self.loaded else int(self.stored.config.get("rank", self.stored.config.get("r", 0)))

    @property
    def resident_bytes(self) -> int:
        return self.loaded.resident_bytes if self.loaded else 0


def adapter_view(
    summary: dict[str, Any], *, adapter_id: str, sha256: str, created_at: str, active: bool, resident: bool,
    resident_bytes: int, load_ms: float | None, usage: AdapterUsage | None = None, served: bool = True,
    pinned: bool = False,
) -> AdapterView:
    """The client's view of an adapter from its config summary (serve and the Ray ingress alike)."""
    return AdapterView(
        id=adapter_id, type=summary.get("peft_type", "LORA"),
        rank=int(summary.get("rank", summary.get("r", 0)) or 0),
        alpha=float(summary.get("lora_alpha", summary.get("alpha", 0)) or 0),
        target_modules=summary.get("target_modules"), modules_to_save=summary.get("modules_to_save") or [],
        resident_bytes=resident_bytes, sha256=sha256, active=active, created_at=created_at, resident=resident,
        load_ms=load_ms, warnings=list(summary.get("warnings") or []), usage=usage, served=served, pinned=pinned,
    )


def record_view(record: AdapterRecord, active: str | None, pinned: bool = False) -> AdapterView:
    return adapter_view(
        {**record.summary, "rank": record.rank}, adapter_id=record.id, sha256=record.stored.sha256,
        created_at=record.stored.created_at, active=record.id == active, resident=record.loaded is not None,
        resident_bytes=record.resident_bytes, load_ms=record.load_ms, usage=replace(record.usage), pinned=pinned,
    )


def unloaded_view(stored: StoredAdapter) -> AdapterView:
    """An unloaded adapter: its files are kept, nothing of it is in memory, requests naming it get 404."""
    return adapter_view(stored.config, adapter_id=stored.id, sha256=stored.sha256, created_at=stored.created_at,
                        active=False, resident=False, resident_bytes=0, load_ms=None, served=False)


def claim_adapter_id(adapter_id: str | None, reserved_names: set[str]) -> str:
    """A valid id for a new adapter (generated when absent); names that mean the base model are refused."""
    adapter_id = validate_adapter_id(adapter_id if adapter_id is not None else new_adapter_id())
    if adapter_id in reserved_names:
        raise InvalidAdapterIdError(adapter_id, "this name means the base model (as /v1/* `model`)")
    return adapter_id


class AdapterRegistry:
    """The registered adapters, ids reserved by uploads and merges in progress, ids being deleted (hidden), and
    the unloaded adapters whose files the store keeps (not served, not counted against `max_adapters`)."""

    def __init__(self, max_adapters: int, base_names: set[str]) -> None:
        self.max_adapters = max_adapters
        self.base_names = base_names | {BASE}
        self.records: dict[str, AdapterRecord] = {}
        self._reserved: set[str] = set()
        self._hidden: set[str] = set()
        self.unloaded: dict[str, StoredAdapter] = {}

    def visible(self) -> list[AdapterRecord]:
        records = [r for r in self.records.values() if r.id not in self._hidden]
        return sorted(records, key=lambda r: (r.stored.created_at, r.id))

    def get(self, adapter_id: str) -> AdapterRecord:
        record = self.records.get(adapter_id)
        if record is None or adapter_id in self._hidden:
            raise AdapterNotFoundError(adapter_id, [r.id for r in self.visible()])
        return record

    def reserve(self, adapter_id: str | None) -> str:
        """Claim an id for an adapter being created; AdapterExistsError if it is taken."""
        adapter_id = claim_adapter_id(adapter_id, self.base_names)
        if adapter_id in self.records or adapter_id in self._reserved:
            raise AdapterExistsError(adapter_id)
        if len(self.records) + len(self._reserved) >= self.max_adapters:
            raise AdapterLimitError(self.max_adapters)
        self._reserved.add(adapter_id)
        return adapter_id

    def release(self, adapter_id: str) -> None:
        self._reserved.discard(adapter_id)

    def add(self, record: AdapterRecord) -> None:
        self.records[record.id] = record

    def hide(self, adapter_id: str) -> AdapterRecord:
        """From now on the adapter is not found (a delete under way); `unhide` undoes it."""
        record = self.get(adapter_id)
        self._hidden.add(adapter_id)
        return record

    def unhide(self, adapter_id: str) -> None:
        self._hidden.discard(adapter_id)

    def remove(self, adapter_id: str) -> None:
        self.records.pop(adapter_id, None)
        self._hidden.discard(adapter_id)

    def hidden(self, adapter_id: str) -> bool:
        return adapter_id in self._hidden
