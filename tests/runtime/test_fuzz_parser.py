"""Hypothesis corrupts valid adapters: the parser answers with typed errors only, and nothing changes.

Starting from PEFT-made adapters (LoRA with embedding LoRA and a `modules_to_save` copy; DoRA on every
linear layer), each example corrupts the config (wrong types and values, unknown keys, huge numbers,
deep nesting, non-UTF-8, not JSON) and/or the weights (header length, header JSON, dtypes, shapes and
byte ranges, truncation, flipped bytes, NaN/inf values, missing or extra tensors), then runs
`AdapterRuntime.inspect` and `load`, and the store's upload path (`stage_files`, as files or in a zip).

Every failure must be a typed `ServiceError`; anything else fails the test. After every
example the live model is bitwise what it was (state_dict, module tree: no wrapper left, the resident
adapter's tensors; logits once per property), the runtime holds the same adapters, and the store's tree
is unchanged (no staging leftovers). An example that happens to still be valid loads and is deleted again,
which must also leave no trace. Derandomized with bounded examples: the same inputs every run.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import input_ids, make_peft_adapter, tiny_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from service.errors import ServiceError
from service.peft_format import CONFIG_FILE, FILE_PREFIX, WEIGHTS_FILE
from service.runtime import AdapterRuntime, AdapterValidationError
from service.store import AdapterStore

SOURCES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "dora": dict(r=2, lora_alpha=4, target_modules="all-linear", use_dora=True, use_rslora=True),
}
MAX_UPLOAD = 4 * 1024 * 1024
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


# ---- the world that must not change ---------------------------------------------------------------------


def _tree(root: Path) -> list[tuple[str, str]]:
    """Every path under root with its bytes' digest (directories too: a leftover empty folder counts)."""
    out = []
    for path in sorted(root.rglob("*")):
        content = "dir" if path.is_dir() else str(hash(path.read_bytes()))
        out.append((str(path.relative_to(root)), content))
    return out


@dataclass
class World:
    model: torch.nn.Module
    runtime: AdapterRuntime
    store: AdapterStore
    snapshot: tuple
    pristine_logits: torch.Tensor | None = None

    def take_snapshot(self) -> tuple:
        modules = [(name, type(m)) for name, m in self.model.named_modules()]
        # The model's state plus the resident adapter's own tensors (LoRA A/B live outside the state_dict).
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        state |= {f"resident.{i}": t.clone() for i, t in enumerate(self.runtime.adapters["resident"].tensors())}
        return modules, state, sorted(self.runtime.adapters), self.runtime.active, _tree(self.store.root)

    def logits(self) -> torch.Tensor:
        with torch.no_grad(), self.runtime.route(["resident", None, "resident"]):
            return self.model(input_ids=input_ids()).logits

    def assert_unchanged(self, forward: bool = False) -> None:
        """Cheap checks after every example; `forward` also compares the logits (once per property: a
        forward pass per example would dominate the run time)."""
        modules, state, adapters, active, tree = self.take_snapshot()
        assert modules == self.snapshot[0], "the module tree changed (a wrapper was left or removed)"
        assert state.keys() == self.snapshot[1].keys()
        for key, value in state.items():
            assert torch.equal(value, self.snapshot[1][key]), key
        assert (adapters, active) == (self.snapshot[2], self.snapshot[3])
        assert tree == self.snapshot[4], "the store's directory tree changed"
        if forward:
            assert torch.equal(self.logits(), self.pristine_logits)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[bytes, bytes]]:
    """(config bytes, weights bytes) of each valid adapter the corruptions start from."""
    base = tiny_model("llama")
    root = tmp_path_factory.mktemp("fuzz-sources")
    made = {name: make_peft_adapter(base, root / name, seed=3 + i, **kw)
            for i, (name, kw) in enumerate(SOURCES.items())}
    return {name: ((d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes()) for name, d in made.items()}


@pytest.fixture(scope="module")
def world(sources, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("fuzz-world")
    model = tiny_model("llama")
    runtime = AdapterRuntime(model, max_rank=64)
    resident = root / "resident"
    resident.mkdir()
    (resident / CONFIG_FILE).write_bytes(sources["lora"][0])
    (resident / WEIGHTS_FILE).write_bytes(sources["lora"][1])
    runtime.load("resident", resident)  # wrappers exist: a failed load must not disturb them either
    store = AdapterStore(root / "store")
    store.commit("resident", store.stage_directory(resident), {"r": 4})
    w = World(model, runtime, store, ())
    w.snapshot, w.pristine_logits = w.take_snapshot(), w.logits()
    return w


def test_the_sources_are_valid(world, sources, tmp_path) -> None:
    for name, (config, weights) in sources.items():
        (tmp_path / CONFIG_FILE).write_bytes(config)
        (tmp_path / WEIGHTS_FILE).write_bytes(weights)
        world.runtime.inspect(name, tmp_path)
    world.assert_unchanged(forward=True)


# ---- corruptions ------------------------------------------------------------------------------------------

HUGE = st.sampled_from([2**63, 2**64 + 1, -(2**63) - 1, 10**400, -(10**400), 1e308, -1e308])
NUMBERS = st.one_of(st.integers(-5, 70), HUGE, st.floats(allow_nan=True, allow_infinity=True))
NAMES = st.sampled_from(["q_proj", "v_proj", "lm_head", "embed_tokens", "all-linear", "(", "[a-", "*", ".*",
                         "model.layers.0.self_attn.q_proj", "layers", "", "\x00", "é"])
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, NAMES, st.text(max_size=6))
JSON_VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(NAMES, inner, max_size=3), max_leaves=8
)
CONFIG_KEYS = st.sampled_from([
    "r", "lora_alpha", "peft_type", "target_modules", "exclude_modules", "modules_to_save", "use_rslora",
    "use_dora", "lora_bias", "bias", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "init_lora_weights", "base_model_name_or_path", "layer_replication", "target_parameters", "fan_in_fan_out",
    "unknown_key", "__proto__",
])


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def corrupt_config(draw, config: bytes) -> bytes:
    doc = json.loads(config)
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "deep", "digits", "whole", "raw", "truncate"]))
    if kind == "set":
        for _ in range(draw(st.integers(1, 3))):
            doc[draw(CONFIG_KEYS | st.text(max_size=8))] = draw(JSON_VALUES)
    elif kind == "delete":
        doc.pop(draw(st.sampled_from(sorted(doc))), None)
    elif kind == "deep":  # nesting deep enough to exhaust the JSON parser's recursion
        text = json.dumps(doc)[:-1] + f', "{draw(CONFIG_KEYS)}": ' + _deep(draw(st.sampled_from([50, 5000, 100_000])),
                                                                        draw(st.sampled_from(["list", "dict"]))) + "}"
        return text.encode()
    elif kind == "digits":  # more digits than Python converts to an int by default
        return (json.dumps(doc)[:-1] + f', "{draw(CONFIG_KEYS)}": 1' + "0" * 5000 + "}").encode()
    elif kind == "whole":
        return json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "raw":
        return draw(st.binary(max_size=64) | st.sampled_from([b"\xff\xfe{}", b'{"r": 4, "x": "\xc3\x28"}', b""]))
    else:
        return config[: draw(st.integers(0, len(config) - 1))]
    return json.dumps(doc).encode()


def _split(weights: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8:8 + n]), weights[8 + n:]


def _join(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "XX", ""])


@st.composite
def corrupt_header(draw, weights: bytes) -> bytes:
    header, data = _split(weights)
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "drop", "add", "rename", "metadata", "whole",
                                 "digits"]))
    if kind == "dtype":
        header[key]["dtype"] = draw(DTYPE_NAMES | JSON_VALUES)
    elif kind == "shape":
        header[key]["shape"] = draw(st.lists(NUMBERS, max_size=4) | JSON_VALUES)
    elif kind == "offsets":
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = draw(st.sampled_from([[end, start], [start, end + 4], [start - 4, end],
                                                             [start, 2**64], [-1, end]])
                                           | st.lists(NUMBERS, max_size=3) | JSON_VALUES)
    elif kind == "entry":
        header[key] = draw(JSON_VALUES)
    elif kind == "drop":
        del header[key]
    elif kind == "add":
        header[draw(NAMES)] = {"dtype": draw(DTYPE_NAMES), "shape": draw(st.lists(NUMBERS, max_size=3)),
                               "data_offsets": draw(st.lists(NUMBERS, min_size=2, max_size=2))}
    elif kind == "rename":
        header[draw(st.sampled_from([key.removeprefix(FILE_PREFIX), FILE_PREFIX + key, key + ".x", "\udcff"]))] = (
            header.pop(key))
    elif kind == "metadata":
        header["__metadata__"] = draw(JSON_VALUES)
    elif kind == "digits":
        raw = json.dumps(header).replace('"shape": [', '"shape": [1' + "0" * 5000 + ", ", 1).encode()
        return struct.pack("<Q", len(raw)) + raw + data
    else:
        header = draw(JSON_VALUES)
    return _join(header, data)


@st.composite
def corrupt_bytes(draw, weights: bytes) -> bytes:
    kind = draw(st.sampled_from(["length", "flip", "truncate", "append"]))
    data = bytearray(weights)
    if kind == "length":
        (n,) = struct.unpack("<Q", weights[:8])
        value = draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, len(weights), 2**63, 2**64 - 1])
                     | st.integers(0, 2**64 - 1))
        data[:8] = struct.pack("<Q", value)
    elif kind == "flip":
        (n,) = struct.unpack("<Q", weights[:8])
        for _ in range(draw(st.integers(1, 8))):  # mostly inside the header, where parsing happens
            pos = draw(st.integers(0, 8 + n - 1) | st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


TORCH_DTYPES = st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.bool,
                                torch.uint8, torch.float8_e4m3fn])


@st.composite
def corrupt_tensors(draw, weights: bytes) -> bytes:
    """A well-formed safetensors file whose tensors are wrong: dtypes, values, shapes, keys."""
    tensors = load_safetensors(weights)
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    kind = draw(st.sampled_from(["dtype", "nan", "shape", "drop", "add", "rename"]))
    if kind == "dtype":
        tensors[key] = t.to(draw(TORCH_DTYPES))
    elif kind == "nan":
        t = t.clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = t
    elif kind == "shape":
        tensors[key] = draw(st.sampled_from([t.T.contiguous(), t[..., :1].contiguous(), t.reshape(-1), t[None],
                                             torch.zeros((0, *t.shape[1:]))]))
    elif kind == "drop":
        del tensors[key]
    elif kind == "add":
        tensors[key.replace("lora_A", "lora_C") + draw(st.sampled_from(["", ".x"]))] = torch.zeros(2, 2)
    else:
        tensors[draw(st.sampled_from([key.removeprefix(FILE_PREFIX), key.replace("q_proj", "k_proj")]))] = (
            tensors.pop(key))
    return save_safetensors(tensors, metadata={"format": "pt"})


@st.composite
def corrupted_adapter(draw, sources: dict[str, tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    config, weights = sources[draw(st.sampled_from(sorted(sources)))]
    target = draw(st.sampled_from(["config", "header", "bytes", "tensors", "config+tensors"]))
    if "config" in target:
        config = draw(corrupt_config(config))
    if target == "header":
        weights = draw(corrupt_header(weights))
    elif target == "bytes":
        weights = draw(corrupt_bytes(weights))
    elif target.endswith("tensors"):
        weights = draw(corrupt_tensors(weights))
    return config, weights


# ---- regressions: what the fuzzing found, each as a plain example --------------------------------------------

FOUND = {
    "alpha too large for a float": {"lora_alpha": 10**400},
    "alpha NaN": {"lora_alpha": math.nan},
    "alpha inf": {"lora_alpha": math.inf},
    "rank too large for a float (rsLoRA sqrt)": {"r": 10**400, "use_rslora": True},
    "alpha_pattern too large": {"alpha_pattern": {"q_proj": 10**400}},
    "target_modules not a regex": {"target_modules": "("},
    "exclude_modules not a regex": {"exclude_modules": "["},
    "modules_to_save not a regex": {"modules_to_save": ["("]},
    "rank_pattern key not a regex": {"rank_pattern": {"(": 4}},
    "layers_pattern not a regex": {"layers_pattern": "(", "layers_to_transform": [0]},
}


@pytest.mark.parametrize("change", FOUND.values(), ids=FOUND.keys())
def test_config_values_found_by_fuzzing_are_typed_errors(world, sources, tmp_path, change) -> None:
    config = {**json.loads(sources["lora"][0]), **change}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(sources["lora"][1])
    with pytest.raises(AdapterValidationError) as info:
        world.runtime.load("fuzzed", tmp_path)
    assert info.value.report.config_errors
    world.assert_unchanged(forward=True)


@pytest.mark.parametrize("text", [b"[" * 100_000 + b"]" * 100_000, b'{"r": 1' + b"0" * 5000 + b"}"],
                         ids=["nested too deeply", "int with 5000 digits"])
def test_unparseable_json_is_a_typed_error(world, sources, tmp_path, text) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(text)
    (tmp_path / WEIGHTS_FILE).write_bytes(sources["lora"][1])
    with pytest.raises(AdapterValidationError):
        world.runtime.load("fuzzed", tmp_path)
    (tmp_path / CONFIG_FILE).write_bytes(sources["lora"][0])
    (tmp_path / WEIGHTS_FILE).write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(AdapterValidationError):
        world.runtime.load("fuzzed", tmp_path)
    with pytest.raises(ServiceError):
        world.store.stage_files([(CONFIG_FILE, io.BytesIO(text)), (WEIGHTS_FILE, io.BytesIO(b""))], MAX_UPLOAD)
    world.assert_unchanged(forward=True)


# ---- the properties -----------------------------------------------------------------------------------------


def _expect_typed(call: Callable[[], object]) -> object | None:
    """Run `call`; a typed error is fine (returns None), anything else propagates and fails the example."""
    try:
        return call()
    except ServiceError:
        return None


@pytest.fixture(scope="module")
def adapters_strategy(sources):
    return corrupted_adapter(sources)


def test_runtime_inspect_and_load_raise_typed_errors_and_change_nothing(world, adapters_strategy) -> None:
    @FUZZ_SETTINGS
    @given(adapter=adapters_strategy)
    def run(adapter: tuple[bytes, bytes]) -> None:
        config, weights = adapter
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / CONFIG_FILE).write_bytes(config)
            (Path(tmp) / WEIGHTS_FILE).write_bytes(weights)
            _expect_typed(lambda: world.runtime.inspect("fuzzed", Path(tmp)))
            world.assert_unchanged()
            if _expect_typed(lambda: world.runtime.load("fuzzed", Path(tmp))) is not None:
                world.runtime.delete("fuzzed")  # still a valid adapter: loading and deleting leave no trace
            world.assert_unchanged()

    run()
    world.assert_unchanged(forward=True)


def _zip(config: bytes, weights: bytes, cut: int | None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CONFIG_FILE, config)
        archive.writestr(WEIGHTS_FILE, weights)
    data = buffer.getvalue()
    return data if cut is None else data[:cut]


def test_store_upload_path_raises_typed_errors_and_leaves_no_trace(world, adapters_strategy) -> None:
    """What an upload does before commit: stage the files, then validate them against the model."""

    @FUZZ_SETTINGS
    @given(adapter=adapters_strategy, form=st.sampled_from(["files", "zip"]), cut=st.none() | st.integers(0, 4096))
    def run(adapter: tuple[bytes, bytes], form: str, cut: int | None) -> None:
        config, weights = adapter
        if form == "zip":
            files = [("adapter.zip", io.BytesIO(_zip(config, weights, cut)))]
        else:
            files = [(CONFIG_FILE, io.BytesIO(config)), (WEIGHTS_FILE, io.BytesIO(weights))]
        staged = _expect_typed(lambda: world.store.stage_files(files, MAX_UPLOAD))
        if staged is not None:
            try:
                _expect_typed(lambda: world.runtime.prepare("fuzzed", staged.path))
            finally:
                staged.discard()
        world.assert_unchanged()

    run()
    world.assert_unchanged(forward=True)
