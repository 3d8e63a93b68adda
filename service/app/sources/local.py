"""Adapters in a directory on the server, under an operator-allowed root (--lora-root)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from ...peft_format import CONFIG_FILE, WEIGHTS_FILE
from ..paths import adapter_directory


class LocalSource:
    schemes = ("file",)

    def __init__(self, roots: list[Path]) -> None:
        self.roots = roots

    def open(self, location: str, max_bytes: int, stack: ExitStack) -> list:
        raw = location[len("file://"):] if location.lower().startswith("file://") else location
        directory = adapter_directory(raw, self.roots)  # every file must resolve under a root
        return [(name, stack.enter_context((directory / name).open("rb"))) for name in (CONFIG_FILE, WEIGHTS_FILE)]
