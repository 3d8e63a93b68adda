"""Serve the app with uvicorn on a socket bound before the app is built, so a busy port fails fast.

uvicorn binds its port only after the app's lifespan has loaded the model; `serve` binds it first (see
`_serve` in service/cli.py) and hands the listening socket over.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

import uvicorn

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


def run(app: FastAPI, sock: socket.socket, log_level: str) -> None:
    """Serve `app` on the listening `sock` until a shutdown signal."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            log_config=None)  # our middleware logs each request with its id
    _SocketServer(config).run(sockets=[sock])
