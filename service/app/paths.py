"""Adapters loaded from server-side directories (vLLM's load_lora_adapter): only under operator-allowed roots."""

from __future__ import annotations

from pathlib import Path

from ..errors import (
    InvalidPathError,
    InvalidUploadError,
    PathLoadingDisabledError,
    PathNotAllowedError,
    PathNotFoundError,
    echo,
)
from ..peft_format import CONFIG_FILE, WEIGHTS_FILE


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def adapter_directory(raw: str, allowed_roots: list[Path]) -> Path:
    """The adapter directory `raw`, if it and each adapter file in it resolve (symlinks followed) under a root."""
    try:
        return _adapter_directory(raw, allowed_roots)
    except OSError as exc:  # a component over NAME_MAX, a path over PATH_MAX, an unreadable directory, ...
        raise InvalidPathError(f"{echo(raw)} is not a usable path: {exc.strerror or type(exc).__name__}") from None


def _adapter_directory(raw: str, allowed_roots: list[Path]) -> Path:
    roots = [root.resolve() for root in allowed_roots]
    if not roots:
        raise PathLoadingDisabledError(
            "loading adapters from server paths is disabled; start the server with --lora-root DIR")
    try:
        path = Path(raw).expanduser().resolve()
        files = {name: (path / name).resolve() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, NUL byte, symlink loop, name too long
        raise InvalidPathError(f"{echo(raw)} is not a usable path: {type(exc).__name__}") from None
    if not _inside(path, roots):
        raise PathNotAllowedError(f"{echo(raw)} is outside the allowed roots",
                                  {"allowed_roots": [str(r) for r in roots]})
    if not path.is_dir():
        raise PathNotFoundError(f"{echo(raw)} is not a directory")
    for name, target in files.items():
        if not _inside(target, roots):
            raise PathNotAllowedError(f"{name} in {echo(raw)} resolves outside the allowed roots",
                                      {"allowed_roots": [str(r) for r in roots], "file": name})
        if not target.is_file():
            raise InvalidUploadError(f"{echo(raw)} has no {name}", {"path": str(path)})
    return path
