"""Fixtures for end-to-end API tests: the demo model on disk, PEFT-made adapters, a running server."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from oracle import make_peft_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.devtools.demo_model import ensure_demo_model

from .server import ServerProcess

ADAPTER_CONFIGS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "embed_tokens"],
                 modules_to_save=["lm_head"]),
    "gamma": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="session")
def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def adapters(base_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        name: make_peft_adapter(base_model, root / name, seed=i + 11, **kw)
        for i, (name, kw) in enumerate(ADAPTER_CONFIGS.items())
    }


class GreedyOracle:
    """PEFT's greedy tokens for (adapter, prompt), EOS excluded, as the server reports them."""

    def __init__(self, base_model, tokenizer, adapters: dict[str, Path]) -> None:
        self.base_model, self.tokenizer, self.adapters = base_model, tokenizer, adapters
        self._models: dict[str | None, torch.nn.Module] = {None: base_model}

    def model(self, adapter: str | None) -> torch.nn.Module:
        if adapter not in self._models:
            self._models[adapter] = PeftModel.from_pretrained(
                copy.deepcopy(self.base_model), self.adapters[adapter]
            ).eval()
        return self._models[adapter]

    def tokens(self, adapter: str | None, prompt: str, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = self.model(adapter).generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        return new[: new.index(eos)] if eos in new else new


@pytest.fixture(scope="session")
def oracle(base_model, tokenizer, adapters) -> GreedyOracle:
    return GreedyOracle(base_model, tokenizer, adapters)


@pytest.fixture()
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture()
def server(model_dir, store):
    proc = ServerProcess(model_dir, store, "--max-upload-bytes", str(8 * 1024 * 1024))
    yield proc
    proc.stop()


def upload(client, adapter_dir: Path, adapter_id: str | None = None):
    files = [
        ("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes())),
        ("files", ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())),
    ]
    data = {"adapter_id": adapter_id} if adapter_id else {}
    return client.post("/adapters", files=files, data=data)


def tree(path: Path) -> list[tuple[str, int]]:
    """Every file under path with its size: a store must be byte-for-byte where it was."""
    if not path.exists():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
