"""Load the base model and tokenizer named by the settings (or the embedded demo model)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .devtools.demo_model import DEMO_MODEL_NAME, ensure_demo_model
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    model: nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype


def load_base_model(settings: Settings) -> BaseModel:
    device = settings.resolve_device()
    dtype = settings.resolve_dtype(device)
    if settings.model is None:
        path = ensure_demo_model(settings.demo_cache)
        log.warning("no --model given: serving the embedded demo model '%s' (%s); outputs are random", DEMO_MODEL_NAME,
                    path)
        source, name = str(path), DEMO_MODEL_NAME
    else:
        source = name = settings.model
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    log.info("loaded base model %s on %s (%s)", name, device, dtype)
    return BaseModel(model, tokenizer, name, device, dtype)
