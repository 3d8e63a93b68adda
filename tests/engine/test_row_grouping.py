"""The running batch keeps each adapter's rows contiguous (so the stacked LoRA path applies each adapter to a
slice of rows), through joins in waves and leaves, and outputs stay PEFT's greedy tokens."""

from __future__ import annotations

import copy

import torch

from service.engine import GenerationRequest, SamplingParams, kv_cache
from service.engine.scheduler import ContinuousBatcher, grouped_order
from service.engine.sequence import Sequence
from service.runtime import AdapterRuntime

PROMPTS = ["Hi", "The quick brown fox", "a", "Serving many adapters at once", "xyz123", "Once upon a time there",
           "Grouped rows", "zz"]


def test_grouped_order_is_stable_and_none_when_grouped() -> None:
    assert grouped_order(["a", "a", None, "b"]) is None
    assert grouped_order(["a", "b", "a", None, "b", None]) == [0, 2, 1, 4, 3, 5]
    assert grouped_order([]) is None
    rank = {"a": 4, "b": 8, "c": 8}
    by_rank = grouped_order(["a", "b", "a", None, "c"], lambda k: (k is None, -rank.get(k, 0)))
    assert by_rank == [1, 4, 0, 2, 3], "higher ranks first, then first appearance; base rows last"


def test_merge_with_an_order_equals_merge_then_select() -> None:
    torch.manual_seed(0)

    def cache_of(rows: int, length: int) -> tuple[kv_cache.GrowingCache, torch.Tensor]:
        cache = kv_cache.GrowingCache()
        cache.update(torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4), 0)
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, 0] = 0  # a left-padded row
        return cache, mask

    old, old_mask = cache_of(3, 5)
    new, new_mask = cache_of(2, 3)
    ordered, ordered_mask = kv_cache.merge(copy.deepcopy(old), old_mask, copy.deepcopy(new), new_mask,
                                           [3, 0, 4, 1, 2])
    plain, plain_mask = kv_cache.merge(old, old_mask, new, new_mask)
    index = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(ordered_mask, plain_mask[index])
    for a, b in zip(ordered.layers, plain.layers, strict=True):
        assert torch.equal(a.keys, b.keys[index]) and torch.equal(a.values, b.values[index])


def test_rows_stay_grouped_by_adapter_through_joins_and_leaves(demo_base, demo_tokenizer, demo_adapters,
                                                                peft_greedy) -> None:
    model = copy.deepcopy(demo_base)
    runtime = AdapterRuntime(model)
    for name, path in demo_adapters.items():
        runtime.load(name, path)
    batcher = ContinuousBatcher(model, demo_tokenizer, runtime, max_batch_size=8, prefill_token_budget=4096)
    # Waves whose adapters interleave with the rows already running; lengths differ so rows leave mid-run.
    waves = [[("a", 9), ("c", 4), ("a", 6)], [("c", 7), (None, 5), ("a", 3)], [("b", 6), ("c", 8)]]
    seqs = []
    for wave_index, wave in enumerate(waves):
        for adapter, n in wave:
            prompt = PROMPTS[len(seqs)]
            seq = Sequence(GenerationRequest(demo_tokenizer(prompt)["input_ids"], adapter,
                                             SamplingParams(max_new_tokens=n)), lambda event: None)
            seqs.append((prompt, adapter, n, seq))
            batcher.waiting.append(seq)
        for _ in range(2 if wave_index < len(waves) - 1 else 0):
            batcher.step()
            adapters = [s.request.adapter_id for s in batcher.running]
            assert grouped_order(adapters) is None, adapters
    while not batcher.idle:
        batcher.step()
        adapters = [s.request.adapter_id for s in batcher.running]
        assert grouped_order(adapters) is None, adapters
        # Groups by descending rank (the stack's order: equal-rank neighbours can form blocks), base rows last.
        ranks = [runtime.adapters[a].rank if a else -1 for a in dict.fromkeys(adapters)]
        assert ranks == sorted(ranks, reverse=True), adapters
    for prompt, adapter, n, seq in seqs:
        assert seq.tokens == peft_greedy(adapter, prompt, n), (prompt, adapter)
