"""Torch threads of a model on the CPU: `fastgen.runner.cpu_threads` and where the runner applies it."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from fastgen import EngineConfig
from fastgen.runner import ModelRunner, cpu_threads


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch):
    """Set the cores this process may use (and clear ``OMP_NUM_THREADS``)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_cores(count: int) -> None:
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(count)))

    return set_cores


def test_one_core_is_left_to_each_engine(cores) -> None:
    cases = [  # cores, tensor-parallel ranks, engines on the host (replicas), threads per rank
        (2, 1, 1, 1), (64, 1, 1, 63), (1, 1, 1, 1), (64, 4, 1, 15), (2, 2, 1, 1),
        (8, 1, 2, 3), (8, 2, 2, 1), (2, 1, 2, 1), (64, 2, 4, 7),
    ]  # fmt: skip
    for count, tp_size, engines, expected in cases:
        cores(count)
        assert cpu_threads(EngineConfig(), tp_size, engines) == expected, (count, tp_size, engines)


def test_replicas_on_one_host_share_the_cores(cores, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment's replicas on the CPU each get their share in their config (the runner applies
    it, in every rank's process); one replica, or a count chosen by the user, is left alone."""
    from fastgen.serving.replica import assign_devices

    cores(8)
    assert assign_devices(EngineConfig(device="cpu"), 1, 2).cpu_threads == 3
    assert assign_devices(EngineConfig(device="cpu", tensor_parallel=2), 0, 2).cpu_threads == 1
    assert assign_devices(EngineConfig(device="cpu"), 0, 1).cpu_threads is None
    assert assign_devices(EngineConfig(device="cpu", cpu_threads=5), 0, 2).cpu_threads == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert assign_devices(EngineConfig(device="cpu"), 0, 2).cpu_threads == 2


def test_the_config_then_omp_num_threads_win(cores, monkeypatch: pytest.MonkeyPatch) -> None:
    cores(64)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_threads(EngineConfig()) == 5
    assert cpu_threads(EngineConfig(cpu_threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty: not a count
    assert cpu_threads(EngineConfig()) == 63
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(cpu_threads=0)


@pytest.mark.parametrize("explicit", [True, False], ids=["cpu_threads", "default"])
def test_the_runner_thread_takes_the_count(llama_path, cores, explicit: bool) -> None:
    """The in-process executor builds the runner in the thread that runs its steps. With OpenMP a
    thread keeps the count it first used, so the runner sets it there, whatever that thread saw
    before; the caller's thread keeps its own."""
    from fastgen.models.config import ModelConfig

    caller_threads = torch.get_num_threads()
    wanted = 1 if caller_threads > 1 else 2
    cores(wanted + 1)  # the default: one core left to the engine
    config = EngineConfig(
        device="cpu", dtype="float32", num_kv_blocks=8, cpu_threads=wanted if explicit else None
    )
    model_config = ModelConfig.from_pretrained(llama_path)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(torch.set_num_threads, caller_threads).result()  # what the thread saw before
            pool.submit(ModelRunner, llama_path, config, model_config, 64, show_progress=False).result()
            assert pool.submit(torch.get_num_threads).result() == wanted
        assert torch.get_num_threads() == caller_threads
    finally:  # the count new threads start with is process-wide: give the next tests theirs back
        torch.set_num_threads(caller_threads)
