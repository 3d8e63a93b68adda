"""Tools for development and tests: the embedded demo model and a builder of valid PEFT adapters for it.

The server uses only `demo_model` (its default model when none is configured); `make_adapter` serves
`python -m service make-adapter`, the tests and the benchmarks.
"""
