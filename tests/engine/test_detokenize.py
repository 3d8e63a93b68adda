"""Incremental detokenization: each step decodes a few tokens, yet the text equals decoding the whole output."""

from __future__ import annotations

import random

from service.devtools.demo_model import build_demo_tokenizer
from service.engine.requests import GenerationRequest, SamplingParams
from service.engine.sequence import Sequence, TokenEvent


def _run(tokens: list[int], tokenizer) -> tuple[Sequence, list[str], list[int]]:
    events: list = []
    calls: list[int] = []

    def decode(ids: list[int]) -> str:
        calls.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=True)

    seq = Sequence(GenerationRequest([1], None, SamplingParams(max_new_tokens=len(tokens), ignore_eos=True)),
                   events.append)
    texts = []
    for token in tokens:
        seq.add_token(token, set(), decode)
        texts.append(seq.text)
        assert seq.text == tokenizer.decode(seq.tokens, skip_special_tokens=True)
    deltas = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert deltas == seq.text
    return seq, texts, calls


def test_text_equals_full_decode_with_split_multibyte_characters() -> None:
    tokenizer = build_demo_tokenizer()
    text = "naïve café — 日本語 🙂 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq, _, calls = _run(ids, tokenizer)
    assert seq.text == text
    assert max(calls) <= 8, "each step decodes a short window, not the whole output"


def test_random_tokens_including_special_ones() -> None:
    tokenizer = build_demo_tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        _run(ids, tokenizer)
