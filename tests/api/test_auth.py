"""API keys with scopes: 401 without a valid key, 403 with the wrong scope, open health checks."""

from __future__ import annotations

import socket

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


def _send_headers_then_some_body(url: str, head: str, first_chunk: bytes) -> bytes:
    """Send the request line, headers and only the start of the body; return what the server answers before
    the rest is sent (it must answer without waiting for it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + first_chunk)
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)  # a server waiting for the rest of the body times out here: the test fails
            if not data:
                break
            reply += data
        return reply


def test_key_is_checked_before_the_body_is_read(model_dir, tmp_path) -> None:
    """An unauthenticated 100 MiB upload (declared, or chunked) gets its 401 before the body is sent, and
    nothing of it reaches the store's staging area or the temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    store = tmp_path / "store"
    server = ServerProcess(model_dir, store, env={**KEYS, "TMPDIR": str(tmp)})
    try:
        boundary = "b0undary"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.tar\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + b"\0" * 65536
        declared = (f"POST /adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                    f"\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n")
        for head in (declared, declared.replace("Host: x", "Host: x\r\nAuthorization: Bearer wrong")):
            reply = _send_headers_then_some_body(server.url, head, part)
            assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        chunked = (f"POST /adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                   "\r\nTransfer-Encoding: chunked\r\n\r\n")
        reply = _send_headers_then_some_body(server.url, chunked, f"{len(part):x}\r\n".encode() + part + b"\r\n")
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        # An inference key may not upload either: 403, also before the body.
        reply = _send_headers_then_some_body(
            server.url, declared.replace("Host: x", "Host: x\r\nAuthorization: Bearer inf-secret"), part)
        assert reply.startswith(b"HTTP/1.1 403"), reply[:200]
        assert server.alive()
        assert list(tmp.iterdir()) == []
        assert [p for p in (store / ".staging").rglob("*")] == []
    finally:
        server.stop()


def test_docs_need_a_key_health_and_metrics_do_not(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "store", env=KEYS)
    try:
        c = server.client
        for path in ("/openapi.json", "/docs", "/redoc", "/no-such-path"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=_auth("inf-secret")).status_code in (200, 404), path
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
    finally:
        server.stop()


def test_health_and_metrics_name_adapters_only_to_key_holders(model_dir, tmp_path, adapters) -> None:
    """With keys set, /health and /metrics stay open but name no adapter to a caller without a key, unless
    --public-health-details says so."""
    for extra, public in (((), False), (("--public-health-details",), True)):
        server = ServerProcess(model_dir, tmp_path / f"store-{public}", *extra, env=KEYS)
        try:
            c = server.client
            admin = _auth("adm-secret")
            r = c.post("/adapters", headers=admin, files=[
                ("files", (n, (adapters["alpha"] / n).read_bytes()))
                for n in ("adapter_config.json", "adapter_model.safetensors")], data={"adapter_id": "secret-name"})
            assert r.status_code == 201
            assert c.put("/adapters/secret-name/activate", headers=admin).status_code == 200
            gen = {"prompt": "hi", "max_new_tokens": 1, "adapter_id": "secret-name"}
            assert c.post("/generate", json=gen, headers=admin).status_code == 200
            anonymous = c.get("/health").text + c.get("/metrics").text
            assert ("secret-name" in anonymous) is public
            assert c.get("/health").json()["adapters"] == 1
            keyed = c.get("/health", headers=_auth("inf-secret")).text + c.get("/metrics", headers=admin).text
            assert "secret-name" in keyed
        finally:
            server.stop()
