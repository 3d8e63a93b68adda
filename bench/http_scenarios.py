"""The many-adapter HTTP scenarios of `bench.run` (issue 18), each on a server of its own, beside a run of the
base model on that same server (so every figure has its own reference under the same machine load):

- `zipf48`: 48 LoRAs (ranks 8/16/32/64 over q,v / q,k,v,o / all-linear: `bench.engine_bench.pool_shape`),
  each request's adapter drawn from Zipf(1.0), all 48 resident (`--max-resident-adapters 48`).
- `zipf48-resident8`: the same with `--max-resident-adapters 8`; TTFT split by whether the request's adapter
  was resident when it was sent (`bench.load`'s residency probe: `GET /adapters/{id}` before and after).
- `shared-prefix`: 8 adapters (and the base model), each with its own 512-token system prompt shared by all of
  its requests, on a server with the prefix cache off (`--prefix-cache-mb 0`) and one with it on. Each
  prefix is sent once before the timed load (the steady state of a chat service: the system prompt was seen
  before). Servers without the flag get one run, reported as not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from .engine_bench import zipf_picker
from .load import PROMPTS, LoadResult, in_rounds, run_load
from .report import BenchReport
from .servers import our_server, serve_supports

BASE_ID = "base"
SCENARIOS = ("zipf48", "zipf48-resident8", "shared-prefix")
PREFIX_FLAG = "--prefix-cache-mb"
SYSTEM_PROMPT_TOKENS = 512  # with <s>: the byte-level tokenizer makes one token per ASCII character
PREFIX_ADAPTERS = 8
ZIPF_S = 1.0
POOL_SIZE = 48


def zipf_label(limit: int | None) -> str:
    return ("ours, 48 adapters Zipf(1.0), all resident" if limit is None
            else f"ours, 48 adapters Zipf(1.0), --max-resident-adapters {limit}")


def beside(label: str) -> str:
    """The label of the base-model run made on the same server as `label`'s scenario."""
    return f"ours, base model (beside: {label.removeprefix('ours, ')})"


def prefix_label(cache_on: bool, adapters: bool) -> str:
    who = f"{PREFIX_ADAPTERS} adapters" if adapters else "base model"
    return f"ours, shared 512-token prefix, {who}, prefix cache {'on' if cache_on else 'off'}"


def upload(client: httpx.Client, name: str, path: Path) -> float:
    """Upload one adapter; seconds from request start to the 201."""
    files = [("files", (f.name, f.read_bytes(), "application/octet-stream"))
             for f in (path / "adapter_config.json", path / "adapter_model.safetensors")]
    start = time.perf_counter()
    response = client.post("/adapters", files=files, data={"adapter_id": name})
    elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise RuntimeError(f"upload of {name} -> {response.status_code}: {response.text[:500]}")
    return elapsed


@contextmanager
def serving(model_dir: Path, args: argparse.Namespace, extra_args: list[str]) -> Iterator[tuple[str, httpx.Client]]:
    """Our server on a fresh store with `extra_args`; yields (URL, a client for admin calls)."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store, \
            our_server(model_dir, Path(store), args.device, args.dtype, extra_args) as server, \
            httpx.Client(base_url=server.url, timeout=args.timeout_s) as client:
        print(f"ours ({' '.join(extra_args) or 'defaults'}): running at {server.url}", flush=True)
        yield server.url, client


def _load(url: str, args: argparse.Namespace, adapter_of: Callable[[int], str], **kwargs) -> LoadResult:
    return asyncio.run(run_load(url, adapter_of, args.clients, args.requests_per_client, args.max_new_tokens,
                                not args.no_stream, args.timeout_s, **kwargs))


def run_zipf(model_dir: Path, pool: list[tuple[str, Path]], args: argparse.Namespace,
             limit: int | None, probe: bool | None = None, rounds: int = 1) -> tuple[LoadResult, LoadResult]:
    """(base, Zipf over `pool`) on one server holding at most `limit` adapters resident (None: all of them),
    `rounds` times in turn, each side pooled over its rounds. `probe`: split TTFT by residency (two extra GETs per
    request); default: when there is a limit."""
    extra = ["--max-resident-adapters", str(limit or len(pool))]
    with serving(model_dir, args, extra) as (url, client):
        for name, path in pool:
            upload(client, name, path)
        ids = [name for name, _ in pool]
        asyncio.run(run_load(url, lambda i: ids[i], 2, 1, 4, False, args.timeout_s))  # warm-up, 2 adapters
        pick = zipf_picker(ids, ZIPF_S, seed=0)
        probe_residency = limit is not None if probe is None else probe
        label = zipf_label(limit)
        pooled = in_rounds({beside(label): lambda: _load(url, args, lambda _: BASE_ID),
                            label: lambda: _load(url, args, lambda _: pick(), probe_residency=probe_residency)},
                           rounds)
    return pooled[beside(label)], pooled[label]


def system_prompt(adapter: str) -> str:
    """`adapter`'s own system prompt: SYSTEM_PROMPT_TOKENS - 1 ASCII characters (plus <s>), deterministic."""
    words = ("serve", "adapter", "token", "batch", "cache", "prefix", "model", "answer", "user", "kindly")
    text, k = f"System: you are the assistant of {adapter}.", 0
    while len(text) < SYSTEM_PROMPT_TOKENS - 1:
        text += " " + words[(k * 7 + len(adapter)) % len(words)]
        k += 1
    return text[: SYSTEM_PROMPT_TOKENS - 1]


def chat_prompt(adapter: str, index: int, turn: int) -> str:
    return f"{system_prompt(adapter)}\nUser: {PROMPTS[(index + turn) % len(PROMPTS)]}\nAssistant:"


def run_shared_prefix(model_dir: Path, adapters: list[tuple[str, Path]], args: argparse.Namespace,
                      report: BenchReport) -> None:
    """Shared-prefix load on the base model and on 8 adapters, prefix cache off then on (when supported)."""
    supported = serve_supports(PREFIX_FLAG)
    report.header["shared-prefix prompts"] = (f"'System: ...' of {SYSTEM_PROMPT_TOKENS} tokens (with <s>), one per "
                                              "adapter, + '\\nUser: <one of the 16-token prompts>\\nAssistant:'")
    report.notes.append(f"`{PREFIX_FLAG}`: " + ("supported by this checkout's server" if supported else
                        "**not supported by this checkout's server: the prefix cache was not measured** (only "
                        "the run without it)"))
    names = [name for name, _ in adapters[:PREFIX_ADAPTERS]]
    seen = [BASE_ID, *names]
    for cache_on in ((False, True) if supported else (False,)):
        extra = [PREFIX_FLAG, str(args.prefix_cache_mb if cache_on else 0)] if supported else []
        with serving(model_dir, args, extra) as (url, client):
            for name, path in adapters[:PREFIX_ADAPTERS]:
                upload(client, name, path)
            # Each prefix once, untimed: afterwards every timed request's system prompt has been seen before.
            asyncio.run(run_load(url, lambda i: seen[i], len(seen), 1, 1, False, args.timeout_s,
                                 prompt_of=chat_prompt))
            for with_adapters in (False, True):
                label = prefix_label(cache_on, with_adapters)
                print(f"running: {label}", flush=True)
                report.scenarios[label] = _load(
                    url, args, (lambda i: names[i % len(names)]) if with_adapters else (lambda _: BASE_ID),
                    prompt_of=chat_prompt)


def ratio_lines(report: BenchReport) -> list[str]:
    """The issue-18 ratios of whichever of these scenarios ran."""
    s = report.scenarios
    lines = []
    for limit in (None, 8):
        label = zipf_label(limit)
        if label in s and beside(label) in s:
            lines.append(f"- {label.removeprefix('ours, ')} / base model (same server): "
                         f"**{s[label].tokens_per_s / s[beside(label)].tokens_per_s:.3f}** throughput")
    label = zipf_label(8)
    if label in s:
        result = s[label]
        cold = [r for r in result.records if r.cold]
        warm = [r for r in result.records if r.cold is False]
        cold_over_warm = _div(result.ttft(99, cold=True), result.ttft(99, cold=False))
        lines.append(f"- --max-resident-adapters 8, TTFT of requests whose adapter was **not resident** when sent "
                     f"(n={len(cold)}): p99 {_s(result.ttft(99, cold=True))}, p50 {_s(result.ttft(50, cold=True))}; "
                     f"resident (n={len(warm)}): p99 {_s(result.ttft(99, cold=False))}, p50 "
                     f"{_s(result.ttft(50, cold=False))}; p99 not resident / resident: **{cold_over_warm}**")
    for with_adapters in (True, False):
        off, on = s.get(prefix_label(False, with_adapters)), s.get(prefix_label(True, with_adapters))
        who = f"{PREFIX_ADAPTERS} adapters" if with_adapters else "base model"
        if off is not None and on is not None:
            lines.append(f"- shared 512-token prefix, {who}: TTFT with the prefix cache / without: p50 "
                         f"**{_div(on.ttft(50), off.ttft(50))}**, p99 **{_div(on.ttft(99), off.ttft(99))}** "
                         f"(throughput {_div(on.tokens_per_s, off.tokens_per_s)})")
        elif off is not None:
            lines.append(f"- shared 512-token prefix, {who}: prefix cache **not measured** (no `{PREFIX_FLAG}`); "
                         f"without it: p50 TTFT {_s(off.ttft(50))}, p99 {_s(off.ttft(99))}")
    for cache_on in (False, True):
        with_adapters, base = s.get(prefix_label(cache_on, True)), s.get(prefix_label(cache_on, False))
        if with_adapters is not None and base is not None:
            state = "on" if cache_on else "off"
            lines.append(f"- shared prefix, {PREFIX_ADAPTERS} adapters / base model (cache {state}): "
                         f"**{with_adapters.tokens_per_s / base.tokens_per_s:.3f}** throughput")
    return lines


def _s(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f} s"


def _div(a: float, b: float) -> str:
    return "n/a" if a != a or b != b or b == 0 else f"{a / b:.2f}"
