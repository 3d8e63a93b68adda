"""Write an adapter in PEFT's on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..peft_format import CONFIG_FILE, WEIGHTS_FILE
from .weighted_merge import MergedAdapter


def write_peft_adapter(adapter: MergedAdapter, directory: Path) -> Path:
    """adapter_config.json (sorted keys, as PEFT writes it) + adapter_model.safetensors ({"format": "pt"})."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True))
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in adapter.tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory
