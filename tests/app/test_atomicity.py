"""Every state change is all or nothing: a store step that fails (a full disk, an I/O error) during an upload,
merge, activation (fused or not), deactivation, delete or in-place replace leaves everything exactly as it
was: the listing, the active and fused adapter in the service, the runtime and the store, /health, the
store's files and the tokens each adapter generates.

Each case starts from adapters a and b with a active (fused or not), makes one store step fail, runs the
operation, expects the typed error, compares a snapshot with the one taken before, then runs the operation
again with the disk healthy (nothing was left half-done in the way: no reserved id, no held lock).
"""

from __future__ import annotations

import asyncio
import copy
import errno
import hashlib
import io
import os
import pathlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import service.app.local as local_module
import service.store as store_module
import service.store_upload as store_upload_module
from service.app import GenerationInput
from service.engine import Engine, SamplingParams
from service.errors import InsufficientStorageError, ServiceError
from service.merging import MergeSpec
from service.model_loading import BaseModel
from service.runtime import AdapterRuntime
from service.settings import Settings
from service.store import AdapterStore

PROMPT = "all or nothing"
NEW_TOKENS = 6
FILES = ("adapter_config.json", "adapter_model.safetensors")


def build_service(base, tokenizer, store_root: Path) -> local_module.LocalAdapterService:
    model = copy.deepcopy(base)
    engine = Engine(model, tokenizer, AdapterRuntime(model), max_batch_size=4)
    settings = Settings(store=store_root, max_resident_adapters=8, max_upload_bytes=1 << 30)
    base_model = BaseModel(model, tokenizer, "demo", torch.device("cpu"), torch.float32)
    return local_module.LocalAdapterService(settings, base_model, engine, AdapterStore(store_root))


def upload_files(adapter_dir: Path) -> list[tuple[str, io.BytesIO]]:
    return [(name, io.BytesIO((adapter_dir / name).read_bytes())) for name in FILES]


async def greedy(service: local_module.LocalAdapterService, adapter: str | None) -> list[int]:
    request = GenerationInput(SamplingParams(max_new_tokens=NEW_TOKENS), adapter, prompt=PROMPT)
    return (await (await service.generate(request)).result()).token_ids


def store_files(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under the store root (path -> size, sha256); `.staging/` must be empty."""
    assert list((root / ".staging").iterdir()) == [], "a failed operation left files in .staging"
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


async def snapshot(service: local_module.LocalAdapterService) -> dict[str, Any]:
    """Everything an operation may change, as seen by clients, the runtime and the store."""
    listing = await service.list()
    ids = [view.id for view in listing.adapters]
    return {
        # usage counts the snapshot's own generations below: not state an operation changes
        "listing": [{**asdict(view), "usage": None} for view in listing.adapters],
        "listing.active": listing.active,
        "service": (service.active, service.fused),
        "runtime": await service.engine.call(lambda rt: (sorted(rt.adapters), rt.active, rt.fused)),
        "health": asdict(await service.health()),
        "store files": store_files(service.store.root),
        "store active": (service.store.get_active(), service.store.get_active_fused()),
        "tokens": {adapter: await greedy(service, adapter) for adapter in (None, "base", *ids)},
    }


# ---- failing store steps -----------------------------------------------------------------------------------

class StepFailure:
    """Makes store steps raise OSError(`code`) and counts the failures it caused."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
        self.monkeypatch, self.root, self.code = monkeypatch, root.resolve(), code
        self.hits = 0

    def in_store(self, *args, **kwargs) -> bool:
        """Whether a call names a path in the store (os and tempfile functions serve the whole process)."""
        return any(isinstance(v, (str, os.PathLike)) and Path(v).resolve().is_relative_to(self.root)
                   for v in (*args, *kwargs.values()))

    def is_root(self, path: Path) -> bool:
        return Path(path).resolve() == self.root

    def install(self, owner: Any, name: str, before: bool = False, when=lambda *args, **kwargs: True) -> None:
        """Replace `owner.name` by a version that raises for the calls `when` accepts; `before`: after running
        the real call (the disk filled up after a partial write)."""
        real = getattr(owner, name)

        def failing(*args, **kwargs):
            if not when(*args, **kwargs):
                return real(*args, **kwargs)
            if before:
                real(*args, **kwargs)
            self.hits += 1
            raise OSError(self.code, os.strerror(self.code))

        self.monkeypatch.setattr(owner, name, failing)


def fail_manifest_write(failure: StepFailure) -> None:
    real = pathlib.Path.write_text

    def write_text(path: Path, *args, **kwargs):
        if path.name != store_module.MANIFEST_FILE:
            return real(path, *args, **kwargs)
        failure.hits += 1
        real(path, "{", **kwargs)  # a torn write, then the disk is full
        raise OSError(failure.code, os.strerror(failure.code))

    failure.monkeypatch.setattr(pathlib.Path, "write_text", write_text)


# Each step: how to make it fail, given the service's store.
STEPS = {
    "store.stage_files": lambda f, store: f.install(store, "stage_files"),
    "store.stage_directory": lambda f, store: f.install(store, "stage_directory"),
    "store.commit": lambda f, store: f.install(store, "commit"),
    "store.replace": lambda f, store: f.install(store, "replace"),
    "store.set_active": lambda f, store: f.install(store, "set_active"),
    "store._write_active": lambda f, store: f.install(store, "_write_active"),
    "store.delete": lambda f, store: f.install(store, "delete"),
    "mkdtemp in staging": lambda f, store: f.install(tempfile, "mkdtemp", when=f.in_store),
    "mkstemp in staging": lambda f, store: f.install(tempfile, "mkstemp", when=f.in_store),
    "upload write": lambda f, store: f.install(store_upload_module, "copy_stream", before=True),
    "manifest write": lambda f, store: fail_manifest_write(f),
    "fsync": lambda f, store: f.install(store_module, "_fsync_path"),
    "store root fsync": lambda f, store: f.install(store_module, "_fsync_path", when=f.is_root),
    "os.rename": lambda f, store: f.install(os, "rename", when=f.in_store),
    "os.replace": lambda f, store: f.install(os, "replace", when=f.in_store),
    "merge write": lambda f, store: f.install(local_module, "write_peft_adapter", before=True),
}


@dataclass(frozen=True)
class Case:
    operation: str
    step: str
    code: int = errno.ENOSPC
    fused: bool = False  # a is active and fused before the operation

    def __str__(self) -> str:
        return f"{self.operation}{' (a fused)' if self.fused else ''} / {self.step} / {errno.errorcode[self.code]}"


def operations(demo_adapters: dict[str, Path]) -> dict[str, Any]:
    return {
        "upload": lambda s: s.upload(upload_files(demo_adapters["c"]), "c"),
        "merge": lambda s: s.merge("m", [("a", 0.5), ("b", 0.5)], MergeSpec(method="cat", weights=[])),
        "activate": lambda s: s.activate("b"),
        "activate fuse": lambda s: s.activate("b", fuse=True),
        "fuse the active": lambda s: s.activate("a", fuse=True),
        "deactivate": lambda s: s.deactivate(),
        "delete the active": lambda s: s.delete("a"),
        "delete another": lambda s: s.delete("b"),
        # vLLM's load_inplace: the active adapter's files and weights replaced by c's
        "replace the active": lambda s: s.lifecycle.replace(
            "a", lambda: s.store.stage_files(upload_files(demo_adapters["c"]), 1 << 30)),
    }


UPLOAD_STEPS = ["store.stage_files", "store.commit", "mkdtemp in staging", "upload write", "manifest write",
                "fsync", "os.rename", "store root fsync"]
MERGE_STEPS = ["merge write", "mkdtemp in staging", "store.stage_directory", "store.commit", "os.rename",
               "store root fsync"]
ACTIVATE_STEPS = ["store.set_active", "store._write_active", "mkstemp in staging", "os.replace", "fsync"]
# No active adapter = no pointer file: clearing it is one rename aside (no free space needed), then an fsync.
DEACTIVATE_STEPS = ["store.set_active", "store._write_active", "os.rename", "fsync"]
CASES = [
    *(Case("upload", step) for step in UPLOAD_STEPS),
    Case("upload", "upload write", errno.EIO), Case("upload", "os.rename", errno.EIO),
    *(Case("merge", step) for step in MERGE_STEPS),
    Case("merge", "store.commit", errno.EIO), Case("upload", "store root fsync", errno.EIO),
    *(Case(op, step, fused=fused) for op in ("activate", "activate fuse") for step in ACTIVATE_STEPS
      for fused in (False, True)),
    Case("activate fuse", "os.replace", errno.EIO),
    *(Case("fuse the active", step) for step in ACTIVATE_STEPS),
    *(Case("deactivate", step, fused=fused) for step in DEACTIVATE_STEPS for fused in (False, True)),
    Case("deactivate", "os.rename", errno.EIO),
    *(Case("delete the active", step, fused=fused) for step in ("store.delete", "os.rename", "store._write_active",
                                                                 "fsync") for fused in (False, True)),
    *(Case("delete another", step) for step in ("store.delete", "os.rename", "fsync")),
    Case("delete the active", "store.delete", errno.EIO),
    *(Case("replace the active", step, fused=fused) for step in ("store.stage_files", "store.replace",
                                                                  "manifest write", "os.rename", "fsync",
                                                                  "store root fsync") for fused in (False, True)),
    Case("replace the active", "os.rename", errno.EIO),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_failed_store_step_changes_nothing(case: Case, demo_base, demo_tokenizer, demo_adapters, peft_greedy,
                                            monkeypatch, tmp_path) -> None:
    service = build_service(demo_base, demo_tokenizer, tmp_path / "store")
    operation = operations(demo_adapters)[case.operation]
    service.start()

    async def scenario() -> None:
        for name in ("a", "b"):
            await service.upload(upload_files(demo_adapters[name]), name)
        await service.activate("a", fuse=case.fused)
        before = await snapshot(service)
        oracle = {None: "a", "base": None, "a": "a", "b": "b"}  # requested adapter -> PEFT adapter
        assert before["tokens"] == {k: peft_greedy(v, PROMPT, NEW_TOKENS) for k, v in oracle.items()}

        failure = StepFailure(monkeypatch, service.store.root, case.code)
        STEPS[case.step](failure, service.store)
        expected = InsufficientStorageError if case.code == errno.ENOSPC else OSError
        with pytest.raises(expected) as raised:
            await operation(service)
        monkeypatch.undo()
        assert failure.hits >= 1, f"{case.step} was not reached"
        if case.code == errno.ENOSPC:
            assert raised.value.code == "insufficient_storage"
        else:
            assert not isinstance(raised.value, ServiceError) and raised.value.errno == case.code
        # Still listed, still active (and fused) if it was, still PEFT's tokens: exactly as before.
        assert await snapshot(service) == before, f"{case}: the failed operation changed the state"

        await operation(service)  # the same operation on a healthy disk: nothing was left in its way
        after = await snapshot(service)
        assert after != before

    try:
        asyncio.run(scenario())
    finally:
        service.stop()
