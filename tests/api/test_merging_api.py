"""Merge, download, export and fused activation over real HTTP."""

from __future__ import annotations

import copy
import io
import tarfile
import zipfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from .conftest import tree, upload
from .test_api import PROMPT, gen


def test_merge_creates_a_normal_adapter(server, adapters) -> None:
    c, store = server.client, server.store
    for name in ("alpha", "beta"):
        assert upload(c, adapters[name], name).status_code == 201
    body = {"adapter_id": "mix", "sources": [{"adapter_id": "alpha", "weight": 0.6},
                                             {"adapter_id": "beta", "weight": 0.4}], "method": "cat"}
    r = c.post("/adapters/merge", json=body)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "mix" and info["rank"] == 12 and info["modules_to_save"] == ["lm_head"]
    assert (store / "mix" / "adapter_model.safetensors").exists()
    tokens = gen(c, PROMPT, "mix").json()["token_ids"]
    assert tokens != gen(c, PROMPT, "alpha").json()["token_ids"]
    assert c.post("/adapters/merge", json=body).status_code == 409, "an existing id is a conflict, not a no-op"
    before = tree(store)
    bad = c.post("/adapters/merge", json={**body, "adapter_id": "bad", "method": "linear"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "incompatible_sources"
    assert "same rank" in bad.json()["error"]["message"]
    assert c.post("/adapters/merge", json={**body, "adapter_id": "bad", "method": "ties"}).status_code == 422
    assert c.post("/adapters/merge", json={**body, "adapter_id": "bad", "sources": [
        {"adapter_id": "nope"}]}).status_code == 404
    assert tree(store) == before
    assert c.delete("/adapters/mix").status_code == 200


def test_download_is_a_peft_adapter(server, adapters, base_model, tmp_path) -> None:
    c = server.client
    assert upload(c, adapters["beta"], "beta").status_code == 201
    r = c.get("/adapters/beta/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        z.extractall(tmp_path / "dl")
    ids = torch.tensor([[5, 17, 99, 3]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "dl").eval()(input_ids=ids).logits
        want = PeftModel.from_pretrained(copy.deepcopy(base_model), adapters["beta"]).eval()(input_ids=ids).logits
    assert torch.equal(got, want)
    assert c.get("/adapters/nope/download").status_code == 404


def test_export_merged_checkpoint(server, adapters, oracle, tmp_path) -> None:
    c = server.client
    assert upload(c, adapters["beta"], "beta").status_code == 201
    with c.stream("POST", "/adapters/beta/export") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        data = b"".join(r.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path, filter="data")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "beta-merged", dtype=torch.float32).eval()
    ids = torch.tensor([oracle.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        want = oracle.model("beta")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fused_activation_over_http(server, adapters, oracle) -> None:
    c = server.client
    for name in ("alpha", "gamma"):
        assert upload(c, adapters[name], name).status_code == 201
    before = {a: gen(c, PROMPT, a).json()["token_ids"] for a in ("alpha", "gamma", "base")}
    assert c.put("/adapters/alpha/activate", params={"fuse": "true"}).json() == {"active": "alpha", "fused": True}
    assert gen(c, PROMPT, None).json()["token_ids"] == oracle.tokens("alpha", PROMPT, 12) == before["alpha"]
    assert {a: gen(c, PROMPT, a).json()["token_ids"] for a in ("alpha", "gamma", "base")} == before
    assert c.delete("/adapters/active").json() == {"active": None}
    assert {a: gen(c, PROMPT, a).json()["token_ids"] for a in ("alpha", "gamma", "base")} == before
