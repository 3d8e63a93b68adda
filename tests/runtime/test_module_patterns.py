"""Config regexes (target/exclude modules, layers_pattern, modules_to_save, rank/alpha pattern keys,
IA3 feedforward_modules) are matched with RE2: same modules and ranks as PEFT, linear time on hostile
patterns, and a clear config error for what RE2 cannot compile or what is too long."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from oracle import tiny_model
from peft import IA3Config, LoraConfig, get_peft_model
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer

from service.runtime import AdapterValidationError
from service.runtime.model_index import ModelIndex
from service.runtime.module_patterns import MAX_PATTERN_CHARS
from service.runtime.plan import plan_adapter

# What PEFT users write (docs, model cards, issues); each is checked against get_peft_model itself.
ORACLE_CONFIGS = {
    "regex suffix alternation": ("llama", dict(target_modules=r".*\.(q_proj|v_proj)$")),
    "regex one exact name": ("llama", dict(target_modules="model.layers.0.self_attn.q_proj")),
    "regex t5-style": ("llama", dict(target_modules=r".*layers.*(self_attn|mlp).*(q|v|up)_proj$")),
    "regex gpt2 conv1d": ("gpt2", dict(target_modules=r".*\.h\.1\..*(c_attn|c_fc)")),
    "list": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "exclude list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"])),
    "exclude regex": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj"],
                                    exclude_modules=r".*layers\.1\..*")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "layers_pattern": ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[0],
                                     layers_pattern="layers")),
    "layers_pattern list gpt2": ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=1,
                                              layers_pattern=["h"])),
    "rank and alpha patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                              rank_pattern={r"layers\.0\.self_attn\.q_proj": 2, "down_proj": 6},
                                              alpha_pattern={r".*\.v_proj": 3, "mlp.up_proj": 5})),
    "modules_to_save excludes its children": ("llama", dict(target_modules=["q_proj", "up_proj"],
                                                            modules_to_save=["mlp"])),
}


def _peft_choice(base: torch.nn.Module, config) -> tuple[torch.nn.Module, dict[str, tuple]]:
    """PEFT's own choice: targeted module -> (rank, scaling) for LoRA, (is_feedforward,) for IA3."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(base), config)
    chosen = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.r:
            chosen[name] = (module.r["default"], module.scaling["default"])
        elif isinstance(module, IA3Layer) and "default" in module.ia3_l:
            chosen[name] = (module.is_feedforward,)
    return model, chosen


def _our_choice(base: torch.nn.Module, adapter: Path) -> dict[str, tuple]:
    plan = plan_adapter("oracle", adapter, ModelIndex.from_model(base))
    return {t.name: ((t.info["rank"], t.info["scaling"]) if "rank" in t.info else (t.info["feedforward"],))
            for t in plan.targets}


@pytest.mark.parametrize("arch,kwargs", ORACLE_CONFIGS.values(), ids=ORACLE_CONFIGS.keys())
def test_targets_and_ranks_equal_peft(arch, kwargs, tmp_path) -> None:
    base = tiny_model(arch)
    model, expected = _peft_choice(base, LoraConfig(**kwargs))
    assert expected, "the example must target something"
    model.save_pretrained(tmp_path)
    assert _our_choice(base, tmp_path) == expected


@pytest.mark.parametrize("feedforward", [r".*\.mlp\.(up|down)_proj", ["down_proj"]], ids=["regex", "list"])
def test_ia3_feedforward_equals_peft(feedforward, tmp_path) -> None:
    base = tiny_model("llama")
    config = IA3Config(target_modules=r".*\.(q_proj|up_proj|down_proj)", feedforward_modules=feedforward)
    model, expected = _peft_choice(base, config)
    assert any(ff for (ff,) in expected.values())
    model.save_pretrained(tmp_path)
    assert _our_choice(base, tmp_path) == expected


# ---- hostile patterns ------------------------------------------------------------------------------------

# Backtracking `re` needs time exponential in the name's length on these: re.fullmatch on the one name
# "model.layers.0.self_attn.q_proj" took 54 s for (.*.*.*.*.*.*.*.*.*.*.*.*Z) and 66 s for ([a-z0-9_.]+)+Z
# (RE2: 40 µs). The q_proj forms also match real modules, so such a config would be stored and paid again at
# every restart.
CATASTROPHIC = [r"(.*.*.*.*.*.*.*.*.*.*.*.*Z)", r"([a-z0-9_.]+)+Z", r"(.*.*.*.*.*.*.*.*.*.*.*.*q_proj)",
                r"(([a-z0-9_]+)+\.?)+q_proj"]
BOUND_S = 1.0  # generous for a loaded 2-core machine; RE2 needs milliseconds


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_adapter(llama, tmp_path_factory) -> Path:
    """A saved PEFT adapter on q_proj (r=4), whose config each test rewrites."""
    out = tmp_path_factory.mktemp("adapter")
    model, _ = _peft_choice(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(out)
    return out


def _plan_with(llama, llama_adapter: Path, tmp_path: Path, **changes):
    config = {**json.loads((llama_adapter / "adapter_config.json").read_text()), **changes}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes((llama_adapter / "adapter_model.safetensors").read_bytes())
    start = time.perf_counter()
    try:
        return plan_adapter("hostile", tmp_path, ModelIndex.from_model(llama)), time.perf_counter() - start
    except AdapterValidationError as exc:
        return exc.report, time.perf_counter() - start


@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                                   "modules_to_save", "layers_pattern"])
def test_catastrophic_patterns_take_linear_time(llama, llama_adapter, tmp_path, field, pattern) -> None:
    changes = {
        "target_modules": {"target_modules": pattern},
        "exclude_modules": {"exclude_modules": pattern},
        "rank_pattern": {"rank_pattern": {pattern: 4}},
        "alpha_pattern": {"alpha_pattern": {pattern: 8}},
        "modules_to_save": {"modules_to_save": [pattern]},
        "layers_pattern": {"layers_pattern": pattern, "layers_to_transform": [0]},
    }[field]
    _, seconds = _plan_with(llama, llama_adapter, tmp_path, **changes)
    assert seconds < BOUND_S


def test_catastrophic_pattern_that_matches_real_modules_loads(llama, llama_adapter, tmp_path) -> None:
    plan, seconds = _plan_with(llama, llama_adapter, tmp_path, target_modules=CATASTROPHIC[2])
    assert seconds < BOUND_S
    assert [t.name for t in plan.targets] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_ia3_catastrophic_feedforward_takes_linear_time(llama, tmp_path) -> None:
    model, _ = _peft_choice(llama, IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    config_path = tmp_path / "ia3" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["feedforward_modules"] = r"(.*.*.*.*.*.*.*.*.*.*.*.*down_proj)"
    config_path.write_text(json.dumps(config))
    start = time.perf_counter()
    plan = plan_adapter("ia3", tmp_path / "ia3", ModelIndex.from_model(llama))
    assert time.perf_counter() - start < BOUND_S
    feedforward = {t.name for t in plan.targets if t.info["feedforward"]}
    assert feedforward == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}


# ---- refused patterns ------------------------------------------------------------------------------------

NOT_RE2 = {
    "lookahead": r"(?!.*k_proj).*_proj",
    "lookbehind": r".*(?<=self_attn\.)q_proj",
    "backreference": r"(.*)\.\1",
    "unbalanced": "(",
}


@pytest.mark.parametrize("pattern", NOT_RE2.values(), ids=NOT_RE2.keys())
@pytest.mark.parametrize("field,changes", [
    ("target_modules", lambda p: {"target_modules": p}),
    ("exclude_modules", lambda p: {"exclude_modules": p}),
    ("rank_pattern key", lambda p: {"rank_pattern": {p: 4}}),
    ("alpha_pattern key", lambda p: {"alpha_pattern": {p: 8}}),
    ("modules_to_save", lambda p: {"modules_to_save": [p]}),
    ("layers_pattern", lambda p: {"layers_pattern": [p], "layers_to_transform": [0]}),
])
def test_pattern_re2_cannot_compile_is_a_config_error(llama, llama_adapter, tmp_path, field, changes,
                                                      pattern) -> None:
    report, _ = _plan_with(llama, llama_adapter, tmp_path, **changes(pattern))
    assert not report.ok
    errors = [e for e in report.config_errors if e.startswith(f"{field}:")]
    assert len(errors) == 1 and "RE2 syntax" in errors[0], report.config_errors


def test_ia3_feedforward_lookahead_is_a_config_error(llama, tmp_path) -> None:
    model, _ = _peft_choice(llama, IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["feedforward_modules"] = r".*(?<!q_)proj"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterValidationError) as info:
        plan_adapter("ia3", tmp_path, ModelIndex.from_model(llama))
    assert any(e.startswith("feedforward_modules:") and "RE2 syntax" in e for e in info.value.report.config_errors)


def test_every_bad_pattern_is_reported_at_once(llama, llama_adapter, tmp_path) -> None:
    report, _ = _plan_with(llama, llama_adapter, tmp_path, exclude_modules="(?=x)",
                           rank_pattern={"q_proj": 4, r"(a)\1": 2}, modules_to_save=["lm_head", "["])
    assert sorted(e.split(":")[0] for e in report.config_errors) == ["exclude_modules", "modules_to_save",
                                                                      "rank_pattern key"]


def test_overlong_pattern_is_a_config_error(llama, llama_adapter, tmp_path) -> None:
    def alternation(n: int) -> str:  # 7n + 3 characters
        return ".*(" + "|".join(["q_proj"] * n) + ")"

    at_limit, over_limit = alternation((MAX_PATTERN_CHARS - 3) // 7), alternation((MAX_PATTERN_CHARS - 3) // 7 + 1)
    assert len(at_limit) <= MAX_PATTERN_CHARS < len(over_limit)
    report, _ = _plan_with(llama, llama_adapter, tmp_path, target_modules=over_limit)
    assert any(e.startswith("target_modules:") and f"limit of {MAX_PATTERN_CHARS}" in e for e in report.config_errors)
    plan, _ = _plan_with(llama, llama_adapter, tmp_path, target_modules=at_limit)
    assert [t.name for t in plan.targets] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
