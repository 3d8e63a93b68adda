"""The application layer runs on the engine tests' demo model and PEFT-made adapters."""

from engine.conftest import demo_adapters, demo_base, demo_tokenizer, peft_greedy  # noqa: F401
