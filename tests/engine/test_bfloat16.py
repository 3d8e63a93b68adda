"""The engine path in bfloat16 (the dtype `--dtype auto` picks on CUDA), run on CPU: the same code as on a GPU
(the runtime's stacked LoRA kernels, the growing KV cache, continuous batching), only the device differs."""

from __future__ import annotations

import asyncio
import copy

import torch
from oracle import PeftGreedy

from service.engine import Engine, GenerationRequest, SamplingParams
from service.runtime import AdapterRuntime

PROMPTS = ["Hi", "The quick brown fox", "Serving many adapters at once", "xyz123"]
ADAPTER_OF = ["a", "b", "c", None]  # LoRA on q,v; LoRA on embeddings + modules_to_save; rsLoRA all-linear; base
NEW_TOKENS = 12


def test_bfloat16_mixed_batch_matches_peft_greedy(demo_base, demo_tokenizer, demo_adapters) -> None:
    """Four requests on three adapters and the base model in one batch: each gets PEFT's greedy tokens on the
    same bfloat16 base. (LoRA A/B stay in float32 as PEFT keeps them, its autocast_adapter_dtype; the base
    model stays bfloat16.)"""
    base = copy.deepcopy(demo_base).to(torch.bfloat16).eval()
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    for name, path in demo_adapters.items():
        runtime.load(name, path)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    engine = Engine(model, demo_tokenizer, runtime, max_batch_size=len(PROMPTS))
    engine.start()
    try:
        async def scenario():
            return await asyncio.gather(*[
                engine.generate(GenerationRequest(demo_tokenizer(prompt)["input_ids"], adapter,
                                                  SamplingParams(max_new_tokens=NEW_TOKENS)))
                for prompt, adapter in zip(PROMPTS, ADAPTER_OF, strict=True)
            ])

        results = asyncio.run(scenario())
    finally:
        engine.stop()
    assert {p.dtype for n, p in model.named_parameters() if "lora" not in n.lower()} == {torch.bfloat16}
    oracle = PeftGreedy(base, demo_tokenizer, demo_adapters)
    for prompt, adapter, result in zip(PROMPTS, ADAPTER_OF, results, strict=True):
        assert result.token_ids == oracle.tokens(adapter, prompt, NEW_TOKENS), (prompt, adapter)
