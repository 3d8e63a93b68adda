"""A full disk is the client-facing `insufficient_storage` error, not an internal one."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InsufficientStorageError

_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def storage_errors() -> Iterator[None]:
    """Re-raise ENOSPC/EDQUOT from the store as InsufficientStorageError (the store has undone its step)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            raise InsufficientStorageError(
                "the disk holding the adapter store is full; nothing was changed: free space or delete adapters",
                {"errno": exc.errno, "reason": exc.strerror or str(exc)}) from exc
        raise
