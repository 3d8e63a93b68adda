"""Server-sent events: one writer for every streamed answer, which always ends with a final or an error event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from ..app import Generation
from ..errors import ServiceError
from .errors import error_body

log = logging.getLogger(__name__)


def sse_event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def error_event(exc: BaseException) -> bytes:
    """The last event of a stream that failed after its headers were sent."""
    if isinstance(exc, ServiceError):
        return sse_event(error_body(exc.code, exc.message, exc.details))
    log.error("stream failed: %s: %s", type(exc).__name__, exc)
    return sse_event(error_body("internal_error", f"{type(exc).__name__}: {exc}"))


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body generator however the response ends.

    When the client hangs up while a chunk is being sent, Starlette cancels the send and leaves the body
    generator suspended; only the garbage collector would close it (and the generation it drives), late,
    with the finalizers of the nested generators racing each other ("asynchronous generator is already
    running"). Closing it here frees the batch row and the adapter at once.
    """

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):  # runs while the response is being cancelled
                await self.body_iterator.aclose()


def sse_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> ClosingStreamingResponse:
    return ClosingStreamingResponse(body, media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache", **(headers or {})})


def served_by_header(generation: Generation) -> dict[str, str]:
    """`X-Replica-Id` for a generation that ran on a Ray replica."""
    return {"X-Replica-Id": generation.served_by} if generation.served_by else {}
