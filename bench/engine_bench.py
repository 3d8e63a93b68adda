"""In-process engine benchmark: the continuous batcher driven directly, no HTTP, so ratios isolate the engine.

`python -m bench.engine_bench [--repeats N]` measures, interleaved and each against the base model in the same
run (the machine is shared and noisy, so throughput is tokens per CPU second of this process with one torch
thread; each throughput is the median of the repeats, and each ratio the median of its per-repeat ratios, whose
two runs are seconds apart, so slow drifts in the machine's load cancel):
- throughput with many adapters (48 LoRAs of ranks 8/16/32/64 over three target sets, Zipf(1.0) popularity);
- 8 rank-16 q/k/v/o adapters mixed vs one of them alone, and one adapter vs the base model;
- host overhead on a deep, thin model (32 layers, hidden 64): one decode step of the engine with 16 rows
  over 8 adapters vs the bare transformers forward of the same batch without adapters.
Closed loop: `clients` rows are always in flight; a finished request is replaced at once by the next one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from service.devtools.demo_model import build_demo_tokenizer
from service.devtools.make_adapter import write_demo_adapter
from service.engine.requests import GenerationRequest, SamplingParams
from service.engine.scheduler import ContinuousBatcher
from service.engine.sequence import Sequence as EngineSequence
from service.runtime import AdapterRuntime

from .load import PROMPTS

RANKS = (8, 16, 32, 64)
TARGET_SETS = (("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
PROMPT_IDS = [1] + [ord(c) for c in PROMPTS[0]]  # 16 tokens, as bench/load.py


def pool_shape(index: int) -> tuple[int, tuple[str, ...]]:
    """Adapter `index`'s (rank, targets): ranks cycle fastest, so every rank meets every target set."""
    return RANKS[index % len(RANKS)], TARGET_SETS[(index // len(RANKS)) % len(TARGET_SETS)]


def ensure_pool(cache_dir: Path, model_dir: Path, count: int, shape: Callable[[int], tuple[int, tuple[str, ...]]]
                = pool_shape, tag: str = "pool") -> list[tuple[str, Path]]:
    """`count` seeded LoRA adapters (cached on disk); returns (adapter id, directory)."""
    out = []
    for i in range(count):
        rank, targets = shape(i)
        path = cache_dir / tag / f"{i}-r{rank}-{len(targets)}"
        if not (path / "adapter_model.safetensors").exists():
            write_demo_adapter(path, model_dir, rank=rank, alpha=2 * rank, target_modules=targets, seed=5000 + i)
        out.append((f"{tag}-{i}", path))
    return out


def zipf_picker(ids: Sequence[str], s: float, seed: int) -> Callable[[], str]:
    weights = [1.0 / (k + 1) ** s for k in range(len(ids))]
    rng = random.Random(seed)
    return lambda: rng.choices(ids, weights)[0]


@dataclass
class Run:
    tokens: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time: with one torch thread, steadier than wall time on a shared machine

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds


def closed_loop(batcher: ContinuousBatcher, pick: Callable[[], str | None], clients: int, requests: int,
                max_new_tokens: int) -> Run:
    """Run `requests` requests with `clients` always in flight; tokens/s of the whole run."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    done: list[EngineSequence] = []
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        # Request k sends prompt k mod 16: no two rows in flight share one, as in bench/load.py.
        prompt = [1] + [ord(c) for c in PROMPTS[submitted % len(PROMPTS)]]
        seq = EngineSequence(GenerationRequest(prompt, pick(), params), lambda e: None)
        seq.emit = lambda event, s=seq: done.append(s) if hasattr(event, "finish_reason") else None
        batcher.waiting.append(seq)
        submitted += 1

    for _ in range(min(clients, requests)):
        submit()
    start, cpu_start = time.perf_counter(), time.process_time()
    while not batcher.idle:
        before = len(done)
        batcher.step()
        for _ in range(len(done) - before):
            if submitted < requests:
                submit()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(sum(len(s.tokens) for s in done), elapsed, cpu)


def bench_model(cache_dir: Path) -> Path:
    from .model import ensure_model
    return ensure_model(cache_dir)


def load_runtime(model_dir: Path, device: str, dtype: torch.dtype) -> tuple[LlamaForCausalLM, AdapterRuntime]:
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, AdapterRuntime(model)


def thin_model(layers: int = 32, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=2 * hidden, vocab_size=512, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def host_overhead(cache_dir: Path, rows: int = 16, adapters: int = 8, steps: int = 40, repeats: int = 5) -> dict:
    """CPU ms per decode step (one torch thread): bare transformers forward (no adapters) vs the engine's step."""
    model = thin_model()
    model_dir = cache_dir / "thin-model"
    if not (model_dir / "config.json").exists():
        model.save_pretrained(model_dir)
    runtime = AdapterRuntime(model)
    ids = [f"thin-{i}" for i in range(adapters)]
    for i, name in enumerate(ids):
        path = cache_dir / "thin-pool" / name
        if not (path / "adapter_model.safetensors").exists():
            write_demo_adapter(path, model_dir, rank=8, target_modules=("q_proj", "v_proj"), seed=9000 + i)
        runtime.load(name, path)
    tokenizer = build_demo_tokenizer()

    def bare() -> float:
        # The same batch shape as the engine's: `rows` rows decoding one token after a 16-token prompt.
        with torch.inference_mode():
            ids_ = torch.randint(0, 500, (rows, 16))
            with runtime.route([None] * rows):
                pass
            cache = DynamicCache()
            out = _unwrapped_forward(runtime, model, ids_, cache)
            last = out.argmax(-1)[:, None]
            mask = torch.ones((rows, 17), dtype=torch.long)
            pos = torch.full((rows, 1), 16)
            start = time.process_time()
            for _ in range(steps):
                logits = _unwrapped_forward(runtime, model, last, cache, mask, pos)
                last = logits.argmax(-1)[:, None]
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                pos = pos + 1
            return (time.process_time() - start) / steps * 1000

    def engine(row_ids: list[str | None]) -> float:
        batcher = ContinuousBatcher(model, tokenizer, runtime, max_batch_size=rows, prefill_token_budget=4096)
        params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True)
        for name in row_ids:
            batcher.waiting.append(EngineSequence(GenerationRequest(list(PROMPT_IDS), name, params), lambda e: None))
        batcher.step()  # prefill + first decode
        start = time.process_time()
        for _ in range(steps):
            batcher.step()
        return (time.process_time() - start) / steps * 1000

    results: dict[str, list[float]] = {"bare forward, no adapters": [], "engine, base": [],
                                       "engine, 1 adapter": [], f"engine, {adapters} adapters": []}
    for _ in range(repeats):  # interleaved; the minimum is the least disturbed
        results["bare forward, no adapters"].append(bare())
        results["engine, base"].append(engine([None] * rows))
        results["engine, 1 adapter"].append(engine([ids[0]] * rows))
        results[f"engine, {adapters} adapters"].append(engine([ids[i % adapters] for i in range(rows)]))
    return {k: min(v) for k, v in results.items()}


def _unwrapped_forward(runtime: AdapterRuntime, model, ids, cache, mask=None, pos=None):
    """A forward with every wrapper taken out (the bare transformers model), then put back."""
    saved = dict(runtime._wrappers)
    for name in saved:
        parent, attr = runtime.index.parents[name]
        setattr(parent, attr, saved[name].base_layer)
    try:
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).logits[:, -1, :]
    finally:
        for name, wrapper in saved.items():
            parent, attr = runtime.index.parents[name]
            setattr(parent, attr, wrapper)


def weights_read(model: torch.nn.Module, runtime: AdapterRuntime, pick: Callable[[], str | None], rows: int = 16,
                 batches: int = 4000) -> tuple[float, float, float]:
    """(base bytes, LoRA bytes, LoRA matmuls) of one decode step of `rows` rows: every base Linear's weight (the
    layers and the LM head; the embedding is a lookup), and the mean over `batches` draws of `pick` of the distinct
    adapters' A/B bytes and of their matmuls (two per adapted module). The base's weights serve all rows at once,
    an adapter's only its own rows."""
    base = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and not isinstance(m, torch.nn.Embedding))
    adapter_bytes = {name: loaded.resident_bytes for name, loaded in runtime.adapters.items()}
    matmuls = {name: 2 * len(loaded.modules) for name, loaded in runtime.adapters.items()}
    lora = launches = 0
    for _ in range(batches):
        batch = {pick() for _ in range(rows)} - {None}
        lora += sum(adapter_bytes[a] for a in batch)
        launches += sum(matmuls[a] for a in batch)
    return float(base), lora / batches, launches / batches


def one_thread_rates(features: int = 512, count: int = 200) -> tuple[float, float]:
    """(GB/s, us) with one torch thread: how fast a 2-row matmul streams fp32 weights it has to read from memory
    (`count` matrices of (2048, features), more than the caches hold), and what the smallest matmul costs (one
    row against a (1, 8) weight: the launch and its Python)."""
    import torch.nn.functional as F

    weights = [torch.randn(2048, features) for _ in range(count)]
    x = torch.randn(2, features)
    for w in weights[:10]:
        F.linear(x, w)
    start = time.perf_counter()
    for w in weights:
        F.linear(x, w)
    rate = count * weights[0].numel() * 4 / (time.perf_counter() - start) / 1e9
    one, tiny = torch.randn(1, 8), torch.randn(1, 8)
    for _ in range(100):
        F.linear(one, tiny)
    start = time.perf_counter()
    for _ in range(5000):
        F.linear(one, tiny)
    return rate, (time.perf_counter() - start) / 5000 * 1e6


def throughput(cache_dir: Path, repeats: int, requests: int = 32, clients: int = 16,
               max_new_tokens: int = 32) -> dict[str, list[float]]:
    """Tokens per CPU second of each scenario, run interleaved `repeats` times (one list entry per repeat)."""
    import itertools

    model_dir = bench_model(cache_dir)
    pool = ensure_pool(cache_dir, model_dir, 48)
    same = ensure_pool(cache_dir, model_dir, 8, shape=lambda i: (16, TARGET_SETS[1]), tag="r16")
    model, runtime = load_runtime(model_dir, "cpu", torch.float32)
    for name, path in pool + same:
        runtime.load(name, path)
    tokenizer = build_demo_tokenizer()
    same_ids = itertools.cycle([n for n, _ in same])
    scenarios: dict[str, Callable[[], str | None]] = {
        "base model": lambda: None,
        "48 adapters, Zipf(1.0), all resident": zipf_picker([n for n, _ in pool], 1.0, 0),
        "one rank-16 adapter": lambda: same[0][0],
        "8 rank-16 adapters mixed": lambda: next(same_ids),
    }

    def run(pick: Callable[[], str | None]) -> float:
        batcher = ContinuousBatcher(model, tokenizer, runtime, clients, 2048)
        return closed_loop(batcher, pick, clients, requests, max_new_tokens).tokens_per_cpu_s

    for pick in scenarios.values():  # warm-up
        run(pick)
    results: dict[str, list[float]] = {k: [] for k in scenarios}
    for _ in range(repeats):
        for label, pick in scenarios.items():
            results[label].append(run(pick))
    base_bytes, lora_bytes, matmuls = weights_read(model, runtime, zipf_picker([n for n, _ in pool], 1.0, 1))
    results["decode step: base MB, 48 adapters' LoRA MB, LoRA matmuls"] = [base_bytes / 1e6, lora_bytes / 1e6,
                                                                           matmuls]
    return results


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parent / ".cache")
    args = parser.parse_args(argv)
    import os
    import statistics

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    runs = throughput(args.cache_dir, args.repeats)
    base_mb, lora_mb, matmuls = runs.pop("decode step: base MB, 48 adapters' LoRA MB, LoRA matmuls")
    rate, launch_us = one_thread_rates()
    # The LoRA part of a 48-adapter step costs at least its bytes at the streaming rate, plus (as the small
    # matmuls' launches do not overlap their reads on one thread) about its launches; against the base's time
    # per 16 tokens, that caps the ratio whatever the engine does around the matmuls.
    base_ms = 16 / statistics.median(runs["base model"]) * 1000
    stream_ms, launches_ms = lora_mb / rate, matmuls * launch_us / 1000
    base, zipf = runs["base model"], runs["48 adapters, Zipf(1.0), all resident"]
    single, mixed = runs["one rank-16 adapter"], runs["8 rank-16 adapters mixed"]

    def ratio(num: list[float], den: list[float]) -> float:
        return statistics.median(n / d for n, d in zip(num, den, strict=True))

    lines = ["| scenario | tokens per CPU s |", "|---|---:|",
             *(f"| {k} | {statistics.median(v):.1f} |" for k, v in runs.items()), "",
             f"- 48 adapters (Zipf) / base: **{ratio(zipf, base):.3f}**",
             f"- 8 mixed / one adapter: **{ratio(mixed, single):.3f}**",
             f"- LoRA overhead per token vs base: **{(ratio(base, single) - 1) * 100:+.1f}%**",
             f"- one decode step of 16 rows: the base reads {base_mb:.1f} MB of weights in {base_ms:.1f} CPU ms "
             f"(per 16 tokens, from its throughput); the 48-adapter batch's LoRA {lora_mb:.1f} MB in {matmuls:.0f} "
             f"matmuls on average. One thread streams {rate:.1f} GB/s through a 2-row matmul and launches the "
             f"smallest in {launch_us:.1f} us, so the LoRA part costs at least {stream_ms:.1f} ms for its bytes "
             f"and about {launches_ms:.1f} ms more for its launches: a ceiling of "
             f"**{base_ms / (base_ms + stream_ms + launches_ms):.3f}** of the base's speed in eager PyTorch "
             f"({base_ms / (base_ms + stream_ms):.3f} for the bytes alone, i.e. one fused kernel per module)"]
    host = host_overhead(args.cache_dir, repeats=args.repeats)
    lines += ["", "| decode step, thin model (32 layers, hidden 64), 16 rows | CPU ms |", "|---|---:|",
              *(f"| {k} | {v:.2f} |" for k, v in host.items()), "",
              f"- engine with 8 adapters / bare forward: "
              f"**{host['engine, 8 adapters'] / host['bare forward, no adapters']:.3f}**",
              f"- load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
