"""Files a request writes into the store's staging area for its client (a download's zip): never left behind.

The file is written on a worker thread, which a cancelled request cannot stop. `owned_file` hands the path to
the caller, or, when the caller is cancelled (its client left, the server stops) or fails first, removes the
file as soon as the thread is done with it. From there on the caller owns it (`TemporaryFileResponse` removes
it however its sending ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path


async def owned_file(writing: Awaitable[Path]) -> Path:
    """The path `writing` (e.g. `asyncio.to_thread(store.zip_copy, ...)`) produces, or its removal later."""
    task = asyncio.ensure_future(writing)
    try:
        return await asyncio.shield(task)  # a cancellation stops the wait, not the writing
    except BaseException:
        task.add_done_callback(_remove_written)  # runs at once if the writing is over already
        raise


def _remove_written(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().unlink(missing_ok=True)
