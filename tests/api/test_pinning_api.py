"""PUT/DELETE /adapters/{id}/pin and POST /adapters/{id}/prefetch on a real server with two resident slots, over
HTTP and through the SDK."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapter_client import AdapterServiceClient
from adapter_client import ServiceError as ClientServiceError

from .conftest import SERVER_FLAGS, upload
from .server import ServerProcess, SharedServer


@pytest.fixture(scope="module")
def two_slots(model_dir, tmp_path_factory) -> Iterator[SharedServer]:
    shared = SharedServer(model_dir, tmp_path_factory.mktemp("two-slots"), *SERVER_FLAGS,
                          "--max-resident-adapters", "2")
    yield shared
    shared.stop()


@pytest.fixture()
def server(two_slots) -> Iterator[ServerProcess]:
    yield two_slots.get()
    two_slots.reset()


def _generate(server: ServerProcess, adapter: str):
    return server.client.post("/generate", json={"prompt": "pin", "adapter_id": adapter, "max_new_tokens": 5})


def _views(server: ServerProcess) -> dict[str, tuple[bool, bool]]:
    """adapter id -> (resident, pinned), as GET /adapters shows them."""
    return {a["id"]: (a["resident"], a["pinned"]) for a in server.client.get("/adapters").json()["adapters"]}


def test_pin_unpin_prefetch_over_http(server, adapters, oracle) -> None:
    c = server.client
    for name in ("alpha", "beta", "gamma"):
        assert upload(c, adapters[name], name).status_code == 201
    for method, path in (("PUT", "pin"), ("DELETE", "pin"), ("POST", "prefetch")):
        r = c.request(method, f"/adapters/nope/{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", (method, path)
    assert _views(server) == {"alpha": (False, False), "beta": (True, False), "gamma": (True, False)}
    r = c.put("/adapters/alpha/pin")
    assert r.status_code == 200 and r.json()["pinned"] and r.json()["resident"]
    assert c.put("/adapters/alpha/pin").status_code == 200, "idempotent"
    assert c.put("/adapters/beta/pin").status_code == 200
    assert _views(server) == {"alpha": (True, True), "beta": (True, True), "gamma": (False, False)}
    r = c.put("/adapters/gamma/pin")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "pin_limit_reached" and "--max-resident-adapters" in error["message"]
    assert error["details"]["max_resident_adapters"] == 2 and error["details"]["pinned"] == ["alpha", "beta"]
    r = _generate(server, "gamma")  # every slot holds a pinned adapter: refused at once, not left waiting
    assert r.status_code == 409 and r.json()["error"]["code"] == "pin_limit_reached"
    r = c.delete("/adapters/beta/pin")
    assert r.status_code == 200 and not r.json()["pinned"]
    r = _generate(server, "gamma")
    assert r.status_code == 200 and r.json()["token_ids"] == oracle.tokens("gamma", "pin", 5)
    assert _views(server) == {"alpha": (True, True), "beta": (False, False), "gamma": (True, False)}
    r = c.post("/adapters/beta/prefetch")
    assert r.status_code == 200 and r.json()["resident"] and not r.json()["pinned"]
    assert _views(server) == {"alpha": (True, True), "beta": (True, False), "gamma": (False, False)}
    # Deleting a pinned adapter works and frees it; its slot and its pin are free again.
    r = c.delete("/adapters/alpha")
    assert r.status_code == 200 and r.json()["freed_bytes"] > 0
    assert c.get("/adapters/alpha").status_code == 404 and c.put("/adapters/alpha/pin").status_code == 404
    assert c.put("/adapters/gamma/pin").status_code == 200 and c.put("/adapters/beta/pin").status_code == 200
    assert c.get("/health").json()["adapters_resident"] == 2


def test_sdk_pin_unpin_prefetch(server, adapters) -> None:
    with AdapterServiceClient(server.url) as sdk:
        for name in ("alpha", "beta", "gamma"):
            sdk.upload_adapter(adapters[name], name)
        assert sdk.pin("alpha").pinned
        assert sdk.prefetch("beta").resident
        assert [a.id for a in sdk.list_adapters().adapters if a.pinned] == ["alpha"]
        assert not sdk.unpin("alpha").pinned
        with pytest.raises(ClientServiceError) as missing:
            sdk.pin("nope")
        assert missing.value.code == "adapter_not_found"


def test_prefetch_racing_delete(server, adapters) -> None:
    """Prefetch and delete of one adapter at once: either order, the delete wins in the end and frees it."""
    c = server.client
    for _ in range(3):
        for name in ("alpha", "beta", "gamma"):
            assert upload(c, adapters[name], name).status_code == 201  # alpha is not resident now
        with ThreadPoolExecutor(2) as pool:
            prefetch = pool.submit(c.post, "/adapters/alpha/prefetch")
            deletion = pool.submit(c.delete, "/adapters/alpha")
            assert deletion.result().status_code == 200
            assert prefetch.result().status_code in (200, 404), prefetch.result().text
        assert c.get("/adapters/alpha").status_code == 404
        assert "alpha" not in _views(server) and c.get("/health").json()["adapters_resident"] <= 2
        for name in ("beta", "gamma"):
            assert c.delete(f"/adapters/{name}").status_code == 200
