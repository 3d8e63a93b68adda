"""Activation is a pointer switch; deletion frees every structure and restores the pristine base."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model

from service.runtime import AdapterExistsError, AdapterNotFoundError, AdapterRuntime, storage_bytes

ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "mts": dict(r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "dora_emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True),
    "bias": dict(r=4, lora_alpha=8, target_modules=["v_proj"], lora_bias=True),
}


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_model("llama", tied=True)


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {n: make_peft_adapter(base, root / n, seed=i + 1, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())}


def model_bytes(model: torch.nn.Module) -> int:
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    return storage_bytes(tensors)


def logits(model, runtime, adapter) -> torch.Tensor:
    with torch.no_grad(), runtime.use(adapter):
        return model(input_ids=input_ids()).logits


def test_resident_bytes_are_exact(base, adapter_dirs) -> None:
    runtime = AdapterRuntime(copy.deepcopy(base))
    lora = runtime.load("lora", adapter_dirs["lora"])
    # q_proj (32->32) and v_proj (32->16), rank 4, two layers, fp32
    assert lora.resident_bytes == 2 * 4 * 4 * ((32 + 32) + (32 + 16))
    mts = runtime.load("mts", adapter_dirs["mts"])
    copies = 2 * 96 * 32 * 4  # lm_head and embed_tokens copies, fp32
    assert mts.resident_bytes == copies + 2 * 4 * 2 * (32 + 32)


def test_delete_frees_every_tensor_and_restores_pristine_model(base, adapter_dirs) -> None:
    model = copy.deepcopy(base)
    pristine_modules = [(n, type(m)) for n, m in model.named_modules()]
    pristine_params = {n: p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)}
    pristine_bytes = model_bytes(model)
    runtime = AdapterRuntime(model)
    first = {}
    refs = []
    for name, path in adapter_dirs.items():
        loaded = runtime.load(name, path)
        refs += [weakref.ref(t) for t in loaded.tensors()]
        refs += [weakref.ref(m) for m in loaded.replacements.values()]
        first[name] = logits(model, runtime, name)
        del loaded
    assert model_bytes(model) == pristine_bytes, "adapter tensors are never model parameters"
    total = sum(a.resident_bytes for a in runtime.adapters.values())
    freed = sum(runtime.delete(name) for name in list(adapter_dirs))
    assert freed == total
    gc.collect()
    assert [r for r in refs if r() is not None] == []
    assert [(n, type(m)) for n, m in model.named_modules()] == pristine_modules
    assert {n: p.data_ptr() for n, p in model.named_parameters(remove_duplicate=False)} == pristine_params
    assert model_bytes(model) == pristine_bytes
    assert runtime._wrappers == {} and runtime.adapters == {}
    for name, path in adapter_dirs.items():  # same id again: same outputs as the first time
        runtime.load(name, path)
        assert torch.equal(logits(model, runtime, name), first[name])


def test_deleting_one_adapter_keeps_the_others(base, adapter_dirs) -> None:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("lora", adapter_dirs["lora"])
    runtime.load("dora_emb", adapter_dirs["dora_emb"])  # shares the q_proj wrappers with "lora"
    before = logits(model, runtime, "lora")
    ref = weakref.ref(runtime.adapters["dora_emb"].modules["model.layers.0.self_attn.q_proj"].A)
    runtime.delete("dora_emb")
    gc.collect()
    assert ref() is None
    assert torch.equal(logits(model, runtime, "lora"), before)
    assert torch.equal(logits(model, runtime, "lora"), peft_logits(base, adapter_dirs["lora"], input_ids()))
    with pytest.raises(AdapterNotFoundError):
        logits(model, runtime, "dora_emb")


def test_activation_is_a_pointer_switch(base, adapter_dirs) -> None:
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("lora", adapter_dirs["lora"])
    runtime.load("mts", adapter_dirs["mts"])
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = input_ids()
    with torch.no_grad():
        base_out = model(input_ids=ids).logits
        runtime.activate("mts")
        assert runtime.active == "mts"
        torch.testing.assert_close(model(input_ids=ids).logits, peft_logits(base, adapter_dirs["mts"], ids),
                                   rtol=0, atol=1e-5)
        runtime.activate(None)
        assert torch.equal(model(input_ids=ids).logits, base_out)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    with pytest.raises(AdapterNotFoundError):
        runtime.activate("nope")
    runtime.activate("lora")
    runtime.delete("lora")
    assert runtime.active is None, "deleting the active adapter deactivates it"


def test_duplicate_id_is_rejected(base, adapter_dirs) -> None:
    runtime = AdapterRuntime(copy.deepcopy(base))
    runtime.load("x", adapter_dirs["lora"])
    with pytest.raises(AdapterExistsError):
        runtime.load("x", adapter_dirs["mts"])
    with pytest.raises(AdapterNotFoundError):
        runtime.delete("y")
