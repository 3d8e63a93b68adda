"""The MoLoRA plug-in over real HTTP, in a server process that has it installed: upload, serve (alone and
beside a LoRA adapter), refuse merging with a clear 4xx, download, delete; and a 422 naming the installed
types in a server without it."""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
from api.conftest import tree, upload
from api.server import ServerProcess
from oracle import PeftGreedy, make_peft_adapter

from .conftest import plugin_env
from .molora_reference import random_molora, reference_model, write_molora

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
PROMPT = "Mixture of experts"
NEW_TOKENS = 10


def generate(client, adapter_id: str | None) -> dict:
    r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "adapter_id": adapter_id})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture()
def plugin_server(model_dir, plugin_site, tmp_path):
    proc = ServerProcess(model_dir, tmp_path / "store", env=plugin_env(plugin_site))
    yield proc
    proc.stop()


def test_molora_lifecycle_over_http(plugin_server, base_model, tokenizer, tmp_path) -> None:
    c, store = plugin_server.client, tmp_path / "store"
    experts = random_molora(base_model, MODULES, r=4, seed=3, with_bias=(MODULES[1],))
    adapter = write_molora(tmp_path / "moe", experts, lora_alpha=16, top_k=2, temperature=0.8)
    r = upload(c, adapter, "moe")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["type"] == "MOLORA" and info["rank"] == 4 and info["resident_bytes"] > 0

    oracle = PeftGreedy(base_model, tokenizer, {})
    oracle.add("moe", model=reference_model(base_model, experts, lora_alpha=16, top_k=2, temperature=0.8))
    expected, base_expected = oracle.tokens("moe", PROMPT, NEW_TOKENS), oracle.tokens(None, PROMPT, NEW_TOKENS)
    assert expected != base_expected
    assert generate(c, "moe")["token_ids"] == expected

    # Served in the same batches as a LoRA adapter and the base model.
    lora_dir = make_peft_adapter(base_model, tmp_path / "lora", r=4, lora_alpha=8,
                                 target_modules=["q_proj", "o_proj"])
    assert upload(c, lora_dir, "lora").status_code == 201
    oracle.add("lora", lora_dir)
    lora_expected = oracle.tokens("lora", PROMPT, NEW_TOKENS)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda a: generate(c, a)["token_ids"], ["moe", "lora", None] * 2))
    assert outs == [expected, lora_expected, base_expected] * 2

    # Merging: a clear 4xx for each route into base weights, and nothing changed.
    before = tree(store)
    fused = c.put("/adapters/moe/activate", params={"fuse": "true"})
    assert fused.status_code == 422 and fused.json()["error"]["code"] == "not_mergeable"
    assert "input-dependent gates" in fused.json()["error"]["message"]
    exported = c.post("/adapters/moe/export")
    assert exported.status_code == 422 and exported.json()["error"]["code"] == "not_mergeable"
    merged = c.post("/adapters/merge", json={"adapter_id": "mix", "method": "linear",
                                             "sources": [{"adapter_id": "moe"}, {"adapter_id": "lora"}]})
    assert merged.status_code == 422 and "LoRA adapters only" in merged.json()["error"]["message"]
    assert tree(store) == before and c.get("/adapters").json()["active"] is None
    assert generate(c, "moe")["token_ids"] == expected

    # Download gives back exactly the uploaded files.
    r = c.get("/adapters/moe/download")
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert archive.read(name) == (adapter / name).read_bytes()

    # Delete: gone from the API, the store and model memory; the LoRA adapter still serves.
    assert c.delete("/adapters/moe").status_code == 200
    assert c.get("/adapters/moe").status_code == 404
    assert c.post("/generate", json={"prompt": PROMPT, "adapter_id": "moe"}).status_code == 404
    assert not (store / "moe").exists()
    assert c.get("/health").json()["adapter_bytes"] == c.get("/adapters/lora").json()["resident_bytes"]
    assert generate(c, "lora")["token_ids"] == lora_expected


def test_server_without_the_plugin_names_installed_types(server, base_model, tmp_path) -> None:
    adapter = write_molora(tmp_path / "moe", random_molora(base_model, MODULES), lora_alpha=8, top_k=2)
    r = upload(server.client, adapter, "moe")
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "'MOLORA'" in message and all(t in message for t in ("LORA", "IA3", "LOHA"))
    assert tree(server.store / "moe") == [] and server.client.get("/adapters").json()["adapters"] == []
