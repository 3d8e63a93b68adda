"""Penalties, logit_bias, min_tokens, stop_token_ids and logprobs in the batched engine, each against an oracle
(transformers' own logits processors through PEFT's generate, or a reference loop over the model's logits)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from peft import PeftModel

from service.engine import GenerationRequest, SamplingParams

PROMPT = "Once upon a time there"


@pytest.fixture(scope="module")
def peft_model(demo_base, demo_adapters):
    return PeftModel.from_pretrained(copy.deepcopy(demo_base), demo_adapters["a"]).eval()


def _run(engine, tokenizer, jobs: list[tuple[str, str | None, SamplingParams]]):
    async def scenario():
        return await asyncio.gather(*[engine.generate(GenerationRequest(tokenizer(p)["input_ids"], a, params))
                                      for p, a, params in jobs])
    return asyncio.run(scenario())


def _reference(model, tokenizer, prompt: str, steps: int,
               params: SamplingParams) -> tuple[list[int], list[list[float]]]:
    """Greedy over scores processed as OpenAI and vLLM define them, written out in full; also each step's raw
    log-softmax (the logprobs the engine reports)."""
    ids = tokenizer(prompt)["input_ids"]
    out: list[int] = []
    raw: list[list[float]] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        raw.append(torch.log_softmax(logits, -1).tolist())
        scores = logits.clone()
        for token, bias in params.logit_bias:
            scores[token] += bias
        for token in set(ids + out) if params.repetition_penalty != 1.0 else ():
            s = scores[token]
            scores[token] = s / params.repetition_penalty if s > 0 else s * params.repetition_penalty
        for token in set(out):
            scores[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        out.append(int(scores.argmax()))
    return out, raw


def test_repetition_penalty_matches_transformers(make_engine, demo_tokenizer, peft_model) -> None:
    """HF's RepetitionPenaltyLogitsProcessor (what generate(repetition_penalty=...) runs) over prompt+output."""
    engine = make_engine(max_batch_size=4)
    ids = torch.tensor([demo_tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                       do_sample=False, repetition_penalty=1.8)[0, ids.shape[1]:].tolist()
    params = SamplingParams(max_new_tokens=16, repetition_penalty=1.8, ignore_eos=True)
    plain, penalised = _run(engine, demo_tokenizer, [(PROMPT, "a", SamplingParams(max_new_tokens=16, ignore_eos=True)),
                                                     (PROMPT, "a", params)])
    assert penalised.token_ids == expected
    assert plain.token_ids != penalised.token_ids, "the penalty changes this output (else the test proves nothing)"


def test_presence_frequency_and_logit_bias_match_the_reference(make_engine, demo_tokenizer, peft_model,
                                                               demo_base) -> None:
    engine = make_engine(max_batch_size=4)
    cases = [
        ("a", SamplingParams(max_new_tokens=12, frequency_penalty=1.5, ignore_eos=True)),
        ("a", SamplingParams(max_new_tokens=12, presence_penalty=2.0, ignore_eos=True)),
        (None, SamplingParams(max_new_tokens=12, logit_bias=((5, 9.0), (17, -100.0)), presence_penalty=-0.5,
                              frequency_penalty=0.7, repetition_penalty=1.2, ignore_eos=True, logprobs=3)),
    ]
    results = _run(engine, demo_tokenizer, [(PROMPT, a, p) for a, p in cases])
    for (adapter, params), result in zip(cases, results, strict=True):
        model = peft_model if adapter else demo_base
        tokens, raw = _reference(model, demo_tokenizer, PROMPT, 12, params)
        assert result.token_ids == tokens, (adapter, params)
        if params.logprobs:
            assert result.logprobs is not None and len(result.logprobs) == 12
            for lp, token, step in zip(result.logprobs, tokens, raw, strict=True):
                assert lp.token_id == token and lp.logprob == pytest.approx(step[token], abs=1e-4)
                best = sorted(range(len(step)), key=step.__getitem__, reverse=True)[:3]
                assert [i for i, _, _ in lp.top] == best
                assert lp.text == demo_tokenizer.decode([token], skip_special_tokens=True)


def test_min_tokens_and_stop_token_ids(make_engine, demo_tokenizer) -> None:
    engine = make_engine(max_batch_size=4)
    eos = demo_tokenizer.eos_token_id
    varied = dict(max_new_tokens=10, presence_penalty=2.0)  # no token twice: a stop token id cuts at one place
    (greedy,) = _run(engine, demo_tokenizer, [(PROMPT, "b", SamplingParams(ignore_eos=True, **varied))])
    stop_at = 3
    assert len(set(greedy.token_ids[:stop_at + 1])) == stop_at + 1
    forced_eos = ((eos, 100.0),)  # EOS is the best token at every step: only min_tokens holds it back
    stopped, at_least, ended = _run(engine, demo_tokenizer, [
        (PROMPT, "b", SamplingParams(stop_token_ids=(greedy.token_ids[stop_at],), ignore_eos=True, **varied)),
        (PROMPT, "b", SamplingParams(max_new_tokens=10, min_tokens=4, logit_bias=forced_eos)),
        (PROMPT, "b", SamplingParams(max_new_tokens=10, logit_bias=forced_eos)),
    ])
    assert stopped.token_ids == greedy.token_ids[:stop_at] and stopped.finish_reason == "stop"
    assert len(at_least.token_ids) == 4 and at_least.finish_reason == "stop"
    assert ended.token_ids == [] and ended.finish_reason == "stop"


def test_min_tokens_defers_stop_strings(make_engine, demo_tokenizer) -> None:
    """A stop string completed before min_tokens does not end the row; one completed later does."""
    engine = make_engine(max_batch_size=2)
    (greedy,) = _run(engine, demo_tokenizer, [(PROMPT, None, SamplingParams(max_new_tokens=8, ignore_eos=True))])
    first = demo_tokenizer.decode(greedy.token_ids[:1], skip_special_tokens=True)
    assert first, "the first token has text"
    (deferred,) = _run(engine, demo_tokenizer, [(PROMPT, None, SamplingParams(max_new_tokens=8, ignore_eos=True,
                                                                              stop=(first,), min_tokens=3))])
    later = deferred.text.find(first, 1)
    assert deferred.text.startswith(first) and len(deferred.token_ids) >= 3
    assert deferred.finish_reason == ("stop" if later >= 0 else "length")
