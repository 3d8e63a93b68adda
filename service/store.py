"""Persistent on-disk store of PEFT adapters: one directory per adapter id, changed only by atomic renames.

Layout under the root:
    <id>/adapter_config.json, <id>/adapter_model.safetensors, <id>/manifest.json
    <id>/unloaded  (present: kept but not served, see `set_served`: vLLM's unload_lora_adapter)
    .staging/   uploads being received (same filesystem, so commit is a single rename)
    .trash/     adapters being deleted (renamed here first, so a crash never leaves a half-deleted one), and
                `<id>+replaced-<hex>`: the old files of a `replace` (put back at start-up if `<id>` is missing)
    active.json {"active": id | null}
    .lock       held by the one process that writes the store (service/store_lock.py)

An adapter directory therefore either exists complete (manifest included) or not at all. Uploads are
streamed to disk in chunks under a byte budget; archives are extracted member by member with every path
checked. Nothing is ever unpickled. The store knows nothing about HTTP or the model: it checks files and
names, not whether an adapter fits the base model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import weakref
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from adapter_client.ids import adapter_id_problem
from service.failpoints import failpoint
from service.peft_format import CONFIG_FILE, WEIGHTS_FILE
from service.store_lock import StoreLock
from service.store_upload import ACCEPTED_NAMES, file_digest, receive_upload

from .errors import AdapterExistsError, AdapterNotFoundError, InvalidAdapterIdError, ServiceError, StoreError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "active.json"
UNLOADED_FILE = "unloaded"  # marker: the adapter's files are kept, but it is not served (nor restored)
MANIFEST_VERSION = 1
REPLACED_MARK = "+replaced-"  # in .trash/: `<id>+replaced-<hex>` ('+' is never in an id)


def validate_adapter_id(adapter_id: str) -> str:
    """Return the id if it is a safe directory name for an adapter, else raise InvalidAdapterIdError (the rule is
    adapter_client/ids.py's, which the client checks before it sends a body)."""
    problem = adapter_id_problem(adapter_id)
    if problem is not None:
        raise InvalidAdapterIdError(str(adapter_id), problem)
    return adapter_id


def new_adapter_id() -> str:
    """A fresh random id such as `adapter-3f9c0a1b2d4e`."""
    return f"adapter-{secrets.token_hex(6)}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _undo_rename(renamed: Path, original: Path) -> None:
    """Rename back after a later step failed (best effort: the caller re-raises that step's error)."""
    try:
        os.replace(renamed, original)
    except OSError as exc:
        logger.error("could not rename %s back to %s: %s", renamed, original, exc)


@dataclass
class AdapterFiles:
    """The two adapter files in one directory, with their digests."""

    path: Path
    sha256: str  # of adapter_model.safetensors
    size_bytes: int
    config_sha256: str
    config_size_bytes: int

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


@dataclass
class StagedAdapter(AdapterFiles):
    """An upload received into `.staging/`, holding exactly the two adapter files; not yet in the store."""

    def discard(self) -> None:
        """Remove the staged files; idempotent, and a no-op once committed."""
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(kw_only=True)
class StoredAdapter(AdapterFiles):
    """One committed adapter, as described by its manifest."""

    id: str
    created_at: str
    config: dict[str, Any] = field(default_factory=dict)
    served: bool = True  # False: unloaded (files kept, not registered at start-up)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (the manifest's fields, no paths)."""
        return {
            "id": self.id,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "config_sha256": self.config_sha256,
            "config_size_bytes": self.config_size_bytes,
            "created_at": self.created_at,
            "config": self.config,
        }


@dataclass(frozen=True)
class CorruptEntry:
    """A directory under the root that is not a usable adapter, and why."""

    id: str
    reason: str


class AdapterStore:
    """The adapter directory tree under `root`; every change is an atomic rename, guarded by one lock."""

    def __init__(self, root: Path, recover: bool = True) -> None:
        """Open the store; `recover=False` opens it for reading only, without the crash clean-up below.

        Readers that share the directory with a writing process (Ray Serve replicas, see
        service/distributed/) must not recover: the clean-up would delete that writer's in-progress uploads.
        A writer (`recover=True`) first takes the store's process lock (StoreLockedError if another process
        holds it, before anything is touched) and holds it until `close`; holds within one process share
        the lock, so `serve` can take it before it binds its port.
        """
        self.root = Path(root)
        self.staging = self.root / ".staging"
        self.trash = self.root / ".trash"
        self._lock = threading.Lock()
        self._process_lock = StoreLock(self.root)
        if not recover:
            return
        self._process_lock.acquire()
        weakref.finalize(self, self._process_lock.release_soon)  # a store dropped without close() lets go too
        for folder in (self.staging, self.trash):
            folder.mkdir(exist_ok=True)
        # Crash recovery: whatever is left in staging or trash belongs to no live operation of this store,
        # except the old files of a replace that crashed between its two renames: they go back in place.
        self._restore_replaced()
        for folder in (self.staging, self.trash):
            for entry in folder.iterdir():
                logger.info("removing leftover %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        # A pointer to an adapter that is gone (a crash between a delete's rename and the pointer update) is
        # dropped now: left in place, it would make a later adapter under the same id active at a restart.
        active = self._read_active()
        if active is not None and not self.exists(active):
            logger.warning("active adapter %r is not in the store; unsetting it", active)
            self._write_active(None)

    def close(self) -> None:
        """Release this store's hold on the process lock (a writer's; a no-op for a reader). Idempotent."""
        self._process_lock.release()

    # ----- uploads -----

    def stage_files(self, files: Iterable[tuple[str, BinaryIO]], max_bytes: int) -> StagedAdapter:
        """Receive an upload: the two adapter files by name, or one .zip or tar archive holding them.

        At most `max_bytes` are read in total (and, for an archive, extracted). On any error the staging
        directory is removed and the store is left exactly as it was.
        """
        staged = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging))
        try:
            receive_upload(files, staged, max_bytes)
            size, sha = file_digest(staged / WEIGHTS_FILE)
            config_size, config_sha = file_digest(staged / CONFIG_FILE)
            failpoint("stage.done")
            return StagedAdapter(staged, sha, size, config_sha, config_size)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise

    def stage_directory(self, directory: Path, max_bytes: int = 1 << 62) -> StagedAdapter:
        """Stage the two adapter files of a directory (a merge result, or a path the operator allowed)."""
        with (directory / CONFIG_FILE).open("rb") as config, (directory / WEIGHTS_FILE).open("rb") as weights:
            return self.stage_files([(CONFIG_FILE, config), (WEIGHTS_FILE, weights)], max_bytes=max_bytes)

    def commit(self, adapter_id: str, staged: StagedAdapter, config_summary: dict[str, Any]) -> StoredAdapter:
        """Move a staged upload into the store under `adapter_id` (one atomic rename).

        Raises AdapterExistsError if the id is taken; the staged files are then left for the caller to
        discard.
        """
        validate_adapter_id(adapter_id)
        target = self.root / adapter_id
        with self._lock:
            if target.exists():
                raise AdapterExistsError(adapter_id)
            # Data must be durable before the rename publishes the directory: each file, and the directory's
            # own entries (without them a crash could leave a published directory missing a file).
            record, manifest = self._write_manifest(adapter_id, staged, config_summary)
            failpoint("commit.before_rename")
            try:
                # Fails on a non-empty target, so a concurrent commit of the same id cannot be overwritten.
                os.rename(staged.path, target)
            except OSError as exc:
                manifest.unlink(missing_ok=True)
                if target.exists():
                    raise AdapterExistsError(adapter_id) from exc
                raise
            try:
                _fsync_path(self.root)
            except BaseException:  # an error means "not stored": unpublish, so the store says the same
                _undo_rename(target, staged.path)
                manifest.unlink(missing_ok=True)
                raise
            failpoint("commit.after_rename")
        logger.info("stored adapter %s (%d bytes)", adapter_id, record.size_bytes)
        return record

    def replace(self, adapter_id: str, staged: StagedAdapter, config_summary: dict[str, Any]) -> StoredAdapter:
        """Put a staged upload in place of the stored adapter `adapter_id` (served from now on; the active
        pointer stays). Two renames under the lock: the old directory into `.trash/`, the staged one into
        place; an error between or after them renames both back, and a crash between them is undone at the
        next start (`_restore_replaced`). AdapterNotFoundError if nothing is stored under the id.
        """
        validate_adapter_id(adapter_id)
        target = self.root / adapter_id
        with self._lock:
            if not (target / MANIFEST_FILE).is_file():
                raise AdapterNotFoundError(adapter_id)
            record, manifest = self._write_manifest(adapter_id, staged, config_summary)
            old = self.trash / f"{adapter_id}{REPLACED_MARK}{secrets.token_hex(4)}"
            os.rename(target, old)
            try:
                failpoint("replace.old_moved")
                os.rename(staged.path, target)
                try:
                    _fsync_path(self.root)
                    _fsync_path(self.trash)
                except BaseException:
                    _undo_rename(target, staged.path)
                    raise
            except BaseException:  # an error means "not replaced": the old files go back
                _undo_rename(old, target)
                manifest.unlink(missing_ok=True)
                raise
        shutil.rmtree(old, ignore_errors=True)
        logger.info("replaced adapter %s (%d bytes)", adapter_id, record.size_bytes)
        return record

    def _write_manifest(self, adapter_id: str, staged: StagedAdapter,
                        config_summary: dict[str, Any]) -> tuple[StoredAdapter, Path]:
        """The record for `staged` under `adapter_id`, its manifest written and everything fsynced (call with
        the lock held, before a rename publishes the directory)."""
        record = StoredAdapter(
            id=adapter_id, path=self.root / adapter_id, sha256=staged.sha256, size_bytes=staged.size_bytes,
            config_sha256=staged.config_sha256, config_size_bytes=staged.config_size_bytes,
            created_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"), config=dict(config_summary),
        )
        manifest = staged.path / MANIFEST_FILE
        manifest.write_text(json.dumps({"manifest_version": MANIFEST_VERSION, **record.to_dict()}, indent=2))
        for name in (*ACCEPTED_NAMES, MANIFEST_FILE):
            _fsync_path(staged.path / name)
        _fsync_path(staged.path)
        return record, manifest

    def _restore_replaced(self) -> None:
        """Put back the old files of a replace that crashed after moving them aside but before the new ones
        were in place (the id is missing); any other leftover of a replace is just trash."""
        for entry in sorted(self.trash.iterdir()):
            adapter_id, mark, _ = entry.name.partition(REPLACED_MARK)
            if mark and entry.is_dir() and not entry.is_symlink() and not (self.root / adapter_id).exists():
                logger.warning("a replace of adapter %s was interrupted; restoring its previous files", adapter_id)
                os.rename(entry, self.root / adapter_id)
                _fsync_path(self.root)

    # ----- lookups and deletion -----

    def zip_copy(self, stored: StoredAdapter) -> Path:
        """A zip of `stored`'s PEFT files in the staging area (the caller removes it after sending)."""
        fd, name = tempfile.mkstemp(prefix="download-", suffix=".zip", dir=self.staging)
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
                archive.write(stored.config_path, CONFIG_FILE)
                archive.write(stored.weights_path, WEIGHTS_FILE)
        except BaseException:  # a full disk, a vanished file: no half-written zip stays behind
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def exists(self, adapter_id: str) -> bool:
        try:
            validate_adapter_id(adapter_id)
        except InvalidAdapterIdError:
            return False
        return (self.root / adapter_id / MANIFEST_FILE).is_file()

    def path(self, adapter_id: str) -> Path:
        """Directory of a stored adapter (for loading); AdapterNotFoundError if absent."""
        if not self.exists(adapter_id):
            raise AdapterNotFoundError(adapter_id)
        return self.root / adapter_id

    def get(self, adapter_id: str) -> StoredAdapter:
        """The manifest record of one adapter (no hash check; `scan` does that)."""
        entry = self._inspect(self.path(adapter_id).name, verify=False)
        if isinstance(entry, CorruptEntry):
            raise StoreError(f"adapter '{adapter_id}' is corrupt: {entry.reason}", {"adapter_id": adapter_id})
        return entry

    def list(self) -> list[StoredAdapter]:
        """Readable adapters, oldest first (by created_at, then id); corrupt ones are skipped (see `scan`)."""
        entries = [self._inspect(name, verify=False) for name in self._entry_names()]
        good = [e for e in entries if isinstance(e, StoredAdapter)]
        return sorted(good, key=lambda a: (a.created_at, a.id))

    def scan(self) -> tuple[list[StoredAdapter], list[CorruptEntry]]:
        """Check every entry, hashes included; never raises. Returns (good sorted like `list`, corrupt)."""
        good: list[StoredAdapter] = []
        corrupt: list[CorruptEntry] = []
        for name in self._entry_names():
            entry = self._inspect(name, verify=True)
            (good if isinstance(entry, StoredAdapter) else corrupt).append(entry)
        good.sort(key=lambda a: (a.created_at, a.id))
        return good, corrupt

    def delete(self, adapter_id: str) -> None:
        """Remove an adapter (atomic rename into `.trash/`, then delete); unset it if it was active."""
        validate_adapter_id(adapter_id)
        source = self.root / adapter_id
        with self._lock:
            if not source.is_dir():
                raise AdapterNotFoundError(adapter_id)
            doomed = self.trash / f"{adapter_id}-{secrets.token_hex(4)}"
            try:
                os.rename(source, doomed)
            except FileNotFoundError as exc:
                raise AdapterNotFoundError(adapter_id) from exc
            try:
                _fsync_path(self.root)
                failpoint("delete.in_trash")
                if self._read_active() == adapter_id:
                    self._write_active(None)
            except BaseException:  # an error means "not deleted": put it back (the pointer is unchanged)
                _undo_rename(doomed, source)
                raise
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("deleted adapter %s", adapter_id)

    def set_served(self, adapter_id: str, served: bool) -> None:
        """Mark an adapter served or not (unloaded: its files stay, it is not restored at start-up).

        One marker file, created or removed and the directory fsynced; unloading the active adapter unsets
        the active pointer, as a delete does."""
        validate_adapter_id(adapter_id)
        marker = self.root / adapter_id / UNLOADED_FILE
        with self._lock:
            if not (self.root / adapter_id / MANIFEST_FILE).is_file():
                raise AdapterNotFoundError(adapter_id)
            if served:
                marker.unlink(missing_ok=True)
            else:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
                os.fsync(fd)
                os.close(fd)
                if self._read_active() == adapter_id:
                    self._write_active(None)
            _fsync_path(marker.parent)
        logger.info("adapter %s %s", adapter_id, "served" if served else "unloaded (files kept)")

    # ----- active pointer -----

    def get_active(self) -> str | None:
        """The persisted active adapter id; None if unset, unreadable, or the adapter is gone."""
        active = self._read_active()
        if active is not None and not self.exists(active):
            logger.warning("active adapter %r is not in the store; ignoring it", active)
            return None
        return active

    def set_active(self, adapter_id: str | None, fused: bool = False) -> None:
        """Persist the active adapter (None for the base model) and whether it is fused."""
        with self._lock:
            if adapter_id is not None and not self.exists(adapter_id):
                validate_adapter_id(adapter_id)
                raise AdapterNotFoundError(adapter_id)
            self._write_active(adapter_id, fused and adapter_id is not None)

    def get_active_fused(self) -> bool:
        """Whether the persisted active adapter was fused."""
        try:
            return bool(json.loads((self.root / ACTIVE_FILE).read_text()).get("fused", False))
        except (OSError, ValueError, AttributeError):
            return False

    def _read_active(self) -> str | None:
        try:
            value = json.loads((self.root / ACTIVE_FILE).read_text()).get("active")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("unreadable %s: %s", self.root / ACTIVE_FILE, exc)
            return None
        return value if isinstance(value, str) else None

    def _write_active(self, adapter_id: str | None, fused: bool = False) -> None:
        if adapter_id is None:
            self._clear_active()
            return
        # Temp file in staging (same filesystem, cleaned on start), then os.replace: readers see old or new.
        fd, tmp = tempfile.mkstemp(prefix="active-", suffix=".json", dir=self.staging)
        target, previous = self.root / ACTIVE_FILE, Path(tmp + ".previous")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"active": adapter_id, **({"fused": True} if fused else {})}, f)
                f.flush()
                os.fsync(f.fileno())
            failpoint("active.temp_written")
            if target.exists():
                os.link(target, previous)  # so an undo is a rename, which needs no free space
            os.replace(tmp, target)
            try:
                _fsync_path(self.root)
            except BaseException:  # an error means "not changed": put the previous pointer back
                if previous.exists():
                    _undo_rename(previous, target)
                else:
                    target.unlink(missing_ok=True)
                raise
        finally:
            Path(tmp).unlink(missing_ok=True)
            previous.unlink(missing_ok=True)

    def _clear_active(self) -> None:
        """No active adapter = no pointer file. Moving it aside needs no free space, so deleting or deactivating
        the active adapter works on a full disk too; an error puts it back."""
        target = self.root / ACTIVE_FILE
        if not target.exists():
            return
        aside = self.staging / f"active-cleared-{secrets.token_hex(4)}.json"
        os.rename(target, aside)
        try:
            _fsync_path(self.root)
        except BaseException:
            _undo_rename(aside, target)
            raise
        aside.unlink(missing_ok=True)

    # ----- internals -----

    def _entry_names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _inspect(self, name: str, verify: bool) -> StoredAdapter | CorruptEntry:
        """Read one entry's manifest and check its files (sizes always, sha256 when `verify`)."""
        path = self.root / name
        try:
            validate_adapter_id(name)
            missing = [f for f in (*ACCEPTED_NAMES, MANIFEST_FILE) if not (path / f).is_file()]
            if missing:
                return CorruptEntry(name, f"missing {', '.join(missing)}")
            data = json.loads((path / MANIFEST_FILE).read_text())
            record = StoredAdapter(
                id=data["id"],
                path=path,
                sha256=data["sha256"],
                size_bytes=int(data["size_bytes"]),
                config_sha256=data["config_sha256"],
                config_size_bytes=int(data["config_size_bytes"]),
                created_at=data["created_at"],
                config=dict(data.get("config") or {}),
                served=not (path / UNLOADED_FILE).exists(),
            )
            if record.id != name:
                return CorruptEntry(name, f"manifest id '{record.id}' does not match the directory name")
            for file, size, sha in (
                (WEIGHTS_FILE, record.size_bytes, record.sha256),
                (CONFIG_FILE, record.config_size_bytes, record.config_sha256),
            ):
                if (path / file).stat().st_size != size:
                    return CorruptEntry(name, f"{file} size differs from manifest")
                if verify and file_digest(path / file)[1] != sha:
                    return CorruptEntry(name, f"{file} sha256 differs from manifest")
            return record
        except ServiceError as exc:
            return CorruptEntry(name, exc.message)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return CorruptEntry(name, f"unreadable manifest: {type(exc).__name__}: {exc}")

