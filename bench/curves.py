"""Scaling curves (issue 18, goal 5): `python -m bench.curves [flags]`.

Throughput as the load grows along one axis at a time, each point divided by the base model's throughput
measured in the same run (so the curves hold up on a shared, noisy machine):
- distinct adapters in the batch (1, 8, 32, 128): in process, `rows` rows (default 128, so 128 adapters do
  fit in one batch) over N rank-8 q,v LoRAs, row i on adapter i mod N;
- rank (8 to 128): in process, 16 rows over 8 LoRAs of that rank on q,k,v,o;
- resident limit (4, 8, 16, 48): over HTTP, because the server's residency (LRU eviction, on-demand loads) is
  what is measured: `bench.run`'s zipf48 load on a server started with `--max-resident-adapters L`.
In process means the continuous batcher driven directly, as `bench/engine_bench.py` (whose helpers this
reuses); on CPU with one torch thread the figure is tokens per CPU second of this process, on CUDA tokens per
wall second. Over HTTP it is tokens per wall second. Writes a PNG (default `bench/scaling.png`) and the
`bench.curves` section of `bench/results.md`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.devtools.demo_model import build_demo_tokenizer
from service.engine.scheduler import ContinuousBatcher
from service.runtime import AdapterRuntime

from .engine_bench import PROMPT_IDS, TARGET_SETS, closed_loop, ensure_pool, load_runtime
from .report import write_section

BENCH_DIR = Path(__file__).resolve().parent
QV = ("q_proj", "v_proj")
QKVO = TARGET_SETS[1]


@dataclass
class CurveConfig:
    """What the curves measure; the defaults are the full CPU run (bench/gpu.sh passes its own)."""

    distinct: Sequence[int] = (1, 8, 32, 128)
    ranks: Sequence[int] = (8, 16, 32, 64, 128)
    limits: Sequence[int] = (4, 8, 16, 48)  # empty: no HTTP curve
    rows: int = 128  # batch of the distinct-adapters curve (one request per row)
    rank_rows: int = 16  # batch of the rank curve
    rank_adapters: int = 8
    rank_requests: int = 32
    max_new_tokens: int = 32
    repeats: int = 1  # interleaved; the median is kept


@dataclass
class Curve:
    """One axis: x values, throughput at each, and the base model's throughput of the same run."""

    title: str
    x_label: str
    unit: str
    x: list[int] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    base_tps: list[float] = field(default_factory=list)  # one base figure per point (HTTP: per server)

    def ratios(self) -> list[float]:
        return [t / b for t, b in zip(self.tps, self.base_tps, strict=True)]


def _measure(batcher_of: Callable[[], ContinuousBatcher], pick: Callable[[], str | None], clients: int,
             requests: int, max_new_tokens: int, device: str) -> float:
    run = closed_loop(batcher_of(), pick, clients, requests, max_new_tokens)
    return run.tokens_per_cpu_s if device == "cpu" else run.tokens_per_s


def _in_process_curve(curve: Curve, model, runtime: AdapterRuntime, points: dict[int, list[str]], clients: int,
                      requests: int, config: CurveConfig, device: str) -> Curve:
    """For each x: rows cycle over `points[x]`'s adapters; the base model runs before each repeat's points."""
    tokenizer = build_demo_tokenizer()

    def batcher() -> ContinuousBatcher:
        return ContinuousBatcher(model, tokenizer, runtime, clients, clients * len(PROMPT_IDS))

    def run(ids: list[str] | None) -> float:
        cycle = itertools.cycle(ids or [None])
        return _measure(batcher, lambda: next(cycle), clients, requests, config.max_new_tokens, device)

    run(None)  # warm-up (allocator, kernels)
    base: list[float] = []
    per_x: dict[int, list[float]] = {x: [] for x in points}
    for _ in range(config.repeats):
        base.append(run(None))
        for x, ids in points.items():
            per_x[x].append(run(ids))
    base_tps = statistics.median(base)
    for x in points:
        curve.x.append(x)
        curve.tps.append(statistics.median(per_x[x]))
        curve.base_tps.append(base_tps)
    return curve


def distinct_curve(cache_dir: Path, model_dir: Path, config: CurveConfig, device: str, dtype: torch.dtype) -> Curve:
    pool = ensure_pool(cache_dir, model_dir, max(config.distinct), shape=lambda i: (8, QV), tag="r8qv")
    model, runtime = load_runtime(model_dir, device, dtype)
    for name, path in pool:
        runtime.load(name, path)
    names = [name for name, _ in pool]
    curve = Curve(f"distinct adapters in a batch of {config.rows} rows (rank 8, q,v)", "distinct adapters",
                  _unit(device))
    points = {n: names[:n] for n in config.distinct}
    return _in_process_curve(curve, model, runtime, points, config.rows, config.rows, config, device)


def rank_curve(cache_dir: Path, model_dir: Path, config: CurveConfig, device: str, dtype: torch.dtype) -> Curve:
    model, runtime = load_runtime(model_dir, device, dtype)
    points: dict[int, list[str]] = {}
    for rank in config.ranks:
        pool = ensure_pool(cache_dir, model_dir, config.rank_adapters, shape=lambda i, r=rank: (r, QKVO),
                           tag=f"rank{rank}")
        for name, path in pool:
            runtime.load(name, path)
        points[rank] = [name for name, _ in pool]
    curve = Curve(f"rank, {config.rank_rows} rows over {config.rank_adapters} adapters (q,k,v,o)", "LoRA rank",
                  _unit(device))
    return _in_process_curve(curve, model, runtime, points, config.rank_rows, config.rank_requests, config, device)


def resident_curve(model_dir: Path, config: CurveConfig, args: argparse.Namespace) -> Curve:
    from . import http_scenarios
    from .http_scenarios import POOL_SIZE

    pool = ensure_pool(args.cache_dir, model_dir, POOL_SIZE)
    curve = Curve(f"resident limit, {POOL_SIZE} adapters, Zipf(1.0), HTTP", "--max-resident-adapters",
                  "tokens/s (wall, HTTP)")
    for limit in config.limits:
        base, zipf = http_scenarios.run_zipf(model_dir, pool, args, limit, probe=False)
        curve.x.append(limit)
        curve.tps.append(zipf.tokens_per_s)
        curve.base_tps.append(base.tokens_per_s)
    return curve


def _unit(device: str) -> str:
    return "tokens per CPU s (1 thread)" if device == "cpu" else "tokens/s (wall)"


def plot(curves: list[Curve], path: Path, title: str) -> None:
    """One panel per curve: throughput relative to the base model of the same run (1.0 = base)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        ax.plot(curve.x, curve.ratios(), marker="o", label="with adapters")
        ax.axhline(1.0, color="grey", linestyle="--", label="base model (same run)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(curve.x, [str(x) for x in curve.x])
        ax.set_ylim(0, max(1.1, max(curve.ratios(), default=1) * 1.1))
        ax.set_xlabel(curve.x_label)
        ax.set_ylabel("throughput / base model")
        ax.set_title(curve.title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(curves: list[Curve], header: dict[str, str], png_name: str) -> str:
    lines = ["## Scaling curves (`python -m bench.curves`, written by it)", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", f"![throughput relative to the base model, three axes]({png_name})", ""]
    for curve in curves:
        lines += [f"Throughput vs {curve.title}:", "",
                  f"| {curve.x_label} | {curve.unit} | base model, same run | ratio |", "|---:|---:|---:|---:|"]
        lines += [f"| {x} | {t:.1f} | {b:.1f} | **{t / b:.3f}** |"
                  for x, t, b in zip(curve.x, curve.tps, curve.base_tps, strict=True)]
        lines.append("")
    return "\n".join(lines)


def run_curves(model_dir: Path, config: CurveConfig, args: argparse.Namespace) -> list[Curve]:
    dtype = _torch_dtype(args.dtype, args.device)
    curves = []
    if config.distinct:
        print("curve: distinct adapters", flush=True)
        curves.append(distinct_curve(args.cache_dir, model_dir, config, args.device, dtype))
    if config.ranks:
        print("curve: rank", flush=True)
        curves.append(rank_curve(args.cache_dir, model_dir, config, args.device, dtype))
    if config.limits:
        print("curve: resident limit (HTTP)", flush=True)
        curves.append(resident_curve(model_dir, config, args))
    return curves


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = CurveConfig()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--distinct", type=_ints, default=list(default.distinct), help="comma list; empty: skip")
    parser.add_argument("--ranks", type=_ints, default=list(default.ranks), help="comma list; empty: skip")
    parser.add_argument("--limits", type=_ints, default=list(default.limits), help="comma list; empty: skip")
    parser.add_argument("--rows", type=int, default=default.rows)
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=default.repeats)
    parser.add_argument("--clients", type=int, default=16, help="HTTP curve: concurrent clients")
    parser.add_argument("--requests-per-client", type=int, default=2, help="HTTP curve")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a saved model to use instead of the 58M benchmark model (e.g. a tiny one)")
    parser.add_argument("--png", type=Path, default=BENCH_DIR / "scaling.png")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results.md")
    args = parser.parse_args(argv)
    args.no_stream = False  # the HTTP curve goes through bench.http_scenarios, which reads these
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # CPU seconds of one thread: steady on a shared machine (as engine_bench)
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    if args.model_dir is None:
        from .model import ensure_model
        args.model_dir = ensure_model(args.cache_dir)
    else:  # adapters are cached by name only: keep another model's apart from the benchmark model's
        args.cache_dir = args.cache_dir / f"for-{args.model_dir.resolve().name}"
    config = CurveConfig(distinct=args.distinct, ranks=args.ranks, limits=args.limits, rows=args.rows,
                         max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    curves = run_curves(args.model_dir, config, args)
    load_after = os.getloadavg()
    header = {
        "date": started.isoformat(timespec="seconds"),
        "device / dtype": f"{args.device} / {args.dtype}",
        "torch": torch.__version__,
        "machine": f"{os.cpu_count()} CPU cores; load average {load_before[0]:.1f} at start, "
                   f"{load_after[0]:.1f} at end (1 min)",
        "load": f"in process: 16-token prompts, {config.max_new_tokens} new tokens, greedy, ignore EOS, "
                f"median of {config.repeats} interleaved repeat(s); HTTP: {args.clients} clients x "
                f"{args.requests_per_client} requests",
        "command": "python -m bench.curves " + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall time": f"{(datetime.datetime.now().astimezone() - started).total_seconds():.0f} s",
    }
    plot(curves, args.png, f"throughput / base model, {args.device}, {_torch_dtype(args.dtype, args.device)}")
    text = render(curves, header, os.path.relpath(args.png, args.results.parent))
    write_section(args.results, "bench.curves", text)
    print(text)
    print(f"written to {args.results} and {args.png}")


if __name__ == "__main__":
    main()
