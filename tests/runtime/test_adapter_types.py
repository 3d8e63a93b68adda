"""IA3 and LoHa against PEFT (the oracle): logits, fused (merged) weights, mixed batches with LoRA, deletion."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model
from peft import IA3Config, LoHaConfig, PeftModel

from service.merging import MergeSpec, merge
from service.merging.weighted_merge import MergeError
from service.runtime import AdapterRuntime, AdapterValidationError
from service.runtime.adapter_types.base import NotMergeableError
from service.runtime.adapter_types.registry import installed_types

IA3_CASES = {
    "llama_ff": ("llama", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "llama_regex_ff": ("llama", dict(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj")),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
    "qwen2_bias": ("qwen2", dict(target_modules=["q_proj", "v_proj", "o_proj"], feedforward_modules=["o_proj"])),
}
LOHA_CASES = {
    "llama_all_linear": ("llama", dict(r=4, alpha=8, target_modules="all-linear")),
    "llama_patterns": ("llama", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})),
    "qwen2": ("qwen2", dict(r=3, alpha=6, target_modules=["q_proj", "o_proj"])),
}
CASES = {**{f"ia3_{k}": (a, IA3Config, kw) for k, (a, kw) in IA3_CASES.items()},
         **{f"loha_{k}": (a, LoHaConfig, kw) for k, (a, kw) in LOHA_CASES.items()}}


def _runtime(base: torch.nn.Module) -> tuple[torch.nn.Module, AdapterRuntime]:
    model = copy.deepcopy(base)
    return model, AdapterRuntime(model)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_merge_match_peft(tmp_path, case: str) -> None:
    arch, config_class, kwargs = CASES[case]
    base = tiny_model(arch)
    adapter = make_peft_adapter(base, tmp_path / "a", config_class=config_class, **kwargs)
    ids = input_ids()
    model, runtime = _runtime(base)
    report = runtime.load("a", adapter).report
    assert report.ok and not report.unexpected_keys and not report.missing_keys
    runtime.activate("a")
    torch.testing.assert_close(_logits(model, ids), peft_logits(base, adapter, ids), rtol=0, atol=1e-6)
    runtime.fuse("a")  # merged copies of the base modules, against PEFT's merge_and_unload
    merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload().eval()
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), rtol=0, atol=1e-5)


def test_mixed_batch_of_lora_ia3_loha_and_base(tmp_path) -> None:
    """Every row of one batch equals PEFT serving that row's adapter alone."""
    base = tiny_model("llama")
    dirs = {
        "lora": make_peft_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        "ia3": make_peft_adapter(base, tmp_path / "ia3", seed=2, config_class=IA3Config,
                                 target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "loha": make_peft_adapter(base, tmp_path / "loha", seed=3, config_class=LoHaConfig, r=4, alpha=8,
                                  target_modules=["q_proj", "down_proj"]),
    }
    model, runtime = _runtime(base)
    for name, path in dirs.items():
        runtime.load(name, path)
    rows = ["ia3", "lora", None, "loha", "ia3", "loha", "lora"]
    ids = input_ids(batch=len(rows))
    with torch.no_grad(), runtime.route(rows):
        mixed = model(input_ids=ids).logits
    for adapter in set(rows):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else _logits(base, ids[idx])
        torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config_class", [IA3Config, LoHaConfig])
def test_delete_frees_every_tensor_and_restores_the_model(tmp_path, config_class) -> None:
    base = tiny_model("llama")
    kwargs = (dict(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
              if config_class is IA3Config else dict(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    adapter = make_peft_adapter(base, tmp_path / "a", config_class=config_class, **kwargs)
    lora = make_peft_adapter(base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    model, runtime = _runtime(base)
    runtime.load("lora", lora)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = runtime.load("a", adapter)
    assert loaded.resident_bytes > 0
    refs = [weakref.ref(t) for t in loaded.tensors()]
    runtime.fuse("a")
    fused_refs = [weakref.ref(p) for m in loaded.fused.values() for p in m.parameters()]
    freed = runtime.delete("a")
    del loaded
    gc.collect()
    assert freed > 0 and all(r() is None for r in refs + fused_refs)
    assert model.state_dict().keys() == pristine.keys()
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    runtime.activate("lora")
    ids = input_ids()
    torch.testing.assert_close(_logits(model, ids), peft_logits(base, lora, ids), rtol=0, atol=1e-6)
    runtime.delete("lora")
    assert not runtime._wrappers  # every base module is back in place


def test_ia3_orientation_mismatch_is_reported_by_key(tmp_path) -> None:
    """A vector saved for the output side but configured as feed-forward is a shape mismatch, not a crash."""
    base = tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", config_class=IA3Config, target_modules=["down_proj"],
                                feedforward_modules=[])
    config = (adapter / "adapter_config.json")
    config.write_text(config.read_text().replace('"feedforward_modules": []', '"feedforward_modules": ["down_proj"]'))
    _, runtime = _runtime(base)
    with pytest.raises(AdapterValidationError) as err:
        runtime.load("a", adapter)
    mismatches = err.value.report.shape_mismatches
    assert mismatches and all(m.key.endswith("mlp.down_proj.ia3_l") for m in mismatches)
    assert not runtime.adapters and not runtime._wrappers


def test_loha_missing_factor_is_listed_alone(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    base = tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", config_class=LoHaConfig, r=4, alpha=8, target_modules=["q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    dropped = next(k for k in sorted(weights) if k.endswith("hada_w2_b"))
    del weights[dropped]
    save_file(weights, adapter / "adapter_model.safetensors")
    _, runtime = _runtime(base)
    with pytest.raises(AdapterValidationError) as err:
        runtime.load("a", adapter)
    report = err.value.report
    assert report.missing_keys == [dropped] and not report.unexpected_keys


def test_weighted_merge_refuses_non_lora_sources(tmp_path) -> None:
    base = tiny_model("llama")
    ia3 = make_peft_adapter(base, tmp_path / "ia3", config_class=IA3Config, target_modules=["q_proj"],
                            feedforward_modules=[])
    lora = make_peft_adapter(base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    model, runtime = _runtime(base)
    sources = [runtime.load("ia3", ia3), runtime.load("lora", lora)]
    with pytest.raises(MergeError, match="LoRA adapters only.*'ia3' is IA3"):
        merge(sources, MergeSpec("linear", [0.5, 0.5]), runtime.index.modules)


def test_unknown_peft_type_names_the_installed_types(tmp_path) -> None:
    base = tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"peft_type": "LORA"', '"peft_type": "VERA"'))
    _, runtime = _runtime(base)
    with pytest.raises(AdapterValidationError) as err:
        runtime.inspect("a", adapter)
    message = err.value.report.unsupported[0]
    assert "'VERA'" in message and all(name in message for name in installed_types())


def test_not_mergeable_is_a_typed_error() -> None:
    assert NotMergeableError("x").code == "not_mergeable"


def test_plugins_never_shadow_builtins_and_broken_ones_are_skipped(tmp_path, monkeypatch, caplog) -> None:
    dist = tmp_path / "fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[adapter_service.adapter_types]\nLORA = json:JSONDecoder\nBROKEN = no_such_module_anywhere:Type\n"
        "NOTATYPE = json:JSONDecoder\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("WARNING"):
        types = installed_types()
    assert type(types["LORA"]).__name__ == "LoraType"
    assert "BROKEN" not in types and "NOTATYPE" not in types
    assert "replace the built-in type LORA" in caplog.text and "BROKEN" in caplog.text
