"""A multipart upload body streamed from disk in chunks, with its exact length known up front.

The body is built by hand rather than by httpx so that (1) files are never read whole into memory, (2) the
`Content-Length` is exact (the server refuses oversized uploads from it before reading the body) and (3) every
chunk handed to the transport is counted for a progress callback: `progress(bytes_sent, total)`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

UPLOAD_CHUNK_BYTES = 1024 * 1024
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")  # as the server accepts

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class _Part:
    head: bytes  # boundary line and part headers
    file: Path | None  # streamed from disk when set
    value: bytes  # the content when there is no file
    size: int


class MultipartUpload:
    """`files` parts for an adapter directory (its two files) or one archive, plus an optional `adapter_id`."""

    def __init__(self, path: Path, adapter_id: str | None = None) -> None:
        self.files = upload_files(Path(path))
        self.boundary = uuid.uuid4().hex
        parts = [self._file_part(f) for f in self.files]
        if adapter_id is not None:
            value = adapter_id.encode()
            head = self._head('form-data; name="adapter_id"', None)
            parts.append(_Part(head, None, value, len(value)))
        self.parts = parts
        self.tail = f"--{self.boundary}--\r\n".encode()
        # every part ends with CRLF before the next boundary
        self.total = sum(len(p.head) + p.size + 2 for p in parts) + len(self.tail)

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}", "Content-Length": str(self.total)}

    def _head(self, disposition: str, content_type: str | None) -> bytes:
        lines = [f"--{self.boundary}", f"Content-Disposition: {disposition}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _file_part(self, file: Path) -> _Part:
        name = file.name.replace('"', "%22").replace("\r", "").replace("\n", "")
        head = self._head(f'form-data; name="files"; filename="{name}"', "application/octet-stream")
        return _Part(head, file, b"", file.stat().st_size)

    def chunks(self, progress: ProgressCallback | None = None) -> Iterator[bytes]:
        """The body, chunk by chunk; at most one chunk of a file is in memory at a time."""
        sent = 0

        def counted(chunk: bytes) -> bytes:
            nonlocal sent
            sent += len(chunk)
            if progress is not None:
                progress(sent, self.total)
            return chunk

        for part in self.parts:
            yield counted(part.head)
            if part.file is None:
                yield counted(part.value)
            else:
                with part.file.open("rb") as f:
                    while chunk := f.read(UPLOAD_CHUNK_BYTES):
                        yield counted(chunk)
            yield counted(b"\r\n")
        yield counted(self.tail)

    async def achunks(self, progress: ProgressCallback | None = None) -> AsyncIterator[bytes]:
        """The same body for an async client; disk reads run in a worker thread, off the event loop."""
        iterator = self.chunks(progress)
        done = object()
        while (chunk := await asyncio.to_thread(next, iterator, done)) is not done:
            yield chunk  # type: ignore[misc]


def upload_files(path: Path) -> list[Path]:
    """The files to send for `path`: a directory's two adapter files, or the archive itself."""
    if path.is_dir():
        files = [path / name for name in ADAPTER_FILES]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory: missing {', '.join(missing)}")
        return files
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{path} is neither an adapter directory nor a .zip or tar (.tar, .tar.gz, .tar.bz2, "
                             ".tar.xz) archive")
        return [path]
    raise FileNotFoundError(f"{path} does not exist")
