"""One writing process per store: an exclusive `flock` on `<store>/.lock`, held for the process's life.

The store's crash recovery (emptying `.staging/` and `.trash/` at start) is only safe if no other process is
writing to the same directory: a second server would delete the first one's uploads in progress. So a
writer takes this lock before it touches anything, without waiting; the holder's pid is written into the
file so the error can name it. The kernel drops the lock when the holder dies, `kill -9` included, so a
crashed server never leaves a stale lock behind.

`flock` locks belong to an open file description: a second `open` + `flock` of the same file in the same
process would conflict with the first. Holds within one process therefore share one open file, counted:
`serve` takes the lock before it binds its port, and the `AdapterStore` its app builds later takes it again
without conflict. The file is closed, and the lock released, when the last hold is released. Readers
(`AdapterStore(recover=False)`, Ray Serve replicas) take no lock.
"""

from __future__ import annotations

import fcntl
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreLockedError

LOCK_FILE = ".lock"


@dataclass
class _OpenLock:
    fd: int
    holds: int = 0


_open_locks: dict[Path, _OpenLock] = {}  # this process's locked files, by resolved store root
_pending: list[StoreLock] = []  # releases queued by `release_soon`
_guard = threading.Lock()  # guards both; not reentrant, see `release_soon`


class StoreLock:
    """One hold on the exclusive lock of the store at `root`; `acquire` and `release` are idempotent."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._key: Path | None = None  # the resolved root, while held

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> StoreLock:
        """Take the lock without waiting (creating the store directory if needed); StoreLockedError if another
        process holds it."""
        with _guard:
            try:
                if self._key is None:
                    self.root.mkdir(parents=True, exist_ok=True)
                    key = self.root.resolve()
                    entry = _open_locks.get(key)
                    if entry is None:
                        entry = _open_locks[key] = _OpenLock(_lock_file(self.path, self.root))
                    entry.holds += 1
                    self._key = key
            finally:
                _release_pending()
        return self

    def release(self) -> None:
        """Give up this hold; the last hold of the process unlocks the file."""
        with _guard:
            self._release()
            _release_pending()

    def release_soon(self) -> None:
        """`release` for a finalizer. A garbage collection can run one inside `acquire` or `release`, on the
        thread that holds the guard: then the release is queued for the end of that call."""
        _pending.append(self)
        if _guard.acquire(blocking=False):
            try:
                _release_pending()
            finally:
                _guard.release()

    def _release(self) -> None:
        key, self._key = self._key, None
        entry = _open_locks.get(key) if key is not None else None
        if entry is None:  # not held, or held by the parent of this forked process
            return
        entry.holds -= 1
        if entry.holds == 0:
            del _open_locks[key]
            os.close(entry.fd)  # closing the only descriptor of the open file drops the flock


def _release_pending() -> None:
    while _pending:
        _pending.pop()._release()


def _lock_file(path: Path, root: Path) -> int:
    """Open and lock `path`, write our pid into it, and return its descriptor."""
    # No O_TRUNC: until we hold the lock, the pid in the file is the holder's. Python descriptors are not
    # inherited across exec, so a child process never keeps the lock alive.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreLockedError(root, int(holder) if holder.isdigit() else None) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _forget_in_forked_child() -> None:
    # A forked child shares the parent's open lock file: close its copies so that it neither believes it
    # holds the lock nor keeps it alive after the parent exits (the parent's descriptor still holds it).
    global _guard
    _guard = threading.Lock()  # another thread may have held it at the fork
    for entry in _open_locks.values():
        os.close(entry.fd)
    _open_locks.clear()
    _pending.clear()


os.register_at_fork(after_in_child=_forget_in_forked_child)
