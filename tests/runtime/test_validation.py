"""Bad adapters get a typed error carrying an adapter-only report, and the model is exactly as before."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file

from service.runtime import AdapterRuntime, AdapterValidationError

GOOD = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture()
def good_adapter(base, tmp_path) -> Path:
    return make_peft_adapter(base, tmp_path / "good", **GOOD)


def _snapshot(model: torch.nn.Module) -> tuple:
    names = [n for n, _ in model.named_modules()]
    tensors = {n: (t.data_ptr(), t.clone()) for n, t in model.state_dict().items()}
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    return names, tensors, logits


def _assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    names, tensors, logits = _snapshot(model)
    assert names == before[0]
    assert tensors.keys() == before[1].keys()
    for key, (ptr, value) in tensors.items():
        assert ptr == before[1][key][0] and torch.equal(value, before[1][key][1]), key
    assert torch.equal(logits, before[2])


def _rewrite_tensors(adapter: Path, change) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _rewrite_config(adapter: Path, **updates) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(updates)
    path.write_text(json.dumps(config))


def _load_fails(base, adapter: Path, loaded: Path | None = None) -> AdapterValidationError:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    if loaded is not None:
        runtime.load("other", loaded)
    before = _snapshot(model)
    with pytest.raises(AdapterValidationError) as info:
        runtime.load("bad", adapter)
    _assert_unchanged(model, before)
    assert set(runtime.adapters) == ({"other"} if loaded else set())
    report = info.value.report
    base_keys = set(base.state_dict())
    for key in report.missing_keys + report.unexpected_keys:
        assert key.removeprefix(PREFIX) not in base_keys or "lm_head" in key, f"base key reported: {key}"
    assert info.value.details["problems"] == report.problems and report.problems
    return info.value


def test_truncated_safetensors(base, good_adapter, tmp_path) -> None:
    path = good_adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    err = _load_fails(base, good_adapter)
    assert "truncated" in " ".join(err.report.file_errors)


def test_garbage_safetensors(base, good_adapter) -> None:
    (good_adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "JSON" in " ".join(_load_fails(base, good_adapter).report.file_errors)


def test_config_not_json(base, good_adapter) -> None:
    (good_adapter / "adapter_config.json").write_text("{'r': 4,")
    assert "not valid JSON" in _load_fails(base, good_adapter).report.config_errors[0]


def test_missing_file(base, good_adapter) -> None:
    (good_adapter / "adapter_model.safetensors").unlink()
    assert _load_fails(base, good_adapter).report.file_errors == ["adapter_model.safetensors is missing"]


def test_missing_lora_key_is_an_error_not_a_silent_init(base, good_adapter) -> None:
    key = PREFIX + "model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_tensors(good_adapter, lambda t: t.pop(key))
    assert _load_fails(base, good_adapter, loaded=None).report.missing_keys == [key]


def test_missing_modules_to_save_key(base, good_adapter) -> None:
    _rewrite_tensors(good_adapter, lambda t: t.pop(PREFIX + "lm_head.weight"))
    assert _load_fails(base, good_adapter).report.missing_keys == [PREFIX + "lm_head.weight"]


def test_unknown_key(base, good_adapter) -> None:
    extra = PREFIX + "model.layers.0.mlp.gate_proj.lora_A.weight"
    _rewrite_tensors(good_adapter, lambda t: t.update({extra: torch.zeros(4, 32)}))
    assert _load_fails(base, good_adapter).report.unexpected_keys == [extra]


def test_wrong_shapes_from_another_base(good_adapter, tmp_path) -> None:
    """An adapter trained for a resized vocabulary: lm_head copy shape differs."""
    bigger = tiny_model("llama")
    bigger.resize_token_embeddings(128)
    err = _load_fails(bigger, good_adapter)
    assert err.report.shape_mismatches == []  # one vocabulary line instead of a shape mismatch
    [line] = err.report.base_mismatches
    assert "96 tokens" in line and "has 128" in line and PREFIX + "lm_head.weight" in line


def test_rank_not_matching_config(base, good_adapter) -> None:
    _rewrite_config(good_adapter, r=8)
    err = _load_fails(base, good_adapter)
    assert len(err.report.shape_mismatches) == 8  # A and B of q/v in two layers


def test_wrong_dtype(base, good_adapter) -> None:
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_tensors(good_adapter, lambda t: t.update({key: t[key].to(torch.int32)}))
    assert key in _load_fails(base, good_adapter).report.dtype_errors[0]


def test_non_finite_values(base, good_adapter) -> None:
    key = PREFIX + "model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite_tensors(good_adapter, lambda t: t[key].__setitem__((0, 0), float("nan")))
    assert key in _load_fails(base, good_adapter).report.dtype_errors[0]


def test_zero_matched_modules(base, good_adapter) -> None:
    _rewrite_config(good_adapter, target_modules=["nonexistent_proj"], modules_to_save=None)
    err = _load_fails(base, good_adapter)
    assert "match no module" in err.report.config_errors[0]


def test_unsupported_module_type(base, good_adapter) -> None:
    _rewrite_config(good_adapter, target_modules=r".*input_layernorm")
    assert "LlamaRMSNorm" in _load_fails(base, good_adapter).report.unsupported[0]


@pytest.mark.parametrize(
    "updates",
    [{"peft_type": "BOFT"}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"}, {"bias": "all"}],
)
def test_unsupported_config(base, good_adapter, updates) -> None:
    _rewrite_config(good_adapter, **updates)
    assert _load_fails(base, good_adapter).report.unsupported


def test_embedding_from_another_base_is_served_as_peft_does(base, tmp_path) -> None:
    """PEFT auto-saves the full embedding next to embedding LoRA and writes it into the base on load; the
    adapter then runs on those weights (held for it alone here), and PEFT's logits are matched exactly."""
    adapter = make_peft_adapter(base, tmp_path / "emb", r=4, lora_alpha=8, target_modules=["embed_tokens"])
    other = tiny_model("llama", seed=3)
    runtime = AdapterRuntime(copy.deepcopy(other))
    loaded = runtime.load("emb", adapter)
    assert list(loaded.base_overrides) == ["model.embed_tokens"] and "differ" in loaded.report.warnings[0]
    ids = input_ids()
    with torch.no_grad(), runtime.use("emb"):
        ours = runtime.model(input_ids=ids).logits
    assert torch.equal(ours, peft_logits(other, adapter, ids))


def test_failure_with_another_adapter_loaded_changes_nothing(base, good_adapter, tmp_path) -> None:
    other = make_peft_adapter(base, tmp_path / "other", r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    key = PREFIX + "model.layers.1.self_attn.q_proj.lora_A.weight"
    _rewrite_tensors(good_adapter, lambda t: t.update({key: t[key][:2]}))
    _load_fails(base, good_adapter, loaded=other)


def test_short_adapter_name_has_no_false_missing_keys(base, good_adapter) -> None:
    """PEFT's substring filter reports every key of 'default' as missing for an adapter named 'a'."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), good_adapter)
    peft_result = peft_model.load_adapter(good_adapter, adapter_name="a")
    assert peft_result.missing_keys, "PEFT's false positives are the reason for this test"
    report = AdapterRuntime(copy.deepcopy(base)).load("a", good_adapter).report
    assert report.ok and report.missing_keys == [] and report.unexpected_keys == []


def test_overlapping_rank_patterns_reload_as_trained(base, tmp_path) -> None:
    """PEFT saves patterns sorted, so overlapping patterns resolve differently on reload and PEFT cannot load
    its own file; the tensors record the trained rank, which we use (docs/peft-differences.md)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                     rank_pattern={"q_proj": 2, "layers.0.self_attn.q_proj": 6})
    trained = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    trained.eval().save_pretrained(tmp_path / "a")
    ids = input_ids()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    with pytest.raises(RuntimeError):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    loaded = runtime.load("a", tmp_path / "a")
    assert loaded.report.warnings
    with torch.no_grad(), runtime.use("a"):
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_inspect_changes_nothing(base, good_adapter) -> None:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    before = _snapshot(model)
    report = runtime.inspect("x", good_adapter)
    assert report.ok and sorted(report.modules_to_save_matched) == ["lm_head"]
    assert len(report.target_modules_matched) == 4
    _assert_unchanged(model, before)
    assert runtime.adapters == {}
    shutil.rmtree(good_adapter)
