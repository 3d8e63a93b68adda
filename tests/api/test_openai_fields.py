"""Every OpenAI request field is honoured or refused with a 422 naming it, tested with the official `openai`
client against a live server; one adapter whose scores overflow fails alone, its neighbour's stream completes."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from oracle import huge_copy, make_peft_adapter

from .conftest import upload

PROMPT = "Hello adapters"


@pytest.fixture()
def client(server, adapters) -> openai.OpenAI:
    assert upload(server.client, adapters["beta"], "beta").status_code == 201
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_include_usage_logprobs_and_n(client, oracle, tokenizer) -> None:
    expected = oracle.tokens("beta", PROMPT, 8)
    chunks = list(client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            logprobs=2, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert chunks[-1].usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert all(c.usage is None for c in chunks[:-1])
    streamed = [t for c in chunks[:-1] for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    done = client.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert streamed == lp.tokens == [tokenizer.decode([t], skip_special_tokens=True) for t in expected]
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    # the reference: log-softmax of PEFT's own scores for the greedy tokens
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = oracle.model("beta")(input_ids=torch.tensor([ids + expected])).logits[0, len(ids) - 1:-1]
    reference = torch.log_softmax(logits.float(), -1)
    for i, token in enumerate(expected):
        assert lp.token_logprobs[i] == pytest.approx(float(reference[i, token]), abs=1e-4)
        # the 2 best and the chosen token; tokens that decode alike (partial UTF-8 bytes) share one key
        assert 1 <= len(lp.top_logprobs[i]) <= 3 and lp.tokens[i] in lp.top_logprobs[i]

    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content, "greedy copies agree"
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens // 2 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)
    chunks = list(client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, temperature=0, logprobs=True, n=2, stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
        assert text == chat.choices[index].message.content

    sampled = client.completions.create(model="beta", prompt=[PROMPT, "Other"], max_tokens=12, temperature=1.0,
                                        seed=7, n=3, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == list(range(6))
    assert len({c.text for c in sampled.choices[:3]}) > 1, "the copies of one prompt sample differently"
    again = client.completions.create(model="beta", prompt=[PROMPT, "Other"], max_tokens=12, temperature=1.0,
                                      seed=7, n=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices], "a seed makes n choices reproducible"
    assert sampled.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"]) + len(tokenizer("Other")["input_ids"])


def test_penalties_bias_and_stop_tokens(client, oracle, tokenizer) -> None:
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():  # transformers' RepetitionPenaltyLogitsProcessor is the oracle
        expected = oracle.model("beta").generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                                 do_sample=False, repetition_penalty=1.7)[0, ids.shape[1]:].tolist()
    done = client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"repetition_penalty": 1.7, "ignore_eos": True})
    assert done.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    plain = oracle.tokens("beta", PROMPT, 6)
    target = next(t for t in range(3, 200) if t not in plain)
    biased = client.completions.create(model="beta", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logit_bias={str(target): 100}, logprobs=0)
    assert biased.choices[0].logprobs.tokens == [tokenizer.decode([target])] * 6
    penalised = client.completions.create(model="beta", prompt=PROMPT, max_tokens=6, temperature=0,
                                          frequency_penalty=-2.0, presence_penalty=-2.0, logprobs=0)
    tokens = penalised.choices[0].logprobs.tokens  # negative penalties reward repeats (exactness: tests/engine)
    assert len(set(plain)) == len(plain) and len(set(tokens)) < len(tokens), (plain, tokens)
    stopped = client.completions.create(model="beta", prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [plain[2]], "min_tokens": 1})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == tokenizer.decode(plain[:plain.index(plain[2])], skip_special_tokens=True)


@pytest.mark.parametrize(("endpoint", "body", "field"), [
    ("completions", {"suffix": "tail"}, "suffix"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "no-such-type"}}}}, "response_format"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {},
                                                                                      "frob": 1}}}, "frob"),
    ("completions", {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ("chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"store": True}, "store"),
    ("chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat/completions", {"n": 17}, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ("chat/completions", {"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_fields_are_refused_by_name(server, endpoint, body, field) -> None:
    base = {"model": "base", "max_tokens": 2}
    base |= {"prompt": PROMPT} if endpoint == "completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = server.client.post(f"/v1/{endpoint}", json={**base, **body})
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"], r.json()


def test_response_format_json_schema_and_json_object(client, server) -> None:
    """The output is JSON matching the schema, properties in the schema's order, streamed or not; json_object
    gives a JSON object (both end with "stop" once the JSON is complete)."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["x", "yz"]}},
              "required": ["ok", "tag"], "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "answer in JSON"}]
    for adapter in ("beta", "base"):
        chat = client.chat.completions.create(model=adapter, messages=messages, max_tokens=60, temperature=0,
                                              response_format=response_format)
        content = chat.choices[0].message.content
        assert chat.choices[0].finish_reason == "stop", content
        value = json.loads(content)
        assert list(value) == ["ok", "tag"] and isinstance(value["ok"], bool) and value["tag"] in ("x", "yz")
        chunks = list(client.chat.completions.create(model=adapter, messages=messages, max_tokens=60, temperature=0,
                                                     response_format=response_format, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
        assert chunks[-1].choices[0].finish_reason == "stop"
    native = server.client.post("/generate", json={
        "prompt": "answer in JSON", "adapter_id": "beta", "max_new_tokens": 60, "json_schema": schema}).json()
    assert native["finish_reason"] == "stop" and list(json.loads(native["text"])) == ["ok", "tag"], native
    done = client.completions.create(model="beta", prompt=PROMPT, max_tokens=200, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})
    text = done.choices[0].text
    assert text.startswith("{")
    if done.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_metadata_fields_are_accepted(client) -> None:
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi", "name": "ann"}],
                                          max_tokens=2, user="u1", metadata={"k": "v"}, store=False,
                                          service_tier="auto", response_format={"type": "text"}, tool_choice="none")
    assert chat.choices[0].finish_reason in ("length", "stop")


def _sse(client: httpx.Client, endpoint: str, body: dict, out: list) -> None:
    with client.stream("POST", f"/v1/{endpoint}", json=body) as r:
        out.append(r.status_code)
        out.extend(json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
                   for line in r.iter_lines() if line.startswith("data: "))


def test_an_overflowing_adapter_fails_alone(server, adapters, base_model, oracle, tokenizer, tmp_path) -> None:
    """The huge adapter streams beside a healthy one: the healthy stream ends with its final chunk and PEFT's
    tokens, the huge one with an error event; a non-streamed request of it gets a 422."""
    c = server.client
    plain = make_peft_adapter(base_model, tmp_path / "plain", seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    r = upload(c, huge_copy(plain, tmp_path / "huge"), "huge")  # (DoRA, or q/v alone, would normalise it away)
    assert r.status_code == 201 and any("above" in w for w in r.json()["warnings"]), r.json()
    assert upload(c, adapters["alpha"], "alpha").status_code == 201
    healthy: list = []
    bad: list = []
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True}
    thread = threading.Thread(target=_sse, args=(httpx.Client(base_url=server.url, timeout=120), "completions",
                                                 {**body, "model": "alpha"}, healthy))
    thread.start()
    _sse(c, "chat/completions", {"model": "huge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
                                 "temperature": 0.7, "stream": True}, bad)
    thread.join()
    assert bad[0] == 200 and "error" in bad[-1] and bad[-1]["error"]["code"] == "non_finite_logits", bad[-3:]
    assert "huge" in bad[-1]["error"]["message"]
    assert healthy[0] == 200 and healthy[-1] == "[DONE]" and healthy[-2]["choices"][0]["finish_reason"]
    text = "".join(chunk["choices"][0]["text"] for chunk in healthy[1:-1])
    assert text == tokenizer.decode(oracle.tokens("alpha", PROMPT, 24), skip_special_tokens=True)
    r = c.post("/v1/completions", json={"model": "huge", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 422 and r.json()["error"]["code"] == "non_finite_logits"
    assert c.post("/v1/completions", json={**body, "model": "alpha", "stream": False}).json()["choices"][0]["text"] \
        == text, "the server keeps serving"
