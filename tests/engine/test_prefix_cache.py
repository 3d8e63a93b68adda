"""Prefix cache: prompts that start with cached blocks prefill only the rest, and their greedy tokens stay PEFT's;
memory stays under the bound; an adapter's blocks go with the adapter (delete, re-upload, fuse)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from service.engine import Engine, GenerationRequest, SamplingParams, submitted_together
from service.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from service.engine.scheduler import ContinuousBatcher
from service.engine.sequence import Sequence
from service.runtime import AdapterRuntime

SYSTEM = "System: you are a terse assistant; answer every single question in one short line.\n"  # 5 blocks with <s>
QUESTIONS = ["Q: what is 2+2?", "Q: name a colour", "Q: hi", "Q: why is the sky blue, in one line?"]


@pytest.fixture()
def make_batcher(demo_base, demo_tokenizer, demo_adapters):
    def make(cache_bytes: int | None = 64 << 20, max_batch_size: int = 16) -> ContinuousBatcher:
        model = copy.deepcopy(demo_base)
        runtime = AdapterRuntime(model)
        for name, path in demo_adapters.items():
            runtime.load(name, path)
        cache = PrefixCache(cache_bytes) if cache_bytes else None
        return ContinuousBatcher(model, demo_tokenizer, runtime, max_batch_size, 4096, cache)

    return make


def submit(batcher: ContinuousBatcher, ids: list[int], adapter: str | None, **params) -> Sequence:
    def emit(event) -> None:
        if isinstance(event, BaseException):
            raise event

    seq = Sequence(GenerationRequest(list(ids), adapter, SamplingParams(**params)), emit)
    batcher.waiting.append(seq)
    return seq


def drain(batcher: ContinuousBatcher) -> None:
    while not batcher.idle:
        batcher.step()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_cached_prefixes_of_different_lengths_in_one_batch_match_peft(make_batcher, demo_tokenizer,
                                                                      peft_greedy) -> None:
    batcher = make_batcher()
    cache = batcher.prefix_cache
    system = ids(demo_tokenizer, SYSTEM)
    assert len(system) >= 5 * BLOCK_TOKENS
    # Warm: the system prompt per adapter, and a shorter shared start for adapter "b" only.
    for adapter in ("a", "b", "c", None):
        submit(batcher, system + ids(demo_tokenizer, "warm")[1:], adapter, max_new_tokens=2)
    drain(batcher)
    assert cache.stats.misses == 4 and cache.stats.hits == 0 and cache.stats.bytes > 0
    # One admission: cached lengths 80 (4 adapters), 32 (a prompt that diverges inside block 3), 0 (short,
    # and a long one no adapter saw), rows with different rest lengths: the batch has padding in mid-row.
    jobs = [(system + ids(demo_tokenizer, q)[1:], a) for q, a in zip(QUESTIONS, ["a", "b", "c", None], strict=True)]
    jobs += [(system[:40] + ids(demo_tokenizer, "different tail, cached up to its 2nd block")[1:], "b"),
             (ids(demo_tokenizer, "Hi"), "a"),
             (ids(demo_tokenizer, "An uncached prompt that is long enough to fill three blocks, yes."), "c")]
    seqs = [submit(batcher, p, a, max_new_tokens=12) for p, a in jobs]
    batcher.step()
    assert len(batcher.running) == len(jobs)  # all in one admission
    drain(batcher)
    for (prompt, adapter), seq in zip(jobs, seqs, strict=True):
        assert seq.tokens == peft_greedy(adapter, prompt, 12), (adapter, prompt)
    assert cache.stats.hits == 5 and cache.stats.misses == 4 + 2
    assert cache.stats.tokens_saved == 4 * 5 * BLOCK_TOKENS + 2 * BLOCK_TOKENS


def test_outputs_equal_with_and_without_the_cache(make_batcher, demo_tokenizer) -> None:
    """Sampled (seeded) rows too: the cache changes what is computed, not what comes out."""
    system = ids(demo_tokenizer, SYSTEM)
    outputs = []
    for cache_bytes in (None, 64 << 20):
        batcher = make_batcher(cache_bytes)
        runs = []
        for _ in range(2):  # the second run hits the cache (when there is one)
            seqs = [submit(batcher, system + ids(demo_tokenizer, q)[1:], a, max_new_tokens=10, temperature=0.8,
                           seed=7) for q, a in zip(QUESTIONS, ["a", None, "b", "a"], strict=True)]
            drain(batcher)
            runs.append([s.tokens for s in seqs])
        assert runs[0] == runs[1]
        outputs.append(runs[0])
    assert outputs[0] == outputs[1]


def test_memory_stays_under_the_bound_and_the_least_recent_tail_goes_first(make_batcher, demo_tokenizer,
                                                                          peft_greedy) -> None:
    probe = make_batcher()
    submit(probe, ids(demo_tokenizer, SYSTEM), "a", max_new_tokens=1)
    drain(probe)
    block_bytes = probe.prefix_cache.stats.bytes // probe.prefix_cache.stats.blocks
    batcher = make_batcher(cache_bytes=6 * block_bytes)  # room for 6 blocks
    cache = batcher.prefix_cache
    first = ids(demo_tokenizer, SYSTEM)  # 5 full blocks
    second = ids(demo_tokenizer, "Another long system prompt, for another product entirely.")  # 3 full blocks
    submit(batcher, first, "a", max_new_tokens=1)
    drain(batcher)
    assert cache.stats.blocks == 5 and cache.stats.evicted_blocks == 0
    submit(batcher, second, "a", max_new_tokens=1)
    drain(batcher)
    assert cache.stats.bytes <= cache.max_bytes and cache.stats.blocks == 6
    assert cache.stats.evicted_blocks == 2  # the first prompt's last two blocks, not its head
    assert len(cache.match("a", first + [1])) == 3 and len(cache.match("a", second + [1])) == 3
    # A hit on what is left of the first prompt still gives PEFT's tokens.
    prompt = first + ids(demo_tokenizer, "Q: and now?")[1:]
    seq = submit(batcher, prompt, "a", max_new_tokens=10)
    drain(batcher)
    assert seq.tokens == peft_greedy("a", prompt, 10)
    assert cache.stats.bytes <= cache.max_bytes and cache.stats.hits == 1


def test_zero_bytes_means_no_cache(make_engine) -> None:
    assert make_engine(prefix_cache_bytes=0).batcher.prefix_cache is None


def test_a_deleted_adapter_s_prefixes_go_and_a_reupload_under_its_id_does_not_reuse_them(
        demo_base, demo_tokenizer, demo_adapters, peft_greedy) -> None:
    model = copy.deepcopy(demo_base)
    runtime = AdapterRuntime(model)
    runtime.load("x", demo_adapters["a"])
    runtime.load("c", demo_adapters["c"])
    engine = Engine(model, demo_tokenizer, runtime, max_batch_size=4, prefix_cache_bytes=64 << 20)
    engine.start()
    cache = engine.batcher.prefix_cache
    prompt = ids(demo_tokenizer, SYSTEM + QUESTIONS[0])

    def generate(adapter: str) -> list[int]:
        request = GenerationRequest(prompt, adapter, SamplingParams(max_new_tokens=12))
        return asyncio.run(asyncio.wait_for(engine.generate(request), 60)).token_ids

    try:
        assert generate("x") == peft_greedy("a", prompt, 12)
        generate("c")
        assert cache.adapters() == {"x", "c"}
        c_bytes = cache.stats.bytes // 2
        asyncio.run(engine.call(lambda rt: rt.delete("x")))  # as lifecycle's delete and residency's eviction do
        assert cache.adapters() == {"c"} and cache.stats.bytes == c_bytes  # freed before the call returned
        asyncio.run(engine.call(lambda rt: rt.load("x", demo_adapters["b"])))  # another adapter, the same id
        assert generate("x") == peft_greedy("b", prompt, 12)
        assert cache.stats.hits == 0
        assert generate("x") == peft_greedy("b", prompt, 12)  # now a hit on its own blocks
        assert cache.stats.hits == 1
        asyncio.run(engine.call(lambda rt: rt.fuse("x")))  # merged weights: other rounding, new blocks
        assert cache.adapters() == {"c"}
    finally:
        engine.stop()


def test_copies_of_one_prompt_share_one_prefill_and_sample_on_their_own(make_batcher, demo_tokenizer,
                                                                        peft_greedy) -> None:
    """n > 1: the embedding sees each distinct (adapter, prompt) once; seeded copies still differ, and each
    gives what it gives alone."""
    batcher = make_batcher(cache_bytes=None)
    embedded: list[tuple[int, ...]] = []
    hook = batcher.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded.append(tuple(args[0].shape)))
    prompt = ids(demo_tokenizer, "Tell me a story about adapters")
    sampled = [submit(batcher, prompt, "b", max_new_tokens=16, temperature=1.0, seed=100 + j) for j in range(4)]
    greedy = [submit(batcher, prompt, "b", max_new_tokens=8) for _ in range(2)]
    other = submit(batcher, prompt, "a", max_new_tokens=8)  # same prompt, other adapter: its own prefill row
    batcher.step()
    hook.remove()
    assert embedded[0] == (2, len(prompt))  # prefill: 2 rows for 7 requests
    assert len(batcher.running) == 7 and batcher.prefill_rows == 2
    drain(batcher)
    assert [s.tokens for s in greedy] == [peft_greedy("b", prompt, 8)] * 2
    assert other.tokens == peft_greedy("a", prompt, 8)
    assert len({tuple(s.tokens) for s in sampled}) == 4
    alone = make_batcher(cache_bytes=None)
    for j, s in enumerate(sampled):
        again = submit(alone, prompt, "b", max_new_tokens=16, temperature=1.0, seed=100 + j)
        drain(alone)
        assert again.tokens == s.tokens


def test_requests_submitted_together_reach_the_engine_in_one_piece(make_engine, demo_tokenizer,
                                                                   peft_greedy) -> None:
    """Held until the block ends (a round trip through the engine thread admits none of them), then admitted
    in one step: three copies, one prefill row."""
    engine = make_engine(max_batch_size=4)
    prompt = ids(demo_tokenizer, "Copies of one prompt")

    async def scenario():
        with submitted_together():
            handles = [engine.submit(GenerationRequest(prompt, "c", SamplingParams(max_new_tokens=6)))]
            await engine.call(lambda rt: None)
            assert engine.batcher.prefill_rows == 0 and engine.waiting_requests == 1
            handles += [engine.submit(GenerationRequest(prompt, "c", SamplingParams(max_new_tokens=6)))
                        for _ in range(2)]
        return [(await h.result()).token_ids for h in handles]

    assert asyncio.run(scenario()) == [peft_greedy("c", prompt, 6)] * 3
    assert engine.batcher.prefill_rows == 1
