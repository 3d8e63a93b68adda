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


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}.part")


def save_stream(response: httpx.Response, target: Path, progress: DownloadProgress | None) -> Path:
    """Write a streamed (not yet read) response to `target`; ServiceError for an error answer."""
    if response.is_error:
        response.read()
        raise ServiceError.from_response(response)
    total, received, partial = _total(response), 0, _partial(target)
    try:
        with partial.open("wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


async def asave_stream(response: httpx.Response, target: Path, progress: DownloadProgress | None) -> Path:
    """`save_stream` for an async response."""
    if response.is_error:
        await response.aread()
        raise ServiceError.from_response(response)
    total, received, partial = _total(response), 0, _partial(target)
    try:
        with partial.open("wb") as f:
            async for chunk in response.aiter_bytes():
                f.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
