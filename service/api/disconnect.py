"""Non-streaming generations stop when their client leaves, as streaming ones do.

A streamed response notices a departed client when its next write fails, and closing the event iterator frees
the batch row. A JSON response writes nothing until the end, so without this a client that hung up kept its
row busy until the last token. Here the result is awaited in a task while the request's ASGI `receive` is
watched for `http.disconnect` (the body has already been read, so the next message is the disconnect);
on a disconnect the task is cancelled, which closes the generation and frees its row and adapter lease.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request, Response

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned: only the access log sees it


class ClientDisconnected(Exception):
    """The client went away before its result was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, result: Awaitable[T]) -> T:
    """`await result`, cancelled (and ClientDisconnected raised) if the client disconnects first."""
    task = asyncio.ensure_future(result)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending


def disconnected_response() -> Response:
    return Response(status_code=CLIENT_CLOSED_REQUEST)
