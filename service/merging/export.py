"""Stream a standalone Hugging Face checkpoint with an adapter merged into the base weights, as a tar.

Nothing is held whole: the safetensors header is computed from the base model's shapes, then each tensor is
merged (LoRA deltas added, modules_to_save copies in place of the originals), serialised and yielded on
its own, so peak extra memory is one tensor. `AutoModelForCausalLM.from_pretrained` loads the result.
"""

from __future__ import annotations

import copy
import json
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..runtime import LoadedAdapter
from ..runtime.adapter_types.base import NotMergeableError
from ..runtime.model_index import ModelIndex

_DTYPE_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class MergedCheckpoint:
    """The merged tensors of one adapter on the pristine model, in state_dict order."""

    def __init__(self, model: nn.Module, index: ModelIndex, adapter: LoadedAdapter) -> None:
        blocker = adapter.merge_blocker()
        if blocker is not None:
            raise NotMergeableError(f"adapter '{adapter.adapter_id}' cannot be exported merged: {blocker}",
                                    {"adapter_id": adapter.adapter_id})
        self.model, self.index, self.adapter = model, index, adapter
        self.sources: dict[str, tuple[str, str]] = {}  # pristine key -> (module name, attribute)
        for key in index.state:
            module_name, _, attr = key.rpartition(".")
            self.sources[key] = (module_name, attr)
        changed = self._changed_keys()
        self.keys, self.untied = self._dedupe_tied(changed)

    def _changed_keys(self) -> set[str]:
        keys = set()
        for name, module in self.adapter.modules.items():
            keys.update(f"{name}.{param}" for param in module.merged_parameter_names(self.index.modules[name]))
        for name in self.adapter.replacements:
            keys.update(k for k in self.index.state if k.startswith(name + "."))
        keys.update(f"{name}.weight" for name in self.adapter.base_overrides)
        return keys

    def _dedupe_tied(self, changed: set[str]) -> tuple[list[str], bool]:
        """Keep one key per shared storage (as save_pretrained does) unless the adapter unties them."""
        groups: dict[int, list[str]] = {}
        for key in self.index.state:
            groups.setdefault(self._base_tensor(key).untyped_storage().data_ptr(), []).append(key)
        keys, untied = [], False
        for members in groups.values():
            if len(members) > 1 and any(k in changed for k in members):
                keys.extend(members)
                untied = True
            else:
                keys.append(members[0])
        order = {k: i for i, k in enumerate(self.index.state)}
        return sorted(keys, key=order.__getitem__), untied

    def _base_tensor(self, key: str) -> torch.Tensor:
        module_name, attr = self.sources[key]
        owner = self.index.modules[module_name] if module_name else self.model
        return getattr(owner, attr)

    def tensor(self, key: str) -> torch.Tensor:
        """The merged value of one state-dict entry."""
        module_name, attr = self.sources[key]
        for name, module in self.adapter.replacements.items():
            if key.startswith(name + "."):
                return module.state_dict()[key[len(name) + 1:]]
        # The adapter's own embedding weights (save_embedding_layers) replace the base's; LoRA sits on top.
        base = self.adapter.base_overrides.get(module_name, self.index.modules.get(module_name))
        module = self.adapter.modules.get(module_name)
        if module is not None and attr in module.merged_parameter_names(base):
            return module.merged_parameters(base)[attr]
        if module_name in self.adapter.base_overrides and attr == "weight":
            return base.weight
        return self._base_tensor(key)

    def safetensors_chunks(self) -> tuple[int, Iterator[bytes]]:
        """(total size, chunks) of a safetensors file, computed without materialising it."""
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key in self.keys:
            spec = self.index.state[key]
            nbytes = spec.dtype.itemsize * int(torch.Size(spec.shape).numel())
            header[key] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section, as the safetensors library does
        prefix = struct.pack("<Q", len(raw)) + raw

        def chunks() -> Iterator[bytes]:
            yield prefix
            with torch.no_grad():
                for key in self.keys:
                    t = self.tensor(key).detach().to("cpu").contiguous()
                    yield t.reshape(-1).view(torch.uint8).numpy().tobytes()

        return len(prefix) + offset, chunks()

    def config_json(self) -> bytes:
        config = copy.deepcopy(self.model.config)
        if self.untied:
            config.tie_word_embeddings = False  # the adapter changed one side of the tied pair
        return config.to_json_string().encode()


def _tar_member(name: str, size: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    written = 0
    for chunk in chunks:
        written += len(chunk)
        yield chunk
    assert written == size, f"{name}: wrote {written} of {size} bytes"
    yield b"\0" * (-size % tarfile.BLOCKSIZE)


def stream_checkpoint_tar(checkpoint: MergedCheckpoint, tokenizer, folder: str) -> Iterator[bytes]:
    """A tar of `folder/` holding config, generation config, tokenizer files and model.safetensors."""
    small: dict[str, bytes] = {"config.json": checkpoint.config_json()}
    generation = getattr(checkpoint.model, "generation_config", None)
    if generation is not None:
        small["generation_config.json"] = generation.to_json_string().encode()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                small[path.name] = path.read_bytes()
    for name, data in small.items():
        yield from _tar_member(f"{folder}/{name}", len(data), iter([data]))
    size, chunks = checkpoint.safetensors_chunks()
    yield from _tar_member(f"{folder}/model.safetensors", size, chunks)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)
