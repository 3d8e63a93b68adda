"""The service on a local Ray cluster with 2 model replicas: the REST contract, outputs exactly PEFT's, and
the consistency of uploads, deletes and activation across replicas (see service/distributed/)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="the distributed suite needs the [distributed] extra (make test-distributed)")

from api.conftest import tree, upload  # noqa: E402

from .conftest import NUM_REPLICAS, wait_for  # noqa: E402

pytestmark = pytest.mark.distributed

PROMPT = "abcd"
TOKENS = 8


def gen(client, adapter_id, prompt: str = PROMPT, **extra):
    return client.post("/generate", json={"prompt": prompt, "adapter_id": adapter_id, "max_new_tokens": TOKENS,
                                          **extra})


def burst(client, jobs: list[tuple[str | None, str]]) -> list:
    """All requests at once, so that they spread over the replicas."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: gen(client, job[0], job[1]), jobs))


def test_many_adapters_spread_over_replicas_with_exact_outputs(cluster, oracle) -> None:
    c = cluster.client
    wait_for(lambda: len(cluster.replicas()) == NUM_REPLICAS, 30, "both replicas polling the cluster state")
    names = ["a0", "a1", "a2", "a3", "a4", "a5"]
    for name in names:
        r = upload(c, oracle.adapters[name], name)
        assert r.status_code == 201, r.text
        assert r.json()["id"] == name and r.json()["rank"] == 4
    assert [a["id"] for a in c.get("/adapters").json()["adapters"]] == names

    # Two rounds over 6 adapters with 2 resident per replica: the second round reloads evicted adapters.
    jobs = [(name, prompt) for name in [*names, "base"] for prompt in ("abcd", "wxyz")]
    served = set()
    for _ in range(2):
        for (adapter, prompt), r in zip(jobs, burst(c, jobs), strict=True):
            assert r.status_code == 200, r.text
            expected = oracle.tokens(None if adapter == "base" else adapter, prompt, TOKENS)
            assert r.json()["token_ids"] == expected, (adapter, prompt)
            assert r.json()["adapter_id"] == adapter
            served.add(r.headers["X-Replica-Id"])
    assert len(served) == NUM_REPLICAS, "requests for many adapters reach every replica"
    # LRU per replica: never more than the limit resident on any one of them.
    assert all(len(resident) <= 2 for resident in cluster.replicas().values())


def test_unknown_adapter_and_bad_requests(cluster) -> None:
    c = cluster.client
    r = gen(c, "nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert c.get("/adapters/nope").status_code == 404
    assert c.delete("/adapters/nope").status_code == 404
    r = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 0})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = c.put("/adapters/nope/activate")
    assert r.status_code == 404


def test_invalid_upload_is_rejected_once_and_leaves_nothing(cluster, oracle) -> None:
    c = cluster.client
    config = json.loads((oracle.adapters["a0"] / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_module"]
    weights = (oracle.adapters["a0"] / "adapter_model.safetensors").read_bytes()
    files = [("files", ("adapter_config.json", json.dumps(config).encode())),
             ("files", ("adapter_model.safetensors", weights))]
    r = c.post("/adapters", files=files, data={"adapter_id": "bad"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter", r.text
    assert r.json()["error"]["details"]["problems"], "the load report comes back from the replica"
    assert c.get("/adapters/bad").status_code == 404 and not (cluster.store / "bad").exists()
    assert upload(c, oracle.adapters["a0"], "bad").status_code == 201  # the id was released
    assert c.delete("/adapters/bad").status_code == 200


def test_activation_is_cluster_wide(cluster, oracle) -> None:
    c = cluster.client
    assert upload(c, oracle.adapters["a6"], "act").status_code == 201
    assert c.put("/adapters/act/activate").json() == {"active": "act"}
    assert c.get("/adapters").json()["active"] == "act"
    expected = oracle.tokens("a6", PROMPT, TOKENS)
    for r in burst(c, [(None, PROMPT)] * 6):
        assert r.status_code == 200 and r.json()["token_ids"] == expected and r.json()["adapter_id"] == "act"
    assert c.delete("/adapters/active").json() == {"active": None}
    base = oracle.tokens(None, PROMPT, TOKENS)
    assert gen(c, None).json()["token_ids"] == base
    # Deleting the active adapter deactivates it everywhere.
    c.put("/adapters/act/activate")
    assert c.delete("/adapters/act").status_code == 200
    assert c.get("/adapters").json()["active"] is None
    assert gen(c, None).json()["token_ids"] == base


def test_streaming_matches_json(cluster, oracle) -> None:
    c = cluster.client
    with c.stream("POST", "/generate", json={"prompt": PROMPT, "adapter_id": "base", "max_new_tokens": TOKENS,
                                              "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == len(oracle.tokens(None, PROMPT, TOKENS)) + 1
    with c.stream("POST", "/generate", json={"prompt": PROMPT, "adapter_id": "gone", "stream": True}) as r:
        assert r.status_code == 404


def test_download_is_the_uploaded_peft_files(cluster, oracle) -> None:
    c = cluster.client
    assert upload(c, oracle.adapters["a7"], "dl").status_code == 201
    r = c.get("/adapters/dl/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        for name in archive.namelist():
            assert archive.read(name) == (oracle.adapters["a7"] / name).read_bytes(), name
    # Removed once sent (a background task after the last byte: polled, not assumed).
    wait_for(lambda: not list((cluster.store / ".staging").iterdir()), 10, "the sent zip removed")
    assert c.delete("/adapters/dl").status_code == 200
    r = c.get("/adapters/dl/download")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_vllm_load_and_unload_from_an_allowed_root(cluster, oracle) -> None:
    c = cluster.client
    shutil.copytree(oracle.adapters["a6"], cluster.lora_root / "a6")
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(cluster.lora_root / "a6")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'vl' added successfully."
    expected = oracle.tokens("a6", PROMPT, TOKENS)
    for _ in range(NUM_REPLICAS):
        assert gen(c, "vl").json()["token_ids"] == expected
    outside = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(oracle.adapters["a5"])})
    assert outside.status_code == 403 and outside.json()["error"]["code"] == 403  # vLLM's error body
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(cluster.lora_root / "a6")})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(cluster.lora_root / "a6"),
                                              "load_inplace": True})
    assert r.status_code == 200, "the same files in place: a no-op"
    r = c.post("/v1/unload_lora_adapter", json={"lora_name": "vl"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'vl' removed successfully."
    assert c.get("/adapters/vl").status_code == 404 and gen(c, "vl").status_code == 404
    assert (cluster.store / "vl" / "unloaded").is_file(), "unload keeps the files, marked unloaded"
    r = c.post("/v1/load_lora_adapter", json={"lora_name": "vl", "lora_path": str(cluster.lora_root / "a6")})
    assert r.status_code == 200 and gen(c, "vl").json()["token_ids"] == expected
    assert c.post("/v1/unload_lora_adapter", json={"lora_name": "vl"}).status_code == 200
    assert c.delete("/adapters/vl").json() == {"deleted": "vl", "freed_bytes": 0}
    assert not (cluster.store / "vl").exists()


def test_merge_on_a_replica_matches_peft(cluster, oracle) -> None:
    import copy

    from peft import PeftModel

    c = cluster.client
    for name in ("a0", "a1"):
        assert upload(c, oracle.adapters[name], f"m-{name}").status_code == 201
    body = {"adapter_id": "mix", "sources": [{"adapter_id": "m-a0", "weight": 0.6},
                                             {"adapter_id": "m-a1", "weight": 0.4}], "method": "cat"}
    r = c.post("/adapters/merge", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "mix" and r.json()["rank"] == 8 and (cluster.store / "mix" / "manifest.json").exists()
    # The oracle: PEFT's add_weighted_adapter with the same method and weights.
    peft = PeftModel.from_pretrained(copy.deepcopy(oracle.base_model), oracle.adapters["a0"], adapter_name="a0")
    peft.load_adapter(oracle.adapters["a1"], adapter_name="a1")
    peft.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "mix", combination_type="cat")
    peft.set_adapter("mix")
    oracle.add("ray-mix", model=peft)
    expected = oracle.tokens("ray-mix", PROMPT, TOKENS)
    assert expected != oracle.tokens("a0", PROMPT, TOKENS)
    for r in burst(c, [("mix", PROMPT)] * 4):
        assert r.status_code == 200 and r.json()["token_ids"] == expected

    assert c.post("/adapters/merge", json=body).status_code == 409, "an existing id is a conflict"
    before = tree(cluster.store)
    bad = c.post("/adapters/merge", json={**body, "adapter_id": "bad", "method": "linear", "sources": [
        {"adapter_id": "mix"}, {"adapter_id": "m-a0"}]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "incompatible_sources", bad.text
    assert "same rank" in bad.json()["error"]["message"]
    missing = c.post("/adapters/merge", json={**body, "adapter_id": "bad", "sources": [{"adapter_id": "nope"}]})
    assert missing.status_code == 404 and missing.json()["error"]["details"]["adapter_id"] == "nope"
    assert tree(cluster.store) == before, "a failed merge leaves nothing behind"
    assert c.get("/adapters/bad").status_code == 404
    assert c.post("/adapters/merge", json={**body, "adapter_id": "bad"}).status_code == 201, "the id was released"
    for name in ("mix", "bad", "m-a0", "m-a1"):
        assert c.delete(f"/adapters/{name}").status_code == 200


def test_export_streams_the_merged_checkpoint_from_a_replica(cluster, oracle, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    c = cluster.client
    assert upload(c, oracle.adapters["a2"], "exp").status_code == 201
    with c.stream("POST", "/adapters/exp/export") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
        assert r.headers["X-Replica-Id"] in cluster.replicas()
        data = b"".join(r.iter_bytes())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path, filter="data")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exp-merged", dtype=torch.float32).eval()
    ids = torch.tensor([oracle.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, oracle.model("a2")(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    assert c.delete("/adapters/exp").status_code == 200
    r = c.post("/adapters/exp/export")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_openai_routes_on_replicas_match_generate(cluster, oracle) -> None:
    from service.app.admission import DEFAULT_CHAT_TEMPLATE

    c = cluster.client
    assert upload(c, oracle.adapters["a5"], "oa").status_code == 201
    base_name = c.get("/health").json()["model"]
    models = c.get("/v1/models").json()["data"]
    assert models[0]["id"] == base_name and "oa" in [m["id"] for m in models[1:]]
    for model, adapter in (("oa", "a5"), (base_name, None), ("base", None)):
        body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["X-Replica-Id"] in cluster.replicas()
        expected = gen(c, "oa" if adapter else "base").json()  # token ids exactly PEFT's (first test)
        assert expected["token_ids"] == oracle.tokens(adapter, PROMPT, TOKENS)
        assert r.json()["choices"][0]["text"] == expected["text"], model
        assert r.json()["usage"]["completion_tokens"] == len(expected["token_ids"])
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            lines = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
        # (The demo tokenizer's pieces are not whole characters, so the chunks' text is not compared to the text.)
        assert lines[-1] == "[DONE]" and len(lines) <= len(expected["token_ids"]) + 2
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == r.json()["choices"][0]["finish_reason"]

    # Chat: the rendered prompt's ids, generated greedily by PEFT, is what the replica generates.
    messages = [{"role": "user", "content": "hello"}]
    chat = c.post("/v1/chat/completions", json={"model": "oa", "messages": messages, "max_tokens": TOKENS,
                                                "temperature": 0})
    assert chat.status_code == 200, chat.text
    template = None if getattr(oracle.tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE  # as serve
    prompt = oracle.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                  tokenize=False)
    ids = oracle.tokenizer(prompt, add_special_tokens=template is not None)["input_ids"]
    want = oracle.tokens("a5", ids, TOKENS)
    as_completion = c.post("/v1/completions", json={"model": "oa", "prompt": ids, "max_tokens": TOKENS,
                                                    "temperature": 0}).json()
    assert chat.json()["usage"]["prompt_tokens"] == len(ids) == as_completion["usage"]["prompt_tokens"]
    assert chat.json()["usage"]["completion_tokens"] == len(want) == as_completion["usage"]["completion_tokens"]
    assert chat.json()["choices"][0]["message"]["content"] == as_completion["choices"][0]["text"]

    r = c.post("/v1/completions", json={"model": "nope", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    metrics = c.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    counted = 'adapter_service_requests_total{adapter="oa",endpoint="/v1/completions",method="POST",status="200"}'
    assert f"{counted} 3.0" in metrics.text.splitlines(), "the ingress counts its own requests, by adapter"
    usage = c.get("/adapters/oa").json()["usage"]  # what this ingress relayed; replicas load and evict
    assert usage["requests"] == 5 and usage["loads"] is None and usage["evictions"] is None
    relayed = f'adapter_service_generated_tokens_total{{adapter="oa"}} {usage["completion_tokens"]:.1f}'
    assert usage["completion_tokens"] > 0 and relayed in metrics.text.splitlines()
    assert c.delete("/adapters/oa").status_code == 200


def _hold_on_every_replica(cluster, adapter_id: str, prompt: str = PROMPT) -> None:
    """Send bursts for one adapter until every replica has it resident (bursts spill over to the other
    replica once the one holding it has `max_ongoing_requests` in flight)."""
    def everywhere() -> bool:
        burst(cluster.client, [(adapter_id, prompt)] * 16)
        replicas = cluster.replicas()
        return len(replicas) == NUM_REPLICAS and all(
            any(m.startswith(f"{adapter_id}@") for m in resident) for resident in replicas.values())

    wait_for(everywhere, 60, f"{adapter_id} resident on every replica", interval=0)


def _fused_per_replica() -> dict[str, str | None]:
    """Every replica's fused model id, asked through the deployment handle until both answered."""
    from ray import serve

    from service.distributed.app import APP_NAME

    handle = serve.get_deployment_handle("AdapterReplica", APP_NAME)
    seen: dict[str, str | None] = {}

    def both() -> bool:
        seen.update(handle.fused_adapter.remote().result() for _ in range(4))
        return len(seen) == NUM_REPLICAS

    wait_for(both, 30, "both replicas answering", interval=0)
    return seen


def test_fused_activation_on_every_replica_keeps_exact_outputs(cluster, oracle) -> None:
    c = cluster.client
    for name in ("a3", "a4"):
        assert upload(c, oracle.adapters[name], f"f-{name}").status_code == 201
    want = {name: oracle.tokens(name, PROMPT, TOKENS) for name in ("a3", "a4")} | {
        "base": oracle.tokens(None, PROMPT, TOKENS)}
    r = c.put("/adapters/f-a3/activate", params={"fuse": "true"})
    assert r.status_code == 200 and r.json() == {"active": "f-a3", "fused": True}
    _hold_on_every_replica(cluster, "f-a3")  # every replica holds it, and each request carries the fused id
    fused = _fused_per_replica()
    assert all(m is not None and m.startswith("f-a3@") for m in fused.values()), fused
    jobs = [(None, PROMPT), ("f-a3", PROMPT), ("f-a4", PROMPT), ("base", PROMPT)] * 2
    for (adapter, _), r in zip(jobs, burst(c, jobs), strict=True):
        assert r.status_code == 200 and r.json()["token_ids"] == want[{None: "a3", "f-a3": "a3", "f-a4": "a4",
                                                                      "base": "base"}[adapter]], adapter
    assert c.put("/adapters/nope/activate", params={"fuse": "true"}).status_code == 404
    # Deactivating unfuses each replica at its next request.
    assert c.delete("/adapters/active").json() == {"active": None}
    _hold_on_every_replica(cluster, "f-a3")
    assert set(_fused_per_replica().values()) == {None}
    assert gen(c, None).json()["token_ids"] == want["base"]
    assert gen(c, "f-a3").json()["token_ids"] == want["a3"]
    for name in ("f-a3", "f-a4"):
        assert c.delete(f"/adapters/{name}").status_code == 200


def test_delete_and_reupload_same_id_never_serves_stale_weights(cluster, oracle) -> None:
    c = cluster.client
    assert upload(c, oracle.adapters["a0"], "same").status_code == 201
    old = oracle.tokens("a0", PROMPT, TOKENS)
    new = oracle.tokens("a7", PROMPT, TOKENS)
    assert old != new
    _hold_on_every_replica(cluster, "same")

    deleted = c.delete("/adapters/same")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == "same"
    assert deleted.json()["freed_bytes"] > 0
    # Every replica freed it before DELETE returned.
    assert not any(m.startswith("same@") for resident in cluster.replicas().values() for m in resident)
    assert all(r.status_code == 404 for r in burst(c, [("same", PROMPT)] * 6))

    r = upload(c, oracle.adapters["a7"], "same")
    assert r.status_code == 201, r.text
    _hold_on_every_replica(cluster, "same")
    results = burst(c, [("same", PROMPT)] * 16)
    assert {r.headers["X-Replica-Id"] for r in results} <= set(cluster.replicas())
    assert all(r.status_code == 200 and r.json()["token_ids"] == new for r in results)


def test_delete_then_request_is_404_on_every_replica(cluster, oracle) -> None:
    c = cluster.client
    assert upload(c, oracle.adapters["a1"], "doomed").status_code == 201
    _hold_on_every_replica(cluster, "doomed")
    assert c.delete("/adapters/doomed").status_code == 200
    results = burst(c, [("doomed", PROMPT)] * 16)
    assert all(r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found" for r in results)
    assert c.get("/adapters/doomed").status_code == 404
    assert "doomed" not in {a["id"] for a in c.get("/adapters").json()["adapters"]}
    assert not (cluster.store / "doomed").exists()
    assert not any(m.startswith("doomed@") for resident in cluster.replicas().values() for m in resident)


def test_delete_lets_running_requests_finish(cluster, oracle) -> None:
    c = cluster.client
    assert upload(c, oracle.adapters["a5"], "busy").status_code == 201
    first_token, final = threading.Event(), {}

    def stream() -> None:
        body = {"prompt": PROMPT, "adapter_id": "busy", "max_new_tokens": 200, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:  # httpx clients are thread-safe
            for line in r.iter_lines():
                if line.startswith("data: "):
                    first_token.set()
                    final.update(json.loads(line.removeprefix("data: ")))

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_token.wait(60)
    deleted = c.delete("/adapters/busy")
    reader.join(60)
    assert deleted.status_code == 200 and deleted.json()["freed_bytes"] > 0
    assert final.get("finish_reason") == "length" and final["usage"]["completion_tokens"] == 200, final
    assert gen(c, "busy").status_code == 404


def test_cluster_state_actor_restarts_from_the_store(cluster, oracle) -> None:
    import ray

    from service.distributed.cluster_state import NAMESPACE, state_actor_name

    c = cluster.client
    assert upload(c, oracle.adapters["a3"], "kept").status_code == 201
    assert c.put("/adapters/kept/activate").status_code == 200
    ray.kill(ray.get_actor(state_actor_name(cluster.store), namespace=NAMESPACE), no_restart=False)

    def restored() -> bool:
        r = c.get("/adapters")
        return r.status_code == 200 and r.json()["active"] == "kept"

    wait_for(restored, 60, "the cluster state to come back with the store's adapters")
    assert gen(c, None).json()["token_ids"] == oracle.tokens("a3", PROMPT, TOKENS)
    wait_for(lambda: len(cluster.replicas()) == NUM_REPLICAS, 30, "replicas registering with the new state")
    assert c.delete("/adapters/kept").status_code == 200
    assert gen(c, "kept").status_code == 404 and gen(c, None).json()["adapter_id"] == "base"


def test_replica_killed_mid_load_is_replaced_and_serving_continues(cluster, oracle) -> None:
    c = cluster.client
    before = set(wait_for(lambda: len(r := cluster.replicas()) == NUM_REPLICAS and r, 30, "two live replicas"))
    for name in ("a2", "a3", "a4", "a5"):
        assert upload(c, oracle.adapters[name], f"k-{name}").status_code == 201
    cluster.arm_file.touch()  # the next replica that loads an adapter dies with SIGKILL, mid-load

    r = gen(c, "k-a2")
    assert not cluster.arm_file.exists(), "a replica hit the failpoint"
    # The ingress re-sent the request: it completed on a live replica, with exact outputs.
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == oracle.tokens("a2", PROMPT, TOKENS)

    def replaced() -> set[str] | None:
        now = set(cluster.replicas())
        return now if len(now) == NUM_REPLICAS and now != before else None

    after = wait_for(replaced, 120, "Serve to replace the killed replica")
    fresh = after - before
    assert len(fresh) == 1 and len(before & after) == 1
    served: set[str] = set()
    jobs = [(f"k-{name}", prompt) for name in ("a2", "a3", "a4", "a5") for prompt in ("abcd", "wxyz", "ab", "wx")]

    def fresh_serves() -> bool:
        """Every answer exact; true once the replacement has answered too (it joins the router shortly
        after it starts polling the cluster state)."""
        for (adapter, prompt), r in zip(jobs, burst(c, jobs), strict=True):
            assert r.status_code == 200, r.text
            assert r.json()["token_ids"] == oracle.tokens(adapter.removeprefix("k-"), prompt, TOKENS)
            served.add(r.headers["X-Replica-Id"])
        return fresh <= served

    wait_for(fresh_serves, 60, "the replacement replica to serve", interval=0)
