"""Cluster-wide adapter state: which version of each adapter exists, which one is active, and deletes that
every live replica has acknowledged.

One instance runs as a named, detached Ray actor (see `app.py`); it is plain asyncio code, so it is tested
without Ray too. Every method returns plain data (never raises across the actor boundary for a client
error): the ingress maps the codes to HTTP errors.

Versions: an adapter's model id is `adapter_id@version`, the version being a digest of its stored files, so
a model id names exactly one set of weights and config: after a delete and an upload of other files under
the same id no replica can be asked for the old ones, even after this actor restarts (it reads the store
again when it starts).

Deletes: `begin_delete` hides the adapter at once and opens a new epoch naming its model id; replicas
long-poll `poll`, free what the epochs name (after their running requests end) and `ack` it. `wait_acked`
returns once every live replica (one that polled within the lease) has acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import AdapterStore, StoredAdapter

log = logging.getLogger(__name__)

NAME = "adapter-service-state"
NAMESPACE = "adapter-service"
# A replica silent this many leases is forgotten (it is long dead), so the deletes it never acknowledged can go.
FORGET_AFTER_LEASES = 10


def adapter_version(sha256: str, config_sha256: str) -> str:
    """The version of stored adapter files: changes whenever the weights or the config change."""
    return f"{sha256[:16]}{config_sha256[:8]}"


def stored_entry(stored: StoredAdapter, resident_bytes: int = 0) -> dict[str, Any]:
    """What the cluster state keeps about one stored adapter."""
    return {"id": stored.id, "version": adapter_version(stored.sha256, stored.config_sha256),
            "summary": stored.config, "sha256": stored.sha256, "created_at": stored.created_at,
            "resident_bytes": resident_bytes}


def model_id(adapter_id: str, version: str) -> str:
    return f"{adapter_id}@{version}"


def split_model_id(multiplexed_id: str) -> tuple[str, str]:
    """(adapter id, version); a plain adapter id (no "@", which ids never contain) has version ""."""
    adapter_id, _, version = multiplexed_id.partition("@")
    return adapter_id, version


@dataclass
class ReplicaLease:
    last_poll: float
    acked_epoch: int = 0
    resident: list[str] = field(default_factory=list)  # model ids resident on that replica
    freed: dict[str, int] = field(default_factory=dict)  # model id -> bytes freed on delete


class ClusterState:
    def __init__(self, max_adapters: int = 10_000, lease_s: float = 10.0, store: str | None = None) -> None:
        """With `store`, start from what the store holds: a restarted actor (Ray restarts it after a crash)
        knows every committed adapter and the active one again."""
        # Changes at every start: replicas that see a new one start over (the old epochs are gone).
        self.incarnation = secrets.token_hex(4)
        self.max_adapters = max_adapters
        self.lease_s = lease_s
        self.entries: dict[str, dict[str, Any]] = {}  # adapter id -> info (with "version")
        self.reserved: set[str] = set()  # ids with an upload in progress
        self.deleting: set[str] = set()
        self.was_active: dict[str, bool] = {}  # adapter being deleted -> it was active (fused or not)
        self.active: str | None = None
        self.fused = False  # the active adapter runs on merged weights on every replica that holds it
        self.epoch = 0
        self.drops: list[tuple[int, str]] = []  # (epoch, model id) to free, in epoch order
        self.replicas: dict[str, ReplicaLease] = {}
        self._changed = asyncio.Condition()
        if store is not None:
            reader = AdapterStore(Path(store), recover=False)  # the ingress writes; never clean up here
            stored, corrupt = reader.scan()
            for entry in corrupt:
                log.error("skipping corrupt store entry %s: %s", entry.id, entry.reason)
            served = [item for item in stored if item.served]  # unloaded ones keep their files, unserved
            self.seed([stored_entry(item) for item in served], reader.get_active(), reader.get_active_fused())
            log.info("cluster state %s: %d adapter(s) from %s", self.incarnation, len(self.entries), store)

    # ---- adapters --------------------------------------------------------------------------------------

    def seed(self, entries: list[dict[str, Any]], active: str | None, fused: bool = False) -> None:
        """Start from these adapters (the store's contents) and this active one (fused or not)."""
        self.entries = {e["id"]: e for e in entries}
        self.active = active if active in self.entries else None
        self.fused = fused and self.active is not None

    def reserve(self, adapter_id: str) -> str | None:
        """Claim an id for an upload; an error code if it is taken or the limit is reached."""
        if adapter_id in self.entries or adapter_id in self.reserved:
            return "adapter_exists"
        if len(self.entries) + len(self.reserved) >= self.max_adapters:
            return "adapter_limit_reached"
        self.reserved.add(adapter_id)
        return None

    def release(self, adapter_id: str) -> None:
        """Give up a reservation (the upload failed)."""
        self.reserved.discard(adapter_id)

    def clear_reservations(self) -> None:
        """Forget every upload in progress: the ingress, their one owner, has (re)started without them."""
        self.reserved.clear()

    def register(self, entry: dict[str, Any]) -> None:
        """Publish a committed upload: from now on every replica may load it."""
        self.reserved.discard(entry["id"])
        self.entries[entry["id"]] = entry

    def lookup(self, adapter_id: str) -> dict[str, Any] | None:
        """The adapter's info, None if unknown or being deleted."""
        if adapter_id in self.deleting:
            return None
        return self.entries.get(adapter_id)

    def resolve(self, requested: str | None) -> tuple[str, dict[str, Any] | None]:
        """("ok", entry or None for the base model) or ("adapter_not_found", None) for a request's adapter."""
        if requested == "base" or (requested is None and self.active is None):
            return "ok", None
        entry = self.lookup(requested or self.active or "")
        return ("ok", entry) if entry is not None else ("adapter_not_found", None)

    def fused_model(self) -> str | None:
        """The model id every replica fuses when it holds it (the active adapter, activated with fuse)."""
        if not self.fused or self.active is None:
            return None
        entry = self.entries[self.active]
        return model_id(entry["id"], entry["version"])

    def route(self, requested: str | None) -> tuple[str, dict[str, Any] | None, str | None]:
        """`resolve`, plus the fused model id that travels with the request to its replica."""
        return (*self.resolve(requested), self.fused_model())

    def listing(self) -> dict[str, Any]:
        """Visible adapters (oldest first), the active one, model ids resident anywhere, and per live replica."""
        visible = [e for i, e in self.entries.items() if i not in self.deleting]
        live = self._live()
        resident = {m for lease in live.values() for m in lease.resident}
        return {"adapters": sorted(visible, key=lambda e: (e["created_at"], e["id"])), "active": self.active,
                "resident": sorted(resident), "replicas": {r: sorted(lease.resident) for r, lease in live.items()}}

    def activate(self, adapter_id: str | None, fused: bool = False) -> bool:
        """Make an adapter the cluster-wide default (None: the base model), fused or not; False if it does
        not exist."""
        if adapter_id is not None and self.lookup(adapter_id) is None:
            return False
        self.active, self.fused = adapter_id, fused and adapter_id is not None
        return True

    # ---- deletes -----------------------------------------------------------------------------------------

    async def begin_delete(self, adapter_id: str) -> tuple[int, dict[str, Any]] | None:
        """Hide the adapter (new requests 404 at once) and ask every replica to free it; (epoch, entry)."""
        entry = self.lookup(adapter_id)
        if entry is None:
            return None
        self.deleting.add(adapter_id)
        if self.active == adapter_id:
            self.was_active[adapter_id] = self.fused
            self.active, self.fused = None, False
        async with self._changed:
            self.epoch += 1
            self.drops.append((self.epoch, model_id(adapter_id, entry["version"])))
            self._changed.notify_all()
        return self.epoch, entry

    async def wait_acked(self, epoch: int, name: str, timeout: float) -> dict[str, Any]:
        """Wait until every live replica acknowledged `epoch`; the bytes each freed for model id `name`."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                pending = [r for r, lease in self._live().items() if lease.acked_epoch < epoch]
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                try:  # woken by each poll; the timeout re-checks leases that expired meanwhile
                    await asyncio.wait_for(self._changed.wait(), min(left, self.lease_s / 4))
                except TimeoutError:
                    pass
        freed = {r: lease.freed.pop(name, 0) for r, lease in self.replicas.items() if lease.acked_epoch >= epoch}
        return {"pending": pending, "freed": freed}

    def finish_delete(self, adapter_id: str) -> None:
        """The files are gone from the store: forget the adapter (its id may be uploaded again)."""
        self.deleting.discard(adapter_id)
        self.was_active.pop(adapter_id, None)
        self.entries.pop(adapter_id, None)

    def abort_delete(self, adapter_id: str) -> None:
        """The store refused the delete: the adapter stays, active again if it was (replicas reload it on
        demand)."""
        self.deleting.discard(adapter_id)
        if adapter_id in self.was_active and self.active is None:
            self.active, self.fused = adapter_id, self.was_active[adapter_id]
        self.was_active.pop(adapter_id, None)

    # ---- replicas ----------------------------------------------------------------------------------------

    async def poll(
        self, replica: str, incarnation: str | None, seen_epoch: int, resident: list[str], timeout: float,
    ) -> tuple[str, int, list[str]]:
        """A replica's heartbeat and change feed: waits up to `timeout` for an epoch beyond `seen_epoch`.

        Returns (incarnation, latest epoch, model ids to free named after `seen_epoch`). A replica that knows
        no incarnation or another one (this actor restarted) is registered at the current epoch and answered
        at once: what it holds was either never deleted or can no longer be asked for (versions are unique),
        so it owes no earlier acknowledgement. One presumed dead that polls again keeps its place, so it
        still frees what was deleted meanwhile.
        """
        now = time.monotonic()
        if incarnation != self.incarnation:
            self.replicas[replica] = ReplicaLease(now, acked_epoch=self.epoch, resident=resident)
            return self.incarnation, self.epoch, []
        lease = self.replicas.setdefault(replica, ReplicaLease(now, acked_epoch=seen_epoch))
        lease.last_poll, lease.resident = now, resident
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.epoch > seen_epoch), timeout)
            except TimeoutError:
                pass
        lease.last_poll = time.monotonic()
        return self.incarnation, self.epoch, [name for epoch, name in self.drops if epoch > seen_epoch]

    async def ack(self, replica: str, incarnation: str, epoch: int, freed: dict[str, int], resident: list[str]) -> None:
        """The replica has freed every model id named up to `epoch` (`freed`: bytes per model id). Epochs of a
        previous incarnation mean nothing now: ignored."""
        lease = self.replicas.get(replica)
        if incarnation != self.incarnation or lease is None:
            return
        lease.last_poll, lease.resident = time.monotonic(), resident
        lease.acked_epoch = max(lease.acked_epoch, epoch)
        lease.freed.update(freed)
        self._prune()
        async with self._changed:
            self._changed.notify_all()  # wake the deletes waiting for this acknowledgement

    def _prune(self) -> None:
        """Forget replicas silent for many leases (dead) and the deletes every remaining one acknowledged."""
        now = time.monotonic()
        for replica in [r for r, lease in self.replicas.items() if now - lease.last_poll > FORGET_AFTER_LEASES
                        * self.lease_s]:
            del self.replicas[replica]
        floor = min((lease.acked_epoch for lease in self.replicas.values()), default=self.epoch)
        self.drops = [(epoch, name) for epoch, name in self.drops if epoch > floor]

    def _live(self) -> dict[str, ReplicaLease]:
        now = time.monotonic()
        return {r: lease for r, lease in self.replicas.items() if now - lease.last_poll <= self.lease_s}


def state_actor_name(store: Path) -> str:
    """One cluster state per store directory: two deployments on two stores never share state."""
    return f"{NAME}-{hashlib.sha256(str(Path(store).resolve()).encode()).hexdigest()[:12]}"


def state_actor(store: Path, max_adapters: int, lease_s: float):
    """A handle to the cluster state of this store, created on first use.

    Named after the store path and detached, so it outlives any ingress or replica that restarts. Imports
    ray only here: the class itself needs none.
    """
    import ray

    actor = ray.remote(ClusterState).options(
        name=state_actor_name(store), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=-1,  # restarted from the store after a crash (calls in flight then fail, never replay)
    )
    return actor.remote(max_adapters, lease_s, str(Path(store).resolve()))
