"""One forward may carry rows for different adapters and for the base; each row equals its own batch."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import input_ids, make_peft_adapter, peft_logits, tiny_model

from service.runtime import AdapterRuntime
from service.runtime.adapter_types.lora import weights as lora_weights_mod

ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "emb_mts": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj"], modules_to_save=["lm_head"]),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
    "rslora": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
}


def _loaded(base, tmp_path, configs: dict[str, dict], seed: int):
    """PEFT adapters made from `configs` (adapter i seeded seed + i), loaded into a runtime on a copy of `base`."""
    dirs = {n: make_peft_adapter(base, tmp_path / n, seed=seed + i, **kw) for i, (n, kw) in enumerate(configs.items())}
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    for name, path in dirs.items():
        runtime.load(name, path)
    return dirs, model, runtime


def _runtime_with_adapters(tmp_path, arch: str = "llama"):
    base = tiny_model(arch)
    dirs, model, runtime = _loaded(base, tmp_path, ADAPTERS, seed=1)
    return base, model, runtime, dirs


def test_mixed_rows_equal_single_adapter_batches_and_peft(tmp_path) -> None:
    base, model, runtime, dirs = _runtime_with_adapters(tmp_path)
    rows = ["lora", None, "emb_mts", "dora", "lora", "rslora", None, "emb_mts"]
    ids = input_ids(batch=len(rows), length=6)
    with torch.no_grad(), runtime.route(rows):
        mixed = model(input_ids=ids).logits
    for adapter in set(rows):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        with torch.no_grad(), runtime.use(adapter):
            alone = model(input_ids=ids[idx]).logits
        torch.testing.assert_close(mixed[idx], alone, rtol=0, atol=1e-5)
        expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
        torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)


def test_rows_of_one_adapter_are_applied_together(tmp_path, monkeypatch) -> None:
    """The LoRA math runs once per (module, adapter group), never once per row."""
    _, model, runtime, _ = _runtime_with_adapters(tmp_path)
    calls: list[int] = []
    real = lora_weights_mod.apply_linear

    def counting(w, base, x, y):
        calls.append(x.shape[0])
        return real(w, base, x, y)

    monkeypatch.setattr(lora_weights_mod, "apply_linear", counting)
    rows = ["lora"] * 3 + [None] * 2 + ["lora"] * 2
    with torch.no_grad(), runtime.route(rows):
        model(input_ids=input_ids(batch=len(rows)))
    lora_modules = 2 * 2  # q_proj and v_proj in 2 layers
    assert calls == [5] * lora_modules


def test_mixed_batch_works_on_gpt2(tmp_path) -> None:
    base = tiny_model("gpt2")
    a = make_peft_adapter(base, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["c_attn"])
    b = make_peft_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=8, target_modules=["c_fc", "wte"],
                          modules_to_save=["lm_head"])
    model = copy.deepcopy(base)
    runtime = AdapterRuntime(model)
    runtime.load("a", a)
    runtime.load("b", b)
    rows = ["b", "a", None, "b"]
    ids = input_ids(batch=4)
    with torch.no_grad(), runtime.route(rows):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[[1]], peft_logits(base, a, ids[[1]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[[0, 3]], peft_logits(base, b, ids[[0, 3]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[[2]], base(input_ids=ids[[2]]).logits, rtol=0, atol=1e-5)


def test_generate_in_mixed_batch(tmp_path) -> None:
    """Greedy decoding with a KV cache through `generate` keeps each row on its adapter."""
    base, model, runtime, dirs = _runtime_with_adapters(tmp_path)
    rows = ["emb_mts", None, "lora"]
    ids = input_ids(batch=3, length=5)
    with torch.no_grad(), runtime.route(rows):
        mixed = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, adapter in enumerate(rows):
        with torch.no_grad(), runtime.use(adapter):
            alone = model.generate(ids[[i]], max_new_tokens=6, do_sample=False, pad_token_id=0)
        n = alone.shape[1]  # a row that hit EOS alone is padded in the batch
        assert torch.equal(mixed[[i], :n], alone)
        assert (mixed[i, n:] == 0).all()


def test_stacked_path_with_different_ranks_and_bias(tmp_path) -> None:
    """Plain-LoRA rows of several adapters go through the gathered (stacked) matmul path."""
    import gc
    import weakref

    base = tiny_model("llama")
    configs = {
        "r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "r8": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "bias": dict(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"], lora_bias=True),
    }
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=7)
    rows = ["r8", "bias", None, "r2", "r8", "bias"]
    for length in (5, 1):  # prefill-shaped (per-group path), then decode-shaped (one token per row: stacked)
        ids = input_ids(batch=len(rows), length=length)
        for _ in range(2):  # the second forward reuses the stacked weights and row layout
            with torch.no_grad(), runtime.route(rows):
                mixed = model(input_ids=ids).logits
        for adapter in set(rows):
            idx = [i for i, r in enumerate(rows) if r == adapter]
            expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
            torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)
    wrapper = runtime._wrappers["model.layers.0.self_attn.v_proj"]
    assert wrapper._stack is not None and wrapper._stack.adapter_ids == ("r8", "bias", "r2")
    stacked = weakref.ref(wrapper._stack.A)
    runtime.delete("r8")
    gc.collect()
    assert stacked() is None, "deleting an adapter drops stacked copies of its weights"


def test_stack_survives_batch_changes_and_rows_stay_exact(tmp_path) -> None:
    """Decode steps: rows joining, leaving or reordering reuse the module's stacked weights (no rebuild) while
    the stack holds every adapter of the batch; each row still equals its adapter alone (PEFT)."""
    base = tiny_model("llama")
    configs = {n: dict(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]) for n, r in
               (("a", 2), ("b", 4), ("c", 8))}
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=3)
    wrapper = runtime._wrappers["model.layers.0.self_attn.q_proj"]
    stacks = []
    for rows in (["a", "b", "c", None], ["c", "a", "b"], ["b", None, "c", "c"], ["a", "b", "c"]):
        ids = input_ids(batch=len(rows), length=1, seed=len(rows))
        with torch.no_grad(), runtime.route(rows):
            mixed = model(input_ids=ids).logits
        stacks.append(wrapper._stack)
        for adapter in set(rows):
            idx = [i for i, r in enumerate(rows) if r == adapter]
            expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
            torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)
    assert all(s is stacks[0] for s in stacks), "the stack is built once for these layouts"


def test_runs_or_whole_batch_by_cost(tmp_path) -> None:
    """Contiguous rows take per-adapter runs when they cost less than the whole-batch stack (at CPU launch cost:
    many adapters of large rank on few rows each), and the stack's three kernels when runs cost more."""
    from types import SimpleNamespace

    from service.runtime.adapter_types.lora.stacked import StackedLora

    def lora(rank: int) -> SimpleNamespace:  # what StackedLora.build reads of a LoraFactors
        return SimpleNamespace(kind="linear", A=torch.randn(rank, 512), B=torch.randn(512, rank), scaling=2.0,
                               rank=rank, bias=None, dora_scale=None)

    big = StackedLora.build(tuple(f"a{i}" for i in range(10)), [lora(64) for _ in range(10)])
    assert big.layout(tuple(f"a{i}" for i in range(10) for _ in range(2))).runs is not None
    small = StackedLora.build(("a", "b"), [lora(4), lora(4)])
    assert small.layout(("a",) * 10 + ("b",) * 6).runs is None
    assert small.layout(("a",) * 8 + ("b",) * 8).runs == ((0, 16, 0, 8, 2.0, 2),)  # one block: two launches


def test_equal_rank_adapters_side_by_side_run_as_one_block(tmp_path, monkeypatch) -> None:
    """Adapters of one rank, scaling and row count, next to each other in the batch and in the stack, are applied
    by two batched matmuls per block; a different scaling, rank or row count starts a new block; every row still
    equals its adapter alone (PEFT)."""
    from service.runtime.adapter_types.lora import stacked

    monkeypatch.setitem(stacked.LAUNCH_COST_MACS, "cpu", 0.0)
    base = tiny_model("llama")
    configs = {f"a{i}": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) for i in range(3)}
    configs["odd"] = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    configs["big"] = dict(r=8, lora_alpha=8, target_modules=["q_proj"])
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=41)
    # Stack order (descending rank, then first seen): big, a0, a1, a2, odd; columns 0:8, 8:12, ..., 20:24.
    layouts = {
        ("a0", "a0", "a1", "a1", "a2", "a2", "odd", "odd", "big", None):
            ((0, 6, 8, 20, 2.0, 3), (6, 8, 20, 24, 4.0, 1), (8, 9, 0, 8, 1.0, 1)),
        ("a0", "a0", "a1", "a2", "a2", None): ((0, 2, 8, 12, 2.0, 1), (2, 3, 12, 16, 2.0, 1), (3, 5, 16, 20, 2.0, 1)),
    }
    for rows, blocks in layouts.items():
        ids = input_ids(batch=len(rows), length=1, seed=6)
        with torch.no_grad(), runtime.route(list(rows)):
            mixed = model(input_ids=ids).logits
        q = runtime._wrappers["model.layers.0.self_attn.q_proj"]
        if len(rows) == 10:
            assert q._plan.layout.runs == blocks
        for adapter in set(rows):
            idx = [i for i, r in enumerate(rows) if r == adapter]
            expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
            torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)


def test_partition_cuts_by_cost() -> None:
    """Adapters (in stack order) with rows become segments when launches are cheap; one stack when dear."""
    from service.runtime.adapter_types.lora.stacked import partition

    counts, ranks = [1, 1, 4, 0], (64, 32, 8, 8)
    assert partition(counts, ranks, width=1024, batch=8, launch=1e12) is None
    assert partition(counts, ranks, width=1024, batch=8, launch=0.0) == [(0, 1), (1, 2), (2, 3)]  # no rowless one
    assert partition([2, 0, 2], (8, 64, 8), width=64, batch=4, launch=0.0) == [(0, 1), (2, 3)]


@pytest.mark.parametrize("launch", [0.0, 1e12], ids=["segments", "whole-batch"])
def test_stacked_decode_by_segments_equals_peft(tmp_path, monkeypatch, launch: float) -> None:
    """A decode step cut into segments (each run of adapters on its own rows) or run as one stack gives every
    row its adapter's output (PEFT), with rows of the base and of adapters absent from a module in between."""
    from service.runtime.adapter_types.lora import stacked

    monkeypatch.setitem(stacked.LAUNCH_COST_MACS, "cpu", launch)
    base = tiny_model("llama")
    configs = {
        "r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "r8": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        "r4": dict(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"]),
        "r8b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    }
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=11)
    rows = ["r8", "r2", None, "r4", "r8", "r8b", "r2", "r8"]
    ids = input_ids(batch=len(rows), length=1, seed=9)
    with torch.no_grad(), runtime.route(rows):
        mixed = model(input_ids=ids).logits
    q = runtime._wrappers["model.layers.0.self_attn.q_proj"]
    assert (q._plan.layout.segments is not None) == (launch == 0.0)
    if launch == 0.0:
        assert len(q._plan.layout.segments) == 3  # r4 is not on q_proj
    for adapter in set(rows):
        idx = [i for i, r in enumerate(rows) if r == adapter]
        expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
        torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)


def test_segmented_decode_on_a_bfloat16_base(tmp_path, monkeypatch) -> None:
    """Half-precision base: segments add the fp32 LoRA delta and round once, as the whole-batch path does."""
    from service.runtime.adapter_types.lora import stacked

    base = tiny_model("llama").to(torch.bfloat16)
    configs = {n: dict(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]) for n, r in (("a", 2), ("b", 8))}
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=21)
    rows = ["a", "b", None, "b"]
    ids = input_ids(batch=len(rows), length=1, seed=4)
    out = {}
    for launch in (0.0, 1e12):
        monkeypatch.setitem(stacked.LAUNCH_COST_MACS, "cpu", launch)
        runtime.router.generation += 1  # drop the cached plans
        runtime._last_assignment = None  # and the layouts memoised for these rows
        with torch.no_grad(), runtime.route(rows):
            out[launch] = model(input_ids=ids).logits
    assert runtime._wrappers["model.layers.0.self_attn.q_proj"]._plan.layout.segments is None
    torch.testing.assert_close(out[0.0], out[1e12], rtol=0, atol=2e-2)


@pytest.mark.parametrize("length", [1, 5], ids=["decode", "prefill"])
def test_contiguous_rows_run_per_adapter_and_equal_peft(tmp_path, monkeypatch, length: int) -> None:
    """Rows grouped by adapter (as the engine keeps them): a decode step takes the per-adapter runs when launches
    are cheap (two matmuls per adapter on its own rows), a prefill the per-group path on slices of rows, with no
    stack built for it; every row equals its adapter alone (PEFT). Rows of a module's absent adapters and of the
    base sit between the runs."""
    from service.runtime.adapter_types.lora import stacked

    monkeypatch.setitem(stacked.LAUNCH_COST_MACS, "cpu", 0.0)
    base = tiny_model("llama")
    configs = {
        "r2": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "r8": dict(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
        "r4": dict(r=4, lora_alpha=8, target_modules=["v_proj", "down_proj"]),
    }
    dirs, model, runtime = _loaded(base, tmp_path, configs, seed=31)
    rows = ["r8", "r8", "r2", None, "r4", "r4", "r2"]  # r2 is split by base and r4 rows: no run on q_proj
    grouped = ["r8", "r8", "r2", "r2", None, "r4", "r4"]
    for order, runs_on_q in ((rows, False), (grouped, True)):
        ids = input_ids(batch=len(order), length=length, seed=5)
        with torch.no_grad(), runtime.route(order):
            mixed = model(input_ids=ids).logits
        q = runtime._wrappers["model.layers.0.self_attn.q_proj"]
        if length > 1:
            assert q._plan.stack is None
            assert [g.span for g in q._plan.groups] == ([(0, 2), (2, 4)] if runs_on_q else [(0, 2), None])
        else:
            assert (q._plan.layout.runs is not None) == runs_on_q
            if runs_on_q:
                assert [(r0, r1) for r0, r1, *_ in q._plan.layout.runs] == [(0, 2), (2, 4)]
        for adapter in set(order):
            idx = [i for i, r in enumerate(order) if r == adapter]
            expected = peft_logits(base, dirs[adapter], ids[idx]) if adapter else base(input_ids=ids[idx]).logits
            torch.testing.assert_close(mixed[idx], expected, rtol=0, atol=1e-5)
