"""The REST contract over real HTTP against a server process, with PEFT's greedy tokens as the oracle."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

from .conftest import tree, upload
from .server import ServerProcess

PROMPT = "Hello adapters"


def gen(client, prompt: str, adapter_id=None, max_new_tokens: int = 12, **extra):
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, **extra}
    if adapter_id is not ...:
        body["adapter_id"] = adapter_id
    return client.post("/generate", json=body)


def test_health_and_empty_state(server) -> None:
    health = server.client.get("/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    assert health["active_adapter"] is None and health["adapters"] == 0 and health["adapter_bytes"] == 0
    assert server.client.get("/adapters").json() == {"adapters": [], "active": None}


def test_upload_activate_generate_delete(server, adapters, oracle) -> None:
    c, store = server.client, server.store
    r = upload(c, adapters["beta"], "beta")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "beta" and info["type"] == "LORA" and info["rank"] == 8 and info["alpha"] == 16
    assert info["modules_to_save"] == ["lm_head"] and info["active"] is False and info["resident_bytes"] > 0
    assert len(info["sha256"]) == 64 and info["created_at"]
    assert c.get("/adapters/beta").json() == info
    assert c.get("/health").json()["adapter_bytes"] == info["resident_bytes"]

    expected_base = oracle.tokens(None, PROMPT, 12)
    expected_beta = oracle.tokens("beta", PROMPT, 12)
    assert expected_base != expected_beta
    out = gen(c, PROMPT, None).json()
    assert out["token_ids"] == expected_base and out["adapter_id"] == "base"
    assert gen(c, PROMPT, "beta").json()["token_ids"] == expected_beta

    assert c.put("/adapters/beta/activate").json() == {"active": "beta"}
    out = gen(c, PROMPT, None).json()
    assert out["token_ids"] == expected_beta and out["adapter_id"] == "beta"
    assert out["usage"] == {"prompt_tokens": len(oracle.tokenizer(PROMPT)["input_ids"]),
                            "completion_tokens": len(expected_beta)}
    assert out["text"] == oracle.tokenizer.decode(expected_beta, skip_special_tokens=True)
    assert gen(c, PROMPT, "base").json()["token_ids"] == expected_base
    assert c.get("/adapters").json()["active"] == "beta"

    assert c.delete("/adapters/active").json() == {"active": None}
    assert gen(c, PROMPT, None).json()["token_ids"] == expected_base

    c.put("/adapters/beta/activate")
    deleted = c.delete("/adapters/beta").json()
    assert deleted == {"deleted": "beta", "freed_bytes": info["resident_bytes"]}
    assert c.get("/adapters").json() == {"adapters": [], "active": None}
    assert c.get("/health").json()["adapter_bytes"] == 0
    assert gen(c, PROMPT, "beta").status_code == 404
    assert not (store / "beta").exists()


def test_archives_and_generated_ids(server, adapters) -> None:
    c = server.client
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            z.write(adapters["alpha"] / name, f"alpha/{name}")
    r = c.post("/adapters", files=[("files", ("alpha.zip", zbuf.getvalue()))], data={"adapter_id": "from-zip"})
    assert r.status_code == 201, r.text
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as t:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            t.add(adapters["gamma"] / name, name)
    r = c.post("/adapters", files=[("files", ("gamma.tar.gz", tbuf.getvalue()))])
    assert r.status_code == 201, r.text
    generated = r.json()["id"]
    assert {a["id"] for a in c.get("/adapters").json()["adapters"]} == {"from-zip", generated}


def test_concurrent_requests_for_different_adapters(server, adapters, oracle) -> None:
    c = server.client
    for name in adapters:
        assert upload(c, adapters[name], name).status_code == 201
    # prompts of one token length, so batching adds no padding and greedy tokens stay PEFT's exactly
    jobs = [(a, p) for a in ("alpha", "beta", "gamma", "base") for p in ("abcd", "wxyz")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: gen(c, job[1], job[0], max_new_tokens=10), jobs))
    for (adapter, prompt), r in zip(jobs, results, strict=True):
        assert r.status_code == 200, r.text
        expected = oracle.tokens(None if adapter == "base" else adapter, prompt, 10)
        assert r.json()["token_ids"] == expected, (adapter, prompt)


def test_sampling_is_reproducible_with_a_seed(server, adapters) -> None:
    c = server.client
    upload(c, adapters["alpha"], "alpha")
    a = gen(c, PROMPT, "alpha", max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7).json()
    b = gen(c, PROMPT, "alpha", max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7).json()
    assert a["token_ids"] == b["token_ids"]


def test_stop_strings(server, oracle) -> None:
    full = gen(server.client, PROMPT, "base", max_new_tokens=12).json()
    assert len(full["text"]) > 2
    stop = full["text"][1:3]
    out = gen(server.client, PROMPT, "base", max_new_tokens=12, stop=[stop]).json()
    assert out["finish_reason"] == "stop" and out["text"] == full["text"][: full["text"].find(stop)]


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_bad_uploads_change_nothing(server, adapters) -> None:
    c, store = server.client, server.store
    assert upload(c, adapters["alpha"], "keep").status_code == 201
    before_tree, before_list = tree(store), c.get("/adapters").json()
    config = (adapters["alpha"] / "adapter_config.json").read_bytes()
    weights = (adapters["alpha"] / "adapter_model.safetensors").read_bytes()
    wrong_rank = json.dumps({**json.loads(config), "r": 16}).encode()
    cases = {
        "config not json": ([("adapter_config.json", b"{nope"), ("adapter_model.safetensors", weights)], 422),
        "truncated": ([("adapter_config.json", config), ("adapter_model.safetensors", weights[:-64])], 422),
        "wrong shapes": ([("adapter_config.json", wrong_rank), ("adapter_model.safetensors", weights)], 422),
        "missing weights": ([("adapter_config.json", config)], 422),
        "wrong name": ([("adapter_config.json", config), ("weights.pt", weights)], 422),
        "pickle": ([("adapter_config.json", config), ("adapter_model.bin", b"\x80\x04pickle")], 422),
        "zip traversal": ([("evil.zip", _zip({"../adapter_config.json": config,
                                              "adapter_model.safetensors": weights}))], 422),
        "too large": ([("adapter_config.json", config), ("adapter_model.safetensors", b"\0" * (9 << 20))], 413),
    }
    for name, (files, status) in cases.items():
        r = c.post("/adapters", files=[("files", f) for f in files], data={"adapter_id": "bad"})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert set(r.json()["error"]) == {"code", "message", "details"}, name
    r = upload(c, adapters["alpha"], "base")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter_id"
    assert upload(c, adapters["alpha"], "a/b").status_code in (404, 422)
    assert upload(c, adapters["alpha"], "x" * 65).status_code == 422
    r = upload(c, adapters["beta"], "keep")
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    r = c.post("/adapters", files=[("files", ("adapter_config.json", wrong_rank)),
                                   ("files", ("adapter_model.safetensors", weights))])
    report = r.json()["error"]["details"]
    assert report["shape_mismatches"] and "problems" in report
    assert not any("embed_tokens.weight" in k for k in report["missing_keys"]), "no base keys in the report"
    assert tree(store) == before_tree and c.get("/adapters").json() == before_list
    assert server.alive()


def test_request_errors_are_json(server) -> None:
    c = server.client
    r = gen(c, PROMPT, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    r = c.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert c.post("/generate", json={"prompt": "x", "max_new_tokens": 0}).status_code == 422
    assert c.put("/adapters/nope/activate").status_code == 404
    assert c.delete("/adapters/nope").status_code == 404
    assert c.get("/nowhere").json()["error"]["code"] == "not_found"


def test_delete_while_requests_run(server, adapters) -> None:
    c, store = server.client, server.store
    assert upload(c, adapters["gamma"], "gamma").status_code == 201
    long_result: dict = {}
    runner = threading.Thread(
        target=lambda: long_result.update(r=gen(c, PROMPT, "gamma", max_new_tokens=400, ignore_eos=True)), daemon=True
    )
    runner.start()
    while c.get("/health").json()["requests_running"] == 0 and runner.is_alive():
        pass  # the long request has reached the engine once a row is running
    deleter_result: dict = {}
    deleter = threading.Thread(target=lambda: deleter_result.update(r=c.delete("/adapters/gamma")), daemon=True)
    deleter.start()
    while c.get("/adapters/gamma").status_code != 404:
        pass  # the delete has been admitted
    assert gen(c, PROMPT, "gamma").status_code == 404, "new requests are refused at once"
    runner.join()
    deleter.join()
    assert long_result["r"].status_code == 200, "the running request finishes"
    assert deleter_result["r"].status_code == 200 and deleter_result["r"].json()["freed_bytes"] > 0
    assert not (store / "gamma").exists()


def _without_load_times(listing: dict) -> dict:
    """What a restart keeps: not the load durations, nor the usage counters (they count from each start)."""
    for info in listing["adapters"]:
        info.pop("load_ms")
        info.pop("usage", None)
    return listing


def test_restart_keeps_adapters_and_tokens(model_dir, store, adapters) -> None:
    first = ServerProcess(model_dir, store)
    try:
        for name in ("alpha", "beta"):
            assert upload(first.client, adapters[name], name).status_code == 201
        first.client.put("/adapters/beta/activate")
        before = {a: gen(first.client, PROMPT, a).json()["token_ids"] for a in ("alpha", "beta", None)}
        listing = _without_load_times(first.client.get("/adapters").json())
    finally:
        first.stop()
    second = ServerProcess(model_dir, store)
    try:
        assert _without_load_times(second.client.get("/adapters").json()) == listing
        assert {a: gen(second.client, PROMPT, a).json()["token_ids"] for a in ("alpha", "beta", None)} == before
    finally:
        second.stop()


def test_corrupt_store_entry_is_skipped(model_dir, store, adapters) -> None:
    first = ServerProcess(model_dir, store)
    try:
        for name in ("alpha", "beta"):
            assert upload(first.client, adapters[name], name).status_code == 201
    finally:
        first.stop()
    weights = store / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    second = ServerProcess(model_dir, store)
    try:
        assert [a["id"] for a in second.client.get("/adapters").json()["adapters"]] == ["beta"]
        assert "alpha" in second.log and second.alive()
    finally:
        second.stop()
