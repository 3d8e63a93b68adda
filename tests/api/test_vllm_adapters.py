"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's requests, statuses and error bodies
(vLLM's serving_models.py), and what unload means for a persistent store (stop serving, keep the files)."""

from __future__ import annotations

import shutil

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


def test_unload_stops_serving_and_keeps_the_files(model_dir, tmp_path, vllm_server, lora_root) -> None:
    c, store = vllm_server.client, tmp_path / "store"
    assert load(c, "a", lora_root / "alpha").status_code == 200
    assert c.put("/adapters/a/activate").status_code == 200
    files = tree(store / "a")
    assert unload(c, "a").status_code == 200
    # not served: not listed, not in /v1/models, a request for it is a 404, no longer active
    assert c.get("/adapters").json() == {"adapters": [], "active": None}
    assert "a" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert gen(c, "hi", "a").status_code == 404
    assert c.get("/adapters/a").status_code == 404
    # the files are still in the store, marked unloaded
    kept = tree(store / "a")
    assert [f for f in kept if f[0] != "unloaded"] == files and ("unloaded", 0) in kept
    # not served after a restart either
    vllm_server.stop()
    again = ServerProcess(model_dir, store, "--lora-root", str(lora_root))
    try:
        c = again.client
        assert c.get("/adapters").json()["adapters"] == []
        r = upload(c, lora_root / "alpha", "a")
        assert r.status_code == 409, "an upload does not take over the kept files' id"
        # loading the name again serves it (vLLM: an unloaded name is free), from the new files
        assert load(c, "a", lora_root / "beta").status_code == 200
        assert c.get("/adapters/a").json()["rank"] == 8
        assert not (store / "a" / "unloaded").exists()
        # unload again, then DELETE /adapters/{id} removes the kept files
        assert unload(c, "a").status_code == 200
        assert (store / "a").is_dir()
        r = c.delete("/adapters/a")
        assert r.status_code == 200 and r.json() == {"deleted": "a", "freed_bytes": 0}
        assert not (store / "a").exists()
        assert c.delete("/adapters/a").status_code == 404
    finally:
        again.stop()
