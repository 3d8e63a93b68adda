"""One command for the whole benchmark: `.venv/bin/python -m bench.run [flags]`.

Builds (or reuses) the 58M Llama and 8 LoRA adapters, starts our server, uploads the adapters (timing
upload-to-ready), runs the single-adapter / mixed-adapter / base-model scenarios, deletes the adapters
(timing it), stops the server, then runs the same mixed load against a hand-written PEFT server. Prints a
Markdown report and writes it to `bench/results.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from .load import LoadResult, run_load
from .model import adapter_id, count_parameters, ensure_adapters, ensure_model
from .report import BenchReport, render
from .servers import naive_server, our_server

BENCH_DIR = Path(__file__).resolve().parent
ADAPTER_COUNT = 8
BASE_ID = "base"
# Scenario key (for --scenarios) -> table label.
LABELS = {
    "single": "ours, single adapter",
    "mixed": f"ours, mixed {ADAPTER_COUNT} adapters",
    "base": "ours, base model",
    "fused": "ours, single adapter fused (activate?fuse=true)",
    "naive": f"naive PEFT, mixed {ADAPTER_COUNT} adapters",
}
ADAPTER_OF: dict[str, Callable[[int], str]] = {
    "single": lambda client: adapter_id(0),
    "mixed": lambda client: adapter_id(client % ADAPTER_COUNT),
    "base": lambda client: BASE_ID,
    "fused": lambda client: adapter_id(0),
    "naive": lambda client: adapter_id(client % ADAPTER_COUNT),
}
WARMUP_CLIENTS = 2  # one warm-up request on adapter 0, one on adapter 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--scenarios", default=",".join(LABELS), help=f"comma list of {', '.join(LABELS)}")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive PEFT server")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-stream", action="store_true", help="never ask our server to stream")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit for each HTTP call")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := sorted(set(args.scenarios) - set(LABELS)):
        parser.error(f"unknown scenarios {unknown}; choose from {list(LABELS)}")
    if args.skip_naive and "naive" in args.scenarios:
        args.scenarios.remove("naive")
    return args


def _load(url: str, scenario: str, args: argparse.Namespace, clients: int, requests: int, stream: bool) -> LoadResult:
    return asyncio.run(run_load(url, ADAPTER_OF[scenario], clients, requests, args.max_new_tokens, stream,
                                args.timeout_s))


def _upload(client: httpx.Client, name: str, path: Path) -> float:
    """Upload one adapter; seconds from request start to the 201."""
    files = [("files", (f.name, f.read_bytes(), "application/octet-stream"))
             for f in (path / "adapter_config.json", path / "adapter_model.safetensors")]
    start = time.perf_counter()
    response = client.post("/adapters", files=files, data={"adapter_id": name})
    elapsed = time.perf_counter() - start
    if response.status_code != 201:
        raise RuntimeError(f"upload of {name} -> {response.status_code}: {response.text[:500]}")
    return elapsed


def _delete(client: httpx.Client, name: str) -> float:
    start = time.perf_counter()
    response = client.delete(f"/adapters/{name}")
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"delete of {name} -> {response.status_code}: {response.text[:500]}")
    return elapsed


def _run_ours(model_dir: Path, adapters: list[Path], args: argparse.Namespace, report: BenchReport) -> None:
    stream = not args.no_stream
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store, \
            our_server(model_dir, Path(store), args.device) as server, \
            httpx.Client(base_url=server.url, timeout=args.timeout_s) as client:
        print(f"ours: running at {server.url}", flush=True)
        report.header["server device (ours, /health)"] = client.get("/health").json().get("device", "?")
        report.upload_s = [_upload(client, adapter_id(i), path) for i, path in enumerate(adapters)]
        report.warmup_tokens["ours"] = [r.token_ids for r in _load(server.url, "mixed", args, WARMUP_CLIENTS, 1,
                                                                   stream).records]
        for scenario in ("single", "mixed", "base"):
            if scenario in args.scenarios:
                print(f"running: {LABELS[scenario]}", flush=True)
                report.scenarios[LABELS[scenario]] = _load(server.url, scenario, args, args.clients,
                                                           args.requests_per_client, stream)
        if "fused" in args.scenarios:
            fused = client.put(f"/adapters/{adapter_id(0)}/activate", params={"fuse": "true"})
            fused.raise_for_status()
            print(f"running: {LABELS['fused']}", flush=True)
            report.scenarios[LABELS["fused"]] = _load(server.url, "fused", args, args.clients,
                                                      args.requests_per_client, stream)
            client.delete("/adapters/active").raise_for_status()
        report.delete_s = [_delete(client, adapter_id(i)) for i in range(len(adapters))]


def _run_naive(model_dir: Path, adapters: list[Path], args: argparse.Namespace, report: BenchReport) -> None:
    named = {adapter_id(i): path for i, path in enumerate(adapters)}
    with naive_server(model_dir, named, args.device) as server:
        print(f"naive PEFT: running at {server.url}", flush=True)
        warmup = _load(server.url, "naive", args, WARMUP_CLIENTS, 1, stream=False)
        report.warmup_tokens["naive"] = [r.token_ids for r in warmup.records]
        print(f"running: {LABELS['naive']}", flush=True)
        report.scenarios[LABELS["naive"]] = _load(server.url, "naive", args, args.clients, args.requests_per_client,
                                                  stream=False)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    started = time.perf_counter()
    model_dir = ensure_model(args.cache_dir)
    params = count_parameters(model_dir)
    print(f"model: {model_dir} ({params:,} parameters)", flush=True)
    adapters = ensure_adapters(args.cache_dir, model_dir, ADAPTER_COUNT)
    print(f"adapters: {len(adapters)} x rank-16 LoRA on q/k/v/o in {adapters[0].parent}", flush=True)
    report = BenchReport(header={
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, {platform.platform()}",
        "torch": torch.__version__,
        "device": args.device,
        "model": f"Llama-shaped, {params:,} parameters (float32 on CPU, bfloat16 on CUDA)",
        "adapters": f"{ADAPTER_COUNT} x LoRA rank 16 on q_proj,k_proj,v_proj,o_proj",
        "load": f"{args.clients} clients x {args.requests_per_client} requests, closed loop, ~16-token prompts, "
                f"max_new_tokens={args.max_new_tokens}, temperature=0",
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    if {"single", "mixed", "base", "fused"} & set(args.scenarios):
        _run_ours(model_dir, adapters, args, report)
    if "naive" in args.scenarios:
        _run_naive(model_dir, adapters, args, report)
    report.header["benchmark wall time"] = f"{time.perf_counter() - started:.1f} s"
    text = render(report, LABELS["single"], LABELS["mixed"], LABELS["base"], LABELS["naive"], LABELS["fused"])
    args.results.write_text(text)
    print("\n" + text)
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
