"""Schemathesis fuzzes every operation of the OpenAPI schema against the real server: never a 5xx.

The server runs as a child process with low limits (a few new tokens, short prompts, small bodies) so that
generation calls stay cheap, and with two real adapters (`fuzz`, `fuzz-embed`) and a `--lora-root` so that generated
requests reach the adapter and path-loading code, not only the 404/403 branches. Each operation gets
a bounded number of valid (positive) and invalid (negative) cases, derandomized: the same cases every run.

The schema comes from the app factory at collection time (one test per operation) and is checked to be
the one the running server serves. Cases are driven with `operation.as_strategy()` and plain Hypothesis
rather than `schemathesis.pytest.from_fixture`, whose lazy loader does not run under pytest 9.2.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.api.app import create_app
from service.settings import Settings

from .conftest import upload
from .server import ServerProcess

# Real adapters the fuzzed requests are steered at: LoRA on attention, and LoRA on the embedding plus a
# trained lm_head copy (wrapped embedding and replaced module paths).
FUZZ_ADAPTERS = {"fuzz": "alpha", "fuzz-embed": "beta"}
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "150"))
LIMITS = (
    "--max-new-tokens", "4", "--max-prompt-tokens", "64", "--max-request-body-bytes", "65536",
    "--max-upload-bytes", str(1024 * 1024), "--max-adapters", "8", "--max-adapter-rank", "16",
    "--request-timeout-s", "30",
)

OPENAPI = create_app(Settings()).openapi()  # the app factory loads nothing heavy: the lifespan does
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module")
def fuzz_server(model_dir, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    lora_root = root / "lora-root"
    for name, source in FUZZ_ADAPTERS.items():  # something /v1/load_lora_adapter may load
        shutil.copytree(adapters[source], lora_root / name)
    # Sources the fuzzer names stay on this machine: the hub offline (404 for what the cache lacks), S3 without
    # credentials (403 before any connection); an unreachable source would be a 502, not a server bug.
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "hub"), "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"), "AWS_CONFIG_FILE": str(root / "none"),
               "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    proc = ServerProcess(model_dir, root / "store", *LIMITS, "--lora-root", str(lora_root), env=offline)
    proc.lora_root = lora_root
    yield proc
    proc.stop()


@pytest.fixture()
def fuzz_adapters(fuzz_server, adapters) -> None:
    """The real adapters are there at the start of every operation's run (an earlier DELETE may have hit them)."""
    for name, source in FUZZ_ADAPTERS.items():
        r = fuzz_server.client.get(f"/adapters/{name}")
        if r.status_code == 404 or not r.json()["served"]:  # deleted, or unloaded (its kept files get replaced)
            response = upload(fuzz_server.client, adapters[source], name)
            assert response.status_code == 201, response.text


def test_fuzzed_schema_is_the_served_schema(fuzz_server):
    assert fuzz_server.client.get("/openapi.json").json() == OPENAPI


def steer(case, name: str, lora_root: Path, path_kind: int) -> None:
    """Point the generated request at the real adapter (ids, `model`, merge sources, a path under the root)
    and within the token limits, so the fuzzed values reach generation, merging and loading code."""
    if "adapter_id" in (case.path_parameters or {}):
        case.path_parameters["adapter_id"] = name
    body = case.body
    if not isinstance(body, dict):
        return
    for key in ("adapter_id", "model", "lora_name"):
        if key in body:
            body[key] = name
    if isinstance(body.get("sources"), list):
        body["sources"] = [{**s, "adapter_id": name} if isinstance(s, dict) else s for s in body["sources"]]
    if isinstance(body.get("lora_path"), str):
        raw = body["lora_path"]
        body["lora_path"] = [str(lora_root / name), str(lora_root / raw.lstrip("/")), "~" + raw][path_kind]
    for key in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = 1 + body[key] % 4


# Strings a JSON body may hold that broke the server before (issue 15.7): lone surrogates (valid JSON, not
# encodable), NUL, a path component over NAME_MAX, huge text, non-string text parts.
EDGE_STRINGS = ["\ud800", "a\udfffb", "\x00", "x" * 300, "é" * 20_000, "", " ", "\u202e\ufeff", "../../etc"]


def poison(case, edge: str, lora_root: Path) -> None:
    """Put an edge-case string into every string field of a JSON body (and its messages and stop lists)."""
    body = case.body
    if not isinstance(body, dict) or "json" not in (case.media_type or ""):
        return
    for key, value in list(body.items()):
        if isinstance(value, str):
            body[key] = str(lora_root / edge) if key == "lora_path" and len(edge) < 400 else edge
        elif key == "stop" and isinstance(value, list):
            body[key] = [edge]
        elif key == "prompt" and isinstance(value, list):
            body[key] = [edge, "ok"]
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            message["content"] = edge if len(edge) % 2 else [{"type": "text", "text": edge},
                                                             {"type": "text", "text": len(edge)}]


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_operation_answers_a_server_error(operation, fuzz_server, fuzz_adapters):
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    # None: send the case as generated; else steer it at an adapter name ("base" is the base model).
    steering = st.sampled_from([None, *FUZZ_ADAPTERS, "base"])

    edges = st.one_of(st.none(), st.sampled_from(EDGE_STRINGS))

    @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, name=steering, path_kind=st.integers(0, 2), edge=edges)
    def run(case, name, path_kind, edge):
        if name is not None:
            steer(case, name, fuzz_server.lora_root, path_kind)
        if edge is not None:
            poison(case, edge, fuzz_server.lora_root)
        case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error], timeout=60)

    run()
    assert fuzz_server.proc.poll() is None, fuzz_server.log[-4000:]


@pytest.mark.parametrize("path", ["~no-such-user-here/adapter", "/tmp/a\x00b"], ids=["unknown user", "NUL byte"])
def test_unusable_lora_path_is_a_422(fuzz_server, path):
    """Found by the fuzzing: resolving these paths raised (500)."""
    for info in fuzz_server.client.get("/adapters").json()["adapters"]:  # the fuzzing may have filled --max-adapters
        if info["id"] not in FUZZ_ADAPTERS:
            fuzz_server.client.delete(f"/adapters/{info['id']}")
    body = {"lora_name": "unusable-path-probe", "lora_path": path}
    response = fuzz_server.client.post("/v1/load_lora_adapter", json=body)
    assert response.status_code == 422 and "not a usable path" in response.json()["error"]["message"]


def test_server_survived_the_fuzzing(fuzz_server):
    """Runs last in this module: the server still serves and logged no unhandled error."""
    assert fuzz_server.alive()
    log = fuzz_server.log
    assert "unhandled error" not in log, log[log.find("unhandled error") - 300:][:4000]
