"""The `server` fixture's process is shared: a test that leaves nothing behind hands it on to the next test."""

from __future__ import annotations

from .conftest import upload


def test_a_cleaned_up_shared_server_is_kept_for_the_next_test(shared_server, adapters) -> None:
    """Once its adapters are deleted the process is as clean as a new one and is kept. (It never was while the
    store's own lock file counted as a leftover: every test of `server` paid for a server start of its own.)"""
    first = shared_server.get()
    assert upload(first.client, adapters["alpha"], "alpha").status_code == 201
    assert first.client.put("/adapters/alpha/activate").status_code == 200
    shared_server.reset()
    assert shared_server.get() is first and first.alive()
    assert first.client.get("/adapters").json() == {"adapters": [], "active": None}
    shared_server.reset()
