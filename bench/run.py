"""One command for the whole benchmark: `.venv/bin/python -m bench.run [flags]`.

Builds (or reuses) the 58M Llama and 8 LoRA adapters, starts our server, uploads the adapters (timing
upload-to-ready), runs the single-adapter / mixed-adapter / base-model scenarios, deletes the adapters
(timing it), stops the server, then runs the many-adapter scenarios of `bench/http_scenarios.py` (48 adapters
under Zipf(1.0), all resident and with 8 resident; a shared 512-token prefix with the prefix cache off and on),
each on its own server beside a base-model run, then the same mixed load against a hand-written PEFT server.
Prints a Markdown report and writes it into `bench/results.md` (between its `bench.run` markers; the
hand-written sections stay).
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
from functools import partial
from pathlib import Path

import httpx
import torch

from . import http_scenarios
from .engine_bench import ensure_pool
from .http_scenarios import upload
from .load import LoadResult, in_rounds, run_load
from .model import adapter_id, count_parameters, ensure_adapters, ensure_model
from .report import BenchReport, render, write_section
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
SCENARIOS = (*LABELS, *http_scenarios.SCENARIOS)
WARMUP_CLIENTS = 2  # one warm-up request on adapter 0, one on adapter 1
POOL_SIZE = http_scenarios.POOL_SIZE


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each comparison (single/mixed/base; base beside each Zipf load), in turn, pooled")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive PEFT server")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype of both servers (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--prefix-cache-mb", type=int, default=256,
                        help="our server's prefix cache size in the shared-prefix scenario's cache-on run")
    parser.add_argument("--no-stream", action="store_true", help="never ask our server to stream")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit for each HTTP call")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := sorted(set(args.scenarios) - set(SCENARIOS)):
        parser.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.skip_naive and "naive" in args.scenarios:
        args.scenarios.remove("naive")
    return args


def _load(url: str, scenario: str, args: argparse.Namespace, clients: int, requests: int, stream: bool) -> LoadResult:
    return asyncio.run(run_load(url, ADAPTER_OF[scenario], clients, requests, args.max_new_tokens, stream,
                                args.timeout_s))


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
            our_server(model_dir, Path(store), args.device, args.dtype) as server, \
            httpx.Client(base_url=server.url, timeout=args.timeout_s) as client:
        print(f"ours: running at {server.url}", flush=True)
        report.header["server device (ours, /health)"] = client.get("/health").json().get("device", "?")
        report.upload_s = [upload(client, adapter_id(i), path) for i, path in enumerate(adapters)]
        report.warmup_tokens["ours"] = [r.token_ids for r in _load(server.url, "mixed", args, WARMUP_CLIENTS, 1,
                                                                   stream).records]
        # In rounds: one run of 32 requests takes seconds, and the shared machine's load drifts by 10% over that
        # time, more than the differences measured.
        loads = {LABELS[scenario]: partial(_load, server.url, scenario, args, args.clients, args.requests_per_client,
                                           stream)
                 for scenario in ("single", "mixed", "base") if scenario in args.scenarios}
        report.scenarios.update(in_rounds(loads, args.rounds))
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
    with naive_server(model_dir, named, args.device, args.dtype) as server:
        print(f"naive PEFT: running at {server.url}", flush=True)
        warmup = _load(server.url, "naive", args, WARMUP_CLIENTS, 1, stream=False)
        report.warmup_tokens["naive"] = [r.token_ids for r in warmup.records]
        print(f"running: {LABELS['naive']}", flush=True)
        report.scenarios[LABELS["naive"]] = _load(server.url, "naive", args, args.clients, args.requests_per_client,
                                                  stream=False)


def _run_many_adapters(model_dir: Path, args: argparse.Namespace, report: BenchReport) -> None:
    """The issue-18 scenarios; each server run adds its base-model run beside its own scenario."""
    wanted = [(key, limit) for key, limit in (("zipf48", None), ("zipf48-resident8", 8)) if key in args.scenarios]
    if wanted:
        pool = ensure_pool(args.cache_dir, model_dir, POOL_SIZE)
        for _, limit in wanted:
            label = http_scenarios.zipf_label(limit)
            report.scenarios[http_scenarios.beside(label)], report.scenarios[label] = http_scenarios.run_zipf(
                model_dir, pool, args, limit, rounds=args.rounds)
    if "shared-prefix" in args.scenarios:
        adapters = ensure_adapters(args.cache_dir, model_dir, ADAPTER_COUNT)
        http_scenarios.run_shared_prefix(model_dir, [(adapter_id(i), p) for i, p in enumerate(adapters)], args,
                                         report)
    report.extra_ratios = http_scenarios.ratio_lines(report)


def _load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


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
        "model": f"Llama-shaped, {params:,} parameters, dtype {args.dtype} (auto: float32 on CPU, bfloat16 on CUDA)",
        "adapters": f"{ADAPTER_COUNT} x LoRA rank 16 on q_proj,k_proj,v_proj,o_proj; zipf48 / zipf48-resident8: "
                    f"{POOL_SIZE} LoRAs, ranks 8/16/32/64 x (q,v / q,k,v,o / all-linear)",
        "machine load (uptime, at start)": _load_average(),
        "load": f"{args.clients} clients x {args.requests_per_client} requests, closed loop, ~16-token prompts, "
                f"max_new_tokens={args.max_new_tokens}, temperature=0; single / mixed / base, and each Zipf load "
                f"with its base run, {args.rounds} rounds in turn, each row pooled over its rounds (fused, shared "
                f"prefix and naive: one round)",
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    if {"single", "mixed", "base", "fused"} & set(args.scenarios):
        _run_ours(model_dir, adapters, args, report)
    _run_many_adapters(model_dir, args, report)
    if "naive" in args.scenarios:
        _run_naive(model_dir, adapters, args, report)
    report.header["machine load (uptime, at end)"] = _load_average()
    report.header["benchmark wall time"] = f"{time.perf_counter() - started:.1f} s"
    text = render(report, LABELS["single"], LABELS["mixed"], LABELS["base"], LABELS["naive"], LABELS["fused"])
    write_section(args.results, "bench.run", text)
    print("\n" + text)
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
