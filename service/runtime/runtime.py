"""The adapter runtime: load, activate, route and delete PEFT-format adapters on one live model.

Not thread-safe by design: exactly one owner (the engine) calls it, between forward passes, so a forward
never sees a half-loaded adapter. Loading is validate -> build every tensor off to the side -> attach;
any failure before attach leaves the model untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapted_module import AdaptedModule
from .adapter_types.base import AdapterType, ModuleAdapter, NotMergeableError
from .adapter_types.config_readers import AdapterConfigBase
from .errors import AdapterError, AdapterExistsError, AdapterNotFoundError, AdapterValidationError, LoadReport
from .model_index import ModelIndex
from .plan import AdapterPlan, plan_adapter
from .routing import Router, RowAssignment
from .safetensors_file import SafetensorsFormatError, load_tensors

# Above this magnitude an adapter weight is absurd (trained LoRA factors, DoRA magnitudes and saved copies of
# embeddings stay many orders of magnitude below): the load report warns.
IMPLAUSIBLE_WEIGHT = 1e4


@dataclass(eq=False)
class LoadedAdapter:
    """Everything one adapter put into the model; deleting this record's entries frees the adapter."""

    adapter_id: str
    adapter_type: AdapterType
    config: AdapterConfigBase
    report: LoadReport
    modules: dict[str, ModuleAdapter] = field(default_factory=dict)  # module name -> the type's per-module object
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter-level tensors (e.g. a shared router)
    replacements: dict[str, nn.Module] = field(default_factory=dict)  # module name -> trained copy
    # Embedding name -> copy with the file's own full weights (save_embedding_layers) where they differ
    # from the served base's; the adapter's rows run on it (and its LoRA, if any, sits on top of it).
    base_overrides: dict[str, nn.Module] = field(default_factory=dict)
    fused: dict[str, nn.Module] = field(default_factory=dict)  # module name -> merged copy, while fused

    def tensors(self) -> list[torch.Tensor]:
        out = [t for m in self.modules.values() for t in m.tensors()] + list(self.shared.values())
        for module in (*self.replacements.values(), *self.base_overrides.values(), *self.fused.values()):
            out += list(module.parameters()) + list(module.buffers())
        return out

    @property
    def resident_bytes(self) -> int:
        return storage_bytes(self.tensors())

    @property
    def rank(self) -> int:
        ranks = [r for m in self.modules.values() if isinstance(r := getattr(m, "rank", None), int)]
        return max(ranks, default=getattr(self.config, "r", 0))

    def merge_blocker(self) -> str | None:
        """Why this adapter cannot be folded into base weights, or None."""
        return next((reason for m in self.modules.values() if (reason := m.merge_blocker())), None)


def storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storage counted once)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen.setdefault((t.device, storage.data_ptr()), storage.nbytes())
    return sum(seen.values())


class AdapterRuntime:
    """Serves any mix of loaded adapters on one base model."""

    def __init__(self, model: nn.Module, max_rank: int | None = None, model_name: str | None = None) -> None:
        self.model = model.eval()
        self.max_rank = max_rank
        self.model_name = model_name  # compared with each adapter's base_model_name_or_path
        self.index = ModelIndex.from_model(model)
        self.router = Router()
        self.adapters: dict[str, LoadedAdapter] = {}
        self._wrappers: dict[str, AdaptedModule] = {}
        self._last_assignment: tuple[tuple[str | None, ...], RowAssignment] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------

    def inspect(self, adapter_id: str, adapter_dir: Path) -> LoadReport:
        """Validate fully (tensors included) without changing anything; raises AdapterValidationError."""
        plan = plan_adapter(adapter_id, adapter_dir, self.index, self.max_rank, self.model_name)
        self._build(plan)
        return plan.report

    def load(self, adapter_id: str, adapter_dir: Path) -> LoadedAdapter:
        """Validate, build and attach in one call (see prepare/attach to split the work across threads)."""
        return self.attach(self.prepare(adapter_id, adapter_dir))

    def prepare(self, adapter_id: str, adapter_dir: Path) -> LoadedAdapter:
        """Validate and build every tensor without touching the model.

        Only reads the pristine index and base weights, so it may run on another thread while the owner
        runs forward passes.
        """
        return self._build(plan_adapter(adapter_id, adapter_dir, self.index, self.max_rank, self.model_name))

    def attach(self, loaded: LoadedAdapter) -> LoadedAdapter:
        """Put a prepared adapter into the model; cannot fail half-way for a prepared adapter."""
        if loaded.adapter_id in self.adapters:
            raise AdapterExistsError(loaded.adapter_id)
        self._attach(loaded)
        self.adapters[loaded.adapter_id] = loaded
        self.router.generation += 1
        return loaded

    def delete(self, adapter_id: str) -> int:
        """Remove every structure of the adapter; returns the bytes it held."""
        loaded = self.adapters.pop(adapter_id, None)
        if loaded is None:
            raise AdapterNotFoundError(adapter_id)
        freed = loaded.resident_bytes
        self.router.generation += 1
        for name in set(loaded.modules) | set(loaded.replacements) | set(loaded.base_overrides):
            wrapper = self._wrappers[name]
            wrapper.remove_adapter(adapter_id)
            if not wrapper.adapter_ids:
                self._unwrap(name)
        loaded.modules.clear()
        loaded.shared.clear()
        loaded.replacements.clear()
        loaded.base_overrides.clear()
        loaded.fused.clear()
        if self.router.active == adapter_id:
            self.router.active = None
        return freed

    # ---- fusing --------------------------------------------------------------------------------------

    @property
    def fused(self) -> str | None:
        return next((a.adapter_id for a in self.adapters.values() if a.fused), None)

    def fuse(self, adapter_id: str) -> None:
        """Give the adapter a merged copy of every module it changes, so its rows skip the LoRA math.

        The base weights are never written: other adapters and the base keep their exact outputs, and
        unfusing just drops the copies. Costs one copy of the targeted base weights.
        """
        loaded = self.adapters.get(adapter_id)
        if loaded is None:
            raise AdapterNotFoundError(adapter_id)
        if loaded.fused:
            return
        blocker = loaded.merge_blocker()
        if blocker is not None:
            raise NotMergeableError(f"adapter '{adapter_id}' cannot be fused: {blocker}", {"adapter_id": adapter_id})
        self.unfuse()
        fused: dict[str, nn.Module] = {}
        with torch.no_grad():
            for name, adapter in loaded.modules.items():
                base = loaded.base_overrides.get(name, self.index.modules[name])
                module = copy.deepcopy(base).requires_grad_(False)
                for param, value in adapter.merged_parameters(base).items():
                    getattr(module, param).data = value
                fused[name] = module
        for name, module in fused.items():
            self._wrappers[name].fused = (adapter_id, module)
        loaded.fused = fused
        self.router.generation += 1

    def unfuse(self) -> None:
        for loaded in self.adapters.values():
            for name in loaded.fused:
                self._wrappers[name].fused = None
            loaded.fused = {}
        self.router.generation += 1

    # ---- activation and routing --------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        return self.router.active

    def activate(self, adapter_id: str | None) -> None:
        """Default adapter for forwards that name none (None = base model); O(1), no weight copies."""
        if adapter_id is not None and adapter_id not in self.adapters:
            raise AdapterNotFoundError(adapter_id)
        self.router.active = adapter_id

    @contextmanager
    def route(self, row_adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter row_adapters[i] (None = base model)."""
        for adapter_id in set(row_adapters):
            if adapter_id is not None and adapter_id not in self.adapters:
                raise AdapterNotFoundError(adapter_id)
        key = tuple(row_adapters)
        if self._last_assignment is None or self._last_assignment[0] != key:
            # Decode steps repeat the same rows; reusing the assignment keeps its per-forward memo too.
            self._last_assignment = (key, RowAssignment.for_rows(row_adapters, self._device()))
        with self.router.use(self._last_assignment[1]):
            yield

    @contextmanager
    def use(self, adapter_id: str | None) -> Iterator[None]:
        """Every row of the forwards in the block uses one adapter (None = base model)."""
        if adapter_id is not None and adapter_id not in self.adapters:
            raise AdapterNotFoundError(adapter_id)
        with self.router.use(RowAssignment(uniform=adapter_id)):
            yield

    # ---- internals -----------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _build(self, plan: AdapterPlan) -> LoadedAdapter:
        """Read tensors and build every adapter structure without touching the model."""
        report = plan.report
        try:
            tensors = load_tensors(plan.weights_path)
        except SafetensorsFormatError as exc:
            report.file_errors.append(str(exc))
            raise AdapterValidationError(report) from None
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            report.dtype_errors += [f"{k} holds NaN or infinite values" for k in sorted(bad)]
            raise AdapterValidationError(report)
        huge = {k: float(t.abs().max()) for k, t in tensors.items() if t.is_floating_point() and t.numel()}
        huge = {k: v for k, v in huge.items() if v > IMPLAUSIBLE_WEIGHT}
        if huge:  # served (a request whose scores overflow fails alone: non_finite_logits), but said here
            worst = max(huge, key=huge.__getitem__)
            report.warnings.append(f"{len(huge)} tensor(s) hold values above {IMPLAUSIBLE_WEIGHT:g} in magnitude "
                                   f"(largest: {worst} = {huge[worst]:.3g}); trained adapters stay far below, and "
                                   "requests with this adapter may fail with non_finite_logits")
        loaded = LoadedAdapter(plan.adapter_id, plan.adapter_type, plan.config, report)
        device = self._device()
        loaded.shared = {f: tensors[key].to(device) for f, key in plan.shared.items()}
        self._build_base_overrides(plan, tensors, loaded)
        for target in plan.targets:
            base = loaded.base_overrides.get(target.name, self.index.modules[target.name])
            fields = {f: tensors[key].to(_module_device(base, device)) for f, key in target.keys.items()}
            try:
                module = plan.adapter_type.build_module(plan.config, target, fields, loaded.shared, base, report)
            except AdapterError:
                raise
            except Exception as exc:  # a plug-in's bug becomes a clear rejection, not a server error
                report.config_errors.append(f"{plan.adapter_type.peft_type} cannot build module '{target.name}': "
                                            f"{type(exc).__name__}: {exc}")
                raise AdapterValidationError(report) from exc
            loaded.modules[target.name] = module
        for name, params in plan.replacements.items():
            copy_module = self._pristine_copy(self.index.modules[name])
            state = {param: tensors[key] for param, key in params.items()}
            copy_module.load_state_dict(state, strict=True)  # casts to the copy's dtype and device
            loaded.replacements[name] = copy_module.eval().requires_grad_(False)
        self._check_unread_keys(plan, tensors)
        if not report.ok:
            raise AdapterValidationError(report)
        return loaded

    def _build_base_overrides(self, plan: AdapterPlan, tensors: dict[str, torch.Tensor],
                              loaded: LoadedAdapter) -> None:
        """The file's full embedding weights (save_embedding_layers): PEFT writes them into the base model.

        Equal to the served base's: nothing is held. Different: this adapter gets its own copy of the
        module, so its rows see what PEFT serves while the base and other adapters keep theirs. Tied
        input/output embeddings share one weight in the base, so PEFT's write reaches both: here both get
        the one copy.
        """
        report = plan.report
        values: dict[int, tuple[str, torch.Tensor]] = {}  # base weight storage -> (file key, file value)
        for name, key in plan.base_weights.items():
            weight = self.index.modules[name].weight
            value = tensors[key].to(weight.device, weight.dtype)  # compared with the base weight below
            storage = weight.untyped_storage().data_ptr()
            seen = values.get(storage)
            if seen is not None and not torch.equal(seen[1], value):
                report.base_mismatches.append(f"{seen[0]} and {key} hold different values for the tied "
                                              f"embedding weight {name}.weight; PEFT would keep either")
            values.setdefault(storage, (key, value))
        if not report.ok:
            return
        for storage, (key, value) in values.items():
            tied = [n for n in self.index.embeddings
                    if self.index.modules[n].weight.untyped_storage().data_ptr() == storage]
            base_weight = self.index.modules[tied[0]].weight
            if torch.equal(value, base_weight):
                report.warnings.append(f"{key}: the file carries the base model's embedding weights "
                                       "(save_embedding_layers); they equal the served model's, nothing extra held")
                continue
            names = [n for n in tied if n not in plan.replacements]  # a modules_to_save copy never reads it
            if not names:
                report.warnings.append(
                    f"{key}: differs from the served model's {tied[0]}.weight; PEFT writes it into the shared base "
                    "model, where only the base model's and other adapters' rows read it (this adapter's rows use "
                    "its modules_to_save copy); ignored, as the server keeps one adapter's weights to itself")
                continue
            shared = nn.Parameter(value.to(base_weight.device), requires_grad=False)
            for name in names:
                clone = self._pristine_copy(self.index.modules[name])
                clone.weight = shared  # tied modules keep sharing one tensor, as in the base
                loaded.base_overrides[name] = clone.eval().requires_grad_(False)
            report.warnings.append(
                f"{key}: the file carries its own embedding weights (save_embedding_layers) that differ from the "
                f"served model's; held for this adapter only ({value.numel() * value.element_size()} bytes, "
                f"used by {', '.join(names)})"
            )

    def _check_unread_keys(self, plan: AdapterPlan, tensors: dict[str, torch.Tensor]) -> None:
        """Say when a key PEFT's loader never lets this adapter's rows read holds something else (§1.7)."""
        report = plan.report
        for key, loaded_key in plan.saved_copies.items():
            if not torch.equal(tensors[key], tensors[loaded_key]):
                report.warnings.append(f"{key} differs from {loaded_key}; PEFT loads the modules_to_save copy from "
                                       f"{loaded_key} and skips {key}, and so does the server")
        for key, state_key in plan.unread_base_params.items():
            module_name, _, attr = state_key.rpartition(".")
            base = getattr(self.index.modules[module_name], attr)
            if not torch.equal(tensors[key].to(base.device, base.dtype), base):
                report.warnings.append(
                    f"{key}: differs from the served model's {state_key}; PEFT writes it into the shared base model, "
                    "where only the base model's and other adapters' rows read it (this adapter's rows use its "
                    "modules_to_save copy); ignored, as the server keeps one adapter's weights to itself")

    @staticmethod
    def _pristine_copy(module: nn.Module) -> nn.Module:
        """A deep copy of the base module with any of our wrappers inside replaced by their base layers."""
        clone = copy.deepcopy(module.base_layer if isinstance(module, AdaptedModule) else module)
        for name, sub in list(clone.named_modules()):
            if isinstance(sub, AdaptedModule) and name:
                clone.set_submodule(name, sub.base_layer)
        return clone

    def _wrapper(self, name: str) -> AdaptedModule:
        wrapper = self._wrappers.get(name)
        if wrapper is None:
            parent, attr = self.index.parents[name]
            wrapper = AdaptedModule(self.index.modules[name], name, self.router)
            setattr(parent, attr, wrapper)
            self._wrappers[name] = wrapper
        return wrapper

    def _unwrap(self, name: str) -> None:
        wrapper = self._wrappers.pop(name)
        parent, attr = self.index.parents[name]
        setattr(parent, attr, wrapper.base_layer)

    def _attach(self, loaded: LoadedAdapter) -> None:
        for name, module in loaded.modules.items():
            self._wrapper(name).adapters[loaded.adapter_id] = module
        for name, module in loaded.replacements.items():
            self._wrapper(name).replacements[loaded.adapter_id] = module
        for name, module in loaded.base_overrides.items():
            self._wrapper(name).bases[loaded.adapter_id] = module




def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else default
