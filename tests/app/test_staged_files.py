"""A download's zip is never left in the staging area: not when its request is cancelled while a worker
thread still writes it, nor when its response is dropped unsent (issue 15)."""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import pytest

from service.api.routes_adapters import TemporaryFileResponse
from service.app.staged_files import owned_file


def _gated_writer(path: Path, gate: threading.Event, fail: bool = False):
    def write() -> Path:
        path.write_bytes(b"PK partial")
        assert gate.wait(60), "the test never opened the gate"
        if fail:
            path.unlink()
            raise OSError("disk full")
        path.write_bytes(b"PK whole")
        return path
    return write


@pytest.mark.parametrize("fail", [False, True])
def test_a_cancelled_request_leaves_no_file_once_the_writer_is_done(tmp_path, fail) -> None:
    path, gate = tmp_path / "download-1.zip", threading.Event()

    async def main() -> None:
        request = asyncio.ensure_future(owned_file(asyncio.to_thread(_gated_writer(path, gate, fail))))
        while not path.exists():  # the writer is mid-write
            await asyncio.sleep(0)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert path.exists(), "the thread still writes it"
        gate.set()
        for _ in range(10_000):  # the writer's completion reaches the loop (bounded)
            if not path.exists():
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the zip stayed")

    asyncio.run(main())


def test_an_uncancelled_request_gets_the_file(tmp_path) -> None:
    path, gate = tmp_path / "download-2.zip", threading.Event()
    gate.set()
    assert asyncio.run(owned_file(asyncio.to_thread(_gated_writer(path, gate)))) == path
    assert path.read_bytes() == b"PK whole"


def test_a_response_dropped_unsent_removes_its_file(tmp_path) -> None:
    path = tmp_path / "download-3.zip"
    path.write_bytes(b"PK")
    response = TemporaryFileResponse(path, media_type="application/zip")
    assert path.exists()
    del response
    gc.collect()
    assert not path.exists()
