"""`serve`'s start-up errors with real processes: each is one `error: ...` line on stderr, a non-zero exit and
no traceback: a malformed environment value, a --model path that does not exist, a start-up adapter that
fails, a model that does not load. And the --max-new-tokens setting, not a constant, bounds requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .server import ServerProcess

REPO = Path(__file__).resolve().parents[2]


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def test_a_malformed_environment_value_is_one_line(tmp_path) -> None:
    proc = serve("--store", str(tmp_path / "store"), env={"ADAPTER_SERVICE_MAX_BATCH_SIZE": "abc"})
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == ["error: ADAPTER_SERVICE_MAX_BATCH_SIZE: Input should be a valid integer, "
                                        "unable to parse string as an integer (got 'abc')"]
    assert not (tmp_path / "store").exists()  # refused before anything was touched


def test_a_model_path_that_does_not_exist_is_one_line(tmp_path) -> None:
    missing = tmp_path / "models" / "base"
    proc = serve("--model", str(missing), "--store", str(tmp_path / "store"))
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        f"error: --model {missing}: no such directory, and not a Hugging Face hub id (org/name) either"]


def test_a_model_that_does_not_load_is_one_line(tmp_path) -> None:
    (tmp_path / "empty-model").mkdir()  # a directory without config.json
    proc = serve("--model", str(tmp_path / "empty-model"), "--store", str(tmp_path / "store"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot load the model {tmp_path / 'empty-model'}: "), proc.stderr
    assert "Application startup failed" not in proc.stderr


def test_a_failing_startup_adapter_is_one_line(model_dir, tmp_path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    proc = serve("--model", str(model_dir), "--store", str(tmp_path / "store"), "--lora-root", str(root),
                 "--adapter", f"broken={root / 'missing'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error") or " ERROR " in line]
    assert len(errors) == 1 and errors[0] == proc.stderr.splitlines()[-1], proc.stderr
    assert errors[0].startswith("error: ") and "broken" in errors[0]


@pytest.fixture(scope="module")
def long_server(model_dir, tmp_path_factory):
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("store"), "--max-new-tokens", "5000")
    yield server
    server.stop()


def test_max_new_tokens_above_4096_is_honoured(long_server) -> None:
    body = {"prompt": "Hello", "max_new_tokens": 4500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=long_server.url, timeout=60) as client:
        with client.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data:"))
            assert "token_id" in json.loads(first[5:])  # admitted and generating; closing stops it
        refused = client.post("/generate", json={**body, "max_new_tokens": 5001, "stream": False})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "max_new_tokens_too_large" and error["details"] == {"max_new_tokens": 5000}
    assert "at most 5000" in error["message"]


def test_openai_max_tokens_is_bounded_by_the_setting_too(long_server) -> None:
    with httpx.Client(base_url=long_server.url, timeout=60) as client:
        answer = client.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 6000})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "max_new_tokens_too_large"
