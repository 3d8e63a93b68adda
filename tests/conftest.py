"""Shared fixtures: tiny seeded base models built from configs (no downloads) and PEFT-made adapters."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py is shared by every test package
