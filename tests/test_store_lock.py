"""StoreLock: one writing process per store, shared by the holds of one process, gone with its holder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.errors import StoreLockedError
from service.store import AdapterStore
from service.store_lock import LOCK_FILE, StoreLock

REPO = Path(__file__).resolve().parents[1]


def other_process(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` (with `root` bound) in a fresh interpreter: another process, so another lock owner."""
    script = f"from pathlib import Path\nroot = Path({str(root)!r})\n{code}"
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)


TRY_LOCK = """
from service.errors import StoreLockedError
from service.store_lock import StoreLock
try:
    StoreLock(root).acquire()
except StoreLockedError as exc:
    print("locked", exc.details["pid"])
else:
    print("acquired")
"""


def test_a_held_lock_stops_other_processes_and_names_its_holder(tmp_path: Path) -> None:
    root = tmp_path / "store"
    lock = StoreLock(root).acquire()
    assert (root / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert other_process(TRY_LOCK, root).stdout.split() == ["locked", str(os.getpid())]
    lock.release()
    assert other_process(TRY_LOCK, root).stdout.split() == ["acquired"]


def test_holds_in_one_process_share_the_lock_until_the_last_is_released(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = StoreLock(root).acquire()
    second = StoreLock(root / ".." / "store").acquire()  # the same store by another path: no self-conflict
    assert first.held and second.held
    first.release()
    first.release()  # idempotent: does not give up the other hold
    assert other_process(TRY_LOCK, root).stdout.split()[0] == "locked"
    second.release()
    assert other_process(TRY_LOCK, root).stdout.split() == ["acquired"]


def test_a_writer_store_holds_the_lock_and_a_second_writer_touches_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = AdapterStore(root)
    (store.staging / "upload-live").mkdir()
    (store.staging / "upload-live" / "adapter_model.safetensors").write_bytes(b"streaming")
    writer = other_process("from service.store import AdapterStore\nAdapterStore(root)", root)
    assert writer.returncode != 0 and "StoreLockedError" in writer.stderr
    assert (store.staging / "upload-live" / "adapter_model.safetensors").read_bytes() == b"streaming"
    reader = other_process("from service.store import AdapterStore\nprint(AdapterStore(root, recover=False).list())",
                           root)
    assert reader.returncode == 0 and reader.stdout.strip() == "[]", reader.stderr
    AdapterStore(root).close()  # a second writer in the same process shares the lock
    assert other_process(TRY_LOCK, root).stdout.split()[0] == "locked"
    store.close()
    assert other_process(TRY_LOCK, root).stdout.split() == ["acquired"]


def test_a_dropped_writer_store_releases_its_hold(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = AdapterStore(root)
    assert other_process(TRY_LOCK, root).stdout.split()[0] == "locked"
    del store
    assert other_process(TRY_LOCK, root).stdout.split() == ["acquired"]


def test_the_error_names_the_store_and_the_holder(tmp_path: Path) -> None:
    error = StoreLockedError(tmp_path, 4242)
    assert error.message == f"the store {tmp_path} is in use by another server (pid 4242)"
    assert error.details == {"store": str(tmp_path), "pid": 4242}
    assert StoreLockedError(tmp_path, None).message == f"the store {tmp_path} is in use by another server"
