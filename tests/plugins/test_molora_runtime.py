"""The MoLoRA plug-in inside the runtime: discovery, exactness against the reference, mixed batches with
LoRA, its own keys in the load report (optional and shared ones never missing), merging, deletion."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model
from safetensors.torch import load_file, save_file

from service.runtime import AdapterRuntime, AdapterValidationError
from service.runtime.adapter_types.base import NotMergeableError
from service.runtime.adapter_types.registry import installed_types

from .molora_reference import random_molora, reference_model, write_molora

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


@pytest.fixture()
def base() -> torch.nn.Module:
    return tiny_model("llama")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_entry_point_makes_the_type_installed(plugin_installed) -> None:
    types = installed_types()
    assert type(types["MOLORA"]).__name__ == "MoLoraType"
    assert {"LORA", "IA3", "LOHA"} <= types.keys()


def test_without_the_plugin_molora_is_refused_naming_installed_types(base, tmp_path) -> None:
    adapter = write_molora(tmp_path / "m", random_molora(base, MODULES), lora_alpha=8, top_k=2)
    with pytest.raises(AdapterValidationError) as err:
        AdapterRuntime(copy.deepcopy(base)).inspect("m", adapter)
    assert "'MOLORA'" in err.value.report.unsupported[0] and "LORA" in err.value.report.unsupported[0]


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_logits_match_the_reference(plugin_installed, base, tmp_path, temperature) -> None:
    experts = random_molora(base, MODULES, with_bias=(MODULES[0],))
    adapter = write_molora(tmp_path / "m", experts, lora_alpha=8, top_k=2, temperature=temperature)
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    report = runtime.load("m", adapter).report
    # Two modules have no router bias and the shared temperature may be absent: optional, never missing.
    assert report.ok and report.missing_keys == [] and report.unexpected_keys == []
    assert sorted(report.target_modules_matched) == sorted(MODULES)
    runtime.activate("m")
    ids = input_ids()
    expected = _logits(reference_model(base, experts, lora_alpha=8, top_k=2, temperature=temperature), ids)
    assert not torch.allclose(expected, _logits(base, ids), atol=1e-3), "the adapter must change the outputs"
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-5)


def test_mixed_batch_with_lora(plugin_installed, base, tmp_path) -> None:
    experts = random_molora(base, MODULES)
    molora = write_molora(tmp_path / "m", experts, lora_alpha=8, top_k=1)
    lora = make_peft_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("m", molora)
    runtime.load("lora", lora)
    rows = ["m", "lora", None, "m", "lora"]
    ids = input_ids(batch=len(rows))
    with torch.no_grad(), runtime.route(rows):
        mixed = model(input_ids=ids).logits
    reference = reference_model(base, experts, lora_alpha=8, top_k=1)
    for adapter, expected in (("m", lambda x: _logits(reference, x)), ("lora", lambda x: peft_logits(base, lora, x)),
                              (None, lambda x: _logits(base, x))):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        torch.testing.assert_close(mixed[idx], expected(ids[idx]), rtol=0, atol=1e-5)


def test_report_lists_only_its_own_missing_and_unexpected_keys(plugin_installed, base, tmp_path) -> None:
    stray = "base_model.model.model.layers.0.self_attn.q_proj.experts.9.lora_A.weight"
    adapter = write_molora(tmp_path / "m", random_molora(base, MODULES), lora_alpha=8, top_k=2,
                           extra={stray: torch.zeros(4, 64)})
    weights = load_file(adapter / "adapter_model.safetensors")
    dropped = f"base_model.model.{MODULES[1]}.experts.2.lora_B.weight"
    del weights[dropped]
    save_file(weights, adapter / "adapter_model.safetensors")
    runtime = AdapterRuntime(copy.deepcopy(base))
    with pytest.raises(AdapterValidationError) as err:
        runtime.load("m", adapter)
    report = err.value.report
    assert report.missing_keys == [dropped] and report.unexpected_keys == [stray]
    assert not runtime.adapters and not runtime._wrappers


def test_merging_where_possible(plugin_installed, base, tmp_path) -> None:
    """Several experts gate per token: fuse refuses with the reason. One expert is a plain LoRA: it fuses."""
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("many", write_molora(tmp_path / "many", random_molora(base, MODULES), lora_alpha=8, top_k=2))
    with pytest.raises(NotMergeableError, match="input-dependent gates"):
        runtime.fuse("many")
    single = random_molora(base, MODULES, experts=1, seed=4)
    runtime.load("one", write_molora(tmp_path / "one", single, lora_alpha=8, top_k=1))
    runtime.activate("one")
    ids = input_ids()
    unfused = _logits(model, ids)
    runtime.fuse("one")
    torch.testing.assert_close(_logits(model, ids), unfused, rtol=0, atol=1e-5)
    torch.testing.assert_close(unfused, _logits(reference_model(base, single, lora_alpha=8, top_k=1), ids),
                               rtol=0, atol=1e-5)


def test_delete_frees_experts_routers_and_shared_tensors(plugin_installed, base, tmp_path) -> None:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = runtime.load("m", write_molora(tmp_path / "m", random_molora(base, MODULES), lora_alpha=8, top_k=2,
                                            temperature=2.0))
    assert "temperature" in loaded.shared
    refs = [weakref.ref(t) for t in loaded.tensors()]
    assert runtime.delete("m") > 0
    del loaded
    gc.collect()
    assert all(r() is None for r in refs)
    assert not runtime._wrappers
    assert all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())


def test_the_plugins_own_writer_round_trips(plugin_installed, base, tmp_path) -> None:
    from molora_adapter import save_molora_adapter

    experts = random_molora(base, MODULES[:1], seed=7)
    ex = experts[MODULES[0]]
    adapter = save_molora_adapter(tmp_path / "m", {MODULES[0]: list(zip(ex.A, ex.B, strict=True))},
                                  {MODULES[0]: (ex.router_weight, None)}, lora_alpha=8, top_k=2)
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("m", adapter)
    runtime.activate("m")
    ids = input_ids()
    torch.testing.assert_close(_logits(model, ids),
                               _logits(reference_model(base, experts, lora_alpha=8, top_k=2), ids), rtol=0, atol=1e-5)


def test_a_buggy_plugin_hook_rejects_the_adapter_without_crashing(plugin_installed, base, tmp_path,
                                                                  monkeypatch) -> None:
    from molora_adapter import MoLoraType

    def broken(*args, **kwargs):
        raise RuntimeError("bug in the plug-in")

    monkeypatch.setattr(MoLoraType, "plan_module", broken)
    adapter = write_molora(tmp_path / "m", random_molora(base, MODULES), lora_alpha=8, top_k=2)
    runtime = AdapterRuntime(copy.deepcopy(base))
    with pytest.raises(AdapterValidationError, match="bug in the plug-in"):
        runtime.load("m", adapter)
    assert not runtime.adapters and not runtime._wrappers
