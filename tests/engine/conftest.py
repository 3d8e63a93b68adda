"""Engine fixtures: the demo model with PEFT-made adapters, and an engine running on its own thread."""

from __future__ import annotations

import copy

import pytest
from oracle import PeftGreedy, make_peft_adapter

from service.devtools.demo_model import build_demo_model, build_demo_tokenizer
from service.engine import Engine
from service.runtime import AdapterRuntime

ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    "c": dict(r=4, lora_alpha=4, target_modules="all-linear", use_rslora=True),
}


@pytest.fixture(scope="session")
def demo_base():
    return build_demo_model().eval()


@pytest.fixture(scope="session")
def demo_tokenizer():
    return build_demo_tokenizer()


@pytest.fixture(scope="session")
def demo_adapters(demo_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-adapters")
    return {n: make_peft_adapter(demo_base, root / n, seed=i + 21, **kw) for i, (n, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def peft_greedy(demo_base, demo_tokenizer, demo_adapters):
    """PEFT's greedy continuation of a prompt (EOS excluded), one prompt at a time with no padding."""
    return PeftGreedy(demo_base, demo_tokenizer, demo_adapters).tokens


@pytest.fixture()
def make_engine(demo_base, demo_tokenizer, demo_adapters):
    engines: list[Engine] = []

    def make(**kwargs) -> Engine:
        model = copy.deepcopy(demo_base)
        runtime = AdapterRuntime(model)
        for name, path in demo_adapters.items():
            runtime.load(name, path)
        engine = Engine(model, demo_tokenizer, runtime, **kwargs)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()
