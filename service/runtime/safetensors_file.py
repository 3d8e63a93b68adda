"""Read a safetensors file defensively: header first (no tensor bytes), then tensors.

The header is checked against the file size so a truncated or padded upload is caught before anything
is allocated; tensor bytes are only read once the header is known to be sound.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

# safetensors dtype names -> torch dtypes we accept for adapter weights.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorHeader:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorHeader]:
    """Parse and check the header; raises SafetensorsFormatError with a readable reason."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SafetensorsFormatError(f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsFormatError(f"header length {header_len} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as exc:  # also: nested too deeply, an int with thousands of digits
            raise SafetensorsFormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    tensors: dict[str, TensorHeader] = {}
    end_max = 0
    for key, entry in header.items():
        if not _well_formed(entry):
            raise SafetensorsFormatError(f"tensor '{key}' has a malformed header entry")
        dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise SafetensorsFormatError(f"tensor '{key}' has unknown dtype {dtype}")
        numel = 1
        for d in shape:
            if d < 0:
                raise SafetensorsFormatError(f"tensor '{key}' has a negative dimension")
            numel *= d
        if not (0 <= start <= end <= data_len) or end - start != numel * _DTYPE_SIZES[dtype]:
            raise SafetensorsFormatError(
                f"tensor '{key}' byte range [{start}, {end}) does not fit the data ({data_len} bytes): "
                "the file is truncated or corrupt"
            )
        end_max = max(end_max, end)
        tensors[key] = TensorHeader(dtype=dtype, shape=shape)
    if end_max != data_len:
        raise SafetensorsFormatError(f"data section is {data_len} bytes but tensors cover {end_max}")
    return tensors


def _well_formed(entry: object) -> bool:
    """A string dtype, a list of int dims and a list of two int offsets (as the safetensors format says)."""

    def ints(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape"))
            and ints(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load every tensor onto the CPU (call only after `read_header` succeeded)."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # the safetensors binding raises its own error types
        raise SafetensorsFormatError(f"cannot read tensors: {exc}") from None
