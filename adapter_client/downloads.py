"""Save a streamed answer (an adapter's zip, a merged model's tar) to a file, chunk by chunk, with progress.

`progress(bytes_received, total)` is called after every chunk; `total` is the Content-Length, or None when
the server streams without one (an export is produced while it is sent). The file is written under a
temporary name and renamed when complete, so a failed transfer leaves no partial file at the target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx

from .types import ServiceError

DownloadProgress = Callable[[int, "int | None"], None]


def target_path(dest: Path, default_name: str) -> Path:
    """`dest` itself, or `<dest>/<default_name>` when dest is an existing directory."""
    dest = Path(dest)
    return dest / default_name if dest.is_dir() else dest


def _total(response: httpx.Response) -> int | None:
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


class _PartialFile:
    """The target's temporary file while chunks arrive: `write` reports progress; on a clean exit the file is
    renamed to the target, and on any exit nothing is left under the temporary name."""

    def __init__(self, target: Path, total: int | None, progress: DownloadProgress | None) -> None:
        self.target, self.total, self.progress, self.received = target, total, progress, 0
        self.path = target.with_name(f".{target.name}.part")

    def __enter__(self) -> _PartialFile:
        self._file = self.path.open("wb")
        return self

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self.received += len(chunk)
        if self.progress is not None:
            self.progress(self.received, self.total)

    def __exit__(self, kind, *_) -> None:
        try:
            self._file.close()
            if kind is None:
                os.replace(self.path, self.target)
        finally:
            self.path.unlink(missing_ok=True)


def save_stream(response: httpx.Response, target: Path, progress: DownloadProgress | None) -> Path:
    """Write a streamed (not yet read) response to `target`; ServiceError for an error answer."""
    if response.is_error:
        response.read()
        raise ServiceError.from_response(response)
    with _PartialFile(target, _total(response), progress) as partial:
        for chunk in response.iter_bytes():
            partial.write(chunk)
    return target


async def asave_stream(response: httpx.Response, target: Path, progress: DownloadProgress | None) -> Path:
    """`save_stream` for an async response."""
    if response.is_error:
        await response.aread()
        raise ServiceError.from_response(response)
    with _PartialFile(target, _total(response), progress) as partial:
        async for chunk in response.aiter_bytes():
            partial.write(chunk)
    return target
