"""A local Ray cluster on this machine running `serve-ray`'s application: 2 model replicas on the demo model,
a shared store in a temporary directory, and PEFT's greedy tokens as the oracle (as in tests/api)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from oracle import PeftGreedy, make_peft_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.devtools.demo_model import ensure_demo_model
from service.settings import Settings

NUM_REPLICAS = 2
PER_REPLICA = 2  # small, so that many adapters force LRU evictions on every replica
LEASE_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll `condition` until it returns something truthy (bounded): the cluster changes on its own."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """The running application: an HTTP client, the arm file of the replica failpoint, the store."""

    def __init__(self, url: str, arm_file: Path, store: Path, lora_root: Path) -> None:
        self.client = httpx.Client(base_url=url, timeout=120)
        self.arm_file = arm_file
        self.store = store
        self.lora_root = lora_root  # the allowed root of vLLM's load_lora_adapter

    def replicas(self) -> dict[str, list[str]]:
        """Live replicas and the model ids resident on each (as reported to the cluster state)."""
        return self.client.get("/health").json()["replicas"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="session")
def oracle(model_dir, tmp_path_factory) -> PeftGreedy:
    import torch

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    root = tmp_path_factory.mktemp("peft-adapters")
    adapters = {f"a{i}": make_peft_adapter(base, root / f"a{i}", seed=100 + i, r=4, lora_alpha=8,
                                           target_modules=["q_proj", "v_proj"]) for i in range(8)}
    return PeftGreedy(base, AutoTokenizer.from_pretrained(model_dir), adapters)


@pytest.fixture(scope="module")  # Ray stops as soon as its module is done, not at the end of the whole run
def cluster(model_dir, tmp_path_factory) -> Iterator[Cluster]:
    import ray  # only here: without the [distributed] extra the test modules skip before this runs
    from ray import serve

    from service.distributed.app import run

    work = tmp_path_factory.mktemp("ray")
    arm_file = work / "arm-replica-failpoint"
    # Every Ray worker inherits the environment of ray.init: one torch thread each (2 cores), and the replica
    # failpoint, which fires only once a test creates the arm file. Restored at once for the other tests.
    saved = dict(os.environ)
    os.environ.update({"OMP_NUM_THREADS": "1", "SERVICE_FAILPOINT": "replica.loading",
                       "SERVICE_FAILPOINT_ARM_FILE": str(arm_file)})
    try:
        ray.init(num_cpus=4, include_dashboard=False, namespace="adapter-service-tests")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    settings = Settings(model=str(model_dir), store=work / "store", host="127.0.0.1", port=_free_port(),
                        device="cpu", num_replicas=NUM_REPLICAS, max_adapters_per_replica=PER_REPLICA,
                        replica_num_cpus=1, replica_lease_s=LEASE_S, max_batch_size=2, max_waiting_requests=4,
                        max_upload_bytes=8 * 1024 * 1024, lora_roots=[work / "lora-root"])
    url = run(settings, block=False)
    try:
        yield Cluster(url, arm_file, settings.store, work / "lora-root")
    finally:
        serve.shutdown()
        ray.shutdown()
