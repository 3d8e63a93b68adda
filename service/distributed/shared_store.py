"""How replicas read adapters: `AdapterSource.fetch(adapter_id, version)` gives a local directory holding
exactly that version's PEFT files. (Not service/app/sources, which fetches new adapters from the hub, S3 or
a directory into the store; this one reads what the store already holds.)

`SharedDirectorySource` reads the store directory itself (a path every node mounts: NFS, EFS, a
ReadWriteMany volume). An object-store backend fits behind the same method: download
`<id>/{manifest.json,adapter_config.json,adapter_model.safetensors}` into a local cache keyed by version.

Replicas only read: they open the store with `recover=False`, because the start-up clean-up of `.staging/`
and `.trash/` would delete the ingress's in-progress uploads. The ingress is the one writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..store import AdapterStore, StoredAdapter
from .cluster_state import adapter_version


class StaleAdapterError(Exception):
    """The store holds another version of the adapter than the one asked for (or none at all)."""


class AdapterSource(Protocol):
    def fetch(self, adapter_id: str, version: str) -> StoredAdapter:
        """The adapter's files at `version`; StaleAdapterError if that version is not the stored one."""
        ...


class SharedDirectorySource:
    """Adapters read in place from a store directory shared by every node."""

    def __init__(self, root: Path) -> None:
        self.store = AdapterStore(root, recover=False)

    def fetch(self, adapter_id: str, version: str) -> StoredAdapter:
        try:
            stored = self.store.get(adapter_id)
        except Exception as exc:  # gone (deleted) or unreadable: either way not the version asked for
            raise StaleAdapterError(f"adapter '{adapter_id}' is not in the store: {exc}") from exc
        if adapter_version(stored.sha256, stored.config_sha256) != version:
            raise StaleAdapterError(f"the store holds another version of adapter '{adapter_id}'")
        return stored
