"""modules_to_save on an embedding combined with PEFT's `save_embedding_layers` (issue 16.4, PEFT_SPEC §1.7).

For a modules_to_save embedding `m` PEFT saves `m.weight` (the copy, which its loader reads),
`m.modules_to_save.weight` (the copy again, which its loader skips) and `m.original_module.weight` (the base
weight, which its loader writes into the base model: the adapter's rows only read it through a tied head).
Files are made with PEFT; PEFT's logits are the oracle.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from oracle import input_ids, make_peft_adapter, mixed_batch_logits, peft_logits, tiny_model
from safetensors.torch import load_file, save_file

from service.runtime import AdapterRuntime, AdapterValidationError
from service.runtime.runtime import storage_bytes

from .test_saved_embeddings import PREFIX, _logits, _saved_with_embeddings

MODULES = {"lm_head": ["lm_head"], "embed_tokens": ["embed_tokens"], "both": ["lm_head", "embed_tokens"]}


def _edit(adapter, **changes) -> None:
    """Add a constant to file keys (relative to the prefix), as a hand-edited or differently trained file."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key, delta in changes.items():
        tensors[PREFIX + key] = tensors[PREFIX + key] + delta
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("change_rows", [False, True])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("which", list(MODULES))
def test_served_as_peft_serves_it(tmp_path, which, tied, change_rows) -> None:
    base = tiny_model("llama", tied=tied)
    adapter = _saved_with_embeddings(base, tmp_path / which, change_rows=change_rows, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"], modules_to_save=MODULES[which])
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    for name in MODULES[which]:
        name = "model.embed_tokens" if name == "embed_tokens" else name
        assert {f"{PREFIX}{name}.{part}weight" for part in ("", "modules_to_save.", "original_module.")} <= set(saved)
    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load(which, adapter)
    assert loaded.report.ok and loaded.report.unexpected_keys == []
    assert set(loaded.replacements) == {"model.embed_tokens" if m == "embed_tokens" else m for m in MODULES[which]}
    # A modules_to_save copy never reads the base weight: an override is held only for an embedding outside it
    # whose saved weight differs (for a tied pair, the one the copy does not replace).
    assert not set(loaded.base_overrides) & set(loaded.replacements)
    assert bool(loaded.base_overrides) == (change_rows and which != "both")
    ids = input_ids()
    assert torch.equal(_logits(runtime, which, ids), peft_logits(base, adapter, ids))
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits), "the base is untouched"


def test_a_second_copy_or_base_weight_peft_never_lets_the_rows_read_is_ignored_with_a_warning(tmp_path) -> None:
    base = tiny_model("llama")
    adapter = _saved_with_embeddings(base, tmp_path / "a", change_rows=False, r=4, target_modules=["q_proj"],
                                     modules_to_save=["lm_head"])
    _edit(adapter, **{"lm_head.modules_to_save.weight": 1.0, "lm_head.original_module.weight": 2.0})
    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load("a", adapter)
    assert loaded.report.ok and not loaded.base_overrides
    [skipped] = [w for w in loaded.report.warnings if "modules_to_save.weight differs" in w]
    assert "skips" in skipped and f"{PREFIX}lm_head.weight" in skipped
    [ignored] = [w for w in loaded.report.warnings if "original_module.weight: differs" in w]
    assert "ignored" in ignored and "other adapters" in ignored
    ids = input_ids()
    assert torch.equal(_logits(runtime, "a", ids), peft_logits(base, adapter, ids))
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits)


def test_tied_head_in_modules_to_save_keeps_the_input_embedding_peft_writes(tmp_path) -> None:
    """Tied: PEFT writes lm_head.original_module.weight into the one weight the input embedding reads."""
    base = tiny_model("llama", tied=True)
    adapter = _saved_with_embeddings(base, tmp_path / "a", change_rows=False, r=4, target_modules=["q_proj"],
                                     modules_to_save=["lm_head"])
    _edit(adapter, **{"lm_head.original_module.weight": 0.5, "model.embed_tokens.weight": 0.5})
    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load("a", adapter)
    assert set(loaded.base_overrides) == {"model.embed_tokens"} and set(loaded.replacements) == {"lm_head"}
    ids = input_ids()
    assert torch.equal(_logits(runtime, "a", ids), peft_logits(base, adapter, ids))
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits)

    _edit(adapter, **{"lm_head.original_module.weight": 1.0})  # the two now disagree on the tied weight
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(copy.deepcopy(base)).load("b", adapter)
    assert "tied" in info.value.report.base_mismatches[0]


def test_mixed_batch_and_delete(tmp_path) -> None:
    base = tiny_model("llama")
    dirs = {
        "mts_emb": _saved_with_embeddings(base, tmp_path / "m", change_rows=True, r=4, lora_alpha=8,
                                          target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "mts_in": _saved_with_embeddings(base, tmp_path / "i", change_rows=True, seed=2, r=2,
                                         target_modules=["v_proj"], modules_to_save=["embed_tokens"]),
        "plain": make_peft_adapter(base, tmp_path / "plain", seed=3, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "embed_tokens"]),
    }
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    before = storage_bytes(list(model.parameters()) + list(model.buffers()))
    names_before = [n for n, _ in model.named_modules()]
    for name, path in dirs.items():
        runtime.load(name, path)
    rows = ["mts_emb", None, "plain", "mts_in", "mts_emb", None]
    mixed_batch_logits(runtime, base, dirs, rows, input_ids(batch=len(rows), length=6))

    for name in dirs:
        loaded = runtime.adapters[name]
        held = [weakref.ref(t) for t in loaded.tensors()]
        assert runtime.delete(name) > 0
        del loaded
        gc.collect()
        assert all(r() is None for r in held)
    assert [n for n, _ in model.named_modules()] == names_before
    assert storage_bytes(list(model.parameters()) + list(model.buffers())) == before


@pytest.mark.parametrize("which", ["lm_head", "embed_tokens"])
def test_resized_vocabulary_is_refused_naming_both_sizes(tmp_path, which) -> None:
    base = tiny_model("llama")
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(128, mean_resizing=False)
    adapter = _saved_with_embeddings(resized, tmp_path / "r", change_rows=False, r=4, target_modules=["q_proj"],
                                     modules_to_save=[which])
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(copy.deepcopy(base)).load("r", adapter)
    report = info.value.report
    [line] = report.base_mismatches
    assert "128 tokens" in line and "has 96" in line
    assert report.unexpected_keys == [] and report.shape_mismatches == [] and report.missing_keys == []


@pytest.mark.parametrize("which", ["lm_head", "wte"])
def test_gpt2_tied_head_and_input_embedding(tmp_path, which) -> None:
    """GPT-2 ties transformer.wte and lm_head by default; its LoRA targets Conv1D."""
    base = tiny_model("gpt2", tied=True)
    adapter = _saved_with_embeddings(base, tmp_path / which, change_rows=True, r=4, target_modules=["c_attn"],
                                     modules_to_save=[which])
    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load(which, adapter)
    assert loaded.report.ok and loaded.report.unexpected_keys == []
    other = "transformer.wte" if which == "lm_head" else "lm_head"
    assert set(loaded.base_overrides) == {other}, "the tied partner reads the saved weight"
    ids = input_ids()
    assert torch.equal(_logits(runtime, which, ids), peft_logits(base, adapter, ids))
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits)
