"""Hot-swappable PEFT adapter serving."""
