"""Where adapters come from: a local directory, a Hugging Face hub repo, S3-compatible object storage.

An `AdapterSource` turns a location string into the adapter's files as readable streams; the store then
receives them exactly as it receives an upload (`AdapterStore.stage_files`: the same names, archive rules,
byte limit counted while reading, staging directory removed on any failure), and the lifecycle validates,
attaches and commits them as it does an upload. A source never writes into the store itself.

Locations (`parse_location`):
    s3://bucket/prefix                  object storage: <prefix>/adapter_config.json + adapter_model.safetensors,
                                        or one archive object (s3://bucket/adapter.tar.gz)
    hf://org/repo[/subfolder][@rev]     a hub repo (rev: a branch, tag or commit to pin)
    org/repo[@rev]                      the same (vLLM accepts a repo id as lora_path too)
    /abs/dir, ./dir, ~/dir, file:///d   a directory under an operator-allowed root (--lora-root)

More sources plug in through the `adapter_service.sources` entry-point group: each entry point is a callable
taking the `Settings` and returning an `AdapterSource` whose `schemes` it claims (e.g. `gs`).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from importlib.metadata import entry_points
from typing import BinaryIO, Protocol

from ...errors import InvalidSourceError, echo
from ...settings import Settings
from ...store import AdapterStore, StagedAdapter

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "adapter_service.sources"

Files = list[tuple[str, BinaryIO]]


class AdapterSource(Protocol):
    """One kind of place adapters are kept."""

    schemes: tuple[str, ...]  # URI schemes it answers ("s3"); "" = bare repo ids, "file" = local paths

    def open(self, location: str, max_bytes: int, stack: ExitStack) -> Files:
        """The adapter's files at `location` as (file name, stream) pairs, closed by `stack`.

        Raise a ServiceError (source_not_found, source_access_denied, source_unavailable, invalid_source,
        upload_too_large when the source declares more than `max_bytes`) and change nothing on failure."""
        ...


def scheme_of(location: str) -> str:
    """The scheme a location is read with: "s3", "hf", "file", or another plug-in's; "" = a bare repo id."""
    if "://" in location:
        return location.split("://", 1)[0].lower()
    if location.startswith(("/", "./", "../", "~", ".")) or location in (".", ".."):
        return "file"
    return ""  # a bare "org/repo[@rev]": the hub, as vLLM reads a lora_path that is not a local directory


class SourceRegistry:
    """The sources by scheme: the built-ins, then any plug-ins (a plug-in may take over a scheme)."""

    def __init__(self, sources: list[AdapterSource]) -> None:
        self.by_scheme: dict[str, AdapterSource] = {}
        for source in sources:
            for scheme in source.schemes:
                self.by_scheme[scheme] = source

    @classmethod
    def from_settings(cls, settings: Settings) -> SourceRegistry:
        from .hub import HubSource
        from .local import LocalSource
        from .s3 import S3Source

        sources: list[AdapterSource] = [LocalSource(settings.lora_roots), HubSource(), S3Source()]
        for point in entry_points(group=ENTRY_POINT_GROUP):
            sources.append(point.load()(settings))
            log.info("adapter source plug-in %s loaded", point.name)
        return cls(sources)

    def source_for(self, location: str) -> AdapterSource:
        if not isinstance(location, str) or not location.strip():
            raise InvalidSourceError("the adapter source is empty", {"source": location})
        scheme = scheme_of(location)
        source = self.by_scheme.get(scheme)
        if source is None:
            known = sorted(s for s in self.by_scheme if s)
            raise InvalidSourceError(f"no adapter source reads {echo(location)}; schemes: {', '.join(known)}",
                                     {"source": location[:200], "schemes": known})
        return source

    def stage(self, store: AdapterStore, location: str, max_bytes: int) -> StagedAdapter:
        """Fetch the adapter at `location` into the store's staging area, as an upload (blocking)."""
        source = self.source_for(location)
        with ExitStack() as stack:
            files = source.open(location, max_bytes, stack)
            return store.stage_files(files, max_bytes)


async def register_startup_adapters(service, specs: list[tuple[str, str]]) -> None:
    """Load each (name, source) of --adapter before serving (any `AdapterService`).

    Idempotent: the same files under the name are a no-op, other files replace them (the command line is what
    the operator wants served). A source that fails raises a StartupAdapterError: the server does not start
    half-configured (as vLLM with --lora-modules)."""
    from ...errors import ServiceError

    for name, location in specs:
        try:
            view = await service.load_from_source(name, location, replace=True)
        except ServiceError as exc:
            raise StartupAdapterError(f"--adapter {name}={location}: {exc.code}: {exc.message}") from None
        log.info("start-up adapter %s from %s (sha256 %s)", name, location, view.sha256[:12])


class StartupAdapterError(RuntimeError):
    """A --adapter source could not be loaded at start-up."""
