"""`serve-ray`'s flags and environment variables land on the settings the Serve application is built from."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.cli import RAY_FLAGS, SERVE_FLAGS, _parser
from service.settings import Settings


def test_serve_ray_flags_map_onto_settings() -> None:
    args = _parser().parse_args(["serve-ray", "--ray-address", "auto", "--num-replicas", "3",
                                 "--max-adapters-per-replica", "5", "--replica-num-gpus", "1",
                                 "--replica-lease-s", "4", "--store", "/tmp/shared-store"])
    settings = Settings(**{k: v for k in SERVE_FLAGS + RAY_FLAGS if (v := getattr(args, k)) is not None})
    assert (settings.ray_address, settings.num_replicas, settings.max_adapters_per_replica) == ("auto", 3, 5)
    assert (settings.replica_num_gpus, settings.replica_lease_s, str(settings.store)) == (1.0, 4.0, "/tmp/shared-store")


def test_serve_ray_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ADAPTER_SERVICE_NUM_REPLICAS", "4")
    monkeypatch.setenv("ADAPTER_SERVICE_MAX_ADAPTERS_PER_REPLICA", "32")
    assert (Settings().num_replicas, Settings().max_adapters_per_replica) == (4, 32)
    monkeypatch.setenv("ADAPTER_SERVICE_NUM_REPLICAS", "0")
    with pytest.raises(ValidationError):
        Settings()
