"""Combining adapters into new ones (weighted merges) and merging adapters into base weights (export)."""

from .weighted_merge import METHODS, MergedAdapter, MergeError, MergeSpec, merge

__all__ = ["METHODS", "MergeError", "MergeSpec", "MergedAdapter", "merge"]
