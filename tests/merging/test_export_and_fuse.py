"""Merged checkpoints and fused activation against PEFT's merge (merge_and_unload / merge_adapter)."""

from __future__ import annotations

import copy
import io
import tarfile

import pytest
import torch
from oracle import input_ids, make_peft_adapter, tiny_model
from peft import PeftModel
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from service.merging.export import MergedCheckpoint, stream_checkpoint_tar
from service.runtime import AdapterRuntime

CASES = [
    ("llama", False, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])),
    ("llama", True, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    ("llama", True, dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True)),
    ("qwen2", False, dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)),
    ("gpt2", False, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True)),
    ("gpt2", True, dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True)),
]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(96)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))


def peft_merged(base, adapter) -> torch.nn.Module:
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload().eval()


def peft_logits(base, adapter, ids) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()(input_ids=ids).logits


def peft_merge_is_right(tied: bool, kwargs: dict) -> bool:
    """PEFT merges embedding LoRA into the weight that a tied lm_head shares, changing the logits (it only
    warns); we untie instead. Elsewhere PEFT's merged model is the bit-exact reference."""
    return not (tied and "embed_tokens" in kwargs["target_modules"])


@pytest.mark.parametrize(("arch", "tied", "kwargs"), CASES)
def test_exported_checkpoint_loads_with_transformers(tmp_path, arch, tied, kwargs) -> None:
    base = tiny_model(arch, tied=tied)
    adapter = make_peft_adapter(base, tmp_path / "a", **kwargs)
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    loaded = runtime.load("a", adapter)
    data = b"".join(stream_checkpoint_tar(MergedCheckpoint(model, runtime.index, loaded), tokenizer(), "merged"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    ids = input_ids()
    with torch.no_grad():
        got = exported(input_ids=ids).logits
        with runtime.use("a"):
            served = model(input_ids=ids).logits
        if peft_merge_is_right(tied, kwargs):
            expected = peft_merged(base, adapter)(input_ids=ids).logits
            assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
    torch.testing.assert_close(got, served, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, peft_logits(base, adapter, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "tied", "kwargs"), CASES)
def test_fused_activation(tmp_path, arch, tied, kwargs) -> None:
    base = tiny_model(arch, tied=tied)
    fused_dir = make_peft_adapter(base, tmp_path / "f", seed=1, **kwargs)
    other_dir = make_peft_adapter(base, tmp_path / "o", seed=2, r=2, lora_alpha=4,
                                  target_modules=["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"])
    model = copy.deepcopy(base)
    params = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters()}
    runtime = AdapterRuntime(model)
    runtime.load("f", fused_dir)
    runtime.load("o", other_dir)
    ids = input_ids(batch=4)
    rows = ["f", "o", None, "f"]

    def outputs():
        with torch.no_grad():
            single = {a: _logits(model, runtime, a, ids) for a in ("f", "o", None)}
            with runtime.route(rows):
                mixed = model(input_ids=ids).logits
        return single, mixed

    before, _ = outputs()
    bytes_before = runtime.adapters["f"].resident_bytes
    runtime.fuse("f")
    assert runtime.fused == "f" and runtime.adapters["f"].resident_bytes > bytes_before
    fused, mixed = outputs()
    assert torch.equal(fused["o"], before["o"]) and torch.equal(fused[None], before[None])
    if peft_merge_is_right(tied, kwargs):
        with torch.no_grad():
            assert torch.equal(fused["f"], peft_merged(base, fused_dir)(input_ids=ids).logits)
    torch.testing.assert_close(fused["f"], before["f"], rtol=0, atol=1e-5)
    for i, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[i], fused[adapter][i], rtol=0, atol=1e-5)
    runtime.unfuse()
    assert runtime.fused is None and runtime.adapters["f"].resident_bytes == bytes_before
    after, _ = outputs()
    assert all(torch.equal(after[a], before[a]) for a in before)
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        assert p.data_ptr() == params[key][0] and torch.equal(p, params[key][1]), "base weights never written"


def _logits(model, runtime, adapter, ids):
    with runtime.use(adapter):
        return model(input_ids=ids).logits
