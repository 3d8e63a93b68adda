"""The store's durability contract, checked on the system calls it makes.

A run without a power cut cannot tell a durable store from one that copies files into place or skips its
fsyncs: the files read back the same either way. So these tests record every `os.fsync` (with the path, size
and inode its descriptor refers to, read from /proc/self/fd), `os.rename` and `os.replace` while the store
commits, deletes and sets the active adapter, and check their order:

- commit: every file of the adapter, then its staging directory, is fsynced with its final content; then one
  rename publishes that same directory (same inode: not a copy); then the store directory is fsynced.
- delete: one rename moves the adapter into .trash/, then the store directory is fsynced, before the active
  pointer is changed.
- set_active: active.json is written to a temp file, fsynced, renamed over the old one, and the store
  directory fsynced.
"""

from __future__ import annotations

import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from service.store import ACTIVE_FILE, AdapterStore

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc/self/fd")

CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}).encode()
WEIGHTS = save({"base_model.model.q_proj.lora_A.weight": torch.ones(2, 8)}, {"format": "pt"})


@dataclass(frozen=True)
class Call:
    """One recorded call: ("fsync", path) with what the descriptor held, or ("rename" | "replace", src, dst)."""

    op: str
    path: str
    dst: str = ""
    inode: int = 0
    size: int | None = None  # of a regular file, at the fsync


def real(path: str | os.PathLike[str]) -> str:
    return str(Path(path).resolve())


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Every os.fsync / os.rename / os.replace made while the test runs, in order."""
    recorded: list[Call] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        size = info.st_size if stat.S_ISREG(info.st_mode) else None
        recorded.append(Call("fsync", os.readlink(f"/proc/self/fd/{fd}"), inode=info.st_ino, size=size))
        fsync(fd)

    def recording_rename(src, dst, *args, **kwargs) -> None:
        recorded.append(Call("rename", real(src), real(dst)))
        rename(src, dst, *args, **kwargs)

    def recording_replace(src, dst, *args, **kwargs) -> None:
        recorded.append(Call("replace", real(src), real(dst)))
        replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    monkeypatch.setattr(os, "replace", recording_replace)
    return recorded


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


def stage(store: AdapterStore):
    return store.stage_files([("adapter_config.json", io.BytesIO(CONFIG)),
                              ("adapter_model.safetensors", io.BytesIO(WEIGHTS))], max_bytes=1 << 20)


def moves(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.op in ("rename", "replace")]


def fsyncs(calls: list[Call]) -> list[Call]:
    return [c for c in calls if c.op == "fsync"]


def test_commit_fsyncs_files_and_directory_then_publishes_that_directory_with_one_rename(store, calls) -> None:
    staged = stage(store)
    staged_dir = real(staged.path)
    staged_inodes = {p.name: p.stat().st_ino for p in staged.path.iterdir()}
    directory_inode = staged.path.stat().st_ino
    calls.clear()

    store.commit("a1", staged, {"r": 2})

    target = store.root / "a1"
    [publish] = moves(calls)  # one rename, nothing copied into place
    assert publish == Call("rename", staged_dir, real(target))
    # The published directory is the staged one itself, files included (a copy would have new inodes).
    assert target.stat().st_ino == directory_inode
    assert {p.name: p.stat().st_ino for p in target.iterdir() if p.name in staged_inodes} == staged_inodes

    at = calls.index(publish)
    synced_before = {c.path: c for c in fsyncs(calls[:at])}
    for file in target.iterdir():  # the adapter's files and the manifest, each with its final content
        call = synced_before.get(os.path.join(staged_dir, file.name))
        assert call is not None, f"{file.name} not fsynced before the rename"
        assert (call.inode, call.size) == (file.stat().st_ino, file.stat().st_size), f"{file.name} fsynced early"
    assert staged_dir in synced_before, "the staging directory (its entries) not fsynced before the rename"
    assert synced_before[staged_dir].inode == directory_inode
    root = real(store.root)
    assert any(c.path == root for c in fsyncs(calls[at + 1:])), "store directory not fsynced after the rename"


def test_set_active_writes_a_temp_file_fsyncs_it_then_renames_it_and_fsyncs_the_directory(store, calls) -> None:
    store.commit("a1", stage(store), {})
    calls.clear()

    store.set_active("a1")

    active = store.root / ACTIVE_FILE
    [publish] = moves(calls)
    assert publish.op == "replace" and publish.dst == real(active)
    assert Path(publish.path).parent == store.staging.resolve(), "temp file outside .staging/"
    at = calls.index(publish)
    temp = [c for c in fsyncs(calls[:at]) if c.path == publish.path]
    assert temp, "temp file not fsynced before the rename"
    assert (temp[-1].inode, temp[-1].size) == (active.stat().st_ino, active.stat().st_size)
    assert any(c.path == real(store.root) for c in fsyncs(calls[at + 1:])), "store directory not fsynced after"
    assert json.loads(active.read_text()) == {"active": "a1"}


def test_delete_renames_into_trash_and_fsyncs_the_store_before_changing_the_pointer(store, calls) -> None:
    store.commit("a1", stage(store), {})
    store.set_active("a1")
    calls.clear()

    store.delete("a1")

    root = real(store.root)
    into_trash, pointer = moves(calls)
    assert into_trash.op == "rename" and into_trash.path == real(store.root / "a1")
    assert Path(into_trash.dst).parent == store.trash.resolve()
    # The pointer is moved aside (no active adapter = no pointer file), which needs no free space.
    assert pointer.op == "rename" and pointer.path == real(store.root / ACTIVE_FILE)
    between = calls[calls.index(into_trash) + 1:calls.index(pointer)]
    assert any(c.path == root for c in fsyncs(between)), "store directory not fsynced after the rename"
    assert [c.path for c in fsyncs(calls[calls.index(pointer) + 1:])] == [root]
    assert not (store.root / "a1").exists() and store.get_active() is None
