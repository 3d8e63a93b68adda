"""Over HTTP: adapter files that carry the base's embeddings (save_embedding_layers), the upload's warnings,
and the access log's adapter id. PEFT-made files; PEFT's greedy tokens are the oracle."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from oracle import PeftGreedy
from peft import LoraConfig, get_peft_model

from .conftest import upload

PROMPT = "Hello adapters"


def _with_embeddings(base: torch.nn.Module, out_dir: Path, vocab: int | None = None, **config) -> Path:
    """A PEFT adapter saved with save_embedding_layers=True: changed embedding rows, or a resized vocabulary.
    `config` adds LoraConfig fields (e.g. modules_to_save)."""
    model = copy.deepcopy(base)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            emb[10:40] = torch.randn(emb[10:40].shape, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      **config))
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out_dir, save_embedding_layers=True)
    return out_dir


@pytest.fixture(scope="module")
def own_embeddings(base_model, tmp_path_factory) -> Path:
    return _with_embeddings(base_model, tmp_path_factory.mktemp("own") / "own")


def _gen(client, adapter_id: str | None) -> dict:
    body = {"prompt": PROMPT, "max_new_tokens": 12, **({"adapter_id": adapter_id} if adapter_id else {})}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_serves_own_embeddings_as_peft_and_delete_frees_them(server, base_model, tokenizer, adapters,
                                                                    own_embeddings) -> None:
    c = server.client
    r = upload(c, own_embeddings, "own")
    assert r.status_code == 201, r.text
    info = r.json()
    assert any("held for this adapter only" in w for w in info["warnings"])
    vocab, width = base_model.get_input_embeddings().weight.shape
    assert info["resident_bytes"] >= 2 * vocab * width * 4  # its own input and output embeddings
    assert upload(c, adapters["alpha"], "alpha").status_code == 201

    oracle = PeftGreedy(base_model, tokenizer, {"own": own_embeddings, "alpha": adapters["alpha"]})
    expected_own = oracle.tokens("own", PROMPT, 12)
    assert expected_own != oracle.tokens(None, PROMPT, 12)
    assert _gen(c, "own")["token_ids"] == expected_own
    assert _gen(c, "alpha")["token_ids"] == oracle.tokens("alpha", PROMPT, 12)
    assert _gen(c, None)["token_ids"] == oracle.tokens(None, PROMPT, 12)

    alpha_bytes = c.get("/adapters/alpha").json()["resident_bytes"]
    assert c.delete("/adapters/own").status_code == 200
    assert c.get("/health").json()["adapter_bytes"] == alpha_bytes


def test_resized_vocabulary_is_a_422_naming_both_sizes(server, base_model, tmp_path) -> None:
    vocab = base_model.get_input_embeddings().weight.shape[0]
    adapter = _with_embeddings(base_model, tmp_path / "resized", vocab=vocab + 32)
    r = upload(server.client, adapter, "resized")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    [line] = [p for p in error["details"]["problems"] if "vocabulary" in p]
    assert f"{vocab + 32} tokens" in line and f"has {vocab}" in line and "Serve a base model" in line
    assert "unexpected key" not in error["message"] and "vocabulary" in error["message"]
    assert server.client.get("/adapters").json()["adapters"] == []


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_modules_to_save_embedding_with_saved_embeddings_is_served_as_peft(server, base_model, tokenizer, adapters,
                                                                           tmp_path, module) -> None:
    """Issue 16.4: the file also holds `{m}.modules_to_save.weight` and `{m}.original_module.weight`."""
    adapter = _with_embeddings(base_model, tmp_path / "mts", modules_to_save=[module])
    c = server.client
    r = upload(c, adapter, "mts")
    assert r.status_code == 201, r.text
    assert upload(c, adapters["alpha"], "alpha").status_code == 201
    oracle = PeftGreedy(base_model, tokenizer, {"mts": adapter, "alpha": adapters["alpha"]})
    assert oracle.tokens("mts", PROMPT, 12) != oracle.tokens(None, PROMPT, 12)
    # one batch mixing the adapter with another and the base; prompts of one token length (no padding)
    jobs = [(a, p) for a in ("mts", "alpha", None) for p in ("abcd", "wxyz")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: c.post("/generate", json={
            "prompt": job[1], "max_new_tokens": 10, **({"adapter_id": job[0]} if job[0] else {})}), jobs))
    for (name, prompt), res in zip(jobs, results, strict=True):
        assert res.status_code == 200, res.text
        assert res.json()["token_ids"] == oracle.tokens(name, prompt, 10), (name, prompt)

    alpha_bytes = c.get("/adapters/alpha").json()["resident_bytes"]
    assert c.delete("/adapters/mts").status_code == 200
    assert c.get("/health").json()["adapter_bytes"] == alpha_bytes


def test_modules_to_save_embedding_on_a_resized_vocabulary_is_a_422_naming_both_sizes(server, base_model,
                                                                                      tmp_path) -> None:
    vocab = base_model.get_input_embeddings().weight.shape[0]
    adapter = _with_embeddings(base_model, tmp_path / "resized", vocab=vocab + 32, modules_to_save=["lm_head"])
    r = upload(server.client, adapter, "resized")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    [line] = [p for p in error["details"]["problems"] if "vocabulary" in p]
    assert f"{vocab + 32} tokens" in line and f"has {vocab}" in line
    assert not any(p.startswith(("unexpected key", "shape mismatch")) for p in error["details"]["problems"])


def test_upload_warns_about_another_base_model(server, adapters, tmp_path) -> None:
    adapter = tmp_path / "other-base"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((adapters["alpha"] / name).read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/another"}))
    r = upload(server.client, adapter, "other")
    assert r.status_code == 201, r.text
    [warning] = r.json()["warnings"]
    assert "org/another" in warning and "trained on base model" in warning
    assert server.client.get("/adapters/other").json()["warnings"] == [warning]
    assert upload(server.client, adapters["alpha"], "same").json()["warnings"] == []


def test_access_log_names_the_adapter_asked_for(server) -> None:
    seen = len(server.lines)  # the shared server's log holds earlier tests' 404s too
    r = server.client.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "adapter_id": "no-such-adapter"})
    assert r.status_code == 404
    line = server.wait_for_line(lambda text: "POST /generate -> 404" in text, since=seen)
    assert "adapter=no-such-adapter" in line
    seen = len(server.lines)
    r = server.client.post("/v1/completions", json={"model": "also-missing", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404
    line = server.wait_for_line(lambda text: "POST /v1/completions -> 404" in text, since=seen)
    assert "adapter=also-missing" in line
