"""Freed tensors go back to the OS: the allocator is configured at start-up (service/memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Free a 4 MiB block (glibc then raises its mmap threshold to 4 MiB), allocate 40 x 2 MiB tensors (an adapter's
# copies), keep the last one (it pins the top of the heap) and free the rest: how much of the 80 MiB came back?
SCRIPT = """
import sys, torch
from service.memory import configure_allocator, release_free_memory
if sys.argv[1] == "configured":
    assert configure_allocator()
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
first = torch.ones(1024 * 1024)
del first
tensors = [torch.ones(512 * 1024) for _ in range(40)]
loaded = rss()
keep = tensors[-1]
del tensors
release_free_memory() if sys.argv[1] == "configured" else None
print(loaded - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_adapter_memory_is_given_back() -> None:
    def returned(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert returned("configured") > 70  # MiB of the 78 freed
