"""Which devices each replica of a deployment gets (CUDA mocked: these tests run on CPUs)."""

from __future__ import annotations

import pytest
import torch

from fastgen import EngineConfig
from fastgen.serving.replica import assign_devices


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_each_replica_gets_its_own_gpus(four_gpus):
    config = EngineConfig(tensor_parallel=2)
    assert assign_devices(config, 0, 2).device_ids == [0, 1]
    assert assign_devices(config, 1, 2).device_ids == [2, 3]
    assert assign_devices(EngineConfig(), 3, 4).device_ids == [3]
    with pytest.raises(RuntimeError, match=r"needs GPUs 4\.\.5"):
        assign_devices(config, 2, 3)


def test_explicit_devices_and_cpu_runs_are_left_alone(four_gpus):
    assert assign_devices(EngineConfig(device_ids=[3]), 0, 1).device_ids == [3]
    assert assign_devices(EngineConfig(device="cpu"), 1, 1).device_ids is None
