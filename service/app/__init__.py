"""The application layer: every operation of the service behind one typed interface, with no HTTP in it."""

from .interface import (
    BASE,
    Activation,
    AdapterService,
    AdapterView,
    Deletion,
    Export,
    Generation,
    GenerationEvent,
    GenerationInput,
    Health,
    Listing,
)

__all__ = [
    "BASE", "Activation", "AdapterService", "AdapterView", "Deletion", "Export", "Generation", "GenerationEvent",
    "GenerationInput", "Health", "Listing",
]
