"""The embedded demo model: a tiny seeded Llama over a byte-level tokenizer, built locally (no download).

It lets the service start with no model configured. Weights are random but deterministic (seed 0), so the
same model comes out on every machine; `ensure_demo_model` saves it once into a cache directory and later
starts load it from there like any other local model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..byte_level import bytes_to_unicode

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo-llama-bytes"
# Bump when the recipe below changes, so stale caches are rebuilt instead of silently reused.
DEMO_RECIPE_VERSION = 1
MARKER_FILE = "demo_model_complete.json"
SEED = 0

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# ids 0..255 are the raw bytes; the specials follow them.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per UTF-8 byte (id == byte value), plus <s>, </s>, <pad>.

    A BPE model with no merges never joins bytes, so any UTF-8 text round-trips exactly; encoding adds <s>
    in front like Llama tokenizers do (`add_special_tokens=False` leaves it out). Special-token strings
    typed in the text (`"<s>"`) stay plain bytes (`split_special_tokens`): user text cannot inject them.
    """
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.add_special_tokens([BOS, EOS, PAD])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",  # decoder-only batches are left-padded for generation
        clean_up_tokenization_spaces=False,  # keep decode exact
        model_max_length=2048,
        split_special_tokens=True,  # see docstring
    )


def build_demo_model() -> LlamaForCausalLM:
    """The tiny Llama, initialised from seed 0 without touching the caller's global RNG state."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model.eval()


def _is_complete(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"name": DEMO_MODEL_NAME, "recipe_version": DEMO_RECIPE_VERSION}


def ensure_demo_model(cache_dir: Path) -> Path:
    """Return a directory holding the saved demo model and tokenizer, building it on first use.

    The model is saved into a temporary sibling directory, the marker file is written last, and the
    directory is renamed into place, so `cache_dir` is either absent or complete. If two processes race,
    the loser's rename fails and it discards its copy; a stale or partial `cache_dir` is moved aside first.
    """
    cache_dir = Path(cache_dir).expanduser()
    if _is_complete(cache_dir):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        logger.info("building demo model %s into %s", DEMO_MODEL_NAME, cache_dir)
        build_demo_model().save_pretrained(tmp)
        build_demo_tokenizer().save_pretrained(tmp)
        marker = {"name": DEMO_MODEL_NAME, "recipe_version": DEMO_RECIPE_VERSION}
        (tmp / MARKER_FILE).write_text(json.dumps(marker))
        if cache_dir.exists() and not _is_complete(cache_dir):
            # Not ours to keep (partial or an older recipe): move it aside atomically, then remove it.
            stale = cache_dir.parent / f".{cache_dir.name}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(cache_dir, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process moved it already
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not _is_complete(cache_dir):
                raise
            # Lost the race to another process that put a complete copy in place: use theirs.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir
