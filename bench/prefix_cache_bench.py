"""In-process benchmark of the prefix cache: time to first token of requests that share a 512-token prompt prefix
(a chat system prompt), with the cache and without, interleaved in one run.

`python -m bench.prefix_cache_bench [--repeats N] [--device cpu|cuda]` drives the continuous batcher directly
(no HTTP) on the benchmark's 58M Llama with four rank-16 LoRA adapters. Each request is the shared 512-token
prefix and a distinct 32-token question, for one of the adapters or the base model. With the cache, each
adapter's prefix was cached by an earlier request (the steady state of a chat service); without it, every
prompt is prefilled whole. Two arrivals:
- one at a time: each request alone on an idle engine (its time to first token is its prefill);
- 8 at once: one admission of 8 requests over the 5 adapters (time until the last of them has its first token).
On CPU the figures are CPU seconds of this process with one torch thread (the machine is shared, and CPU time
is steadier than wall time there); on CUDA, wall seconds after a synchronize. Each is the median of the repeats.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.devtools.demo_model import BOS_ID, build_demo_tokenizer
from service.engine.prefix_cache import PrefixCache
from service.engine.requests import GenerationRequest, SamplingParams
from service.engine.scheduler import ContinuousBatcher
from service.engine.sequence import Sequence, TokenEvent

from .engine_bench import bench_model, ensure_pool, load_runtime

PREFIX_TOKENS = 512
QUESTION_TOKENS = 32
ADAPTERS = 4


def prompts(count: int, seed: int) -> list[list[int]]:
    """`count` prompts: one shared 512-token prefix (<s> first), then a distinct 32-token question each."""
    rng = random.Random(0)
    prefix = [BOS_ID] + [rng.randrange(32, 127) for _ in range(PREFIX_TOKENS - 1)]
    rng = random.Random(seed)
    return [prefix + [rng.randrange(32, 127) for _ in range(QUESTION_TOKENS)] for _ in range(count)]


def time_to_first_tokens(batcher: ContinuousBatcher, jobs: list[tuple[list[int], str | None]],
                         clock: Callable[[], float]) -> float:
    """Submit the jobs at once; seconds until the last of them has its first token."""
    firsts: list[float] = []
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for ids, adapter in jobs:
        def emit(event, firsts=firsts) -> None:
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, TokenEvent):
                firsts.append(clock())
        batcher.waiting.append(Sequence(GenerationRequest(ids, adapter, params), emit))
    start = clock()
    while not batcher.idle:
        batcher.step()
    assert len(firsts) == len(jobs)
    return max(firsts) - start


def run(cache_dir: Path, repeats: int, device: str) -> dict[str, dict[str, float]]:
    model_dir = bench_model(cache_dir)
    pool = ensure_pool(cache_dir, model_dir, ADAPTERS, shape=lambda i: (16, ("q_proj", "k_proj", "v_proj", "o_proj")),
                       tag="r16")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, runtime = load_runtime(model_dir, device, dtype)
    for name, path in pool:
        runtime.load(name, path)
    tokenizer = build_demo_tokenizer()
    adapters: list[str | None] = [name for name, _ in pool] + [None]

    def clock() -> float:
        if device == "cpu":
            return time.process_time()
        torch.cuda.synchronize()
        return time.perf_counter()

    def batcher(cached: bool) -> ContinuousBatcher:
        b = ContinuousBatcher(model, tokenizer, runtime, 16, 16384, PrefixCache(256 << 20) if cached else None)
        time_to_first_tokens(b, [(p, a) for p, a in zip(prompts(len(adapters), 1), adapters, strict=True)], clock)
        return b  # with the cache: each adapter's prefix is in it now

    results: dict[str, dict[str, list[float]]] = {"one at a time": {"cache": [], "no cache": []},
                                                  "8 at once": {"cache": [], "no cache": []}}
    for r in range(repeats + 1):  # the first round warms up and is not counted
        for label, cached in (("cache", True), ("no cache", False)):
            b = batcher(cached)
            alone = [time_to_first_tokens(b, [(p, adapters[i % len(adapters)])], clock)
                     for i, p in enumerate(prompts(len(adapters), 100 + r))]
            together = time_to_first_tokens(b, [(p, adapters[i % len(adapters)])
                                                for i, p in enumerate(prompts(8, 200 + r))], clock)
            if r:
                results["one at a time"][label].append(statistics.median(alone))
                results["8 at once"][label].append(together)
            if cached:
                assert b.prefix_cache is not None and b.prefix_cache.stats.hits >= len(adapters) + 8
    return {k: {c: statistics.median(v) for c, v in d.items()} for k, d in results.items()}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cache_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    results = run(args.cache_dir, args.repeats, args.device)
    unit = "CPU s" if args.device == "cpu" else "s"
    lines = [f"| time to first token ({PREFIX_TOKENS}-token shared prefix + {QUESTION_TOKENS}, {args.device}) "
             f"| no cache ({unit}) | cache ({unit}) | no cache / cache |", "|---|---:|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['no cache']:.3f} | {r['cache']:.3f} | **{r['no cache'] / r['cache']:.2f}** |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
