"""What an operator sees: JSON log lines only, access lines with client/adapter/status/tokens/duration, the
metrics /metrics promises (moving as requests run), and per-adapter usage on GET /adapters/{id}.

One server (JSON logs, one resident slot so adapters are evicted and loaded again) runs one session of
uploads, generations (plain, streamed, OpenAI with two prompts) and errors; the tests then read what it
logged, what it counts and what it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import upload
from .server import ServerProcess
from .test_ecosystem import _metric

NEW = 5  # tokens per generation (ignore_eos: exactly this many)


@dataclass
class Session:
    lines: list[str]
    metrics_before: str
    metrics_after: str
    usage: dict[str, dict]
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per adapter, from the responses' usage
    request_ids: dict[str, str] = field(default_factory=dict)  # what -> X-Request-ID sent


def _gen(c, adapter: str, request_id: str, stream: bool = False):
    body = {"prompt": f"Hello {request_id}", "adapter_id": adapter, "max_new_tokens": NEW, "ignore_eos": True,
            "stream": stream}
    return c.post("/generate", json=body, headers={"X-Request-ID": request_id})


@pytest.fixture(scope="module")
def session(model_dir, adapters, tmp_path_factory) -> Session:
    server = ServerProcess(model_dir, tmp_path_factory.mktemp("observed") / "store", "--log-json",
                           "--max-resident-adapters", "1")
    c = server.client
    try:
        assert upload(c, adapters["alpha"], "alpha").status_code == 201
        assert upload(c, adapters["beta"], "beta").status_code == 201  # evicts alpha (one slot)
        before = c.get("/metrics").text
        prompt = {"alpha": 0, "beta": 0}
        for i in range(3):  # the first loads alpha again, evicting beta
            r = _gen(c, "alpha", f"plain-{i}")
            assert r.status_code == 200, r.text
            prompt["alpha"] += r.json()["usage"]["prompt_tokens"]
        r = _gen(c, "alpha", "streamed", stream=True)
        assert r.status_code == 200 and '"finish_reason"' in r.text
        final = json.loads([line for line in r.text.splitlines() if "finish_reason" in line][-1][len("data: "):])
        prompt["alpha"] += final["usage"]["prompt_tokens"]
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": ["one", "two"], "max_tokens": NEW,
                                            "ignore_eos": True}, headers={"X-Request-ID": "openai"})
        assert r.status_code == 200, r.text
        prompt["alpha"] += r.json()["usage"]["prompt_tokens"]
        r = _gen(c, "beta", "beta-0")  # loads beta, evicting alpha
        assert r.status_code == 200
        prompt["beta"] += r.json()["usage"]["prompt_tokens"]
        assert _gen(c, "nope", "unknown").status_code == 404
        assert c.post("/generate", json={"prompt": 3}, headers={"X-Request-ID": "invalid"}).status_code == 422
        bad = c.post("/adapters", files=[("files", ("adapter_config.json", b"{not json"))])
        assert 400 <= bad.status_code < 500
        assert c.get("/health").status_code == 200
        after = c.get("/metrics").text
        usage = {a: c.get(f"/adapters/{a}").json()["usage"] for a in ("alpha", "beta")}
    finally:
        server.stop()  # every line it wrote is read once it has exited
        server._drain.join(timeout=30)
    return Session(server.lines, before, after, usage, prompt)


def _records(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_every_line_is_json(session) -> None:
    bad = [line for line in session.lines if not line.startswith("{")]
    assert not bad, f"{len(bad)} non-JSON line(s), e.g. {bad[:3]}"
    records = _records(session.lines)
    assert all(isinstance(r, dict) and {"ts", "level", "logger", "message"} <= r.keys() for r in records)
    leaked = [r for r in records if "color_message" in r or "\x1b" in json.dumps(r, ensure_ascii=False)]
    assert not leaked, leaked[:3]


def test_access_lines_carry_client_adapter_status_tokens_duration(session) -> None:
    access = {r["request_id"]: r for r in _records(session.lines) if r["logger"] == "service.access"}
    plain = access["plain-0"]
    assert plain["client"].startswith("127.0.0.1:") and plain["adapter"] == "alpha" and plain["status"] == 200
    assert plain["tokens_out"] == NEW and plain["tokens_in"] > 0 and plain["duration_ms"] > 0
    assert plain["path"] == "/generate" and plain["method"] == "POST"
    streamed = access["streamed"]  # written when the stream ended: its tokens are all there
    assert streamed["status"] == 200 and streamed["tokens_out"] == NEW and streamed["tokens_in"] > 0
    assert access["openai"]["tokens_out"] == 2 * NEW and access["openai"]["adapter"] == "alpha"
    assert access["unknown"]["status"] == 404 and access["unknown"]["adapter"] == "nope"
    assert access["invalid"]["status"] == 422 and access["invalid"]["tokens_in"] is None
    for line in (plain, streamed, access["unknown"]):
        assert line["level"] == "info"
    quiet = [r for r in _records(session.lines) if r["logger"] == "service.access"
             and r["path"] in ("/health", "/metrics")]
    assert not quiet, "probes and scrapes log at debug, not info"


def test_metrics_present_and_moving(session) -> None:
    before, after = session.metrics_before, session.metrics_after
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"):
        assert _metric(after, name) > 0
    assert _metric(after, "adapter_service_prompt_tokens_total", adapter="alpha") == session.prompt_tokens["alpha"]
    assert _metric(after, "adapter_service_prompt_tokens_total", adapter="beta") == session.prompt_tokens["beta"]
    assert _metric(after, "adapter_service_generated_tokens_total", adapter="alpha") == 6 * NEW
    assert _metric(after, "adapter_service_generation_duration_seconds_count", adapter="alpha") == 6
    assert _metric(after, "adapter_service_time_per_output_token_seconds_count", adapter="alpha") == 6
    assert _metric(after, "adapter_service_time_per_output_token_seconds_sum", adapter="alpha") > 0
    assert _metric(after, "adapter_service_generation_duration_seconds_count", adapter="beta") == 1
    # alpha: upload, reload; beta: upload, reload. Evictions: alpha twice, beta once.
    assert _metric(before, "adapter_service_adapter_loads_total") == 2
    assert _metric(after, "adapter_service_adapter_loads_total") == 4
    assert _metric(before, "adapter_service_adapter_evictions_total") == 1
    assert _metric(after, "adapter_service_adapter_evictions_total") == 3
    assert _metric(after, "adapter_service_adapters", state="registered") == 2
    assert _metric(after, "adapter_service_adapters", state="resident") == 1
    assert _metric(before, "process_cpu_seconds_total") < _metric(after, "process_cpu_seconds_total")


def test_usage_per_adapter(session) -> None:
    alpha, beta = session.usage["alpha"], session.usage["beta"]
    assert alpha["requests"] == 6 and alpha["completion_tokens"] == 6 * NEW
    assert alpha["prompt_tokens"] == session.prompt_tokens["alpha"]
    assert (alpha["loads"], alpha["evictions"]) == (2, 2)
    assert beta["requests"] == 1 and beta["completion_tokens"] == NEW and (beta["loads"], beta["evictions"]) == (2, 1)
    assert alpha["last_used"] < beta["last_used"]  # ISO 8601 UTC: ordered as text


def test_warnings_and_progress_bars_become_json_lines(tmp_path: Path) -> None:
    """What the server process does not show in a short session: a Python warning, a tqdm bar, and a line of
    transformers' own logger, each after `configure_logging(json_lines=True)`."""
    code = (
        "from service.logging_setup import configure_logging\n"
        "configure_logging('info', True)\n"
        "import warnings, tqdm\n"
        "from huggingface_hub.utils import tqdm as hub_tqdm\n"
        "from transformers.utils import logging as hf_logging\n"
        "warnings.warn('careful now')\n"
        "for bar in (tqdm.tqdm, hub_tqdm, hf_logging.tqdm):  # any tqdm; downloads; checkpoint loading\n"
        "    list(bar(range(3), desc='bar'))\n"
        "hf_logging.get_logger('transformers.modeling_utils').warning('from transformers')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # a bar or a bare warning would not parse
    messages = {r["logger"]: r["message"] for r in records}
    assert "careful now" in messages["py.warnings"]
    assert messages["transformers.modeling_utils"] == "from transformers"
