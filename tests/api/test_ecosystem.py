"""OpenAI-compatible API (with the official client), vLLM adapter management, metrics, request ids, JSON logs."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .conftest import upload
from .server import ServerProcess, SharedServer
from .test_api import gen


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, adapters) -> Path:
    root = tmp_path_factory.mktemp("ops") / "loras"
    root.mkdir()
    shutil.copytree(adapters["alpha"], root / "alpha")
    return root


@pytest.fixture(scope="module")
def shared_ops_server(model_dir, lora_root, tmp_path_factory) -> Iterator[SharedServer]:
    shared = SharedServer(model_dir, tmp_path_factory.mktemp("ops-server"), "--lora-root", str(lora_root),
                          "--log-json")
    yield shared
    shared.stop()


@pytest.fixture()
def ops_server(shared_ops_server, lora_root) -> Iterator[ServerProcess]:
    """A server with a lora root and JSON logs, shared by this module's tests (cleaned after each, root too)."""
    yield shared_ops_server.get()
    shared_ops_server.reset()
    for entry in lora_root.iterdir():
        if entry.name == "alpha":
            continue
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        else:
            shutil.rmtree(entry)


def test_openai_client(server, adapters) -> None:
    c = server.client
    assert upload(c, adapters["beta"], "beta").status_code == 201
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    base_name = c.get("/health").json()["model"]
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_name, "beta"}
    prompt = "Hello adapters"
    ours = gen(c, prompt, "beta", max_new_tokens=10).json()
    done = client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0)
    assert done.choices[0].text == ours["text"] and done.usage.completion_tokens == len(ours["token_ids"])
    streamed = client.completions.create(model="beta", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == ours["text"]
    base = client.completions.create(model=base_name, prompt=prompt, max_tokens=10, temperature=0)
    assert base.choices[0].text == gen(c, prompt, "base", max_new_tokens=10).json()["text"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_vllm_load_and_unload(ops_server, lora_root, tmp_path, adapters) -> None:
    c = ops_server.client
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": str(lora_root / "alpha")})
    assert r.status_code == 200 and "Success" in r.text
    assert [a["id"] for a in c.get("/adapters").json()["adapters"]] == ["alpha"]
    assert gen(c, "Hello adapters", "alpha").status_code == 200
    outside = tmp_path / "outside"
    shutil.copytree(adapters["beta"], outside)
    for path in (outside, lora_root / ".." / "outside"):
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(path)})
        assert r.status_code == 403 and r.json()["error"]["code"] == 403  # vLLM's ErrorResponse shape
        assert "outside the allowed roots" in r.json()["error"]["message"]
    os.symlink(outside, lora_root / "escape")
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(lora_root / "escape")})
    assert r.status_code == 403, "a symlink out of the root is refused"
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": str(lora_root / "alpha")})
    assert r.status_code == 400, "vLLM: an adapter already loaded is a 400"
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 200
    assert [(a["id"], a["served"]) for a in c.get("/adapters").json()["adapters"]] == [("alpha", False)]
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 404


def test_path_loading_is_off_without_roots(server, adapters) -> None:
    r = server.client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters["alpha"])})
    assert r.status_code == 403 and "--lora-root" in r.json()["error"]["message"]


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not found")


def test_metrics(fresh_server, adapters) -> None:
    c = fresh_server.client  # counters are process-wide: exact counts need a process of its own
    assert upload(c, adapters["alpha"], "alpha").status_code == 201
    for _ in range(2):
        assert gen(c, "Hello adapters", "alpha", max_new_tokens=5, ignore_eos=True).status_code == 200
    assert gen(c, "x", "nope").status_code == 404
    text = c.get("/metrics").text
    assert _metric(text, "adapter_service_requests_total", endpoint="/generate", status="200", adapter="alpha") == 2
    assert _metric(text, "adapter_service_requests_total", endpoint="/generate", status="404") == 1
    assert _metric(text, "adapter_service_generated_tokens_total", adapter="alpha") == 10
    assert _metric(text, "adapter_service_time_to_first_token_seconds_count", adapter="alpha") == 2
    assert _metric(text, "adapter_service_request_duration_seconds_count", endpoint="/generate") == 3
    assert _metric(text, "adapter_service_adapters_resident") == 1
    assert _metric(text, "adapter_service_adapter_bytes") == c.get("/health").json()["adapter_bytes"]
    assert _metric(text, "adapter_service_adapter_load_seconds_count") == 1
    assert _metric(text, "adapter_service_queue_depth") == 0
    assert _metric(text, "adapter_service_running_batch_size") == 0
    c.delete("/adapters/alpha")
    assert _metric(c.get("/metrics").text, "adapter_service_adapter_delete_seconds_count") == 1


def test_request_ids_and_json_logs(ops_server) -> None:
    c = ops_server.client
    generated = c.get("/adapters").headers["x-request-id"]  # /health logs at debug: not in an info log
    assert len(generated) == 32
    r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers={"X-Request-ID": "req-42"})
    assert r.headers["x-request-id"] == "req-42"
    assert c.get("/adapters/nope", headers={"X-Request-ID": "req-43"}).headers["x-request-id"] == "req-43"
    ops_server.wait_for_line(lambda line: '"req-43"' in line and "service.access" in line)
    records = [json.loads(line) for line in ops_server.lines if line.startswith("{")]
    access = {rec["request_id"]: rec for rec in records if rec["logger"] == "service.access"}
    assert access["req-42"]["status"] == 200 and access["req-42"]["path"] == "/generate"
    assert access["req-43"]["status"] == 404
    assert generated in access
