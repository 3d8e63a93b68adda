"""Uploads stream to disk: a 200 MB upload barely moves the server's peak memory, and an upload over the limit
is a 413 with a JSON error that leaves nothing in the store.

The bodies are generated chunk by chunk (one reused 1 MiB buffer), so the test holds no more of them in
memory than the server should. Peak memory is the server process's `VmHWM` (peak resident set) from
/proc/<pid>/status, read before and after the upload.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import tree
from .server import ServerProcess

MiB = 1024 * 1024
BIG = 200 * MiB
CHUNK = bytes(MiB)
BOUNDARY = "upload-streaming-test-boundary"
# Far less than the body: what a server that holds the body (or a copy of it) in memory would exceed.
MAX_PEAK_GROWTH = 40 * MiB

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def weights_stream(data_bytes: int) -> tuple[int, Iterator[bytes]]:
    """A well-formed safetensors file holding one `data_bytes`-byte tensor that matches no module of the model,
    so the server reads its header, answers 422, and never loads the tensor."""
    header = {"base_model.model.unrelated.lora_A.weight": {"dtype": "U8", "shape": [data_bytes],
                                                         "data_offsets": [0, data_bytes]}}
    raw = json.dumps(header).encode()
    head = struct.pack("<Q", len(raw)) + raw

    def chunks() -> Iterator[bytes]:
        yield head
        left = data_bytes
        while left:
            piece = CHUNK if left >= len(CHUNK) else CHUNK[:left]
            left -= len(piece)
            yield piece

    return len(head) + data_bytes, chunks()


def multipart_upload(config: bytes, weights_size: int, weights: Iterator[bytes]) -> tuple[int, Iterator[bytes]]:
    """(Content-Length, body chunks) of a multipart upload of the two adapter files, built lazily."""

    def part_head(filename: str, content_type: str) -> bytes:
        return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {content_type}\r\n\r\n").encode()

    pieces = [part_head("adapter_config.json", "application/json") + config + b"\r\n",
              part_head("adapter_model.safetensors", "application/octet-stream")]
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield from pieces
        yield from weights
        yield tail

    return sum(map(len, pieces)) + weights_size + len(tail), body()


def bytes_written(pid: int) -> int:
    """Bytes the process has written so far (files, sockets, pipes): /proc/<pid>/io `wchar`."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/<pid>/io")


def post_upload(server: ServerProcess, size: int, body: Iterator[bytes], send_length: bool = True) -> httpx.Response:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    if send_length:
        headers["content-length"] = str(size)  # without it httpx sends the generator chunked
    return server.client.post("/adapters", content=body, headers=headers)


@pytest.fixture()
def config(adapters) -> bytes:
    return (adapters["alpha"] / "adapter_config.json").read_bytes()


def _warm_up(server: ServerProcess, config: bytes) -> None:
    """One small upload through the same path first, so lazily created buffers and threads are not counted."""
    size, weights = weights_stream(4 * MiB)
    assert post_upload(server, *multipart_upload(config, size, weights)).status_code == 422


def test_a_200_mb_upload_streams_to_disk(model_dir, tmp_path, config) -> None:
    store = tmp_path / "store"
    server = ServerProcess(model_dir, store, "--max-upload-bytes", str(256 * MiB))
    try:
        _warm_up(server, config)
        before_store, before_peak = tree(store), peak_rss(server.proc.pid)
        size, weights = weights_stream(BIG)
        response = post_upload(server, *multipart_upload(config, size, weights))
        growth = peak_rss(server.proc.pid) - before_peak
        # The whole body arrived (the size was checked) and was judged on its header: the tensor is unknown.
        assert response.status_code == 422, response.text
        assert "unexpected key: base_model.model.unrelated.lora_A.weight" in response.json()["error"]["details"][
            "problems"]
        assert growth < MAX_PEAK_GROWTH, f"peak RSS grew by {growth / MiB:.1f} MiB for a {BIG // MiB} MiB upload"
        assert tree(store) == before_store  # staging removed
        assert server.alive()
    finally:
        server.stop()


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "chunked"])
def test_an_upload_over_the_limit_is_a_413_that_leaves_nothing(model_dir, tmp_path, config, send_length) -> None:
    store = tmp_path / "store"
    limit = 16 * MiB
    server = ServerProcess(model_dir, store, "--max-upload-bytes", str(limit))
    try:
        _warm_up(server, config)
        before_store, before_peak = tree(store), peak_rss(server.proc.pid)
        before_written = bytes_written(server.proc.pid)
        size, weights = weights_stream(64 * MiB)
        response = post_upload(server, *multipart_upload(config, size, weights), send_length=send_length)
        growth = peak_rss(server.proc.pid) - before_peak
        assert response.status_code == 413, response.text
        # Not spooled to a temporary file either: a chunked body is cut off once it passes the limit.
        written = bytes_written(server.proc.pid) - before_written
        assert written < limit + 8 * MiB, f"the server wrote {written / MiB:.1f} MiB for a refused upload"
        error = response.json()["error"]
        assert error["code"] == "upload_too_large" and error["details"] == {"max_bytes": limit}
        assert str(limit) in error["message"]
        assert growth < MAX_PEAK_GROWTH, f"peak RSS grew by {growth / MiB:.1f} MiB"
        assert tree(store) == before_store
        assert not list((store / ".staging").iterdir())
        assert server.alive()
    finally:
        server.stop()
