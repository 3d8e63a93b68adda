"""Adapter types: the interface (base.py), the built-ins (LoRA, IA3, LoHa) and the registry of installed ones."""
