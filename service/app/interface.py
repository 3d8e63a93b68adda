"""The application interface: every operation of the service, typed, with no HTTP in it.

`service/api` serves any implementation of `AdapterService` through the same routers: the single-process
`LocalAdapterService` (local.py) and the Ray Serve cluster (`service/distributed/cluster_service.py`).
Errors are `service.errors.ServiceError`s; streams are async iterators that must be closed (`aclose`),
which releases whatever they hold (a batch row, an adapter in use).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from ..engine import GenerationResult, SamplingParams, TokenEvent
from ..merging import MergeSpec
from ..metrics import ServiceMetrics

BASE = "base"  # the adapter name that always means the base model


@dataclass
class AdapterUsage:
    """What one adapter has served since the server started (counts are not kept across restarts).

    `last_used`: ISO 8601 UTC time of its latest generation. `loads`: loads into model memory (the upload's or
    restore's first one included); `evictions`: times it was evicted to make room for another. On a Ray
    cluster the counts are those of the ingress that answers (generations it relayed) and `loads`/`evictions`
    are None: replicas load and evict on their own."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: str | None = None
    loads: int | None = 0
    evictions: int | None = 0


@dataclass(frozen=True)
class AdapterView:
    """What a client sees of one adapter."""

    id: str
    type: str
    rank: int
    alpha: float
    target_modules: list[str] | str | None
    modules_to_save: list[str]
    resident_bytes: int
    sha256: str
    active: bool
    created_at: str
    resident: bool
    load_ms: float | None
    warnings: list[str] = field(default_factory=list)  # the load report's warnings (served, but worth a look)
    usage: AdapterUsage | None = None  # a snapshot; None where the service keeps none
    served: bool = True  # False: unloaded (vLLM's unload_lora_adapter): files kept, requests naming it get 404
    pinned: bool = False  # kept resident, never evicted (POST /adapters/{id}/pin); not kept across restarts


@dataclass(frozen=True)
class Listing:
    adapters: list[AdapterView]
    active: str | None


@dataclass(frozen=True)
class Activation:
    active: str | None
    fused: bool = False


@dataclass(frozen=True)
class Deletion:
    deleted: str
    freed_bytes: int


@dataclass
class GenerationInput:
    """One generation as a client asked for it; the service tokenizes (a chat is rendered with the model's
    template first). `adapter`: None = the active adapter, "base" = the base model, else an adapter id."""

    params: SamplingParams
    adapter: str | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None

    def to_wire(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> GenerationInput:
        params = dict(data["params"])
        params["stop"] = tuple(params.get("stop") or ())
        params["stop_token_ids"] = tuple(params.get("stop_token_ids") or ())
        params["logit_bias"] = tuple((int(t), float(b)) for t, b in params.get("logit_bias") or ())
        return cls(**{**data, "params": SamplingParams(**params)})


GenerationEvent = TokenEvent | GenerationResult


@dataclass
class TokenCounts:
    """Tokens of one generation so far: the prompt's, and those generated (filled as its events pass)."""

    prompt: int = 0
    completion: int = 0


@dataclass
class Generation:
    """An admitted generation: `adapter_id` is the adapter it runs on (None: the base model); `events` yields
    token events then the result, and must be closed. `served_by`: the replica that runs it (Ray only)."""

    adapter_id: str | None
    events: AsyncIterator[GenerationEvent]
    served_by: str | None = None
    tokens: TokenCounts = field(default_factory=TokenCounts)  # live counts, for the request's access-log line

    async def result(self) -> GenerationResult:
        """Drain to the final result (the events are closed either way)."""
        try:
            async for event in self.events:
                if isinstance(event, GenerationResult):
                    return event
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
        raise RuntimeError("the generation ended without a result")


@dataclass
class Export:
    """A merged checkpoint's tar as it streams; closing `chunks` ends the adapter's lease."""

    chunks: AsyncIterator[bytes]
    served_by: str | None = None  # the replica that builds it (Ray only)


@dataclass
class Health:
    status: str
    model: str
    device: str
    active_adapter: str | None
    adapters: int
    adapter_bytes: int
    adapters_resident: int
    requests_running: int | None = None
    requests_waiting: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # deployment-specific facts (e.g. Ray replicas)


class AdapterService(Protocol):
    """Every operation the HTTP API offers."""

    model_name: str  # the served base model's name (OpenAI's `model` for no adapter)
    metrics: ServiceMetrics

    async def upload(self, files: list[tuple[str, BinaryIO]], adapter_id: str | None) -> AdapterView:
        """Validate, load and store an adapter from uploaded files (two PEFT files or one archive); under the id of
        an unloaded adapter, its kept files are replaced."""
        ...

    async def load_from_source(self, adapter_id: str | None, source: str, replace: bool = False) -> AdapterView:
        """The same as an upload, from a source location (app/sources: a directory under an allowed root, a hub
        repo, s3://). An id whose files an unload kept is taken over; a served one only with `replace`
        (vLLM's load_inplace): a no-op when the files are the same, else the new files are validated while the
        old version serves, then swapped in so that each request runs wholly on one version (single process;
        the Ray cluster still removes the old version first)."""
        ...

    async def unload(self, adapter_id: str) -> Deletion:
        """Stop serving an adapter (vLLM's unload_lora_adapter): freed from memory, unknown to requests, not
        restored at a restart; its stored files stay until new files replace them or it is deleted (listed
        with `served` false by the single-process service)."""
        ...

    async def merge(self, adapter_id: str | None, sources: list[tuple[str, float]], spec: MergeSpec) -> AdapterView:
        """A new stored adapter combining `sources` (adapter id, weight)."""
        ...

    async def activate(self, adapter_id: str, fuse: bool = False) -> Activation:
        ...

    async def deactivate(self) -> Activation:
        ...

    async def delete(self, adapter_id: str) -> Deletion:
        """Remove an adapter and its stored files (an unloaded one too)."""
        ...

    async def get(self, adapter_id: str) -> AdapterView:
        ...

    async def pin(self, adapter_id: str) -> AdapterView:
        """Load the adapter into model memory if it is not, and never evict it (idempotent). It counts toward
        the resident limit: pinning more adapters than the limit raises PinLimitError. Pins are not
        persisted: a restart starts with none. A deployment that cannot pin raises NotSupportedError."""
        ...

    async def unpin(self, adapter_id: str) -> AdapterView:
        """The adapter may be evicted again (idempotent); it stays resident until eviction picks it."""
        ...

    async def prefetch(self, adapter_id: str) -> AdapterView:
        """Load the adapter into model memory now; returns once it is resident (it may be evicted later, as
        any unpinned adapter). A deployment that cannot raises NotSupportedError."""
        ...

    async def list(self) -> Listing:
        ...

    async def generate(self, request: GenerationInput) -> Generation:
        """Admit a generation: admission errors (unknown adapter, limits, overload) raise here."""
        ...

    async def download(self, adapter_id: str) -> Path:
        """A zip of the adapter's stored files in a temporary place; the caller removes it."""
        ...

    async def export(self, adapter_id: str) -> Export:
        """The tar of the base model with the adapter merged in; the adapter stays in use until it is closed.
        Errors known before the first byte (not found, not mergeable) raise here."""
        ...

    async def health(self) -> Health:
        ...
