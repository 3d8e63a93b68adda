"""Give the memory of freed adapters back to the operating system (glibc's allocator).

glibc serves a large allocation with its own mmap (returned to the OS on free) only above a threshold, and it
raises that threshold each time such a block is freed, up to 32 MiB: after the first deleted adapter, the next
adapters' tensors come from the heap, whose free pages glibc keeps. Measured (docs/reliability.md,
bench/memory_cycles.py): VmRSS grew by about 15 MiB per upload/delete cycle of a 62 MiB adapter. Fixing the
threshold at glibc's own starting value (128 KiB) keeps every tensor-sized block in its own mapping, so a freed
adapter's pages go back at once; `malloc_trim(0)` after deletes and evictions returns the heap's free pages.

Both are no-ops where the C library is not glibc (musl, macOS). A threshold the user set through glibc's
`MALLOC_MMAP_THRESHOLD_` environment variable is left as it is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial dynamic threshold, kept fixed
_libc: ctypes.CDLL | None = None
_loaded = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):  # not glibc
                _libc = None
    return _libc


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold (once, at start-up, before the model loads); True when it was set."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, done)
    return done


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (after an adapter's tensors were freed)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
