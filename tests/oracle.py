"""Helpers that build tiny seeded models and PEFT adapters; PEFT is the oracle (tests only)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
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


def mixed_batch_logits(runtime, base: torch.nn.Module, dirs: dict[str, Path], rows: list[str | None],
                       ids: torch.Tensor) -> torch.Tensor:
    """One forward of `runtime` over a batch whose rows use `rows` (None: the base model), checked row group by
    row group against PEFT (each adapter alone) and the bare base; returns the mixed logits."""
    with torch.no_grad(), runtime.route(rows):
        mixed = runtime.model(input_ids=ids).logits
    for adapter in set(rows):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        with torch.no_grad():
            expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
        torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)
    return mixed


def greedy_tokens(model: torch.nn.Module, ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """`model.generate`'s greedy continuation of one unpadded prompt, as the server reports it: EOS and all after
    it excluded."""
    prompt = torch.tensor([ids])  # (1, L)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False)
    new = out[0, prompt.shape[1]:].tolist()
    return new[: new.index(eos_token_id)] if eos_token_id in new else new


class PeftGreedy:
    """PEFT's greedy tokens for (adapter, prompt), the oracle of every end-to-end generation test.

    `adapters` maps names to PEFT adapter directories; the name `None` is the base model alone. Each adapter's
    `PeftModel` is built once, on a copy of the base, and kept."""

    def __init__(self, base_model: torch.nn.Module, tokenizer, adapters: dict[str, Path]) -> None:
        self.base_model, self.tokenizer = base_model, tokenizer
        self.adapters = dict(adapters)
        self._models: dict[str | None, torch.nn.Module] = {None: base_model}

    def add(self, name: str, adapter_dir: Path | None = None, model: torch.nn.Module | None = None) -> None:
        """Another adapter: a PEFT directory, or a model the test built itself (e.g. PEFT's weighted merge)."""
        if (adapter_dir is None) == (model is None):
            raise ValueError("give exactly one of adapter_dir and model")
        self._models.pop(name, None)
        if adapter_dir is not None:
            self.adapters[name] = adapter_dir
        else:
            self._models[name] = model.eval()

    def model(self, adapter: str | None) -> torch.nn.Module:
        if adapter not in self._models:
            self._models[adapter] = PeftModel.from_pretrained(
                copy.deepcopy(self.base_model), self.adapters[adapter]
            ).eval()
        return self._models[adapter]

    def tokens(self, adapter: str | None, prompt: str | list[int], max_new_tokens: int) -> list[int]:
        """Greedy new tokens, EOS excluded; `prompt` is text (tokenized as the server does) or token ids."""
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        return greedy_tokens(self.model(adapter), ids, max_new_tokens, self.tokenizer.eos_token_id)


def input_ids(batch: int = 3, length: int = 7, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def huge_copy(adapter_dir: Path, out: Path, scale: float = 1e20) -> Path:
    """The same adapter with every lora_B scaled by `scale`: finite in float32; on every linear layer (q/v alone
    are tamed by the norms) the scores become NaN."""
    shutil.copytree(adapter_dir, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v * scale if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out
