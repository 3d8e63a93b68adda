"""A full disk is a 507 with a clear message and leaves nothing behind; a download's zip is removed however
its sending ends."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from service.api.routes_adapters import TemporaryFileResponse

from .conftest import mounted_tmpfs, upload
from .server import ServerProcess


@pytest.fixture()
def small_disk(tmp_path):
    """A real 4 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        yield disk


def _fill(disk: Path, leave: int) -> Path:
    """Fill the disk up to `leave` free bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            if free <= leave:
                break
            try:
                f.write(b"\0" * min(free - leave, 65536))
                f.flush()
            except OSError:
                break
    return filler


def _emptied(directory: Path, attempts: int = 50) -> bool:
    for _ in range(attempts):
        if not any(directory.iterdir()):
            return True
        time.sleep(0.1)
    return False


def test_full_disk_is_507_and_leaves_nothing(model_dir, adapters, small_disk) -> None:
    store = small_disk / "store"
    server = ServerProcess(model_dir, store)
    try:
        c = server.client
        assert upload(c, adapters["alpha"], "alpha").status_code == 201
        filler = _fill(small_disk, leave=8192)
        r = upload(c, adapters["beta"], "beta")
        assert r.status_code == 507, r.text
        assert r.json()["error"]["code"] == "insufficient_storage" and "disk" in r.json()["error"]["message"]
        r = c.get("/adapters/alpha/download")
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert list((store / ".staging").iterdir()) == [], "a failed upload or download left files behind"
        assert c.get("/adapters/beta").status_code == 404
        filler.unlink()
        r = c.get("/adapters/alpha/download")
        assert r.status_code == 200 and r.content[:2] == b"PK"
        assert _emptied(store / ".staging"), "the sent zip stayed"  # removed just after the last byte went
        assert upload(c, adapters["beta"], "beta").status_code == 201
        assert {a["id"] for a in c.get("/adapters").json()["adapters"]} == {"alpha", "beta"}
    finally:
        server.stop()


def test_download_zip_is_removed_when_the_client_leaves(tmp_path) -> None:
    """The send fails after the first chunk (the client hung up): the zip is removed all the same."""
    path = tmp_path / "download-x.zip"
    path.write_bytes(b"\0" * (1024 * 1024))
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client says nothing more
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            raise OSError("client disconnected")

    scope = {"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}
    with pytest.raises(OSError):
        asyncio.run(TemporaryFileResponse(path, media_type="application/zip")(scope, receive, send))
    assert not path.exists()


def _staged_zips(store: Path) -> list[str]:
    return sorted(p.name for p in (store / ".staging").iterdir() if p.suffix == ".zip")


def _until(condition, what: str, timeout: float = 60) -> None:
    """Wait (bounded) until `condition()` holds; a poll on a condition, not a sleep for synchronisation."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_download_cancelled_while_its_zip_is_written_leaves_no_zip(model_dir, adapters, store) -> None:
    """The client hangs up while the server is still writing the zip. The weights file in the store is swapped
    for a FIFO, so the zip's writer blocks on it until the test feeds it: the disconnect lands mid-write, the
    request is cancelled (499 in the access log), and the zip is removed once the writer is done."""
    server = ServerProcess(model_dir, store)
    try:
        c = server.client
        assert upload(c, adapters["alpha"], "alpha").status_code == 201
        weights = store / "alpha" / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.unlink()
        os.mkfifo(weights)
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /adapters/alpha/download HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            _until(lambda: _staged_zips(store), "the zip is being written")
        # the client is gone: its request is cancelled while the zip is still being written ...
        server.wait_for_line(lambda line: "GET /adapters/alpha/download -> 499" in line)
        assert _staged_zips(store), "the writer is still blocked on the FIFO"
        # ... and the writer finishes afterwards
        with open(weights, "wb") as fifo:
            fifo.write(data)
        _until(lambda: not _staged_zips(store), "the cancelled download's zip is removed")
        weights.unlink()
        weights.write_bytes(data)
        r = c.get("/adapters/alpha/download")
        assert r.status_code == 200 and r.content[:2] == b"PK"
        _until(lambda: not _staged_zips(store), "the sent zip is removed")
    finally:
        server.stop()
