"""`serve`'s start-up order, with real server processes: store lock, then port, then model and store.

A second server on a store in use, or a server on a busy port, exits with one line on stderr before it loads
a model or touches the store; the lock dies with its holder, `kill -9` included.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from .conftest import tree, upload
from .server import ServerProcess

REPO = Path(__file__).resolve().parents[2]
FAILS_WITHIN_S = 30  # an import of torch on a busy machine; a model load would print more than one line


def serve_expecting_failure(model_dir: Path, store: Path, port: int) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `python -m service serve` to its exit; returns the finished process and how long it ran."""
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(model_dir), "--store", str(store),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def test_a_second_server_on_the_store_exits_and_the_first_keeps_serving(fresh_server, store, model_dir,
                                                                       adapters) -> None:
    server = fresh_server  # holds the lock on `store` (a shared server would hold another store)
    assert upload(server.client, adapters["alpha"], "alpha").status_code == 201
    assert server.client.put("/adapters/alpha/activate").status_code == 200
    # What an upload in progress looks like on disk (FastAPI spools the body elsewhere first, so a real one is
    # in .staging/ only for the moment its files are copied): the second server's clean-up would delete it.
    in_flight = store / ".staging" / "upload-in-flight" / "adapter_model.safetensors"
    in_flight.parent.mkdir()
    in_flight.write_bytes(b"half an upload")
    before = tree(store)

    second, seconds = serve_expecting_failure(model_dir, store, free_port())

    assert second.returncode != 0 and seconds < FAILS_WITHIN_S
    assert second.stderr.splitlines() == [
        f"error: the store {store} is in use by another server (pid {server.proc.pid}); "
        "stop it first, or serve another --store"]
    assert second.stdout == ""
    # Nothing touched: the upload in progress, the adapters, active.json, the pid in the lock file.
    assert tree(store) == before
    assert (store / ".lock").read_text() == f"{server.proc.pid}\n"
    # The first server keeps serving, uploads included.
    assert upload(server.client, adapters["beta"], "beta").status_code == 201
    listed = server.client.get("/adapters").json()
    assert {a["id"] for a in listed["adapters"]} == {"alpha", "beta"} and listed["active"] == "alpha"
    assert server.client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 2}).status_code == 200


def test_serve_on_a_busy_port_exits_before_loading_or_recovering(model_dir, store) -> None:
    marker = store / ".staging" / "upload-left-by-a-crash"
    marker.parent.mkdir(parents=True)
    marker.write_text("recovery would remove this")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc, seconds = serve_expecting_failure(model_dir, store, port)
    assert proc.returncode != 0 and seconds < FAILS_WITHIN_S
    assert proc.stderr.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert proc.stdout == ""
    assert marker.read_text() == "recovery would remove this"
    assert sorted(p.name for p in store.iterdir()) == [".lock", ".staging"]  # no .trash/, no active.json


def test_the_lock_dies_with_a_killed_server(model_dir, store, adapters) -> None:
    first = ServerProcess(model_dir, store)
    try:
        assert upload(first.client, adapters["alpha"], "alpha").status_code == 201
    finally:
        first.proc.kill()
        first.stop()
    marker = store / ".staging" / "upload-cut-by-the-kill"
    marker.write_text("x")
    second = ServerProcess(model_dir, store)  # starts: the kernel dropped the lock with the killed process
    try:
        assert (store / ".lock").read_text() == f"{second.proc.pid}\n"
        assert not marker.exists(), "the new server holds the lock, so it runs the crash clean-up"
        assert [a["id"] for a in second.client.get("/adapters").json()["adapters"]] == ["alpha"]
    finally:
        second.stop()
