"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's requests, statuses and error bodies
(vLLM's serving_models.py), and what unload means for a persistent store (stop serving, keep the files)."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from .conftest import tree, upload
from .server import ServerProcess
from .test_api import gen


@pytest.fixture()
def lora_root(tmp_path, adapters):
    root = tmp_path / "loras"
    root.mkdir()
    for name in ("alpha", "beta"):
        shutil.copytree(adapters[name], root / name)
    return root


@pytest.fixture()
def vllm_server(model_dir, tmp_path, lora_root):
    proc = ServerProcess(model_dir, tmp_path / "store", "--lora-root", str(lora_root))
    yield proc
    proc.stop()


def vllm_error(response, status: int, err_type: str | None = None) -> str:
    """Assert vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}, code = the status."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if err_type:
        assert error["type"] == err_type
    return error["message"]


def load(c, name, path, **extra):
    return c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def unload(c, name, **extra):
    return c.post("/v1/unload_lora_adapter", json={"lora_name": name, **extra})


def test_requests_and_errors_as_vllm(vllm_server, lora_root) -> None:
    c = vllm_server.client
    message = vllm_error(load(c, "", lora_root / "alpha"), 400, "InvalidUserInput")
    assert message == "Both 'lora_name' and 'lora_path' must be provided."
    vllm_error(load(c, "a", ""), 400, "InvalidUserInput")
    assert c.get("/adapters").json()["adapters"] == [], "an empty name registers nothing"
    r = load(c, "a", lora_root / "alpha")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' added successfully."
    message = vllm_error(load(c, "a", lora_root / "alpha"), 400, "InvalidUserInput")
    assert "has already been loaded" in message and "load_inplace" in message
    vllm_error(c.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400, "BadRequestError")
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x", "lora_rank": 8})
    assert "lora_rank" in vllm_error(r, 400), "an unknown field is refused by name"
    r = load(c, "x", lora_root / "alpha", is_3d_lora_weight=True)
    assert vllm_error(r, 400)
    vllm_error(c.post("/v1/load_lora_adapter", content=b"{nope", headers={"content-type": "application/json"}), 400)
    vllm_error(load(c, "x", lora_root / "missing"), 404, "NotFoundError")
    # unload: lora_int_id accepted (vLLM does not use it either), unknown name 404, empty name 400
    message = vllm_error(unload(c, "nope", lora_int_id=3), 404, "NotFoundError")
    assert message == "The lora adapter 'nope' cannot be found."
    vllm_error(unload(c, ""), 400, "InvalidUserInput")
    r = unload(c, "a", lora_int_id=1)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a' removed successfully."


def test_load_inplace_replaces_the_weights(vllm_server, lora_root, oracle) -> None:
    c = vllm_server.client
    prompt = "Hello adapters"
    assert load(c, "x", lora_root / "alpha").status_code == 200
    before = c.get("/adapters/x").json()
    assert load(c, "x", lora_root / "alpha", load_inplace=True).status_code == 200
    assert c.get("/adapters/x").json()["created_at"] == before["created_at"], "the same files: a no-op"
    assert load(c, "x", lora_root / "beta", load_inplace=True).status_code == 200
    after = c.get("/adapters/x").json()
    assert after["sha256"] != before["sha256"] and after["rank"] == 8
    assert gen(c, prompt, "x", max_new_tokens=8).json()["token_ids"] == oracle.tokens("beta", prompt, 8)
    # an invalid replacement changes nothing
    bad = lora_root / "bad"
    shutil.copytree(lora_root / "alpha", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = load(c, "x", bad, load_inplace=True)
    assert r.status_code == 422 and r.json()["error"]["code"] == 422
    assert c.get("/adapters/x").json()["sha256"] == after["sha256"]
    assert gen(c, prompt, "x", max_new_tokens=8).json()["token_ids"] == oracle.tokens("beta", prompt, 8)


def test_unload_stops_serving_and_keeps_the_files(model_dir, tmp_path, vllm_server, lora_root, oracle) -> None:
    c, store = vllm_server.client, tmp_path / "store"
    assert load(c, "a", lora_root / "alpha").status_code == 200
    assert c.put("/adapters/a/activate").status_code == 200
    files = tree(store / "a")
    sha = c.get("/adapters/a").json()["sha256"]
    assert unload(c, "a").status_code == 200
    # not served: listed with served false, not in /v1/models, a request for it is a 404, no longer active
    listing = c.get("/adapters").json()
    [info] = listing["adapters"]
    assert listing["active"] is None and info["id"] == "a" and info["sha256"] == sha
    assert (info["served"], info["resident"], info["resident_bytes"], info["active"]) == (False, False, 0, False)
    assert c.get("/adapters/a").json() == info
    assert "a" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert gen(c, "hi", "a").status_code == 404
    assert c.put("/adapters/a/activate").status_code == 404
    # the files are still in the store, marked unloaded
    kept = tree(store / "a")
    assert [f for f in kept if f[0] != "unloaded"] == files and ("unloaded", 0) in kept
    # not served after a restart either, still listed as unloaded
    vllm_server.stop()
    again = ServerProcess(model_dir, store, "--lora-root", str(lora_root))
    try:
        c = again.client
        assert [(a["id"], a["served"]) for a in c.get("/adapters").json()["adapters"]] == [("a", False)]
        # an invalid upload under its id changes nothing
        bad = tmp_path / "bad"
        shutil.copytree(lora_root / "alpha", bad)
        (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
        assert upload(c, bad, "a").status_code == 422
        assert tree(store / "a") == kept
        # a multipart upload under its id replaces the kept files and serves the new ones (as loading does)
        r = upload(c, lora_root / "beta", "a")
        assert r.status_code == 201, r.text
        assert r.json()["served"] and r.json()["rank"] == 8 and not (store / "a" / "unloaded").exists()
        assert [(a["id"], a["served"]) for a in c.get("/adapters").json()["adapters"]] == [("a", True)]
        assert gen(c, "Hello adapters", "a", max_new_tokens=8).json()["token_ids"] == \
            oracle.tokens("beta", "Hello adapters", 8)
        assert "a" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert upload(c, lora_root / "alpha", "a").status_code == 409, "a served id is not replaced by an upload"
        # unload again, then DELETE /adapters/{id} removes the kept files
        assert unload(c, "a").status_code == 200
        assert (store / "a").is_dir()
        r = c.delete("/adapters/a")
        assert r.status_code == 200 and r.json() == {"deleted": "a", "freed_bytes": 0}
        assert not (store / "a").exists() and c.get("/adapters").json()["adapters"] == []
        assert c.delete("/adapters/a").status_code == 404
        assert not any((store / ".staging").iterdir()) and not any((store / ".trash").iterdir())
    finally:
        again.stop()


def test_load_inplace_under_load_serves_old_or_new_never_404(vllm_server, lora_root, oracle) -> None:
    """Requests for the adapter run all through three in-place reloads: none gets a 404, each is answered
    wholly by the version before or after a reload (PEFT's greedy tokens of one or the other), and every
    request sent after a reload returned is answered by the new version."""
    c = vllm_server.client
    prompt = "Hello adapters"
    expected = {name: oracle.tokens(name, prompt, 8) for name in ("alpha", "beta")}
    assert expected["alpha"] != expected["beta"]
    assert load(c, "x", lora_root / "alpha").status_code == 200
    assert c.put("/adapters/x/activate").status_code == 200
    stop = threading.Event()
    versions = ["alpha", "beta", "alpha", "beta"]  # loaded in this order
    loaded = [0]  # index of the latest version whose load returned
    results: list[tuple[int, int, object]] = []  # (loaded[0] when sent, status, token ids or the error)

    def client_loop(named: bool) -> None:
        with httpx.Client(base_url=vllm_server.url, timeout=120) as client:
            while not stop.is_set():
                sent = loaded[0]
                body = {"prompt": prompt, "max_new_tokens": 8, **({"adapter_id": "x"} if named else {})}
                r = client.post("/generate", json=body)
                results.append((sent, r.status_code, r.json().get("token_ids") if r.status_code == 200 else r.text))

    def answered(since: int, count: int = 6) -> None:
        """Wait (bounded) until `count` requests sent once version `since` was loaded are answered."""
        deadline = time.monotonic() + 120
        while sum(sent == since for sent, *_ in results) < count:
            assert time.monotonic() < deadline, "requests stopped being answered"
            assert not stop.wait(0.01)

    threads = [threading.Thread(target=client_loop, args=(i % 3 != 0,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(1, len(versions)):
            answered(i - 1)  # traffic is flowing before each reload
            assert load(c, "x", lora_root / versions[i], load_inplace=True).status_code == 200
            loaded[0] = i
        answered(len(versions) - 1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
    for sent, _, tokens in results:  # the version loaded when it was sent, or a later one
        assert tokens in [expected[v] for v in versions[sent:]], (sent, tokens)
    assert {tokens == expected["alpha"] for *_, tokens in results} == {True, False}, "both versions answered"
    info = c.get("/adapters").json()
    assert info["active"] == "x" and [a["rank"] for a in info["adapters"]] == [8]
