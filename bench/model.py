"""Build (or reuse from a cache) the benchmark's 58M-parameter Llama and its seeded LoRA adapters.

Nothing is downloaded: the model is initialised from `torch.manual_seed(0)` and saved with the project's
byte-level tokenizer; the adapters are PEFT LoRAs with seeded noise on their A/B matrices. A marker file
written last makes a cache entry either complete or rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from service.devtools.demo_model import BOS_ID, EOS_ID, PAD_ID, build_demo_tokenizer

MARKER_FILE = "bench_complete.json"
MODEL_SEED = 0
# Bump when a recipe below changes, so stale caches are rebuilt instead of silently reused.
MODEL_RECIPE = {"name": "bench-llama-58m", "version": 1}
ADAPTER_RECIPE = {"name": "bench-lora", "version": 1}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_RANK = 16
LORA_ALPHA = 32
# B's noise std; A is scaled by 1/sqrt(in_features), so the LoRA delta is a few percent of the activations.
LORA_B_STD = 0.05


def bench_model_config() -> LlamaConfig:
    """The Llama shape under test (58M parameters, untied embeddings)."""
    return LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def _is_complete(path: Path, recipe: dict) -> bool:
    try:
        return json.loads((path / MARKER_FILE).read_text()) == recipe
    except (OSError, ValueError):
        return False


def _build_atomically(path: Path, recipe: dict, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a sibling temp dir, write the marker last, then rename it into `path`."""
    if _is_complete(path, recipe):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        build(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(recipe))
        shutil.rmtree(path, ignore_errors=True)  # stale or partial entry
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _save_model(out: Path) -> None:
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(bench_model_config()).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out)
    build_demo_tokenizer().save_pretrained(out)


def ensure_model(cache_dir: Path) -> Path:
    """Directory of the saved benchmark model and tokenizer, built on first use."""
    return _build_atomically(cache_dir / "model", MODEL_RECIPE, _save_model)


def count_parameters(model_dir: Path) -> int:
    """Parameter count of the saved model, computed on the meta device (no weights read)."""
    config = LlamaConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _save_adapters(model_dir: Path, count: int) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from peft import LoraConfig, get_peft_model  # only the benchmark needs peft

        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0)
        for index in range(count):
            peft_model = get_peft_model(base, config)
            gen = torch.Generator().manual_seed(1000 + index)
            with torch.no_grad():
                for name, param in sorted(peft_model.named_parameters()):
                    if ".lora_A." in name:  # (r, in)
                        param.copy_(torch.randn(param.shape, generator=gen) / param.shape[1] ** 0.5)
                    elif ".lora_B." in name:  # (out, r); PEFT initialises it to zeros
                        param.copy_(torch.randn(param.shape, generator=gen) * LORA_B_STD)
            peft_model.save_pretrained(out / adapter_id(index))
            base = peft_model.unload()  # the original modules back, ready for the next adapter

    return build


def adapter_id(index: int) -> str:
    """The id adapter `index` is uploaded and requested under, on both servers."""
    return f"bench-{index}"


def ensure_adapters(cache_dir: Path, model_dir: Path, count: int) -> list[Path]:
    """Directories of `count` PEFT LoRA adapters (rank 16 on q/k/v/o) for the benchmark model."""
    recipe = {**ADAPTER_RECIPE, "count": count, "model": MODEL_RECIPE}
    root = _build_atomically(cache_dir / "adapters", recipe, _save_adapters(model_dir, count))
    return [root / adapter_id(i) for i in range(count)]
