"""Shared set-up: offline Hugging Face, bounded threads, and tests/oracle.py importable everywhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py is shared by every test package
