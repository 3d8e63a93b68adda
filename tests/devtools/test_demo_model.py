"""The embedded demo model: deterministic weights, exact byte-level tokenizer, atomic cache."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.devtools.demo_model import (
    BOS_ID,
    EOS_ID,
    MARKER_FILE,
    PAD_ID,
    VOCAB_SIZE,
    build_demo_model,
    build_demo_tokenizer,
    ensure_demo_model,
)

TEXTS = [
    "",
    "hello world",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld 日本語 🎉",
    "<s> </s> <pad> look like specials",
    "\x00\x7f control",
    "a" * 300,
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("cache") / "demo-model")


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_demo_model().state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    second = build_demo_model().state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_model_shape() -> None:
    model = build_demo_model()
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (VOCAB_SIZE, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 256)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(text: str) -> None:
    tok = build_demo_tokenizer()
    ids = tok.encode(text)
    assert ids[0] == BOS_ID and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_ensure_saves_complete_loadable_model(demo_dir: Path) -> None:
    assert (demo_dir / MARKER_FILE).is_file()
    tok = AutoTokenizer.from_pretrained(demo_dir)
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    loaded = AutoModelForCausalLM.from_pretrained(demo_dir).state_dict()
    built = build_demo_model().state_dict()
    assert all(torch.equal(loaded[k], built[k]) for k in built)
    assert loaded["lm_head.weight"].dtype == torch.float32
    assert not [p for p in demo_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_ensure_reuses_complete_cache(demo_dir: Path) -> None:
    stamp = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(demo_dir) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_replaces_partial_or_stale_cache(tmp_path: Path) -> None:
    partial = tmp_path / "demo"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # crashed copy from elsewhere: no marker
    assert ensure_demo_model(partial) == partial
    assert (partial / MARKER_FILE).is_file() and (partial / "model.safetensors").is_file()
    (partial / MARKER_FILE).write_text(json.dumps({"name": "demo-llama-bytes", "recipe_version": 0}))
    ensure_demo_model(partial)
    assert json.loads((partial / MARKER_FILE).read_text())["recipe_version"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_generate_runs(demo_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(demo_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    batch = tok(["hi", "longer prompt"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_concurrent_builds_race_safely(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: ensure_demo_model(target), range(3)))
    assert results == [target] * 3
    assert (target / MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # losers discarded their temp dirs
