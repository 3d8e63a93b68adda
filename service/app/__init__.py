"""The application layer: every operation of the service behind one typed interface, with no HTTP in it."""

from .interface import (
    BASE,
    Activation,
    AdapterService,
    AdapterUsage,
    AdapterView,
    Deletion,
    Export,
    Generation,
    GenerationEvent,
    GenerationInput,
    Health,
    Listing,
    TokenCounts,
)

__all__ = [
    "BASE", "Activation", "AdapterService", "AdapterUsage", "AdapterView", "Deletion", "Export", "Generation",
    "GenerationEvent", "GenerationInput", "Health", "Listing", "TokenCounts",
]
