"""Weighted merges against PEFT's add_weighted_adapter (the oracle), and where we deliberately differ."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import input_ids, make_peft_adapter, tiny_model
from peft import PeftModel

from service.merging import MergeError, MergeSpec, merge
from service.merging.adapter_files import write_peft_adapter
from service.runtime import AdapterRuntime

SAME_RANK = {
    "x": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "y": dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
    "z": dict(r=4, lora_alpha=4, target_modules=["v_proj", "embed_tokens"]),
}
WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("merge")
    dirs = {n: make_peft_adapter(base, root / n, seed=i + 3, **kw) for i, (n, kw) in enumerate(SAME_RANK.items())}
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    loaded = [runtime.load(n, d) for n, d in dirs.items()]
    return base, dirs, runtime, loaded, root


def peft_merge(base, dirs, tmp_path, method: str, seed: int | None = None, **kwargs):
    """PEFT's merged tensors (in memory) and the logits of its merged adapter saved and loaded again.

    PEFT's in-memory SVD factors keep LAPACK's column-major strides, which changes matmul accumulation by
    ~1e-7; the stored adapter (what a server serves) is the fair comparison for logits.
    """
    names = list(dirs)
    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(dirs[n], adapter_name=n)
    if seed is not None:
        torch.manual_seed(seed)
    model.add_weighted_adapter(names, WEIGHTS, "merged", combination_type=method, **kwargs)
    tensors = {k.replace(".merged", ""): v for k, v in model.state_dict().items() if ".merged" in k}
    model.save_pretrained(tmp_path / "peft", selected_adapters=["merged"])
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft" / "merged").eval()
    with torch.no_grad():
        return tensors, reloaded(input_ids=input_ids()).logits


def our_merge(base, runtime, loaded, tmp_path, spec: MergeSpec):
    merged = merge(loaded, spec, runtime.index.modules)
    path = write_peft_adapter(merged, tmp_path / f"merged-{spec.method}")
    model = copy.deepcopy(base)
    fresh = AdapterRuntime(model)
    fresh.load("merged", path)
    with torch.no_grad(), fresh.use("merged"):
        return merged.tensors, model(input_ids=input_ids()).logits


def assert_same(ours, theirs) -> None:
    our_tensors, our_logits = ours
    peft_tensors, peft_logits = theirs
    assert set(our_tensors) == set(peft_tensors)
    for key, tensor in our_tensors.items():
        assert torch.equal(tensor, peft_tensors[key]), key
    assert torch.equal(our_logits, peft_logits)


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}),
        ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.6}), ("ties_svd", {"density": 0.5}),
        ("magnitude_prune_svd", {"density": 0.4}),
    ],
)
def test_deterministic_methods_match_peft(setup, tmp_path, method, kwargs) -> None:
    base, dirs, runtime, loaded, _ = setup
    spec = MergeSpec(method=method, weights=WEIGHTS, **kwargs)
    assert_same(our_merge(base, runtime, loaded, tmp_path, spec), peft_merge(base, dirs, tmp_path, method, **kwargs))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_random_methods_are_reproducible_and_match_peft_with_the_same_seed(setup, tmp_path, method) -> None:
    base, dirs, runtime, loaded, _ = setup
    spec = MergeSpec(method=method, weights=WEIGHTS, density=0.5, seed=123)
    first = our_merge(base, runtime, loaded, tmp_path / "1", spec)
    again = our_merge(base, runtime, loaded, tmp_path / "2", spec)
    other = our_merge(base, runtime, loaded, tmp_path / "3", MergeSpec(method, WEIGHTS, 0.5, seed=7))
    assert torch.equal(first[1], again[1]) and not torch.equal(first[1], other[1])
    # PEFT draws DARE masks from the global RNG after its adapter init consumed some of it, so whole-merge
    # equality with PEFT is not defined; the merge functions themselves are compared in test_merge_functions.


def test_rslora_sources_are_not_overscaled(tmp_path) -> None:
    """PEFT keeps use_rslora on the result (scaling √r instead of 1); ours equals the exact sum of deltas."""
    base = tiny_model("llama")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    runtime = AdapterRuntime(copy.deepcopy(base))
    sources = [runtime.load("a", a), runtime.load("b", b)]
    merged = merge(sources, MergeSpec("cat", [1.0, 0.5]), runtime.index.modules)
    name = "model.layers.0.self_attn.q_proj"
    prefix = f"base_model.model.{name}"
    got = merged.tensors[f"{prefix}.lora_B.weight"] @ merged.tensors[f"{prefix}.lora_A.weight"]
    wa, wb = sources[0].modules[name], sources[1].modules[name]
    expected = 1.0 * wa.scaling * (wa.B @ wa.A) + 0.5 * wb.scaling * (wb.B @ wb.A)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert merged.config["use_rslora"] is False and merged.config["lora_alpha"] == merged.config["r"]


def test_modules_to_save_come_from_the_trained_copy(tmp_path) -> None:
    base = tiny_model("llama")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"],
                          modules_to_save=["lm_head"])
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    runtime = AdapterRuntime(copy.deepcopy(base))
    sources = [runtime.load("a", a), runtime.load("b", b)]
    merged = merge(sources, MergeSpec("linear", [0.5, 0.5]), runtime.index.modules)
    trained = sources[0].replacements["lm_head"].weight
    assert torch.equal(merged.tensors["base_model.model.lm_head.weight"], trained)
    assert not torch.equal(trained, base.lm_head.weight)
    assert merged.config["modules_to_save"] == ["lm_head"]


def test_incompatible_sources_explain_why(setup, tmp_path) -> None:
    base, _, runtime, loaded, root = setup
    other = make_peft_adapter(base, root / "r8", seed=9, r=8, lora_alpha=8, target_modules=["q_proj"])
    dora = make_peft_adapter(base, root / "dora", seed=9, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    fresh = AdapterRuntime(copy.deepcopy(base))
    r8, dora_loaded = fresh.load("r8", other), fresh.load("dora", dora)
    with pytest.raises(MergeError, match="same rank"):
        merge([loaded[0], r8], MergeSpec("linear", [1, 1]), runtime.index.modules)
    merge([loaded[0], r8], MergeSpec("cat", [1, 1]), runtime.index.modules)  # cat allows different ranks
    with pytest.raises(MergeError, match="DoRA"):
        merge([loaded[0], dora_loaded], MergeSpec("cat", [1, 1]), runtime.index.modules)
    with pytest.raises(MergeError, match="density"):
        merge(loaded, MergeSpec("ties", WEIGHTS), runtime.index.modules)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_with_density_zero_is_refused_naming_density(setup, method) -> None:
    """DARE divides the kept entries by density: 0 used to produce NaN (reported as NaN in lora_A)."""
    _, _, runtime, loaded, _ = setup
    with pytest.raises(MergeError, match=f"density must be above 0 for method '{method}'"):
        merge(loaded, MergeSpec(method, WEIGHTS, density=0.0, seed=1), runtime.index.modules)
