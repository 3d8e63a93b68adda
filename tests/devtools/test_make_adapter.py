"""write_demo_adapter: PEFT-format output that PEFT itself loads, key for key, and that changes the logits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from oracle import tiny_model
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from service.devtools.demo_model import ensure_demo_model
from service.devtools.make_adapter import write_demo_adapter

IDS = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119], [256, 1, 2, 3, 200, 201, 202, 255]])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache") / "demo-model")


@pytest.fixture(scope="module")
def base(demo_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(demo_dir).eval()


def peft_check(base: torch.nn.Module, adapter_dir: Path) -> torch.Tensor:
    """Load with PEFT, assert it holds exactly the file's tensors, return its logits."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    file_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == file_tensors.keys()
    for key, tensor in file_tensors.items():
        assert torch.equal(loaded[key], tensor), key
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_peft_loads_it_and_logits_change(
    tmp_path: Path, demo_dir: Path, base: torch.nn.Module, modules_to_save: list[str]
) -> None:
    out = write_demo_adapter(tmp_path / "adapter", demo_dir, rank=4, modules_to_save=modules_to_save, seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config["modules_to_save"] == (modules_to_save or None)
    assert config["base_model_name_or_path"] == str(demo_dir)
    assert not config["use_rslora"] and not config["use_dora"] and config["bias"] == "none"

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    tensors = load_file(out / "adapter_model.safetensors")
    q_a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    k_b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert q_a.shape == (4, 128) and k_b.shape == (64, 4)  # k_proj: 2 kv heads * head_dim 32
    assert q_a.dtype == k_b.dtype == torch.float32 and k_b.abs().sum() > 0
    lora_keys = {k for k in keys if ".lora_" in k}
    assert len(lora_keys) == 2 * 4 * 2  # A and B, 4 modules, 2 layers
    assert keys - lora_keys == ({"base_model.model.lm_head.weight"} if modules_to_save else set())

    with torch.no_grad():
        base_logits = base(input_ids=IDS).logits
    adapted = peft_check(base, out)
    assert torch.isfinite(adapted).all()
    assert (adapted - base_logits).abs().max() > 1e-3


def test_deterministic_per_seed(tmp_path: Path, demo_dir: Path) -> None:
    a = load_file(write_demo_adapter(tmp_path / "a", demo_dir, seed=1) / "adapter_model.safetensors")
    b = load_file(write_demo_adapter(tmp_path / "b", demo_dir, seed=1) / "adapter_model.safetensors")
    c = load_file(write_demo_adapter(tmp_path / "c", demo_dir, seed=2) / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_alpha_and_targets(tmp_path: Path, demo_dir: Path, base: torch.nn.Module) -> None:
    out = write_demo_adapter(
        tmp_path / "a", demo_dir, rank=2, alpha=3.5, target_modules=("gate_proj", "down_proj")
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 3.5 and config["target_modules"] == ["gate_proj", "down_proj"]
    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (2, 256)
    peft_check(base, out)


def test_gpt2_conv1d_targets(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "gpt2")
    out = write_demo_adapter(tmp_path / "a", tmp_path / "gpt2", target_modules=("c_attn",))
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    shapes = {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 8)  # 3 * n_embd
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        peft_out = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()(input_ids=ids).logits
        assert (peft_out - model(input_ids=ids).logits).abs().max() > 1e-4


def test_refuses_to_overwrite(tmp_path: Path, demo_dir: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo_adapter(tmp_path / "full", demo_dir)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    write_demo_adapter(tmp_path / "empty", demo_dir)  # an empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full"]  # no temp dirs left


def test_unknown_targets_fail(tmp_path: Path, demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="target_modules"):
        write_demo_adapter(tmp_path / "a", demo_dir, target_modules=("nope",))
    with pytest.raises(ValueError, match="modules_to_save"):
        write_demo_adapter(tmp_path / "b", demo_dir, modules_to_save=["nope"])
    assert not list(tmp_path.iterdir())
