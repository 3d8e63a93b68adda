"""API keys with scopes: 401 without a valid key, 403 with the wrong scope, open health checks."""

from __future__ import annotations

import openai

from adapter_client import AdapterServiceClient, ServiceError

from .conftest import upload
from .server import ServerProcess

KEYS = {"ADAPTER_SERVICE_API_KEYS": "admin:adm-secret,inference:inf-secret"}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_scopes(model_dir, tmp_path, adapters) -> None:
    server = ServerProcess(model_dir, tmp_path / "store", env=KEYS)
    try:
        c = server.client
        assert c.get("/health").status_code == 200, "health checks need no key"
        body = {"prompt": "hi", "max_new_tokens": 2}
        for headers in ({}, _auth("wrong"), {"Authorization": "Basic adm-secret"}):
            r = c.post("/generate", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "unauthorized"
        assert c.post("/generate", json=body, headers=_auth("inf-secret")).status_code == 200
        assert c.post("/generate", json=body, headers=_auth("adm-secret")).status_code == 200
        c.headers.update(_auth("inf-secret"))
        r = upload(c, adapters["alpha"], "alpha")
        assert r.status_code == 403 and r.json()["error"]["details"] == {"needed": "admin", "granted": "inference"}
        c.headers.update(_auth("adm-secret"))
        assert upload(c, adapters["alpha"], "alpha").status_code == 201
        c.headers.update(_auth("inf-secret"))
        assert c.get("/adapters").status_code == 200
        for method, path in (("PUT", "/adapters/alpha/activate"), ("DELETE", "/adapters/alpha"),
                             ("GET", "/adapters/alpha/download"), ("POST", "/adapters/alpha/export"),
                             ("POST", "/v1/unload_lora_adapter")):
            assert c.request(method, path, json={"lora_name": "alpha"}).status_code == 403, path
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="inf-secret")
        assert {m.id for m in client.models.list().data} >= {"alpha"}
        try:
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").models.list()
            raise AssertionError("a wrong key must be refused")
        except openai.AuthenticationError:
            pass
        with AdapterServiceClient(server.url, api_key="adm-secret") as admin:
            assert admin.delete_adapter("alpha").deleted == "alpha"
        with AdapterServiceClient(server.url, api_key="inf-secret") as reader:
            try:
                reader.activate("alpha")
                raise AssertionError("an inference key cannot activate")
            except ServiceError as exc:
                assert exc.status in (403, 404)
    finally:
        server.stop()


def test_keys_file_and_loud_warning(model_dir, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# scope key\nadmin file-admin\ninference file-user\n")
    server = ServerProcess(model_dir, tmp_path / "store", "--api-keys-file", str(keys))
    try:
        assert server.client.get("/adapters").status_code == 401
        assert server.client.get("/adapters", headers=_auth("file-user")).status_code == 200
    finally:
        server.stop()
    exposed = ServerProcess(model_dir, tmp_path / "store2", "--host", "0.0.0.0")
    try:
        assert "WITHOUT API KEYS" in exposed.log
    finally:
        exposed.stop()
