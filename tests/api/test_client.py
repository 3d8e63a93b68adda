"""`adapter_client` (sync and async) and the client CLI against a real server process; PEFT is the oracle."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from adapter_client import (
    ActiveResult,
    AdapterServiceClient,
    AsyncAdapterServiceClient,
    ServiceConnectionError,
    ServiceError,
    StreamEnd,
    TokenEvent,
)
from service.cli import main

PROMPT = "Hello adapters"
ROOT = Path(__file__).resolve().parents[2]


def bad_adapter(adapters: dict[str, Path], dest: Path) -> Path:
    """alpha's weights under a config claiming rank 16: every LoRA tensor has the wrong shape (a 422)."""
    dest.mkdir(parents=True)
    config = json.loads((adapters["alpha"] / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    (dest / "adapter_model.safetensors").write_bytes((adapters["alpha"] / "adapter_model.safetensors").read_bytes())
    return dest


def check_progress(calls: list[tuple[int, int]], adapter_dir: Path) -> None:
    sent = [s for s, _ in calls]
    total = calls[-1][1]
    assert sent == sorted(sent) and sent[-1] == total and {t for _, t in calls} == {total}
    files = sum((adapter_dir / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors"))
    assert files < total < files + 1024  # the two files plus the multipart framing


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_sync_client(server, adapters, oracle, tmp_path) -> None:
    calls: list[tuple[int, int]] = []
    with AdapterServiceClient(server.url) as client:
        assert client.health().status == "ok"
        info = client.upload_adapter(adapters["alpha"], "alpha", progress=lambda s, t: calls.append((s, t)))
        check_progress(calls, adapters["alpha"])
        assert (info.id, info.type, info.rank, info.alpha, info.active) == ("alpha", "LORA", 4, 8, False)
        archive = tmp_path / "beta.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                tar.add(adapters["beta"] / name, arcname=name)
        beta = client.upload_adapter(archive)  # the server picks the id
        assert beta.modules_to_save == ["lm_head"]

        listing = client.list_adapters()
        assert {a.id for a in listing.adapters} == {"alpha", beta.id} and listing.active is None
        assert client.get_adapter("alpha") == info and client.get_adapter("alpha").raw["id"] == "alpha"
        assert client.activate("alpha") == ActiveResult(active="alpha", fused=False)

        expected = oracle.tokens("alpha", PROMPT, 10)
        result = client.generate(PROMPT, max_new_tokens=10)
        assert result.token_ids == expected and result.adapter_id == "alpha"
        assert result.usage.completion_tokens == len(expected) and result.finish_reason in ("length", "stop")
        assert client.generate(PROMPT, beta.id, max_new_tokens=10).token_ids == oracle.tokens("beta", PROMPT, 10)

        events = list(client.stream(PROMPT, max_new_tokens=10))
        tokens, end = events[:-1], events[-1]
        assert all(isinstance(e, TokenEvent) for e in tokens) and isinstance(end, StreamEnd)
        assert [e.token_id for e in tokens] == expected
        assert "".join(e.text for e in tokens) == end.text == result.text
        assert end.usage == result.usage and end.finish_reason == result.finish_reason and end.adapter_id == "alpha"

        zipped = client.download("alpha", tmp_path)
        assert zipped == tmp_path / "alpha.zip"
        assert set(zipfile.ZipFile(zipped).namelist()) == {"adapter_config.json", "adapter_model.safetensors"}

        assert client.deactivate() == ActiveResult(active=None)
        deleted = client.delete_adapter("alpha")
        assert deleted.deleted == "alpha" and deleted.freed_bytes > 0

        with pytest.raises(ServiceError) as missing:
            client.get_adapter("alpha")
        assert (missing.value.status, missing.value.code) == (404, "adapter_not_found")
        assert "alpha" in missing.value.message
        with pytest.raises(ServiceError) as missing_stream:
            list(client.stream(PROMPT, "alpha"))
        assert missing_stream.value.code == "adapter_not_found"
        with pytest.raises(ServiceError) as invalid:
            client.upload_adapter(bad_adapter(adapters, tmp_path / "bad"), "bad")
        assert invalid.value.status == 422 and invalid.value.code == "invalid_adapter"
        assert invalid.value.details["shape_mismatches"] and invalid.value.details["problems"]
        big = tmp_path / "big"
        big.mkdir()
        (big / "adapter_config.json").write_bytes((adapters["alpha"] / "adapter_config.json").read_bytes())
        (big / "adapter_model.safetensors").write_bytes(b"\0" * (10 << 20))  # over the server's 8 MiB limit
        with pytest.raises(ServiceError) as too_large:
            client.upload_adapter(big, "big")
        assert (too_large.value.status, too_large.value.code) == (413, "upload_too_large")
        assert [a.id for a in client.list_adapters().adapters] == [beta.id]

    with AdapterServiceClient(closed_port_url(), timeout=5) as client, pytest.raises(ServiceConnectionError) as down:
        client.health()
    assert down.value.status is None and "not reachable" in down.value.message


def test_async_client(server, adapters, oracle, tmp_path) -> None:
    async def flow() -> None:
        calls: list[tuple[int, int]] = []
        async with AsyncAdapterServiceClient(server.url) as client:
            info = await client.upload_adapter(adapters["gamma"], "gamma", progress=lambda s, t: calls.append((s, t)))
            check_progress(calls, adapters["gamma"])
            assert info.id == "gamma" and info.type == "LORA"
            await client.upload_adapter(adapters["alpha"], "alpha")
            assert {a.id for a in (await client.list_adapters()).adapters} == {"alpha", "gamma"}
            assert await client.get_adapter("gamma") == info
            assert (await client.activate("gamma")).active == "gamma"
            assert (await client.health()).active_adapter == "gamma"

            expected = oracle.tokens("gamma", PROMPT, 8)
            result = await client.generate(PROMPT, max_new_tokens=8)
            assert result.token_ids == expected and result.adapter_id == "gamma"
            events = [e async for e in client.stream(PROMPT, max_new_tokens=8)]
            assert [e.token_id for e in events if isinstance(e, TokenEvent)] == expected
            assert isinstance(events[-1], StreamEnd) and events[-1].usage == result.usage

            merged = await client.merge("half-alpha", [("alpha", 0.5)], "linear")
            assert merged.id == "half-alpha" and merged.rank == 4
            with pytest.raises(ServiceError) as refused:  # DoRA sources are refused (PEFT drops magnitudes)
                await client.merge("dora-merge", [("gamma", 1.0)], "linear")
            assert refused.value.status == 422
            assert (await client.download("half-alpha", tmp_path / "half.zip")).stat().st_size > 0

            assert (await client.delete_adapter("gamma")).deleted == "gamma"
            assert (await client.list_adapters()).active is None
            with pytest.raises(ServiceError) as invalid:
                await client.upload_adapter(bad_adapter(adapters, tmp_path / "bad"))
            assert invalid.value.code == "invalid_adapter" and invalid.value.details["problems"]
            with pytest.raises(ServiceError) as gone:
                await client.generate(PROMPT, "gamma")
            assert gone.value.status == 404

    asyncio.run(flow())


def test_error_bodies_and_api_key_without_server() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/health":
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(409, json={"error": {"code": "adapter_exists", "message": "taken", "details": {}}})

    with AdapterServiceClient("http://svc", api_key="sekret", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServiceError) as html:
            client.health()
        assert (html.value.status, html.value.code, html.value.message) == (502, "http_502", "<html>bad gateway</html>")
        with pytest.raises(ServiceError) as taken:
            client.merge("x", [("a", 1.0)])
        assert (taken.value.code, taken.value.message) == ("adapter_exists", "taken")
        assert str(taken.value) == "adapter_exists: taken"
    assert {r.headers["authorization"] for r in seen} == {"Bearer sekret"}
    assert json.loads(seen[1].content) == {"adapter_id": "x", "sources": [{"adapter_id": "a", "weight": 1.0}],
                                          "method": "linear"}
    with AdapterServiceClient("http://svc", transport=httpx.MockTransport(handler)) as client:
        assert "authorization" not in client._http.headers


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a `python -m service ...` process."""
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The same CLI entry point called in this process (each process start costs a torch import)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_cli(server, adapters, oracle, tmp_path, capsys) -> None:
    url = ["--url", server.url]
    up = cli("adapters", "upload", str(adapters["alpha"]), "--id", "alpha", *url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("uploaded alpha: LORA rank 4") and "100%" in up.stderr and "upload alpha" in up.stderr

    listed = cli("adapters", "list", "--json", env={"ADAPTER_SERVICE_URL": server.url})  # URL from the environment
    assert listed.returncode == 0, listed.stderr
    assert [a["id"] for a in json.loads(listed.stdout)["adapters"]] == ["alpha"]
    code, out, _ = cli_in_process(capsys, "adapters", "list", *url)
    table = out.splitlines()
    assert code == 0 and len(table) == 2
    assert table[0].split()[:3] == ["ID", "TYPE", "RANK"] and table[1].split()[:3] == ["alpha", "LORA", "4"]
    assert cli_in_process(capsys, "adapters", "activate", "alpha", *url) == (0, "active adapter: alpha\n", "")

    expected = oracle.tokens("alpha", PROMPT, 8)
    generated = cli("generate", PROMPT, "--max-new-tokens", "8", "--json", *url)
    assert generated.returncode == 0, generated.stderr
    result = json.loads(generated.stdout)
    assert result["token_ids"] == expected and result["adapter_id"] == "alpha"
    code, out, err = cli_in_process(capsys, "generate", PROMPT, "--max-new-tokens", "8", "--stream", *url)
    assert code == 0 and out == result["text"] + "\n" and "adapter alpha" in err
    code, out, _ = cli_in_process(capsys, "generate", PROMPT, "--max-new-tokens", "8", "--stream", "--json", *url)
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["token_id"] for e in events[:-1]] == expected and events[-1]["usage"] == result["usage"]
    code, out, _ = cli_in_process(capsys, "adapters", "delete", "alpha", *url)
    assert code == 0 and out.startswith("deleted alpha (freed ")

    again = cli("adapters", "delete", "alpha", *url)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("error: adapter_not_found: ") and len(again.stderr.splitlines()) == 1
    code, _, err = cli_in_process(capsys, "adapters", "upload", str(bad_adapter(adapters, tmp_path / "bad")), *url)
    error_lines = err[err.index("error: "):].splitlines()  # after the progress bar
    assert code == 1 and error_lines[0].startswith("error: invalid_adapter: ") and len(error_lines) > 1
    assert all(line.startswith("  - ") for line in error_lines[1:]) and any("shape" in line for line in error_lines)
    nowhere = tmp_path / "nowhere"
    code, out, err = cli_in_process(capsys, "adapters", "upload", str(nowhere), *url)
    assert (code, out, err) == (1, "", f"error: {nowhere} does not exist\n")
    down = closed_port_url()
    code, _, err = cli_in_process(capsys, "adapters", "list", "--url", down)
    assert code == 1 and err.startswith(f"error: unreachable: the server is not reachable at {down}")
