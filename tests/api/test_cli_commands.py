"""Every CLI command against a live server with API keys, as a user runs it (`python -m service ...`
processes): global --url/--api-key before or after the command or from the environment, uploads named after
their directory, ids checked before a body is sent, show/deactivate/merge/download/export/unload, `generate`
with every sampling field, and the SDK's export."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import tomllib

from adapter_client import AdapterServiceClient, AsyncAdapterServiceClient
from adapter_client.ids import adapter_id_problem, default_adapter_id
from service.errors import InvalidAdapterIdError
from service.store import validate_adapter_id

from .server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
KEY = "test-admin-key"


@pytest.fixture(scope="module")
def keyed_server(model_dir, tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("store"), "--lora-root", str(loras),
                           env={"ADAPTER_SERVICE_API_KEYS": f"admin:{KEY}"})
    server.loras = loras
    yield server
    server.stop()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SERVICE_")}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **(env or {})}, timeout=300)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr
    return proc


def test_every_command_against_a_live_server(keyed_server, adapters, tmp_path) -> None:
    url, key = keyed_server.url, KEY
    # Global flags before the command, after it, and from the environment; none at all is a clear 401.
    assert ok(cli("--url", url, "--api-key", key, "health")).stdout.startswith("ok: model ")
    assert ok(cli("health", "--url", url, "--api-key", key, "--json")).stdout.count('"status": "ok"') == 1
    env = {"ADAPTER_SERVICE_URL": url, "ADAPTER_SERVICE_API_KEY": key}
    assert json.loads(ok(cli("adapters", "list", "--json", env=env)).stdout)["adapters"] == []
    refused = cli("--url", url, "adapters", "list")
    assert refused.returncode == 1 and refused.stderr.startswith("error: unauthorized: ")

    # Upload: named after its directory; a bad id (given or from the name) is refused before a byte is sent.
    up = ok(cli("adapters", "upload", str(adapters["alpha"]), env=env))
    assert up.stdout.startswith("uploaded alpha: LORA rank 4") and "100%" in up.stderr
    for bad in (["--id", "no spaces"], ["--id", "base"]):
        proc = cli("adapters", "upload", str(adapters["beta"]), *bad, env=env)
        assert proc.returncode == 1 and proc.stderr.startswith("error: invalid adapter id") and "%" not in proc.stderr
    odd = shutil.copytree(adapters["beta"], tmp_path / "beta copy")
    proc = cli("adapters", "upload", str(odd), env=env)
    assert proc.returncode == 1 and proc.stderr == ("error: invalid adapter id 'beta copy': must be 1-64 characters "
                                                    "from A-Z a-z 0-9 . _ -\n")
    # The JSON source upload, from a directory under the server's --lora-root.
    shutil.copytree(adapters["beta"], keyed_server.loras / "beta-src")
    added = ok(cli("adapters", "add", "--source", str(keyed_server.loras / "beta-src"), "--id", "beta", env=env))
    assert added.stdout.startswith("added beta: LORA rank 8")
    assert [a["id"] for a in json.loads(ok(cli("adapters", "list", "--json", env=env)).stdout)["adapters"]] == \
        ["alpha", "beta"]

    shown = ok(cli("adapters", "show", "alpha", env=env)).stdout.splitlines()
    assert "id: alpha" in shown and "rank: 4" in shown and "alpha: 8.0" in shown
    assert ok(cli("adapters", "activate", "alpha", env=env)).stdout == "active adapter: alpha\n"
    assert ok(cli("adapters", "deactivate", env=env)).stdout.startswith("no active adapter")
    assert json.loads(ok(cli("adapters", "list", "--json", env=env)).stdout)["active"] is None
    pinned = ok(cli("adapters", "pin", "alpha", env=env)).stdout
    assert pinned.startswith("pinned alpha: LORA rank 4") and pinned.endswith(", resident, pinned\n")
    assert "(pinned)" in ok(cli("adapters", "list", env=env)).stdout
    assert not json.loads(ok(cli("adapters", "unpin", "alpha", "--json", env=env)).stdout)["pinned"]
    assert ok(cli("adapters", "prefetch", "beta", env=env)).stdout.startswith("resident beta: LORA rank 8")

    merged = ok(cli("adapters", "merge", "alpha:0.5", "beta:0.25", "--id", "mix", "--method", "cat", env=env))
    assert merged.stdout.startswith("merged into mix: LORA rank 12")  # cat stacks the ranks: 4 + 8
    dare = ok(cli("adapters", "merge", "alpha", "beta", "--id", "dare", "--method", "dare_ties_svd", "--svd-rank", "4",
                  "--density", "0.5", "--seed", "7", "--majority-sign-method", "frequency", "--json", env=env))
    assert (json.loads(dare.stdout)["id"], json.loads(dare.stdout)["rank"]) == ("dare", 4)

    down = ok(cli("adapters", "download", "mix", "--out", str(tmp_path), env=env))
    assert down.stdout.startswith(f"saved {tmp_path / 'mix.zip'}") and "download mix: 100%" in down.stderr
    assert sorted(zipfile.ZipFile(tmp_path / "mix.zip").namelist()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    exported = ok(cli("adapters", "export", "alpha", "--out", str(tmp_path / "alpha.tar"), env=env))
    assert exported.stdout.startswith(f"saved {tmp_path / 'alpha.tar'}") and "export alpha: " in exported.stderr
    names = tarfile.open(tmp_path / "alpha.tar").getnames()
    assert any(n.endswith("config.json") for n in names) and any(n.endswith(".safetensors") for n in names)
    assert not list(tmp_path.glob(".*.part"))

    # generate: every sampling field of /generate reaches the server (the same seeded request by the SDK).
    flags = ["--adapter", "alpha", "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--top-k",
             "20", "--seed", "5", "--stop", "zzz", "--stop", "qqq", "--ignore-eos", "--json"]
    by_cli = json.loads(ok(cli("generate", "Hello", *flags, env=env)).stdout)
    with AdapterServiceClient(url, api_key=key) as client:
        by_sdk = client.generate("Hello", "alpha", max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20, seed=5,
                                 stop=["zzz", "qqq"], ignore_eos=True)
        other_seed = client.generate("Hello", "alpha", max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=20,
                                     seed=6, ignore_eos=True)
    assert by_cli["token_ids"] == by_sdk.token_ids and by_cli["usage"]["completion_tokens"] == 6
    assert other_seed.token_ids != by_sdk.token_ids  # the seed was honoured, so the others were sent too
    streamed = ok(cli("generate", "Hello", "--adapter", "alpha", "--max-new-tokens", "3", "--stream", env=env))
    assert "[length, 3 tokens, adapter alpha]" in streamed.stderr

    unloaded = ok(cli("adapters", "unload", "beta", env=env)).stdout
    assert unloaded == "Success: LoRA adapter 'beta' removed successfully.\n"
    assert ok(cli("adapters", "delete", "dare", env=env)).stdout.startswith("deleted dare (freed ")
    missing = cli("adapters", "show", "dare", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error: adapter_not_found: ")


def test_sdk_export_streams_the_merged_model_to_a_file(keyed_server, adapters, tmp_path) -> None:
    seen: list[tuple[int, int | None]] = []
    with AdapterServiceClient(keyed_server.url, api_key=KEY) as client:
        client.upload_adapter(adapters["gamma"], "gamma-x")
        path = client.export("gamma-x", tmp_path, progress=lambda got, total: seen.append((got, total)))
        with client._http.stream("POST", "/adapters/gamma-x/export") as response:
            direct = b"".join(response.iter_bytes())
        client.download("gamma-x", tmp_path / "g.zip")
    assert path == tmp_path / "gamma-x-merged.tar" and path.read_bytes() == direct
    assert seen and seen[-1][0] == len(direct) and [got for got, _ in seen] == sorted(got for got, _ in seen)

    async def export_async() -> Path:
        async with AsyncAdapterServiceClient(keyed_server.url, api_key=KEY) as client:
            return await client.export("gamma-x", tmp_path / "async.tar")

    assert asyncio.run(export_async()).read_bytes() == direct
    assert zipfile.ZipFile(tmp_path / "g.zip").namelist()


def test_the_client_and_the_store_share_one_id_rule() -> None:
    samples = ["alpha", "a.b_c-d", "x" * 64, "x" * 65, "", ".hidden", "base", "Active", "sp ace", "sla/sh", "é",
               "a\n", "..", "-lead", "v1.0"]
    for sample in samples:
        problem = adapter_id_problem(sample)
        try:
            validate_adapter_id(sample)
            assert problem is None, sample
        except InvalidAdapterIdError as exc:
            assert problem is not None and problem in exc.message, sample
    assert default_adapter_id("my-adapter.tar.gz") == "my-adapter" and default_adapter_id("dir") == "dir"


def test_the_console_script_is_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["adapter-service"].partition(":")
    proc = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = 'adapter-service'; "
                           f"from {module} import {function}; {function}()", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: adapter-service")
    for command in ("serve", "adapters", "generate", "health"):
        assert command in proc.stdout
