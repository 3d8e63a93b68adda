"""Constrained decoding: outputs that match a JSON schema (OpenAI's `response_format`).

A schema becomes a regular expression (outlines-core, the library behind vLLM's `outlines` backend), the
expression an index over the tokenizer's vocabulary: for each state of the expression's automaton, the tokens
that keep the output a prefix of a match. Each row walks that index (`GrammarState`): before every choice, the
tokens it does not allow are masked out; once the output is a complete match and nothing may follow, the row
ends with finish reason "stop" (no end token is sampled).

Whitespace between JSON tokens is at most one space (an unbounded whitespace pattern lets a model loop on
blanks until max_tokens). A generic container (`json_object`, `{"type": "object"}` without properties, an array
without items, `{}`) holds values at most two levels deep: strings, numbers, booleans, null, or flat
arrays/objects of those (`bounded`); the unbounded nesting of full JSON makes an automaton too large to build in
time.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..byte_level import bytes_to_unicode

WHITESPACE = r"[ ]?"
MAX_SCHEMA_BYTES = 32 * 1024  # a schema's JSON text; larger ones are refused before any work
CACHED_GRAMMARS = 64  # compiled schemas kept (least recently used dropped)
# A small schema can make an automaton that takes minutes and gigabytes to build (nested arrays of objects), and
# the library cannot be interrupted: each index is built in a child process, killed past these bounds.
COMPILE_TIMEOUT_S = 20.0
COMPILE_MEMORY_BYTES = 4 * 2**30
_CHILD = """
import pickle, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from outlines_core import Index
regex, vocabulary = pickle.load(sys.stdin.buffer)
sys.stdout.buffer.write(pickle.dumps(Index(regex, vocabulary)))
"""

# JSON values two levels deep: what a generic container (an object without properties, an array without items,
# `{}`) holds. outlines-core expands a generic container into every JSON value a few levels deep, an automaton
# that takes 10-20 s to build even for a 259-token vocabulary.
_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
_FLAT: dict[str, Any] = {"anyOf": [_SCALAR, {"type": "array", "items": _SCALAR},
                                   {"type": "object", "additionalProperties": _SCALAR}]}
_SUBSCHEMA_KEYS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "examples", "default"}


def bounded(schema: Any) -> Any:
    """The schema with every generic container given values at most two levels deep (see _FLAT)."""
    if not isinstance(schema, dict):
        return schema
    node = dict(schema)
    for key in _SUBSCHEMA_KEYS:
        if key in node:
            node[key] = bounded(node[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            node[key] = {name: bounded(sub) for name, sub in node[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            node[key] = [bounded(sub) for sub in node[key]]
    if not set(node) - _ANNOTATIONS:  # {}: any JSON value
        return {**node, "anyOf": [_SCALAR, {"type": "array", "items": _FLAT},
                                  {"type": "object", "additionalProperties": _FLAT}]}
    kind = node.get("type")
    if isinstance(kind, list) and len(kind) > 1 and {"object", "array"} & set(kind):
        rest = {k: v for k, v in node.items() if k != "type"}
        return {"anyOf": [bounded({**rest, "type": t}) for t in kind]}
    if kind == "object" and not {"properties", "additionalProperties", "patternProperties"} & set(node):
        node["additionalProperties"] = _FLAT
    if kind == "array" and not {"items", "prefixItems"} & set(node):
        node["items"] = _FLAT
    return node


class GrammarError(ValueError):
    """The schema cannot be used for constrained decoding (invalid, unsupported or too large)."""


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The bytes each ordinary token stands for (special tokens left out): byte-level BPE tokens through GPT-2's
    byte map, sentencepiece tokens with `▁` as a space and `<0xAB>` byte fallbacks, others as decoded."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in repr(decoder)
    byte_map = {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else {}
    out: dict[int, bytes] = {}
    for token, token_id in vocab.items():
        if token_id in special:
            continue
        if byte_level and all(ch in byte_map for ch in token):
            out[token_id] = bytes(byte_map[ch] for ch in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[token_id] = bytes([int(token[3:5], 16)])
        elif "▁" in token:
            out[token_id] = token.replace("▁", " ").encode()
        else:
            out[token_id] = tokenizer.convert_tokens_to_string([token]).encode()
    return out


class Grammar:
    """One compiled schema: an index over the vocabulary, shared by every row that uses the schema."""

    def __init__(self, index: Any, vocab_size: int) -> None:
        self.index = index
        self.vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's vocabulary)

    def start(self) -> GrammarState:
        return GrammarState(self)


class GrammarState:
    """One row's position in its grammar (engine thread only)."""

    def __init__(self, grammar: Grammar) -> None:
        from outlines_core import Guide

        self.grammar = grammar
        self.guide = Guide(grammar.index)
        self._words = torch.zeros((grammar.vocab_size + 31) // 32, dtype=torch.int32)
        self._bit = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output a prefix of a match."""
        self._words.zero_()
        self.guide.write_mask_into(self._words.data_ptr(), self._words.numel(), self._words.element_size())
        bits = (self._words.unsqueeze(-1) >> self._bit) & 1  # (words, 32), bit j of word w = token 32 w + j
        return bits.flatten()[: self.grammar.vocab_size].bool()

    def advance(self, token: int) -> None:
        self.guide.advance(token, return_tokens=False)

    @property
    def finished(self) -> bool:
        """The output is a complete match and nothing may follow it."""
        return self.guide.is_finished()


class Grammars:
    """Compiles schemas for one tokenizer (the vocabulary is built once) and keeps the recent ones."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._vocabulary: Any = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        # One thread of its own: compiles run one at a time and never take the threads tokenizing and reading
        # files use; a queued compile holds no thread, so a caller that gives up can cancel it.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    def submit(self, schema_text: str) -> Future[Grammar]:
        """The grammar of a JSON schema, compiled in the grammar thread (or from the cache)."""
        return self._worker.submit(self._compiled, schema_text)

    def _compiled(self, schema_text: str) -> Grammar:
        cached = self._cache.get(schema_text)
        if cached is not None:
            self._cache.move_to_end(schema_text)
            return cached
        grammar = Grammar(self._index(schema_text), self.vocab_size)
        self._cache[schema_text] = grammar
        if len(self._cache) > CACHED_GRAMMARS:
            self._cache.popitem(last=False)
        return grammar

    def _index(self, schema_text: str) -> Any:
        from outlines_core import Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        if len(schema_text.encode()) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the schema is {len(schema_text.encode())} bytes; at most {MAX_SCHEMA_BYTES}")
        try:
            regex = build_regex_from_schema(json.dumps(bounded(json.loads(schema_text))), whitespace_pattern=WHITESPACE)
        except Exception as exc:  # the library's own errors (unsupported keywords, bad references)
            raise GrammarError(f"the schema cannot be used: {exc}") from None
        if self._vocabulary is None:
            eos = self.tokenizer.eos_token_id
            by_bytes: dict[bytes, list[int]] = {}
            for token_id, data in token_bytes(self.tokenizer).items():
                if token_id != eos and data:
                    by_bytes.setdefault(data, []).append(token_id)
            self._vocabulary = Vocabulary(eos, by_bytes)
        return _index_in_child(regex, self._vocabulary)


def _index_in_child(regex: str, vocabulary: Any) -> Any:
    """outlines' Index of `regex`, built in a child process bounded by COMPILE_TIMEOUT_S and COMPILE_MEMORY_BYTES."""
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(COMPILE_MEMORY_BYTES)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = child.communicate(pickle.dumps((regex, vocabulary)), timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise GrammarError(f"its grammar did not compile within {COMPILE_TIMEOUT_S:.0f} s; simplify it") from None
    if child.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or ["out of memory"])[-1]
        raise GrammarError(f"the schema cannot be compiled for this model's vocabulary: {last[:300]}")
    return pickle.loads(out)
