"""Helpers that build tiny seeded models and PEFT adapters; PEFT is the oracle (tests only)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96


def tiny_model(arch: str, tied: bool = False, seed: int = 0) -> torch.nn.Module:
    """A tiny causal LM of the given architecture, deterministic for a seed."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tied
        )
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
        )
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def make_peft_adapter(base: torch.nn.Module, out_dir: Path, seed: int = 1, config_class: type = LoraConfig,
                      **config_kwargs) -> Path:
    """Train-free adapter: PEFT injects it, every trainable tensor gets seeded noise, PEFT saves it.

    `config_class` picks the PEFT method (LoraConfig by default; IA3Config, LoHaConfig, ...)."""
    with torch.random.fork_rng():  # PEFT's own init draws from the global generator: seed it for determinism
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), config_class(**config_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
    model.save_pretrained(out_dir)
    return out_dir


def peft_logits(base: torch.nn.Module, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def input_ids(batch: int = 3, length: int = 7, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)
