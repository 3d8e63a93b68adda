"""Serve the app with uvicorn on a socket bound before the app is built, so a busy port fails fast.

uvicorn binds its port only after the app's lifespan has loaded the model; `serve` binds it first (see
`_serve` in service/cli.py) and hands the listening socket over.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import StartupFailure

if TYPE_CHECKING:
    from fastapi import FastAPI

LISTEN_BACKLOG = 2048  # uvicorn's default

log = logging.getLogger("uvicorn.error")


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free one). Connections made while the app starts
    wait in the backlog. OSError if the address cannot be used."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class _SocketServer(uvicorn.Server):
    """uvicorn's server on given sockets, which also logs uvicorn's ready line (it does so only for ports it
    binds itself; tests and tools wait for that line)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            message = "Uvicorn running on http://[%s]:%d (Press CTRL+C to quit)" if ":" in self.config.host \
                else "Uvicorn running on http://%s:%d (Press CTRL+C to quit)"
            log.info(message, self.config.host, self.config.port)


class _StartupFailureCatcher:
    """ASGI wrapper of the app's lifespan: a `StartupFailure` ends the start-up with its message alone.

    Starlette sends the formatted traceback as the `lifespan.startup.failed` message, which uvicorn logs; for
    a StartupFailure (a model that does not load, a start-up adapter that fails) the message is the whole
    story, so it is kept here for `run` to raise, and the traceback and uvicorn's own "Application startup
    failed" line are left out. Any other exception keeps uvicorn's full report.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.failure: StartupFailure | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent below once the exception is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except StartupFailure as exc:
            self.failure = exc
            log.addFilter(_drop_startup_failed_line)
            await send({"type": "lifespan.startup.failed", "message": ""})
            return
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)


def _drop_startup_failed_line(record: logging.LogRecord) -> bool:
    return record.getMessage() != "Application startup failed. Exiting."


def run(app: FastAPI, sock: socket.socket, log_level: str) -> None:
    """Serve `app` on the listening `sock` until a shutdown signal; StartupFailure if its start-up fails so."""
    host, port = sock.getsockname()[:2]
    catcher = _StartupFailureCatcher(app)
    config = uvicorn.Config(catcher, host=host, port=port, log_level=log_level, access_log=False,
                            log_config=None)  # our middleware logs each request with its id
    try:
        _SocketServer(config).run(sockets=[sock])
    except SystemExit:  # recent uvicorn exits (3) when the start-up failed; older ones return
        if catcher.failure is None:
            raise
    if catcher.failure is not None:
        raise catcher.failure
