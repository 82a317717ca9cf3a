"""MII's ``device_map``: its forms, its refusals, and the GPUs each replica and each of its ranks
receives (CUDA mocked where a GPU would be asked: these tests run on CPUs)."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec
import pytest
import torch

import fastgen
from fastgen import EngineConfig
from fastgen.cli import main as cli_main
from fastgen.ipc import Seal
from fastgen.runner import resolve_device
from fastgen.serving import registry
from fastgen.serving.device_map import parse_device_map, replica_device_ids
from fastgen.serving.protocol import ReplicaSpec
from fastgen.serving.replica import assign_devices
from fastgen.serving.supervision import ReplicaSupervisor
from fastgen.supervisor import Launch


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.parametrize(
    ("device_map", "tensor_parallel", "replica_num", "expected"),
    [
        ("auto", 2, 2, None),
        (None, 1, 1, None),
        (3, 1, 1, [[3]]),  # MII: an int is one replica on that GPU
        ([2, 3], 2, 1, [[2, 3]]),
        ([[0, 1], [3, 2]], 2, 2, [[0, 1], [3, 2]]),
        ({"localhost": [[1], [0]]}, 1, 2, [[1], [0]]),
        ({"127.0.0.1": [[0, 1]], socket.gethostname(): [[2, 3]]}, 2, 2, [[0, 1], [2, 3]]),
        ((1, 0), 2, 1, [[1, 0]]),
    ],
)
def test_the_forms_mii_takes(device_map, tensor_parallel, replica_num, expected):
    resolved = replica_device_ids(device_map, tensor_parallel=tensor_parallel, replica_num=replica_num)
    assert resolved == expected


@pytest.mark.parametrize(
    ("device_map", "tensor_parallel", "replica_num", "message"),
    [
        ([[0], [1]], 1, 3, r"GPUs for 2 replica\(s\) but replica_num=3"),
        (0, 1, 2, r"GPUs for 1 replica\(s\) but replica_num=2"),
        ([[0, 1], [2]], 2, 2, r"replica 1 \(\[2\]\) names 1 GPU\(s\) but tensor_parallel=2"),
        ([0, 1, 2], 2, 1, r"replica 0 \(\[0, 1, 2\]\) names 3 GPU\(s\) but tensor_parallel=2"),
        ([1, 1], 2, 1, "names a GPU twice"),
        ([[0, 1], [1, 2]], 2, 2, "GPU 1 in replicas 0 and 1"),
        ({"gpu-node-7": [[0]]}, 1, 1, "host 'gpu-node-7'.*not supported yet.*Ray"),
        ({"localhost": [[0]], "other": [[1]]}, 1, 2, "host 'other'"),
        ([True], 1, 1, "must hold GPU ids"),
        ([-1], 1, 1, "must hold GPU ids"),
        ([[0], []], 1, 2, "must hold GPU ids"),
        ("0,1", 2, 1, "must be 'auto', a GPU id"),
        ([], 1, 1, "must be 'auto', a GPU id"),
    ],
)
def test_mismatches_are_named(device_map, tensor_parallel, replica_num, message):
    with pytest.raises(ValueError, match=message):
        replica_device_ids(device_map, tensor_parallel=tensor_parallel, replica_num=replica_num)


def test_command_line_values():
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("[[0,1],[2,3]]") == [[0, 1], [2, 3]]
    assert parse_device_map('{"localhost": [[1]]}') == {"localhost": [[1]]}
    with pytest.raises(ValueError, match="--device-map must be 'auto' or JSON"):
        parse_device_map("0;1")


class _Recorder:
    """A placement that starts nothing and keeps what it was asked to start."""

    isolates_devices = False

    def __init__(self):
        self.launches: list[Launch] = []

    def start(self, launch: Launch):
        self.launches.append(launch)
        return type("Unit", (), {"pid": 0})()

    def close(self) -> None:
        pass


def test_each_replica_and_rank_receives_its_gpus(four_gpus, tmp_path):
    replica_ids = replica_device_ids([[3, 1], [0, 2]], tensor_parallel=2, replica_num=2)
    placement = _Recorder()
    supervisor = ReplicaSupervisor(
        model="unused", config=EngineConfig(tensor_parallel=2), replica_num=2, address="tcp://127.0.0.1:1",
        seal=Seal.new(), log_dir=tmp_path, on_down=lambda *_: None, placement=placement,
        replica_device_ids=replica_ids,
    )  # fmt: skip
    for slot in supervisor.slots:
        supervisor._launch(slot)
    specs = [msgspec.json.decode(launch.payload, type=ReplicaSpec) for launch in placement.launches]
    placed = []
    for spec in specs:
        config = assign_devices(spec.config, spec.device_slot, spec.replicas_on_host)  # in the replica
        placed.append([resolve_device(config, rank) for rank in range(2)])  # in each rank's worker
    cuda = lambda index: torch.device("cuda", index)
    assert placed == [[cuda(3), cuda(1)], [cuda(0), cuda(2)]]


def test_without_a_map_replicas_take_their_slots_gpus(four_gpus, tmp_path):
    placement = _Recorder()
    supervisor = ReplicaSupervisor(
        model="unused", config=EngineConfig(tensor_parallel=2), replica_num=2, address="tcp://127.0.0.1:1",
        seal=Seal.new(), log_dir=tmp_path, on_down=lambda *_: None, placement=placement,
    )  # fmt: skip
    for slot in supervisor.slots:
        supervisor._launch(slot)
    specs = [msgspec.json.decode(launch.payload, type=ReplicaSpec) for launch in placement.launches]
    configs = [assign_devices(spec.config, spec.device_slot, spec.replicas_on_host) for spec in specs]
    assert [config.device_ids for config in configs] == [[0, 1], [2, 3]]


def test_a_gpu_that_is_not_there_is_named(four_gpus):
    with pytest.raises(RuntimeError, match=r"replica slot 1 was given GPUs \[2, 4\] but only 4 are visible"):
        assign_devices(EngineConfig(tensor_parallel=2, device_ids=[2, 4]), 1, 2)


def test_serve_refuses_a_map_that_does_not_fit_before_starting_anything(llama_path):
    with pytest.raises(ValueError, match=r"GPUs for 1 replica\(s\) but replica_num=2"):
        fastgen.serve(llama_path, deployment_name="mapped", replica_num=2, tensor_parallel=2, device_map=[0])
    with pytest.raises(ValueError, match="device_map or device_ids, not both"):
        fastgen.serve(llama_path, deployment_name="mapped", device_map=0, device_ids=[1])
    with pytest.raises(ValueError, match="host 'node-2'"):
        fastgen.serve(llama_path, deployment_name="mapped", device_map={"node-2": [[0]]})
    assert registry.read("mapped") is None  # nothing was started


def test_pipeline_takes_one_replicas_gpus(monkeypatch, llama_path):
    import fastgen.mii_pipeline as mii_pipeline

    configs: list[EngineConfig] = []
    monkeypatch.setattr(mii_pipeline, "Pipeline", lambda model, config: configs.append(config))
    fastgen.pipeline(llama_path, device_map=[[2, 3]], tensor_parallel=2)
    fastgen.pipeline(llama_path, device_map={"localhost": [[1]]})
    fastgen.pipeline(llama_path, device_map="auto")
    assert [config.device_ids for config in configs] == [[2, 3], [1], None]
    with pytest.raises(ValueError, match=r"for 2 replica\(s\) but replica_num=1.*a pipeline is one replica"):
        fastgen.pipeline(llama_path, device_map=[[0], [1]])
    with pytest.raises(ValueError, match="tensor_parallel=1"):
        fastgen.pipeline(llama_path, device_map=[0, 1])


def test_cli_checks_the_map(monkeypatch, capsys):
    import fastgen.serving.launcher as launcher

    assert cli_main(["serve", "--device-map", "[[0],[1]]"]) == 1
    assert "GPUs for 2 replica(s) but replica_num=1" in capsys.readouterr().err
    assert cli_main(["serve", "--device-map", "0;1"]) == 1
    assert "--device-map must be 'auto' or JSON" in capsys.readouterr().err

    def fake_serve(model, **options):
        raise ValueError(f"device_map={options['device_map']!r}")

    monkeypatch.setattr(launcher, "serve", fake_serve)
    assert cli_main(["serve", "--replicas", "2", "--device-map", "[[1],[0]]"]) == 1
    assert "device_map=[[1], [0]]" in capsys.readouterr().err


def test_a_deployment_passes_each_replica_its_gpus(llama_path):
    """End to end on CPU: each replica process receives its list (and says it ignores it here)."""
    client = fastgen.serve(
        llama_path, deployment_name="device-map", replica_num=2, device_map={"localhost": [[1], [0]]},
        dtype="float32", device="cpu", num_kv_blocks=32, max_model_len=64,
    )  # fmt: skip
    try:
        assert client.generate(["hello"], max_new_tokens=2)[0].generated_text is not None
        log_dir = Path(client.info.log_dir)
        logs = [(log_dir / f"replica-{index}.log").read_text() for index in range(2)]
    finally:
        client.terminate_server()
    assert "device ids [1] ignored" in logs[0]
    assert "device ids [0] ignored" in logs[1]
