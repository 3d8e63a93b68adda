"""Receive an adapter upload into a staging directory: bounded streaming copies and safe archive extraction.

Accepted: the two PEFT files by name, or exactly one .zip/.tar.gz/.tgz/.tar holding them (at the top or
under a single folder). Archives are never extracted wholesale: every member is checked first (no absolute
paths, no `..`, no links or devices, bounded count), then only the two wanted files are streamed out under
a byte budget, so zip bombs and path tricks fail before they cost anything. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.failpoints import failpoint

from .errors import InvalidUploadError, UploadTooLargeError
from .peft_format import CONFIG_FILE, WEIGHTS_FILE

ACCEPTED_NAMES = (CONFIG_FILE, WEIGHTS_FILE)
IGNORED_NAMES = ("README.md",)
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
# Weight formats that are Python pickles (arbitrary code on load): refused with a conversion hint.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_ARCHIVE_ENTRIES = 16
CHUNK_BYTES = 1024 * 1024
# What a malformed archive raises while being read. RuntimeError: encrypted zip member;
# NotImplementedError: unsupported zip compression method.
_ARCHIVE_READ_ERRORS = (
    zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, NotImplementedError, RuntimeError
)


def pickle_message(name: str) -> str:
    return (
        f"'{name}' is a pickle-based weights file; only {WEIGHTS_FILE} (safetensors) is accepted. Convert it "
        "with `safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors', "
        "metadata={'format': 'pt'})`, or re-save the adapter with PEFT's "
        "`model.save_pretrained(dir, safe_serialization=True)`."
    )


def copy_stream(src: BinaryIO, dst: Path, budget: int, limit: int, what: str = "upload") -> int:
    """Copy `src` into a new file `dst` chunk by chunk, refusing to write more than `budget` bytes.

    `limit` is the overall cap the budget was carved from, named in the error.
    """
    size = 0
    with dst.open("xb") as out:
        while chunk := src.read(CHUNK_BYTES):
            size += len(chunk)
            if size > budget:
                raise UploadTooLargeError(limit, what)
            out.write(chunk)
            failpoint("stage.partial")
    return size


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def receive_upload(files: Iterable[tuple[str, BinaryIO]], dest: Path, max_bytes: int) -> None:
    """Write the upload's two adapter files into the empty directory `dest`, or raise a StoreError."""
    budget = max_bytes
    seen: list[str] = []
    for raw_name, stream in files:
        # Clients may send a path ("dir/adapter_config.json", even with backslashes): keep the base name.
        name = raw_name.replace("\\", "/").rsplit("/", 1)[-1]
        lowered = name.lower()
        if lowered.endswith(PICKLE_SUFFIXES):
            raise InvalidUploadError(pickle_message(name), {"file": name})
        if name in IGNORED_NAMES:
            continue
        is_archive = lowered.endswith(ARCHIVE_SUFFIXES)
        if name not in ACCEPTED_NAMES and not is_archive:
            raise InvalidUploadError(
                f"unexpected file '{name}'; accepted: {' and '.join(ACCEPTED_NAMES)} (a {IGNORED_NAMES[0]} "
                f"is ignored), or one archive ({', '.join(ARCHIVE_SUFFIXES)}) holding them",
                {
                    "file": name,
                    "accepted_names": list(ACCEPTED_NAMES),
                    "archive_suffixes": list(ARCHIVE_SUFFIXES),
                },
            )
        if name in seen or (seen and (is_archive or seen[0].lower().endswith(ARCHIVE_SUFFIXES))):
            message = "send each adapter file once, or exactly one archive"
            raise InvalidUploadError(message, {"files": [*seen, name]})
        seen.append(name)
        if is_archive:
            archive = dest / ".archive"
            budget -= copy_stream(stream, archive, budget, max_bytes)
            try:
                extract_archive(archive, lowered, dest, max_bytes)
            finally:
                archive.unlink(missing_ok=True)
        else:
            budget -= copy_stream(stream, dest / name, budget, max_bytes)

    missing = [name for name in ACCEPTED_NAMES if not (dest / name).is_file()]
    if missing:
        raise InvalidUploadError(
            f"upload is missing {', '.join(missing)}; a PEFT adapter needs {' and '.join(ACCEPTED_NAMES)}",
            {"missing": missing, "accepted_names": list(ACCEPTED_NAMES)},
        )
    try:
        config = json.loads((dest / CONFIG_FILE).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise InvalidUploadError(f"{CONFIG_FILE} is not valid JSON: {exc}", {"file": CONFIG_FILE}) from None
    if not isinstance(config, dict):
        raise InvalidUploadError(f"{CONFIG_FILE} must hold a JSON object", {"file": CONFIG_FILE})


def _unsafe(name: str, reason: str) -> InvalidUploadError:
    details = {"member": name, "reason": reason}
    return InvalidUploadError(f"archive member '{name}' rejected: {reason}", details)


def _member_path(name: str) -> PurePosixPath:
    """The member's relative path, or raise if it could escape the extraction directory."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise _unsafe(name, "absolute path")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(name, "'..' in path")
    return PurePosixPath(*parts)


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[str, bool, int]]:
    """(name, is_regular_file, declared size) of each entry; links and special files raise."""
    for info in zf.infolist():
        mode = info.external_attr >> 16  # unix mode, 0 when the zip was made elsewhere
        if stat.S_ISLNK(mode):
            raise _unsafe(info.filename, "symbolic link")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _unsafe(info.filename, "special file")
        yield info.filename, not info.is_dir(), info.file_size


def _tar_members(tf: tarfile.TarFile) -> Iterator[tuple[str, bool, int]]:
    for member in tf:
        if member.issym() or member.islnk():
            raise _unsafe(member.name, "symbolic or hard link")
        if not (member.isfile() or member.isdir()):
            raise _unsafe(member.name, "device, fifo or other special file")
        yield member.name, member.isfile(), member.size


def _select(members: Iterable[tuple[str, bool, int]], max_bytes: int) -> dict[str, str]:
    """Check every member; map each wanted base name to its member name (top level or one folder deep)."""
    chosen: dict[str, str] = {}
    folders: set[PurePosixPath] = set()
    pickles: list[str] = []
    declared = 0
    for count, (name, is_file, size) in enumerate(members, start=1):
        if count > MAX_ARCHIVE_ENTRIES:
            raise InvalidUploadError(
                f"archive has more than {MAX_ARCHIVE_ENTRIES} entries", {"max_entries": MAX_ARCHIVE_ENTRIES}
            )
        path = _member_path(name)
        if not is_file or len(path.parts) > 2:
            continue
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            pickles.append(path.name)
        if path.name not in ACCEPTED_NAMES:
            continue
        if path.name in chosen:
            raise InvalidUploadError(f"archive holds more than one {path.name}", {"member": name})
        declared += size
        chosen[path.name] = name
        folders.add(path.parent)
    if len(folders) > 1:
        message = "the adapter files must sit in the same folder of the archive"
        raise InvalidUploadError(message, {"members": chosen})
    if WEIGHTS_FILE not in chosen and pickles:
        raise InvalidUploadError(pickle_message(pickles[0]), {"file": pickles[0]})
    if declared > max_bytes:
        raise UploadTooLargeError(max_bytes, "extracted archive")
    return chosen


def extract_archive(archive: Path, name: str, dest: Path, max_bytes: int) -> None:
    """Extract the two adapter files of a .zip or tar archive into `dest`, at most `max_bytes` in total."""
    budget = max_bytes
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for base, member in _select(_zip_members(zf), max_bytes).items():
                    # Sizes in the zip header can lie: the budget counts the bytes actually inflated.
                    with zf.open(member) as src:
                        budget -= copy_stream(src, dest / base, budget, max_bytes, "extracted archive")
        else:
            with tarfile.open(archive, mode="r:*") as tf:
                for base, member in _select(_tar_members(tf), max_bytes).items():
                    src = tf.extractfile(tf.getmember(member))
                    if src is None:
                        raise _unsafe(member, "not a regular file")
                    with src:
                        budget -= copy_stream(src, dest / base, budget, max_bytes, "extracted archive")
    except _ARCHIVE_READ_ERRORS as exc:
        raise InvalidUploadError(f"cannot read archive '{name}': {exc}", {"file": name}) from exc
