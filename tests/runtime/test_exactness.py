"""Logits of our runtime equal PEFT's `PeftModel.from_pretrained` on the same base (PEFT is the oracle)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from service.runtime import AdapterRuntime

CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(q|k)_proj"),
    "all_linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "exclude": dict(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "k_proj"]),
    "layers": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                   layers_pattern="layers"),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     rank_pattern={"layers.0.self_attn.q_proj": 2, "v_proj": 6}, alpha_pattern={"v_proj": 3}),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
    "mts_lm_head": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "mts_embed": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
}
GPT2_CASES = {
    "conv1d": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "conv1d_dora": dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True),
    "conv1d_bias_rslora": dict(r=4, lora_alpha=16, target_modules=["c_fc"], lora_bias=True, use_rslora=True),
    "wte_mts": dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], modules_to_save=["lm_head"]),
}
ARCH_CASES = (
    [("llama", name) for name in CASES]
    + [("qwen2", name) for name in ("plain", "all_linear", "dora", "mts_lm_head", "embedding")]
    + [("gpt2", name) for name in GPT2_CASES]
)


def our_logits(base: torch.nn.Module, adapter_dir, ids: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("a", adapter_dir)
    runtime.activate("a")
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("arch", "case"), ARCH_CASES)
def test_logits_match_peft(tmp_path, arch: str, case: str, tied: bool) -> None:
    base = tiny_model(arch, tied=tied)
    kwargs = (GPT2_CASES if arch == "gpt2" else CASES)[case]
    adapter = make_peft_adapter(base, tmp_path / "a", **kwargs)
    ids = input_ids()
    expected = peft_logits(base, adapter, ids)
    with torch.no_grad():
        assert not torch.allclose(expected, base(input_ids=ids).logits), "the adapter must change the output"
    got = our_logits(base, adapter, ids)
    assert torch.equal(got, expected), f"max abs diff {(got - expected).abs().max().item()}"


def test_bfloat16_base_matches_peft(tmp_path) -> None:
    base = tiny_model("llama").to(torch.bfloat16)
    adapter = make_peft_adapter(base, tmp_path / "a", **CASES["dora"], modules_to_save=["lm_head"])
    ids = input_ids()
    got = our_logits(base, adapter, ids)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, peft_logits(base, adapter, ids))


def test_hand_written_all_linear_config(tmp_path) -> None:
    """PEFT saves the expanded module list; a hand-written 'all-linear' must still work (and skip lm_head)."""
    base = tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", **CASES["all_linear"])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = "all-linear"
    config_path.write_text(json.dumps(config))
    ids = input_ids()
    assert torch.equal(our_logits(base, adapter, ids), peft_logits(base, adapter, ids))


def test_classifier_head_in_modules_to_save(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    base = LlamaForSequenceClassification(cfg).eval()
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                                modules_to_save=["score"])
    ids = input_ids()
    expected = peft_logits(base, adapter, ids)
    assert torch.equal(our_logits(base, adapter, ids), expected)


class PromptScale(torch.nn.Module):
    """A custom (non-Linear, non-Embedding) module: a learned per-channel scale after the final norm."""

    def __init__(self, norm: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm = norm
        self.scale = torch.nn.Parameter(torch.ones(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale


def test_custom_module_in_modules_to_save(tmp_path) -> None:
    base = tiny_model("llama")
    base.model.norm = PromptScale(base.model.norm, 32)
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                                modules_to_save=["model.norm"])
    ids = input_ids()
    assert torch.equal(our_logits(base, adapter, ids), peft_logits(base, adapter, ids))
