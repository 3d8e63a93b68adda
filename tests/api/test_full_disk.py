"""A really full disk under the store: uploads and activations answer 507 `insufficient_storage` and change
nothing, deleting an inactive adapter still works; once space is freed, the same requests succeed.

Every store step failing in-process, for every operation: tests/app/test_atomicity.py.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import mounted_tmpfs, tree, upload
from .server import ServerProcess

DISK_BYTES = 2 * 1024 * 1024


@pytest.fixture()
def tiny_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    with mounted_tmpfs(tmp_path / "disk", str(DISK_BYTES)) as disk:
        yield disk


def fill(path: Path) -> None:
    """Write `path` until the disk is full."""
    with path.open("wb", buffering=0) as filler:  # unbuffered: nothing left to flush on close
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def state(server: ServerProcess, store: Path) -> dict:
    c = server.client
    health = c.get("/health").json()
    reply = c.post("/generate", json={"prompt": "full disk", "max_new_tokens": 6})
    return {"adapters": c.get("/adapters").json(), "health": health, "store": tree(store),
            "tokens": reply.json()["token_ids"]}


def test_full_disk_is_507_and_changes_nothing(model_dir, adapters, tiny_disk) -> None:
    store = tiny_disk / "store"
    server = ServerProcess(model_dir, store)
    try:
        c = server.client
        assert upload(c, adapters["alpha"], "alpha").status_code == 201
        before = state(server, store)
        fill(tiny_disk / "filler")

        refused = [upload(c, adapters["beta"], "beta"), c.put("/adapters/alpha/activate", params={"fuse": "true"}),
                   c.put("/adapters/alpha/activate")]
        for reply in refused:
            assert reply.status_code == 507, reply.text
            assert reply.json()["error"]["code"] == "insufficient_storage"
        assert state(server, store) == before
        assert c.delete("/adapters/alpha").status_code == 200, "deleting an inactive adapter needs no space"

        (tiny_disk / "filler").unlink()
        for name in ("alpha", "beta"):
            assert upload(c, adapters[name], name).status_code == 201
        assert c.put("/adapters/alpha/activate", params={"fuse": "true"}).json() == {"active": "alpha", "fused": True}

        fill(tiny_disk / "filler")  # full again: the way out (deactivate, delete the active adapter) needs no space
        assert c.delete("/adapters/active").json() == {"active": None}
        (tiny_disk / "filler").unlink()
        assert c.put("/adapters/beta/activate").status_code == 200
        fill(tiny_disk / "filler")
        assert c.delete("/adapters/beta").status_code == 200, "deleting the active adapter on a full disk"
        assert c.get("/adapters").json()["active"] is None and c.get("/adapters/beta").status_code == 404
    finally:
        server.stop()
