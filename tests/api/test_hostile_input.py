"""Hostile input: malformed strings are clear 422s on a connection that stays usable, every endpoint has the
same per-field limits, a huge prompt is refused by its size before it is tokenized, a client that leaves a
non-streaming request frees its batch row, error bodies never repeat a huge input, and a --lora-root directory
whose files are symlinks to outside is refused."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import threading
import time

import pytest

from .conftest import upload
from .server import ServerProcess

LONE = '"\\ud800"'  # a JSON string holding a lone surrogate (valid JSON, not encodable as UTF-8)


@pytest.fixture(scope="module")
def hostile_server(model_dir, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    lora_root = root / "lora-root"
    shutil.copytree(adapters["alpha"], lora_root / "alpha")
    proc = ServerProcess(model_dir, root / "store", "--lora-root", str(lora_root), "--max-prompt-tokens", "64")
    proc.lora_root = lora_root
    proc.outside = root / "outside"
    yield proc
    proc.stop()


def _conn(server) -> http.client.HTTPConnection:
    host, port = server.url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _post_raw(conn: http.client.HTTPConnection, path: str, body: str) -> tuple[int, dict, dict]:
    conn.request("POST", path, body=body.encode(), headers={"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    return response.status, dict(response.getheaders()), json.loads(data) if data else {}


MALFORMED = [
    ("/generate", '{"prompt": @, "max_new_tokens": 1}'.replace("@", LONE)),
    ("/generate", '{"prompt": "hi", "stop": [@], "max_new_tokens": 1}'.replace("@", LONE)),
    ("/generate", '{"prompt": "hi", @: 1}'.replace("@", LONE)),  # an unknown key that cannot be encoded
    ("/v1/completions", '{"model": "base", "prompt": @, "max_tokens": 1}'.replace("@", LONE)),
    ("/v1/completions", '{"model": "base", "prompt": ["ok", @], "max_tokens": 1}'.replace("@", LONE)),
    ("/v1/completions", '{"model": @, "prompt": "hi", "max_tokens": 1}'.replace("@", LONE)),
    ("/v1/chat/completions", '{"model": "base", "messages": [{"role": "user", "content": @}]}'.replace("@", LONE)),
    ("/v1/chat/completions",
     '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": @}]}]}'.replace("@", LONE)),
    ("/v1/chat/completions",
     '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}'),
    ("/v1/chat/completions",
     '{"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}'),
    ("/v1/chat/completions",
     '{"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}'),
    ("/v1/load_lora_adapter", '{"lora_name": "x", "lora_path": @}'.replace("@", LONE)),
    ("/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "/" + "a" * 5000})),
]


def test_malformed_strings_are_422_on_a_kept_connection(hostile_server) -> None:
    conn = _conn(hostile_server)
    try:
        for path, body in MALFORMED:
            status, headers, reply = _post_raw(conn, path, body)
            # vLLM's endpoints answer bad input with vLLM's 400 (service/api/routes_vllm.py); ours with 422
            assert status == (400 if path == "/v1/load_lora_adapter" else 422), (path, body[:120], reply)
            assert headers.get("connection", "").lower() != "close"
            # the same connection serves the next request: it was not reset
            ok, _, _ = _post_raw(conn, "/generate", '{"prompt": "hi", "max_new_tokens": 1}')
            assert ok == 200, (path, body[:120])
        long_component = str(hostile_server.lora_root / ("a" * 300))  # over NAME_MAX, inside the root
        status, _, reply = _post_raw(conn, "/v1/load_lora_adapter",
                                     json.dumps({"lora_name": "long", "lora_path": long_component}))
        assert status == 422 and "not a usable path" in reply["error"]["message"], reply  # invalid_path
    finally:
        conn.close()
    assert hostile_server.alive()


def test_same_limits_on_every_endpoint(hostile_server) -> None:
    c = hostile_server.client
    stops = [f"s{i}" for i in range(17)]
    for path, body in (("/generate", {"prompt": "hi", "max_new_tokens": 1}),
                       ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 1}),
                       ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 1})):
        assert c.post(path, json={**body, "stop": stops}).status_code == 422, path
        assert c.post(path, json={**body, "stop": ["x" * 257]}).status_code == 422, path
        assert c.post(path, json={**body, "stop": stops[:16]}).status_code == 200, path
    r = c.post("/v1/completions", json={"model": "base", "prompt": ["hi"] * 17, "max_tokens": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_prompts"
    r = c.post("/v1/completions", json={"model": "base", "prompt": [[5, 6]] * 17, "max_tokens": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_prompts"
    assert c.post("/v1/completions", json={"model": "base", "prompt": ["hi"] * 16, "max_tokens": 1}).status_code == 200
    messages = [{"role": "user", "content": "hi"}] * 257
    r = c.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 1})
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_messages"


def test_huge_prompt_is_refused_by_size_while_health_answers(hostile_server) -> None:
    """A 5 MB prompt is refused by its byte size, before tokenizing; /health answers meanwhile."""
    c = hostile_server.client
    huge = "word " * (1024 * 1024)
    replies: dict[str, object] = {}

    def send(path: str, body: dict) -> None:
        with _http(hostile_server) as client:
            replies[path] = client.post(path, json=body)

    bodies = {"/generate": {"prompt": huge, "max_new_tokens": 1},
              "/v1/completions": {"model": "base", "prompt": huge, "max_tokens": 1},
              "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": huge}]}}
    threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
    for t in threads:
        t.start()
    assert c.get("/health").status_code == 200
    for t in threads:
        t.join()
    for path in bodies:
        r = replies[path]
        assert r.status_code == 422 and r.json()["error"]["code"] == "prompt_too_long", path
        assert "max_prompt_bytes" in r.json()["error"]["details"], path  # refused by size, not after tokenizing


def _http(server):
    import httpx

    return httpx.Client(base_url=server.url, timeout=120)


def test_error_bodies_do_not_repeat_huge_input(hostile_server, adapters, tmp_path) -> None:
    c = hostile_server.client
    body = '{"prompt": "hi", "@": 1}'.replace("@", "k" * 1_000_000)
    r = c.post("/generate", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and len(r.content) < 10_000
    config = json.loads((adapters["alpha"] / "adapter_config.json").read_text())
    config["target_modules"] = "(" * 10 + "a" * 2_000_000
    bad = tmp_path / "bad"
    shutil.copytree(adapters["alpha"], bad)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    r = upload(c, bad, "bad-regex")
    assert 400 <= r.status_code < 500 and len(r.content) < 20_000, (r.status_code, len(r.content))


def test_lora_root_files_symlinked_outside_are_refused(hostile_server, adapters) -> None:
    """A directory inside the root whose adapter files are symlinks to outside it: 403 path_not_allowed."""
    outside = hostile_server.outside
    shutil.copytree(adapters["alpha"], outside)
    inside = hostile_server.lora_root / "linked-files"
    inside.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.symlink(outside / name, inside / name)
    r = hostile_server.client.post("/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(inside)})
    # path_not_allowed, in vLLM's error body (service/api/routes_vllm.py)
    assert r.status_code == 403 and "resolves outside the allowed roots" in r.json()["error"]["message"], r.text
    assert hostile_server.client.get("/adapters/linked").status_code == 404


def test_non_streaming_clients_that_leave_free_their_rows(model_dir, tmp_path) -> None:
    server = ServerProcess(model_dir, tmp_path / "store")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        requests = [
            ("/generate", {"prompt": "hello", "max_new_tokens": 4096, "ignore_eos": True}),
            ("/v1/completions", {"model": "base", "prompt": ["hello", "world"], "max_tokens": 4096,
                                 "ignore_eos": True}),
            ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 4096, "ignore_eos": True}),
        ] * 2
        socks = []
        for path, body in requests:
            data = json.dumps(body).encode()
            sock = socket.create_connection((host, int(port)), timeout=60)
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
            socks.append(sock)
        rows = sum(len(b.get("prompt", [])) if isinstance(b.get("prompt"), list) else 1 for _, b in requests)
        assert _poll(server, lambda h: h["requests_running"] == rows), "the generations never all ran"
        for sock in socks:
            sock.close()
        assert _poll(server, lambda h: h["requests_running"] == 0 and h["requests_waiting"] == 0, attempts=600), \
            (server.client.get("/health").json(), server.log[-3000:])
        assert server.client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
    finally:
        server.stop()


def _poll(server, done, attempts: int = 200) -> bool:
    """Ask /health up to `attempts` times, 0.1 s apart, until `done(health)`."""
    for _ in range(attempts):
        if done(server.client.get("/health").json()):
            return True
        time.sleep(0.1)
    return False


def test_adapter_id_equal_to_the_base_models_name_is_refused(tmp_path, adapters) -> None:
    """The embedded demo model's name is a valid id: refused, else `model: <name>` could not reach it."""
    server = ServerProcess(None, tmp_path / "store", "--lora-root", str(adapters["alpha"].parent))
    try:
        c = server.client
        base_name = c.get("/v1/models").json()["data"][0]["id"]
        for name in (base_name, "base"):
            r = upload(c, adapters["alpha"], name)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter_id", (name, r.text)
        r = c.post("/v1/load_lora_adapter", json={"lora_name": base_name, "lora_path": str(adapters["alpha"])})
        assert r.status_code == 400 and "base model" in r.json()["error"]["message"], r.text  # vLLM's status
        assert c.get("/adapters").json()["adapters"] == []
    finally:
        server.stop()
