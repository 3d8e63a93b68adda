"""AdapterStore: staging, commit, scan, delete, active pointer, and every rejected upload leaving no trace."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from service.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterIdError,
    InvalidUploadError,
    ServiceError,
    UploadTooLargeError,
)
from service.store import AdapterStore, CorruptEntry, new_adapter_id, validate_adapter_id

CONFIG = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}).encode()
SUMMARY = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj"],
    "modules_to_save": None,
}
MAX = 1 << 20


def weights(seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return save({"base_model.model.q_proj.lora_A.weight": torch.randn(2, 8, generator=gen)}, {"format": "pt"})


def two_files(seed: int = 0) -> list[tuple[str, io.BytesIO]]:
    return [
        ("adapter_config.json", io.BytesIO(CONFIG)),
        ("adapter_model.safetensors", io.BytesIO(weights(seed))),
    ]


def zip_bytes(entries: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16  # S_IFLNK
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def tar_bytes(
    entries: dict[str, bytes], mode: str = "w:gz", links: dict[str, tuple[bytes, str]] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def tree(root: Path) -> list[tuple[str, str]]:
    """Every path under root with a digest of its content (files) or 'dir'."""
    return sorted(
        (str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in root.rglob("*")
    )


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    s = AdapterStore(tmp_path / "store")
    s.commit("existing", s.stage_files(two_files(seed=9), MAX), SUMMARY)
    s.set_active("existing")
    return s


def test_stage_commit_scan_round_trip(store: AdapterStore) -> None:
    staged = store.stage_files(two_files(seed=1), MAX)
    assert sorted(p.name for p in staged.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert staged.sha256 == hashlib.sha256(weights(1)).hexdigest()
    assert staged.size_bytes == len(weights(1))

    record = store.commit("a1", staged, SUMMARY)
    assert not staged.path.exists()
    staged.discard()  # no-op once committed

    manifest = json.loads((store.root / "a1" / "manifest.json").read_text())
    assert manifest["id"] == "a1"
    assert (
        manifest["sha256"]
        == hashlib.sha256((store.root / "a1" / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert manifest["config_sha256"] == hashlib.sha256(CONFIG).hexdigest()
    assert manifest["size_bytes"] == len(weights(1)) and manifest["config_size_bytes"] == len(CONFIG)
    assert manifest["config"] == SUMMARY
    assert manifest["created_at"].endswith("+00:00")

    good, corrupt = AdapterStore(store.root).scan()
    assert [a.id for a in good] == ["existing", "a1"] and corrupt == []
    assert store.get("a1") == record == good[1]
    assert [a.id for a in store.list()] == ["existing", "a1"]
    assert store.exists("a1") and store.path("a1") == store.root / "a1"
    assert record.weights_path.read_bytes() == weights(1)
    assert not any(store.staging.iterdir())


def upload(name: str, data: bytes) -> list[tuple[str, io.BytesIO]]:
    return [(name, io.BytesIO(data))]


def in_folder(folder: str, entries: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in entries.items()}


FLAT = {"adapter_config.json": CONFIG, "adapter_model.safetensors": weights(1)}
EXTRAS = {"README.md": b"hi", "training_args.json": b"{}"}
ACCEPTED: dict[str, Callable[[], list]] = {
    "flat-zip": lambda: upload("adapter.zip", zip_bytes(FLAT)),
    "zip-in-folder": lambda: upload("a.zip", zip_bytes(in_folder("my-adapter", {**FLAT, **EXTRAS}))),
    "tar.gz": lambda: upload("a.tar.gz", tar_bytes(in_folder("x", FLAT))),
    "tgz": lambda: upload("a.TGZ", tar_bytes(FLAT)),
    "tar": lambda: upload("a.tar", tar_bytes(in_folder(".", FLAT), mode="w")),
    "files+readme": lambda: [*two_files(1), ("README.md", io.BytesIO(b"# card"))],
    "client-paths": lambda: [
        ("dir\\adapter_config.json", io.BytesIO(CONFIG)),
        ("dir/adapter_model.safetensors", io.BytesIO(weights(1))),
    ],
}


@pytest.mark.parametrize("files", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_upload_shapes(store: AdapterStore, files: Callable[[], list]) -> None:
    staged = store.stage_files(files(), MAX)
    assert (staged.path / "adapter_model.safetensors").read_bytes() == weights(1)
    assert (staged.path / "adapter_config.json").read_bytes() == CONFIG
    assert sorted(p.name for p in staged.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    staged.discard()
    assert not any(store.staging.iterdir())


BOMB = zip_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\0" * (4 * MAX)})
SYMLINK = {"x": (tarfile.SYMTYPE, "/etc/passwd")}
HARDLINK = {"x": (tarfile.LNKTYPE, "adapter_config.json")}
MANY = {f"f{i}.txt": b"x" for i in range(20)}
PICKLED = {"adapter_config.json": CONFIG, "x/adapter_model.bin": b"pickle"}
SPLIT = {"a/adapter_config.json": CONFIG, "b/adapter_model.safetensors": weights(1)}
# case id -> (upload, expected error, substring of its message); uploads are capped at MAX bytes except
# "too-large", which is capped at 100.
REJECTED: dict[str, tuple[Callable[[], list], type[ServiceError], str]] = {
    "too-large": (lambda: two_files(1), UploadTooLargeError, "exceeds"),
    "wrong-name": (
        lambda: upload("weights.safetensors", b"x"),
        InvalidUploadError,
        "adapter_model.safetensors",
    ),
    "missing-file": (lambda: two_files(1)[:1], InvalidUploadError, "missing adapter_model.safetensors"),
    "pickle-bin": (
        lambda: [two_files(1)[0], ("adapter_model.bin", io.BytesIO(b"\x80\x02"))],
        InvalidUploadError,
        "save_file",
    ),
    "duplicate": (lambda: [*two_files(1), two_files(2)[1]], InvalidUploadError, "once"),
    "files+archive": (
        lambda: [*two_files(1), *upload("a.zip", zip_bytes(FLAT))],
        InvalidUploadError,
        "archive",
    ),
    "zip-dotdot": (lambda: upload("a.zip", zip_bytes({**FLAT, "../evil": b"x"})), InvalidUploadError, ".."),
    "zip-absolute": (
        lambda: upload("a.zip", zip_bytes({**FLAT, "/etc/evil": b"x"})),
        InvalidUploadError,
        "absolute",
    ),
    "zip-symlink": (lambda: upload("a.zip", zip_bytes(FLAT, symlinks=("ln",))), InvalidUploadError, "link"),
    "tar-symlink": (lambda: upload("a.tgz", tar_bytes(FLAT, links=SYMLINK)), InvalidUploadError, "link"),
    "tar-hardlink": (lambda: upload("a.tgz", tar_bytes(FLAT, links=HARDLINK)), InvalidUploadError, "link"),
    "tar-device": (
        lambda: upload("a.tar", tar_bytes(FLAT, mode="w", links={"dev": (tarfile.CHRTYPE, "")})),
        InvalidUploadError,
        "device",
    ),
    "too-many-entries": (lambda: upload("a.zip", zip_bytes({**FLAT, **MANY})), InvalidUploadError, "entries"),
    "zip-bomb": (lambda: upload("a.zip", BOMB), UploadTooLargeError, "extracted"),
    "zip-pickle": (lambda: upload("a.zip", zip_bytes(PICKLED)), InvalidUploadError, "safetensors"),
    "split-folders": (lambda: upload("a.zip", zip_bytes(SPLIT)), InvalidUploadError, "same folder"),
    "corrupt-zip": (lambda: upload("a.zip", b"not a zip"), InvalidUploadError, "cannot read"),
    "corrupt-tar": (lambda: upload("a.tar.gz", b"not a tar"), InvalidUploadError, "cannot read"),
    "bad-json": (
        lambda: [("adapter_config.json", io.BytesIO(b"{nope")), two_files(1)[1]],
        InvalidUploadError,
        "JSON",
    ),
    "json-not-object": (
        lambda: [("adapter_config.json", io.BytesIO(b"[1]")), two_files(1)[1]],
        InvalidUploadError,
        "object",
    ),
}


@pytest.mark.parametrize(("files", "error", "needle"), REJECTED.values(), ids=REJECTED.keys())
def test_rejected_upload_leaves_store_unchanged(
    store: AdapterStore, files: Callable[[], list], error: type[ServiceError], needle: str
) -> None:
    before = tree(store.root)
    max_bytes = 100 if needle == "exceeds" else MAX
    with pytest.raises(error) as info:
        store.stage_files(files(), max_bytes)
    assert needle in info.value.message
    if error is UploadTooLargeError:
        assert info.value.details == {"max_bytes": max_bytes}
    assert tree(store.root) == before
    assert not any(store.staging.iterdir())


def test_error_codes_and_statuses() -> None:
    from service.api.errors import status_of

    for error, code, status in [
        (AdapterNotFoundError("x"), "adapter_not_found", 404), (AdapterExistsError("x"), "adapter_exists", 409),
        (UploadTooLargeError(1), "upload_too_large", 413), (InvalidUploadError("m"), "invalid_upload", 422),
        (InvalidAdapterIdError("x", "r"), "invalid_adapter_id", 422),
    ]:
        assert (error.code, status_of(error.code)) == (code, status)
        assert not hasattr(error, "status"), "the core carries no HTTP status"
    assert InvalidAdapterIdError("x", "r").details["adapter_id"] == "x"


def test_wrong_name_lists_accepted_names(store: AdapterStore) -> None:
    with pytest.raises(InvalidUploadError) as info:
        store.stage_files([("model.safetensors", io.BytesIO(b"x"))], MAX)
    assert info.value.details["accepted_names"] == ["adapter_config.json", "adapter_model.safetensors"]


def test_commit_to_existing_id_keeps_both(store: AdapterStore) -> None:
    before = tree(store.root / "existing")
    staged = store.stage_files(two_files(seed=3), MAX)
    with pytest.raises(AdapterExistsError):
        store.commit("existing", staged, SUMMARY)
    assert tree(store.root / "existing") == before
    assert sorted(p.name for p in staged.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    staged.discard()
    assert not any(store.staging.iterdir())


def test_commit_rejects_invalid_id(store: AdapterStore) -> None:
    staged = store.stage_files(two_files(), MAX)
    with pytest.raises(InvalidAdapterIdError):
        store.commit("../x", staged, SUMMARY)
    assert staged.path.exists()
    staged.discard()


def test_delete(store: AdapterStore) -> None:
    store.commit("other", store.stage_files(two_files(1), MAX), SUMMARY)
    store.delete("existing")
    assert not (store.root / "existing").exists()
    assert not store.exists("existing") and [a.id for a in store.list()] == ["other"]
    assert store.get_active() is None  # the active adapter was deleted
    assert not (store.root / "active.json").exists(), "no active adapter: no pointer file (needs no free space)"
    assert not any(store.trash.iterdir()) and not any(store.staging.iterdir())
    with pytest.raises(AdapterNotFoundError):
        store.delete("existing")
    with pytest.raises(AdapterNotFoundError):
        store.get("existing")
    with pytest.raises(AdapterNotFoundError):
        store.path("existing")


def test_unloaded_marker_keeps_the_files(store: AdapterStore) -> None:
    files = tree(store.root / "existing")
    store.set_served("existing", False)  # vLLM's unload: not served, files kept
    assert tree(store.root / "existing") == sorted([*files, ("unloaded", hashlib.sha256(b"").hexdigest())])
    assert [(a.id, a.served) for a in store.scan()[0]] == [("existing", False)], "still a good entry"
    assert store.get_active() is None, "unloading the active adapter unsets the pointer"
    store.set_served("existing", True)
    assert tree(store.root / "existing") == files and store.get("existing").served
    with pytest.raises(AdapterNotFoundError):
        store.set_served("missing", False)


def test_replace_swaps_the_files_and_keeps_the_pointer(store: AdapterStore) -> None:
    old = store.get("existing")
    store.set_served("existing", False)  # a replace takes over an unloaded adapter's files too
    store.set_active(None)
    store.set_served("existing", True)
    store.set_active("existing")
    new = store.replace("existing", store.stage_files(two_files(seed=4), MAX), {"r": 2})
    assert new.sha256 != old.sha256 and store.get("existing").sha256 == new.sha256 and new.config == {"r": 2}
    assert store.get_active() == "existing" and store.get("existing").served
    assert [a.id for a in store.scan()[0]] == ["existing"] and store.scan()[1] == []
    assert not any(store.trash.iterdir()) and not any(store.staging.iterdir())
    with pytest.raises(AdapterNotFoundError):
        store.replace("missing", store.stage_files(two_files(), MAX), SUMMARY)


def test_replace_that_fails_between_its_renames_keeps_the_old_files(store: AdapterStore, monkeypatch) -> None:
    import service.store as store_module

    before = tree(store.root / "existing")
    staged = store.stage_files(two_files(seed=4), MAX)

    def fail(name: str) -> None:
        if name == "replace.old_moved":
            raise OSError("disk went away")

    monkeypatch.setattr(store_module, "failpoint", fail)
    with pytest.raises(OSError, match="went away"):
        store.replace("existing", staged, SUMMARY)
    assert tree(store.root / "existing") == before and store.get_active() == "existing"
    assert not any(store.trash.iterdir())
    assert sorted(p.name for p in staged.path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_crash_between_the_renames_of_a_replace_restores_the_old_files(store: AdapterStore) -> None:
    """SIGKILL after the old directory went into .trash/: the next start puts it back."""
    import subprocess
    import sys

    before = tree(store.root / "existing")
    root = store.root
    store.close()  # the child process takes the store's lock
    code = ("import io, sys; from service.store import AdapterStore; from tests.test_store import two_files, MAX; "
            "s = AdapterStore(__import__('pathlib').Path(sys.argv[1])); "
            "s.replace('existing', s.stage_files(two_files(seed=4), MAX), {})")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "SERVICE_FAILPOINT": "replace.old_moved"}, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert not (root / "existing").exists() and any((root / ".trash").iterdir()), "crashed between the renames"
    reopened = AdapterStore(root)
    assert tree(root / "existing") == before and reopened.get_active() == "existing"
    assert not any(reopened.trash.iterdir()) and not any(reopened.staging.iterdir())
    reopened.close()


def test_scan_reports_corrupt_entries(store: AdapterStore) -> None:
    for name in ("no-weights", "bad-manifest", "sha-mismatch", "id-mismatch", "no-manifest"):
        store.commit(name, store.stage_files(two_files(1), MAX), SUMMARY)
    (store.root / "no-weights" / "adapter_model.safetensors").unlink()
    (store.root / "bad-manifest" / "manifest.json").write_text("{not json")
    tampered = bytearray((store.root / "sha-mismatch" / "adapter_model.safetensors").read_bytes())
    tampered[-1] ^= 0xFF  # same size, different bytes: only the hash can tell
    (store.root / "sha-mismatch" / "adapter_model.safetensors").write_bytes(bytes(tampered))
    manifest = json.loads((store.root / "id-mismatch" / "manifest.json").read_text())
    (store.root / "id-mismatch" / "manifest.json").write_text(json.dumps({**manifest, "id": "other"}))
    (store.root / "no-manifest" / "manifest.json").unlink()
    (store.root / "base").mkdir()  # reserved name: never an adapter
    (store.root / "stray-file.txt").write_text("ignored")

    good, corrupt = store.scan()
    assert [a.id for a in good] == ["existing"]
    reasons = {c.id: c.reason for c in corrupt}
    assert set(reasons) == {
        "no-weights",
        "bad-manifest",
        "sha-mismatch",
        "id-mismatch",
        "no-manifest",
        "base",
    }
    assert "adapter_model.safetensors" in reasons["no-weights"]
    assert "sha256" in reasons["sha-mismatch"]
    assert all(isinstance(c, CorruptEntry) for c in corrupt)
    # list() skips what it can see is broken without hashing (the tampered file keeps its size).
    assert {a.id for a in store.list()} == {"existing", "sha-mismatch"}


def test_leftovers_cleaned_on_construction(store: AdapterStore) -> None:
    (store.staging / "upload-dead" / "sub").mkdir(parents=True)
    (store.staging / "upload-dead" / "adapter_model.safetensors").write_bytes(b"half")
    (store.staging / "active-123.json").write_text("{}")
    (store.trash / "gone-abc").mkdir()
    (store.trash / "gone-abc" / "manifest.json").write_text("{}")
    reopened = AdapterStore(store.root)
    assert not any(reopened.staging.iterdir()) and not any(reopened.trash.iterdir())
    assert [a.id for a in reopened.list()] == ["existing"]


def test_reader_leaves_another_process_uploads_alone(store: AdapterStore) -> None:
    """A second process reading the same directory (a Ray Serve replica) must not run the clean-up: the
    staging entries are the writer's uploads in progress."""
    (store.staging / "upload-live").mkdir()
    (store.staging / "upload-live" / "adapter_model.safetensors").write_bytes(b"streaming")
    (store.trash / "going-abc").mkdir()
    store.set_active("existing")
    reader = AdapterStore(store.root, recover=False)
    assert (store.staging / "upload-live" / "adapter_model.safetensors").read_bytes() == b"streaming"
    assert (store.trash / "going-abc").is_dir()
    assert [a.id for a in reader.list()] == ["existing"] and reader.get("existing").id == "existing"


def test_active_pointer_round_trip(store: AdapterStore) -> None:
    assert AdapterStore(store.root).get_active() == "existing"
    store.set_active(None)
    assert AdapterStore(store.root).get_active() is None
    with pytest.raises(AdapterNotFoundError):
        store.set_active("nope")
    with pytest.raises(InvalidAdapterIdError):
        store.set_active("../x")
    store.set_active("existing")
    (store.root / "active.json").write_text("garbage")
    assert store.get_active() is None
    (store.root / "active.json").write_text(json.dumps({"active": "vanished"}))
    assert store.get_active() is None
    assert not any(store.staging.iterdir())


@pytest.mark.parametrize(
    "bad", ["", ".", "..", ".hidden", "base", "active", "Base", "a/b", "a b", "x" * 65, "é"]
)
def test_invalid_adapter_ids(bad: str) -> None:
    with pytest.raises(InvalidAdapterIdError):
        validate_adapter_id(bad)


def test_valid_and_generated_ids() -> None:
    for good in ("a", "my-adapter_v1.2", "x" * 64, "base2"):
        assert validate_adapter_id(good) == good
    ids = {new_adapter_id() for _ in range(100)}
    assert len(ids) == 100 and all(validate_adapter_id(i) for i in ids)
