"""The contract every adapter type implements (LoRA, IA3, LoHa, and plug-ins from installed packages).

An adapter type answers five questions, and the runtime does everything else (validation order,
wrapping base modules, routing rows of a mixed batch, modules_to_save copies, deletion, fusing):

1. Config: `parse_config` turns the raw `adapter_config.json` object into a typed config, collecting
   every problem (`AdapterConfigBase` holds the fields every PEFT type shares; a type subclasses it and
   reads its fields with the shared readers of `config_readers.py`).
2. Keys: `plan_module` says, for one targeted base module, which file keys belong to it and with
   which shapes (through `AdapterKeys.expect`, which records missing keys and shape/dtype problems),
   and `plan_shared` claims adapter-level keys (a router, VeRA-style shared matrices). Keys declared
   `optional=True` are never reported missing. Whatever no type claims is reported as unexpected.
3. Wrapping: `build_module` turns the planned keys' tensors into a `ModuleAdapter`, the object the
   runtime's wrapper calls for the rows of a batch that use this adapter.
4. Tensors: `ModuleAdapter.tensors()` lists every tensor it holds, so the runtime can count bytes
   and a test can prove that deleting the adapter freed them; dropping the object frees them.
5. Merging: `ModuleAdapter.merged_parameters(base)` returns the base module's parameters with the
   adapter folded in, or raises `NotMergeableError` saying why (e.g. input-dependent gating).

A type is registered under its PEFT `peft_type` (upper case). Built-in types live next to this file;
other packages expose theirs through the `adapter_service.adapter_types` entry-point group (see
`registry.py` and docs/adapter-types.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...peft_format import FILE_PREFIX
from ..errors import AdapterError, LoadReport, ShapeMismatch
from ..safetensors_file import FLOAT_DTYPES
from .config_readers import AdapterConfigBase, ParsedConfig

if TYPE_CHECKING:
    from ..model_index import ModelIndex

ADAPTER_DTYPE = torch.float32  # PEFT's autocast_adapter_dtype=True: adapter tensors compute in fp32


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module; Conv1D stores its weight as (in, out), embeddings are (V, d)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


class NotMergeableError(AdapterError):
    """This adapter cannot be folded into base weights (the reason is in the message)."""

    code = "not_mergeable"


class AdapterKeys:
    """The file's keys (module-relative, `base_model.model.` stripped) as a type claims them.

    `expect` checks presence, shape and dtype and records problems in the load report; every key a type
    looks at through it counts as used, so the runtime can report the rest as unexpected.
    """

    def __init__(self, keys: dict[str, tuple[str, Any]], report: LoadReport) -> None:
        self._keys = keys  # relative key -> (file key, TensorHeader)
        self.report = report
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def unused(self) -> list[str]:
        """File keys no type claimed, sorted (the load report's unexpected keys)."""
        return sorted(self._keys[k][0] for k in self._keys.keys() - self.used)

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape recorded in the file header, or None when the key is absent."""
        entry = self._keys.get(key)
        return tuple(entry[1].shape) if entry is not None else None

    def expect(self, key: str, shape: Sequence[int] | None, optional: bool = False,
               float_only: bool = True) -> str | None:
        """Claim `key`; returns its file key when usable. Missing keys are reported unless optional.

        `shape` None accepts any shape (the type checks it itself, e.g. a rank read from the file).
        """
        entry = self._keys.get(key)
        if entry is None:
            if not optional:
                self.report.missing_keys.append(FILE_PREFIX + key)
            return None
        self.used.add(key)
        file_key, spec = entry
        usable = True
        if shape is not None and tuple(spec.shape) != tuple(shape):
            self.report.shape_mismatches.append(ShapeMismatch(file_key, list(shape), list(spec.shape)))
            usable = False
        if float_only and spec.dtype not in FLOAT_DTYPES:
            self.report.dtype_errors.append(f"{file_key} is {spec.dtype}; adapter weights must be F32, F16 or BF16")
            usable = False
        return file_key if usable else None


@dataclass
class ModuleTarget:
    """One base module an adapter changes, as planned: its file keys and type-specific values."""

    name: str
    keys: dict[str, str]  # field name (e.g. "A", "B", "ia3_l") -> file key
    info: dict[str, Any] = field(default_factory=dict)  # e.g. rank, alpha, scaling, feedforward


class ModuleAdapter(ABC):
    """One adapter's tensors at one base module and how they change that module's forward.

    The runtime calls, for the rows of a batch that use this adapter (x: those rows' input):
        y = base(adapt_input(base, x))   # only when `changes_input` is True; else y = base(x)
        y = adapt_output(base, x, y)
    In a mixed batch the base module runs once for all rows, so `adapt_input` must be row-wise and
    `adapt_output` must only depend on its own rows. Tensors live on the base module's device.
    """

    changes_input: ClassVar[bool] = False
    # Optional attribute `rank: int`: reported in adapter info and checked against the server's max rank.

    def adapt_input(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    @abstractmethod
    def adapt_output(self, base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The module's output for these rows with the adapter applied, in y's dtype."""

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object holds (the runtime counts their bytes and proves they are freed)."""

    def merged_parameters(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """New values of base parameters ("weight", maybe "bias") with this adapter folded in."""
        raise NotMergeableError(self.merge_blocker() or f"{type(self).__name__} cannot be merged")

    def merged_parameter_names(self, base: nn.Module) -> tuple[str, ...]:
        """Which base parameters `merged_parameters` returns (read before any tensor is computed)."""
        return ("weight",)

    def merge_blocker(self) -> str | None:
        """Why this adapter cannot be folded into base weights, or None when it can."""
        if type(self).merged_parameters is ModuleAdapter.merged_parameters:
            return f"{type(self).__name__} cannot be merged into base weights"
        return None

    @classmethod
    def stacked(cls, adapter_ids: tuple[str, ...], adapters: Sequence[ModuleAdapter]) -> Any | None:
        """Optional fast path for the decode steps of a batch mixing adapters of this class on one module.

        Return None to use the per-group path, or an object with:
        - `adapter_ids` (the ids it was built for) and `rank_total` (the work it does per row, e.g. ranks summed);
        - `layout_key`: hashable; stacks with equal keys give equal layouts (shared between modules);
        - `layout(row_adapters) -> object`: what one batch layout needs (row_adapters: each row's
          adapter id or None, in batch order; ids it does not hold mean "no adapter");
        - `apply(x, y, layout) -> y`: the output of every row with its adapter applied (one token per row).
        The wrapper may keep a stack holding adapters that have left the batch (their rows are simply absent).
        """
        return None


class AdapterType(ABC):
    """One kind of adapter (a PEFT `peft_type`): parses its config and builds its per-module objects."""

    peft_type: ClassVar[str]  # e.g. "LORA"; adapter_config.json must spell it exactly so, as PEFT requires
    # Base module classes this type can wrap; a targeted module of another class is "unsupported".
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    # Whether POST /adapters/merge (weighted combination into a new adapter) accepts this type.
    supports_weighted_merge: ClassVar[bool] = False

    @abstractmethod
    def parse_config(self, raw: dict[str, Any]) -> ParsedConfig:
        """Validate the raw JSON object; collect every problem instead of stopping at the first."""

    @abstractmethod
    def plan_module(self, config: AdapterConfigBase, name: str, module: nn.Module, keys: AdapterKeys,
                    report: LoadReport) -> ModuleTarget | None:
        """Claim the keys of one targeted module (None: nothing to do for it). Reads no tensor data."""

    def plan_shared(self, config: AdapterConfigBase, index: ModelIndex, keys: AdapterKeys,
                    report: LoadReport) -> dict[str, str]:
        """Claim adapter-level keys (field -> file key) shared by all modules; none by default."""
        return {}

    @abstractmethod
    def build_module(self, config: AdapterConfigBase, target: ModuleTarget, tensors: dict[str, torch.Tensor],
                     shared: dict[str, torch.Tensor], base: nn.Module, report: LoadReport) -> ModuleAdapter:
        """Build the module's adapter from its planned tensors (`tensors` maps field -> tensor, loaded
        on the base module's device, dtype as stored). Problems go into `report` (e.g. base mismatch)."""
