"""Constrained decoding (response_format): the engine's choices are PEFT's greedy choices among the tokens the
schema allows, in mixed batches beside free rows, and what ends with "stop" is JSON that matches the schema."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch
from outlines_core import Guide

from service.engine import GenerationRequest, SamplingParams
from service.engine.grammar import GrammarError, Grammars

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 5}, "tag": {"enum": ["x", "yz"]}},
    "required": ["ok", "name", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammars(demo_tokenizer, demo_base):
    return Grammars(demo_tokenizer, demo_base.config.vocab_size)


def constrained_greedy(model, grammar, prompt_ids: list[int], eos: int, max_new: int) -> list[int]:
    """The oracle: full forward passes of the PEFT model (no cache, no batch), argmax over the tokens outlines'
    own Guide lists as allowed (not our bitmask), stopping where the guide is finished."""
    guide = Guide(grammar.index)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            allowed = torch.tensor(sorted(guide.get_tokens()))
            token = int(allowed[logits[allowed].argmax()])
            if token == eos:
                break
            guide.advance(token)
            ids.append(token)
            out.append(token)
            if guide.is_finished():
                break
    return out


def _run(engine, requests: list[GenerationRequest]):
    async def all_of():
        return await asyncio.gather(*(engine.generate(r) for r in requests))

    return asyncio.run(all_of())


def test_greedy_choices_are_pefts_among_the_allowed_in_a_mixed_batch(make_engine, grammars, demo_tokenizer,
                                                                     demo_base, demo_adapters, peft_greedy):
    from oracle import PeftGreedy

    oracle = PeftGreedy(demo_base, demo_tokenizer, demo_adapters)
    text = json.dumps(SCHEMA)
    grammar = grammars.submit(text).result()
    params = SamplingParams(max_new_tokens=80, json_schema=text)
    free = SamplingParams(max_new_tokens=12)
    prompts = {"a": "the answer is", None: "json please", "c": "x"}
    ids = {k: demo_tokenizer(p)["input_ids"] for k, p in prompts.items()}
    requests = [GenerationRequest(ids[k], k, params, grammar=grammar) for k in prompts]
    requests += [GenerationRequest(ids["a"], "b", free), GenerationRequest(ids[None], None, free)]
    results = _run(make_engine(), requests)
    eos = demo_tokenizer.eos_token_id
    for (adapter, prompt_ids), result in zip(ids.items(), results, strict=False):
        expected = constrained_greedy(oracle.model(adapter), grammar, prompt_ids, eos, 80)
        assert result.token_ids == expected, adapter
        assert result.finish_reason == "stop"
        jsonschema.validate(json.loads(result.text), SCHEMA)  # a complete match is valid JSON of the schema
    assert results[3].token_ids == peft_greedy("b", ids["a"], 12)  # free rows are untouched by the grammar rows
    assert results[4].token_ids == peft_greedy(None, ids[None], 12)


def test_sampled_rows_stay_inside_the_grammar(make_engine, grammars, demo_tokenizer):
    text = json.dumps(SCHEMA)
    grammar = grammars.submit(text).result()
    ids = demo_tokenizer("sample")["input_ids"]
    requests = [GenerationRequest(ids, None, SamplingParams(max_new_tokens=48, temperature=1.5, seed=seed,
                                                            json_schema=text), grammar=grammar)
                for seed in range(6)]
    for result in _run(make_engine(), requests):
        if result.finish_reason == "stop":
            jsonschema.validate(json.loads(result.text), SCHEMA)
        else:  # cut by max_new_tokens: still a prefix of a match
            guide = Guide(grammar.index)
            for token in result.token_ids:
                assert token in guide.get_tokens()
                guide.advance(token)


def _matches(grammar, text: str) -> bool:
    """Whether outlines' own Guide over the compiled index accepts `text` (one byte = one demo token) whole."""
    guide = Guide(grammar.index)
    for byte in text.encode():
        if byte not in guide.get_tokens():
            return False
        guide.advance(byte)
    return guide.is_finished() or 257 in guide.get_tokens()  # complete: only the end token (257) may follow


@pytest.mark.parametrize(("schema", "accepted", "refused"), [
    ({"type": "object"},  # json_object
     ['{}', '{"a": 1}', '{"a": [1, "x", null], "b": {"c": true, "d": -2.5e+3}}', '{"k": "\\"q\\""}'],
     ['[]', '{"a": {"b": {"c": 1}}}', '{"a": 1,}', '{a: 1}', '{"a": 01}', '{  "a": 1}']),
    ({"type": "array"}, ['[]', '[1, {"a": 2}, [null]]'], ['{}', '[[[1]]]']),
    ({"type": ["object", "null"]}, ['null', '{"a": [true]}'], ['1', '{"a": {"b": {}}}']),
    ({}, ['1', '"s"', '[{"a": 1}]', '{"a": [2]}'], ['[[[1]]]']),
])
def test_generic_containers_hold_values_two_levels_deep(grammars, schema, accepted, refused):
    grammar = grammars.submit(json.dumps(schema)).result()
    for text in accepted:
        json.loads(text)
        assert _matches(grammar, text), text
    for text in refused:
        assert not _matches(grammar, text), text


def test_unusable_schemas_are_refused(grammars):
    with pytest.raises(GrammarError, match="cannot be used"):
        grammars.submit(json.dumps({"type": "no-such-type"})).result()
    with pytest.raises(GrammarError, match="bytes"):
        grammars.submit(json.dumps({"type": "object", "description": "x" * 40000})).result()


def test_a_schema_whose_grammar_explodes_is_refused_in_bounded_time(grammars, monkeypatch):
    """Nested arrays of objects: a tiny schema whose automaton takes minutes to build. The child process that
    builds it is killed at the bound, and the next schema compiles at once."""
    import service.engine.grammar as grammar_module

    monkeypatch.setattr(grammar_module, "COMPILE_TIMEOUT_S", 2.0)
    nested = {"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "object"}}}}
    with pytest.raises(GrammarError, match="did not compile within 2 s"):
        grammars.submit(json.dumps(nested)).result()
    assert grammars.submit(json.dumps({"enum": ["a", "b"]})).result() is not None
