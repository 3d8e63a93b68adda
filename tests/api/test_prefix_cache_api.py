"""The prefix cache and shared prefills in a real server (on by default): repeated long prompts hit the cache
(/metrics), greedy outputs stay PEFT's, a re-upload under a deleted adapter's id does not see its old prefixes,
and n copies of a greedy OpenAI request are all PEFT's tokens."""

from __future__ import annotations

from .conftest import upload
from .test_ecosystem import _metric

SYSTEM = "System: you answer briefly and politely, in one line, whatever the question is.\n"


def _generate(c, prompt: str, adapter: str) -> list[int]:
    r = c.post("/generate", json={"prompt": prompt, "adapter_id": adapter, "max_new_tokens": 10})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def test_prefix_hits_keep_outputs_and_die_with_the_adapter(server, adapters, oracle) -> None:
    c = server.client
    assert upload(c, adapters["alpha"], "alpha").status_code == 201
    before = c.get("/metrics").text
    prompts = [SYSTEM + "Q: first?", SYSTEM + "Q: and the second one?"]
    for prompt in prompts:
        assert _generate(c, prompt, "alpha") == oracle.tokens("alpha", prompt, 10)
    after = c.get("/metrics").text
    assert _metric(after, "adapter_service_prefix_cache_hits_total") == \
        _metric(before, "adapter_service_prefix_cache_hits_total") + 1
    assert _metric(after, "adapter_service_prefix_cache_tokens_saved_total") >= \
        _metric(before, "adapter_service_prefix_cache_tokens_saved_total") + 64
    held_before = _metric(before, "adapter_service_prefix_cache_bytes")  # other tests' prefixes (shared server)
    assert _metric(after, "adapter_service_prefix_cache_bytes") > held_before

    assert c.delete("/adapters/alpha").status_code == 200
    assert _metric(c.get("/metrics").text, "adapter_service_prefix_cache_bytes") == held_before
    assert upload(c, adapters["beta"], "alpha").status_code == 201  # other weights, the same id
    assert _generate(c, prompts[0], "alpha") == oracle.tokens("beta", prompts[0], 10)


def test_the_copies_of_an_openai_request_share_one_prefill(server, adapters, oracle) -> None:
    """n = 3 greedy copies of a new prompt: one prefill (one miss, no hit: the copies did not come one after
    another, hitting what the first one cached), and each copy is PEFT's output."""
    c = server.client
    assert upload(c, adapters["beta"], "beta").status_code == 201
    prompt = SYSTEM + "Q: copies?"
    before = c.get("/metrics").text
    r = c.post("/v1/completions", json={"model": "beta", "prompt": prompt, "n": 3, "max_tokens": 8,
                                        "temperature": 0})
    assert r.status_code == 200, r.text
    after = c.get("/metrics").text
    expected = oracle.tokenizer.decode(oracle.tokens("beta", prompt, 8), skip_special_tokens=True)
    assert [choice["text"] for choice in r.json()["choices"]] == [expected] * 3
    for name, prefills in (("misses", 1), ("hits", 0)):
        metric = f"adapter_service_prefix_cache_{name}_total"
        assert _metric(after, metric) - _metric(before, metric) == prefills, name
