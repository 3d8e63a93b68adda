"""In-process residency benchmark: many adapters under a resident limit, through the service's own admission.

`python -m bench.residency_bench` runs the local service (`LocalAdapterService`: registry, residency, lifecycle,
admission, engine thread; no HTTP) on the 58M benchmark Llama with 48 LoRA adapters (ranks 8/16/32/64 over the
target sets q,v / q,k,v,o / all-linear, as `bench.engine_bench`) and `--max-resident-adapters 8`. `clients`
asyncio clients each send one request at a time (closed loop); each request's adapter is drawn by Zipf(1.0).

It reports, each against the base model run in the same process and interleaved (the machine is shared):
- throughput: tokens per wall second and per CPU second of the process (every thread: engine, loads, event loop);
- time to first token, p50 and p99, of requests whose adapter was resident when they were sent vs those that
  had to load it first (the issue's bound: the non-resident p99 within 2x the resident p99).
Figures are medians over the repeats (the p99s: of each repeat's p99).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.app.interface import GenerationInput
from service.app.local import LocalAdapterService
from service.engine.requests import SamplingParams
from service.engine.sequence import TokenEvent
from service.settings import Settings

from .engine_bench import PROMPT_IDS, ensure_pool, zipf_picker
from .model import ensure_model


@dataclass
class Scenario:
    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    ttft_resident: list[float] = field(default_factory=list)  # seconds, requests whose adapter was resident
    ttft_loaded: list[float] = field(default_factory=list)  # requests that had to load their adapter

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_s


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(service: LocalAdapterService, pick: Callable[[], str], clients: int, requests: int,
                      max_new_tokens: int) -> Scenario:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    out = Scenario()
    left = requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            adapter = pick()
            record = service.registry.records.get(adapter)
            # Resident: so when sent and not loaded since (it may be evicted while the request is tokenized).
            loads = record.usage.loads if record is not None and record.loaded is not None else None
            start = time.perf_counter()
            generation = await service.generate(GenerationInput(params, adapter, prompt_ids=list(PROMPT_IDS)))
            first = None
            async for event in generation.events:
                if isinstance(event, TokenEvent):
                    out.tokens += 1
                    if first is None:
                        first = time.perf_counter() - start
                        resident = record is None or loads == record.usage.loads
                        (out.ttft_resident if resident else out.ttft_loaded).append(first)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    out.wall_s, out.cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return out


async def run(cache_dir: Path, repeats: int, requests: int, clients: int, max_new_tokens: int, resident: int,
              pinned: int = 0, quantum_s: float | None = None) -> dict[str, list[Scenario]]:
    model_dir = ensure_model(cache_dir)
    pool = ensure_pool(cache_dir, model_dir, 48)
    with tempfile.TemporaryDirectory() as store:
        settings = Settings(model=str(model_dir), store=Path(store), device="cpu", dtype="float32",
                            max_resident_adapters=resident, max_batch_size=clients,
                            **({} if quantum_s is None else {"preempt_adapters": True,
                                                             "preemption_quantum_s": quantum_s}))
        service = LocalAdapterService.from_settings(settings)
        service.start()
        try:
            for name, path in pool:
                await service._create(name, lambda path=path: service.store.stage_directory(path))
            ids = [name for name, _ in pool]
            for name in ids[:pinned]:  # Zipf ranks the ids in order: the first are the most popular
                await service.pin(name)
            scenarios: dict[str, Callable[[], str]] = {
                "base model": lambda: "base",
                f"48 adapters, Zipf(1.0), {resident} resident": zipf_picker(ids, 1.0, 0),
            }
            await closed_loop(service, scenarios["base model"], clients, clients, max_new_tokens)  # warm-up
            results: dict[str, list[Scenario]] = {k: [] for k in scenarios}
            for _ in range(repeats):
                for label, pick in scenarios.items():
                    results[label].append(await closed_loop(service, pick, clients, requests, max_new_tokens))
            return results
        finally:
            service.stop()


def slot_bound(adapters: int, resident: int, clients: int, new_tokens: int, s: float = 1.0, steps: int = 20_000,
               seed: int = 0) -> tuple[float, float, int]:
    """The same closed loop simulated in decode steps with loads that cost nothing: (the fraction of client-steps
    spent decoding, the fraction of requests that waited for a slot, the p99 of those waits in decode steps).
    With at most `resident` adapters in memory and none evicted while in use, a request whose adapter is not
    resident waits until some resident one has no request left: that wait, not the load itself, bounds
    throughput and time to first token under the limit."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(adapters)]
    last_used: dict[int, int] = {}  # resident adapter -> step of its latest request
    rows: list[list[int]] = []  # [adapter, tokens left]
    waiting = [[rng.choices(range(adapters), weights)[0], 0] for _ in range(clients)]  # [adapter, sent at]
    decoding = requests = 0
    waits: list[int] = []  # decode steps each request that waited for a slot spent waiting
    for step in range(steps):
        still = []
        for request in waiting:  # first come, first served: none overtakes a waiting load
            adapter = request[0]
            if adapter not in last_used and len(last_used) >= resident:
                in_use = {r[0] for r in rows}
                idle = [a for a in last_used if a not in in_use]
                if still or not idle:
                    still.append(request)
                    continue
                del last_used[min(idle, key=last_used.__getitem__)]
            last_used[adapter] = step
            # The first requests start staggered, as a running closed loop is.
            rows.append([adapter, rng.randint(1, new_tokens) if step == 0 else new_tokens])
            if step > request[1]:
                waits.append(step - request[1])
        waiting = still
        decoding += len(rows)
        for row in rows:
            row[1] -= 1
        done = sum(r[1] == 0 for r in rows)
        rows = [r for r in rows if r[1] > 0]
        requests += done
        waiting += [[rng.choices(range(adapters), weights)[0], step + 1] for _ in range(done)]
    return decoding / (steps * clients), len(waits) / max(requests, 1), int(percentile(waits or [0], .99))


def report(results: dict[str, list[Scenario]], bound: tuple[float, float]) -> str:
    base_label, zipf_label = list(results)
    med = statistics.median
    lines = ["| scenario | tokens/s | tokens/CPU s | TTFT p50 resident | p99 resident | p50 loading | p99 loading |"
             " loads |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs in results.items():
        lines.append(
            f"| {label} | {med(r.tokens_per_s for r in runs):.1f} | {med(r.tokens_per_cpu_s for r in runs):.1f} | "
            f"{med(percentile(r.ttft_resident, .5) for r in runs) * 1000:.0f} ms | "
            f"{med(percentile(r.ttft_resident, .99) for r in runs) * 1000:.0f} ms | "
            f"{med(percentile(r.ttft_loaded, .5) for r in runs) * 1000:.0f} ms | "
            f"{med(percentile(r.ttft_loaded, .99) for r in runs) * 1000:.0f} ms | "
            f"{med(len(r.ttft_loaded) for r in runs):.0f} |")
    base, zipf = results[base_label], results[zipf_label]
    ratio_wall = med(z.tokens_per_s / b.tokens_per_s for z, b in zip(zipf, base, strict=True))
    ratio_cpu = med(z.tokens_per_cpu_s / b.tokens_per_cpu_s for z, b in zip(zipf, base, strict=True))
    ttft = med(percentile(z.ttft_loaded, .99) / percentile(z.ttft_resident, .99) for z in zipf)
    lines += ["", f"- Zipf / base throughput: **{ratio_wall:.3f}** (wall), **{ratio_cpu:.3f}** (CPU)",
              f"- TTFT p99, loading / resident: **{ttft:.2f}**",
              f"- bound with free loads (`slot_bound`): clients decode {bound[0]:.1%} of the time, {bound[1]:.1%} of "
              f"requests wait for a slot, for up to {bound[2]} decode steps (p99); the throughput ratio cannot pass "
              "that fraction times the adapters' own cost per token (`bench.engine_bench`)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.residency_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=96, help="requests per scenario run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-resident-adapters", type=int, default=8)
    parser.add_argument("--pin", type=int, default=0, help="pin the N most popular adapters first")
    parser.add_argument("--preemption-quantum-s", type=float, default=None,
                        help="preempt adapters in use (the server's --preempt-adapters) with this "
                        "--preemption-quantum-s (default: no preemption)")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the service keeps it: steadier figures on a shared machine
    torch.set_num_threads(1)
    results = asyncio.run(run(args.cache_dir, args.repeats, args.requests, args.clients, args.max_new_tokens,
                              args.max_resident_adapters, args.pin, args.preemption_quantum_s))
    bound = slot_bound(48, args.max_resident_adapters, args.clients, args.max_new_tokens)
    print(report(results, bound))


if __name__ == "__main__":
    main()
