"""Adapter files that carry the base model's embeddings (PEFT's `save_embedding_layers`, PEFT_SPEC §1.7).

PEFT writes the full input/output embedding weights into such a file and, on load, into the base model.
Files are made with PEFT itself; PEFT's logits are the oracle. Equal weights hold nothing extra; other
weights of the same shape are held for that adapter only (freed on delete, exact in mixed batches); another
vocabulary size is refused naming both sizes.
"""

from __future__ import annotations

import copy
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from oracle import input_ids, make_peft_adapter, mixed_batch_logits, peft_logits, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from service.runtime import AdapterRuntime, AdapterValidationError
from service.runtime.runtime import storage_bytes

PREFIX = "base_model.model."


def _saved_with_embeddings(base: torch.nn.Module, out_dir: Path, change_rows: bool, seed: int = 1,
                           save_embedding_layers: bool | str = True, **config) -> Path:
    """A PEFT adapter saved with its model's embedding weights; `change_rows` edits rows of both embeddings
    first (same shape), as training new tokens into an unresized vocabulary does."""
    model = copy.deepcopy(base)
    if change_rows:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for emb in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
                emb[3:9] = torch.randn(emb[3:9].shape, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out_dir, save_embedding_layers=save_embedding_layers)
    return out_dir


def _logits(runtime: AdapterRuntime, adapter: str | None, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), runtime.use(adapter):
        return runtime.model(input_ids=ids).logits


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", False)])
def test_equal_embeddings_hold_nothing_extra(tmp_path, arch, tied) -> None:
    base = tiny_model(arch, tied=tied)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    adapter = _saved_with_embeddings(base, tmp_path / "eq", change_rows=False, r=4, lora_alpha=8,
                                     target_modules=targets)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    emb = [k for k in keys if "lora" not in k]
    assert len(emb) == 2, "PEFT wrote the input and output embeddings"
    plain = make_peft_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=targets)

    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load("eq", adapter)
    assert loaded.report.ok and loaded.report.unexpected_keys == [] and not loaded.base_overrides
    assert "nothing extra held" in loaded.report.warnings[0]
    assert loaded.resident_bytes == AdapterRuntime(copy.deepcopy(base)).load("plain", plain).resident_bytes
    ids = input_ids()
    assert torch.equal(_logits(runtime, "eq", ids), peft_logits(base, adapter, ids))


CHANGED = {
    "untargeted": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_on_embeddings": dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "dora_on_embedding": dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True),
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", list(CHANGED))
def test_changed_embeddings_are_served_as_peft_serves_them(tmp_path, kind, tied) -> None:
    base = tiny_model("llama", tied=tied)
    adapter = _saved_with_embeddings(base, tmp_path / kind, change_rows=True, **CHANGED[kind])
    runtime = AdapterRuntime(copy.deepcopy(base))
    loaded = runtime.load(kind, adapter)
    assert loaded.report.ok and loaded.base_overrides
    assert any("held for this adapter only" in w for w in loaded.report.warnings)
    if tied:  # one copy shared by both modules, as the base shares one weight
        weights = {id(m.weight) for m in loaded.base_overrides.values()}
        assert len(loaded.base_overrides) == 2 and len(weights) == 1
    ids = input_ids()
    assert torch.equal(_logits(runtime, kind, ids), peft_logits(base, adapter, ids))
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits), "the base is untouched"


def test_mixed_batches_with_other_adapters_stay_exact(tmp_path) -> None:
    base = tiny_model("llama")
    dirs = {
        "own_emb": _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=4, lora_alpha=8,
                                          target_modules=["q_proj", "v_proj"]),
        "own_emb_lora": _saved_with_embeddings(base, tmp_path / "own2", change_rows=True, seed=2, r=2,
                                               lora_alpha=4, target_modules=["embed_tokens", "o_proj"]),
        "plain": make_peft_adapter(base, tmp_path / "plain", seed=3, r=4, lora_alpha=8,
                                   target_modules=["q_proj", "embed_tokens"]),
        "mts": make_peft_adapter(base, tmp_path / "mts", seed=4, r=2, lora_alpha=4, target_modules=["v_proj"],
                                 modules_to_save=["lm_head"]),
    }
    runtime = AdapterRuntime(copy.deepcopy(base))
    for name, path in dirs.items():
        runtime.load(name, path)
    rows = ["own_emb", None, "plain", "own_emb_lora", "mts", "own_emb", None, "own_emb_lora"]
    ids = input_ids(batch=len(rows), length=6)
    mixed = mixed_batch_logits(runtime, base, dirs, rows, ids)
    for adapter in set(rows):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        torch.testing.assert_close(mixed[idx], _logits(runtime, adapter, ids[idx]), rtol=0, atol=1e-5)


def test_greedy_tokens_match_peft(tmp_path) -> None:
    base = tiny_model("llama")
    adapter = _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"])
    runtime = AdapterRuntime(copy.deepcopy(base))
    runtime.load("own", adapter)
    ids = input_ids(batch=1, length=4)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                       do_sample=False)
        with runtime.use("own"):
            ours = runtime.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                          do_sample=False)
    assert ours.tolist() == expected.tolist()


def test_delete_frees_the_copies(tmp_path) -> None:
    base = tiny_model("llama")
    adapter = _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=2, lora_alpha=4,
                                     target_modules=["q_proj", "embed_tokens", "lm_head"])
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    before = storage_bytes(list(model.parameters()) + list(model.buffers()))
    names_before = [n for n, _ in model.named_modules()]
    loaded = runtime.load("own", adapter)
    copies = {name: weakref.ref(m.weight) for name, m in loaded.base_overrides.items()}
    assert set(copies) == {"model.embed_tokens", "lm_head"}
    copy_bytes = sum(m.weight.numel() * m.weight.element_size() for m in loaded.base_overrides.values())
    assert loaded.resident_bytes >= copy_bytes == 2 * 96 * 32 * 4
    held = [weakref.ref(t) for t in loaded.tensors()]
    resident = loaded.resident_bytes
    assert runtime.delete("own") == resident
    del loaded
    gc.collect()
    assert all(r() is None for r in copies.values()) and all(r() is None for r in held)
    assert [n for n, _ in model.named_modules()] == names_before
    assert storage_bytes(list(model.parameters()) + list(model.buffers())) == before
    ids = input_ids()
    assert torch.equal(_logits(runtime, None, ids), base(input_ids=ids).logits)


def test_fused_adapter_with_own_embeddings_matches_peft(tmp_path) -> None:
    base = tiny_model("llama")
    adapter = _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=2, lora_alpha=4,
                                     target_modules=["q_proj", "embed_tokens"])
    runtime = AdapterRuntime(copy.deepcopy(base))
    runtime.load("own", adapter)
    runtime.fuse("own")
    ids = input_ids()
    torch.testing.assert_close(_logits(runtime, "own", ids), peft_logits(base, adapter, ids), rtol=1e-5, atol=1e-5)


def test_exported_checkpoint_carries_the_adapters_embeddings(tmp_path) -> None:
    """The merged checkpoint (GET .../export) is the adapter as served: its own embeddings, LoRA on top."""
    import io
    import tarfile

    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from service.merging.export import MergedCheckpoint, stream_checkpoint_tar

    base = tiny_model("llama")
    adapter = _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=2, lora_alpha=4,
                                     target_modules=["q_proj", "embed_tokens"])
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    loaded = runtime.load("own", adapter)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    data = b"".join(stream_checkpoint_tar(MergedCheckpoint(model, runtime.index, loaded), tok, "merged"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged", dtype=torch.float32).eval()
    ids = input_ids()
    with torch.no_grad():
        got = exported(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(base, adapter, ids), rtol=0, atol=1e-5)


def test_weighted_merge_refuses_sources_with_own_embeddings(tmp_path) -> None:
    from service.merging import MergeError, MergeSpec, merge

    base = tiny_model("llama")
    own = _saved_with_embeddings(base, tmp_path / "own", change_rows=True, r=2, target_modules=["q_proj"])
    plain = make_peft_adapter(base, tmp_path / "plain", r=2, target_modules=["q_proj"])
    runtime = AdapterRuntime(copy.deepcopy(base))
    sources = [runtime.load("own", own), runtime.load("plain", plain)]
    with pytest.raises(MergeError, match="save_embedding_layers"):
        merge(sources, MergeSpec("linear", [1, 1]), runtime.index.modules)


def test_resized_vocabulary_is_refused_naming_both_sizes(tmp_path) -> None:
    """PEFT's default save_embedding_layers="auto" writes the embeddings because the vocabulary was resized;
    PEFT cannot load the file onto the unresized base either (a size mismatch error)."""
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")  # "auto" compares with the base's config on disk
    resized = type(base).from_pretrained(tmp_path / "base").eval()
    resized.resize_token_embeddings(128, mean_resizing=False)
    with torch.random.fork_rng():
        peft_model = get_peft_model(resized, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "resized")  # save_embedding_layers="auto"
    saved = load_file(str(tmp_path / "resized" / "adapter_model.safetensors"))
    assert saved[PREFIX + "lm_head.weight"].shape == (128, 32), "auto turned save_embedding_layers on"

    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "resized")
    model = copy.deepcopy(base)
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(model).load("resized", tmp_path / "resized")
    report = info.value.report
    [line] = report.base_mismatches
    assert "128 tokens" in line and "has 96" in line and "resize_token_embeddings(128)" in line
    assert report.unexpected_keys == [] and report.shape_mismatches == []
    assert line in info.value.message


def test_tied_embeddings_saved_with_different_values_are_refused(tmp_path) -> None:
    """PEFT writes both into the one tied weight, so which value it serves depends on load order."""
    base = tiny_model("llama", tied=True)
    adapter = _saved_with_embeddings(base, tmp_path / "eq", change_rows=False, r=4, target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + "lm_head.weight"] + 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(copy.deepcopy(base)).load("tied", adapter)
    assert "tied" in info.value.report.base_mismatches[0]


# ---- the load report (issue 16.5) and PEFT's peft_type rule --------------------------------------------------

def _plain_adapter(tmp_path: Path, **config_updates) -> tuple[torch.nn.Module, Path]:
    base = tiny_model("llama")
    adapter = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_updates}))
    return base, adapter


@pytest.mark.parametrize("adapter_base,served,warned", [
    ("org/other-model", "org/tiny-llama", True),
    ("org/tiny-llama", "org/tiny-llama", False),
    ("org/tiny-llama", "/models/tiny-llama/", False),  # a local copy of the hub model
    (None, "org/tiny-llama", False),
])
def test_report_warns_when_trained_on_another_base(tmp_path, adapter_base, served, warned) -> None:
    base, adapter = _plain_adapter(tmp_path, base_model_name_or_path=adapter_base)
    report = AdapterRuntime(copy.deepcopy(base), model_name=served).load("a", adapter).report
    warnings = [w for w in report.warnings if "trained on base model" in w]
    assert bool(warnings) == warned and report.ok
    if warned:
        assert adapter_base in warnings[0] and served in warnings[0]


def test_empty_tensors_get_one_line(tmp_path) -> None:
    """What a DeepSpeed ZeRO-3 save writes when the sharded parameters were not gathered."""
    base, adapter = _plain_adapter(tmp_path)
    path = adapter / "adapter_model.safetensors"
    save_file({k: torch.empty(0) for k in load_file(str(path))}, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(copy.deepcopy(base)).load("a", adapter)
    report = info.value.report
    assert len(report.problems) == 1 and report.shape_mismatches == []
    assert "every tensor" in report.problems[0] and "ZeRO-3" in report.problems[0]


def test_lowercase_peft_type_is_refused_as_peft_does(tmp_path) -> None:
    from peft import PeftConfig

    base, adapter = _plain_adapter(tmp_path, peft_type="lora")
    with pytest.raises(KeyError):
        PeftConfig.from_pretrained(adapter)
    with pytest.raises(AdapterValidationError) as info:
        AdapterRuntime(copy.deepcopy(base)).load("a", adapter)
    [error] = info.value.report.config_errors
    assert "peft_type 'lora'" in error and "LORA" in error
