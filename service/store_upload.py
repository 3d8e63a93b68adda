"""Receive an adapter upload into a staging directory: bounded streaming copies and safe archive extraction.

Accepted: the two PEFT files by name, or exactly one .zip or tar archive (plain, gzip, bzip2 or xz) holding
them (at the top or under a single folder). Archives are never extracted wholesale: every member is checked
(no absolute paths, no `..`, no links or devices, bounded count) and only the two wanted files are written,
under a byte budget. The work is bounded too: a zip's entry count and directory size are read from its end
record before zipfile parses the directory, and a tar is decompressed once, as a stream, counting every byte
(skipped members included) against the upload limit. Nothing is unpickled.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import stat
import struct
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
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")
# Weight formats that are Python pickles (arbitrary code on load): refused with a conversion hint.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_ARCHIVE_ENTRIES = 16  # an adapter needs 2-3 files; also checked in a zip's end record before parsing
# A zip's central directory is read into memory whole: 16 entries with ordinary names need ~2 KB.
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024
# A tar stream holds its files plus 512-byte headers, padding and end blocks (a 10 KiB record at most):
# allowed on top of the upload limit when counting decompressed bytes.
TAR_FRAMING_BYTES = (MAX_ARCHIVE_ENTRIES * 3 + 2) * 512 + 10 * 1024
CHUNK_BYTES = 1024 * 1024
# End-of-central-directory records (APPNOTE 4.3.14-16), as zipfile reads them.
_EOCD = struct.Struct("<4s4H2LH")  # signature, disk numbers, entries here/total, directory size/offset, comment
_EOCD_SIGNATURE = b"PK\x05\x06"
_MAX_ZIP_COMMENT = 0xFFFF
_ZIP64_LOCATOR_SIGNATURE, _ZIP64_LOCATOR_SIZE = b"PK\x06\x07", 20
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries here/total, directory size/offset
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
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


def _too_many_entries(count: int | None = None) -> InvalidUploadError:
    said = f"{count} entries, more than {MAX_ARCHIVE_ENTRIES}" if count else f"more than {MAX_ARCHIVE_ENTRIES} entries"
    details = {"max_entries": MAX_ARCHIVE_ENTRIES, **({"entries": count} if count else {})}
    return InvalidUploadError(f"archive has {said}", details)


class _Selection:
    """Checks members one by one and picks the two adapter files (top level or one folder deep)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.chosen: dict[str, str] = {}  # wanted base name -> member name
        self.folders: set[PurePosixPath] = set()
        self.pickles: list[str] = []
        self.count = self.declared = 0

    def add(self, name: str, is_file: bool, size: int) -> str | None:
        """Check one member; returns the adapter file name it provides, or None when it is not wanted."""
        self.count += 1
        if self.count > MAX_ARCHIVE_ENTRIES:
            raise _too_many_entries()
        path = _member_path(name)
        if not is_file or len(path.parts) > 2:
            return None
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            self.pickles.append(path.name)
        if path.name not in ACCEPTED_NAMES:
            return None
        if path.name in self.chosen:
            raise InvalidUploadError(f"archive holds more than one {path.name}", {"member": name})
        self.declared += size
        if self.declared > self.max_bytes:
            raise UploadTooLargeError(self.max_bytes, "extracted archive")
        self.chosen[path.name] = name
        self.folders.add(path.parent)
        return path.name

    def finish(self) -> dict[str, str]:
        if len(self.folders) > 1:
            message = "the adapter files must sit in the same folder of the archive"
            raise InvalidUploadError(message, {"members": self.chosen})
        if WEIGHTS_FILE not in self.chosen and self.pickles:
            raise InvalidUploadError(pickle_message(self.pickles[0]), {"file": self.pickles[0]})
        return self.chosen


def extract_archive(archive: Path, name: str, dest: Path, max_bytes: int) -> None:
    """Extract the two adapter files of a .zip or tar archive into `dest`, at most `max_bytes` in total.

    The work is bounded whatever the archive holds: a zip's entry count and directory size are read from
    its end record before the directory is parsed; a tar is read once, as a stream, through a decompressor
    that refuses to produce more than `max_bytes` (plus tar framing), counting the members it skips.
    """
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, dest, max_bytes)
        else:
            _extract_tar(archive, dest, max_bytes)
    except (*_ARCHIVE_READ_ERRORS, _CorruptStream) as exc:
        raise InvalidUploadError(f"cannot read archive '{name}': {exc}", {"file": name}) from exc


def _extract_zip(archive: Path, dest: Path, max_bytes: int) -> None:
    _check_zip_directory(archive)
    with zipfile.ZipFile(archive) as zf:
        selection = _Selection(max_bytes)
        for member in _zip_members(zf):
            selection.add(*member)
        budget = max_bytes
        for base, member in selection.finish().items():
            # Sizes in the zip header can lie: the budget counts the bytes actually inflated.
            with zf.open(member) as src:
                budget -= copy_stream(src, dest / base, budget, max_bytes, "extracted archive")


def _check_zip_directory(archive: Path) -> None:
    """Refuse a zip whose central directory is too big, before zipfile reads it into memory (it builds a
    ZipInfo per entry: 200k entries cost +108 MB). Finds the end-of-central-directory record (and the zip64
    one) the way zipfile does; a zip without one is left to zipfile to refuse."""
    size = archive.stat().st_size
    with archive.open("rb") as f:
        f.seek(max(0, size - _EOCD.size - _MAX_ZIP_COMMENT - 1))
        tail = f.read()
    last = tail[-_EOCD.size:]
    if len(last) == _EOCD.size and last.startswith(_EOCD_SIGNATURE) and last.endswith(b"\0\0"):
        at = len(tail) - _EOCD.size  # no archive comment: the common case, checked first as zipfile does
    else:
        at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return
    entries, directory_bytes = _EOCD.unpack_from(tail, at)[4:6]
    if tail.startswith(_ZIP64_LOCATOR_SIGNATURE, max(0, at - _ZIP64_LOCATOR_SIZE)):
        # zip64: the record just before its locator holds the real counts. Anywhere else (extensible data,
        # or an offset that points elsewhere) we cannot vouch for what zipfile would read: refuse.
        record_at = at - _ZIP64_LOCATOR_SIZE - _ZIP64_EOCD.size
        record = _ZIP64_EOCD.unpack_from(tail, record_at) if record_at >= 0 else None
        if record is None or record[0] != _ZIP64_EOCD_SIGNATURE:
            raise InvalidUploadError("archive has a zip64 end record this server cannot check", {})
        entries, directory_bytes = record[7], record[8]
    if entries > MAX_ARCHIVE_ENTRIES:
        raise _too_many_entries(entries)
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InvalidUploadError(
            f"archive directory has {directory_bytes} bytes, more than {MAX_ZIP_DIRECTORY_BYTES}",
            {"directory_bytes": directory_bytes, "max_directory_bytes": MAX_ZIP_DIRECTORY_BYTES},
        )


def _extract_tar(archive: Path, dest: Path, max_bytes: int) -> None:
    with archive.open("rb") as raw, _decompressor(raw) as plain:
        stream = _BoundedStream(plain, max_bytes + TAR_FRAMING_BYTES, max_bytes)
        # "r|": one forward pass; a skipped member's data is still read (and counted) to reach the next one.
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            selection = _Selection(max_bytes)
            budget = max_bytes
            for member in tf:
                if member.issym() or member.islnk():
                    raise _unsafe(member.name, "symbolic or hard link")
                if not (member.isfile() or member.isdir()):
                    raise _unsafe(member.name, "device, fifo or other special file")
                base = selection.add(member.name, member.isfile(), member.size)
                if base is not None:
                    src = tf.extractfile(member)
                    if src is None:
                        raise _unsafe(member.name, "not a regular file")
                    with src:
                        budget -= copy_stream(src, dest / base, budget, max_bytes, "extracted archive")
            selection.finish()


def _decompressor(raw: BinaryIO) -> BinaryIO:
    """The tar stream inside `raw`, by magic number (as tarfile's "r:*" detects it)."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


class _CorruptStream(Exception):
    """The compressed stream under a tar archive cannot be decoded."""


class _BoundedStream:
    """Read side of a (decompressed) archive that refuses to produce more than `limit` bytes.

    Counting here, below tarfile, covers every byte decompressed: members extracted, members skipped,
    headers. Decoder errors are told apart from errors writing the extracted files."""

    def __init__(self, stream: BinaryIO, limit: int, max_bytes: int) -> None:
        self.stream, self.limit, self.max_bytes = stream, limit, max_bytes
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        allowed = self.limit - self.read_bytes + 1  # one byte more than allowed tells "too large" from "exactly"
        try:
            data = self.stream.read(allowed if size is None or size < 0 else min(size, allowed))
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:  # gzip/bz2 raise OSError on bad data
            raise _CorruptStream(str(exc) or type(exc).__name__) from exc
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise UploadTooLargeError(self.max_bytes, "extracted archive", self.read_bytes)
        return data
