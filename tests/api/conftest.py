"""Fixtures for end-to-end API tests: the demo model on disk, PEFT-made adapters, a running server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from oracle import PeftGreedy, make_peft_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.devtools.demo_model import ensure_demo_model

from .server import ServerProcess, SharedServer

ADAPTER_CONFIGS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj", "embed_tokens"],
                 modules_to_save=["lm_head"]),
    "gamma": dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
}
SERVER_FLAGS = ("--max-upload-bytes", str(8 * 1024 * 1024))  # `server` and `fresh_server`


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (mount's syntax: "4m", bytes) mounted at `mount`, a new directory; the test is
    skipped where it cannot mount one (needs root and the mount command)."""
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="session")
def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def adapters(base_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        name: make_peft_adapter(base_model, root / name, seed=i + 11, **kw)
        for i, (name, kw) in enumerate(ADAPTER_CONFIGS.items())
    }


@pytest.fixture(scope="session")
def oracle(base_model, tokenizer, adapters) -> PeftGreedy:
    return PeftGreedy(base_model, tokenizer, adapters)


@pytest.fixture()
def store(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture(scope="session")
def shared_server(model_dir, tmp_path_factory) -> Iterator[SharedServer]:
    shared = SharedServer(model_dir, tmp_path_factory.mktemp("shared-server"), *SERVER_FLAGS)
    yield shared
    shared.stop()


@pytest.fixture()
def server(shared_server) -> Iterator[ServerProcess]:
    """A running server on default settings with an empty store (its own in `server.store`), shared between
    tests: whatever a test creates is deleted after it, so tests stay independent (see SharedServer)."""
    yield shared_server.get()
    shared_server.reset()


@pytest.fixture()
def fresh_server(model_dir, store) -> Iterator[ServerProcess]:
    """A server process of this test's own, on the same settings as `server` (for process-wide counters)."""
    proc = ServerProcess(model_dir, store, *SERVER_FLAGS)
    yield proc
    proc.stop()


def upload(client, adapter_dir: Path, adapter_id: str | None = None):
    files = [
        ("files", ("adapter_config.json", (adapter_dir / "adapter_config.json").read_bytes())),
        ("files", ("adapter_model.safetensors", (adapter_dir / "adapter_model.safetensors").read_bytes())),
    ]
    data = {"adapter_id": adapter_id} if adapter_id else {}
    return client.post("/adapters", files=files, data=data)


def tree(path: Path) -> list[tuple[str, int]]:
    """Every file under path with its size: a store must be byte-for-byte where it was."""
    if not path.exists():
        return []
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
