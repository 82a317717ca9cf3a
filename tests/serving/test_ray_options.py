"""Ray without a cluster (issue 17): what is checked in the caller's process before anything
starts, that nothing imports Ray unless a deployment asks for it, and the placement's pieces
against a stand-in for Ray (how a replica's exit, its actor's death and a stop are reported; the
resources a replica takes). These run in CI, where Ray is not installed; the cluster itself is
tested in ``test_ray_cluster.py`` (marked ``ray``)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

import fastgen
from fastgen import cli
from fastgen.config import EngineConfig
from fastgen.serving import ray_placement
from fastgen.serving.errors import DeploymentStartError
from fastgen.serving.ray_placement import (
    ACTOR_DIED,
    RayCluster,
    RayNotInstalledError,
    RayReplicaUnit,
    check_fits,
    cluster_spec,
    replica_bundle,
)
from fastgen.supervisor import Launch


@pytest.fixture
def without_ray(monkeypatch):
    monkeypatch.setattr(ray_placement, "ray_installed", lambda: False)


@pytest.fixture
def with_ray(monkeypatch):
    """As if Ray were installed (nothing here imports it)."""
    monkeypatch.setattr(ray_placement, "ray_installed", lambda: True)


def test_nothing_imports_ray_until_a_deployment_asks_for_it():
    code = (
        "import json, sys, fastgen, fastgen.cli, fastgen.serving.launcher, fastgen.serving.server\n"
        "from fastgen.serving.ray_placement import RayCluster, cluster_spec\n"
        "cluster_spec('local')\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'ray')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_serve_on_ray_without_ray_says_what_to_install(without_ray, llama_path):
    with pytest.raises(RayNotInstalledError, match=r"pip install 'fastgen\[ray\]'"):
        fastgen.serve(llama_path, cluster="ray")
    with pytest.raises(ImportError, match="needs Ray"):  # an ImportError too, for callers that catch those
        fastgen.serve(llama_path, cluster=RayCluster(address="auto"))


def test_the_cli_says_it_in_one_line(without_ray, llama_path, capsys):
    assert cli.main(["serve", llama_path, "--ray", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastgen: error: ") and "pip install 'fastgen[ray]'" in err
    assert "Traceback" not in err


def test_ray_options_are_checked(with_ray, llama_path, capsys):
    assert cluster_spec("local") is None
    assert cluster_spec("ray", "10.0.0.1:6379") == RayCluster(address="10.0.0.1:6379")
    ported = RayCluster(router_port=29000)
    assert cluster_spec(ported, "auto") == RayCluster(address="auto", router_port=29000)
    with pytest.raises(ValueError, match="ray_address needs cluster='ray'"):
        cluster_spec("local", "auto")
    with pytest.raises(ValueError, match="cluster must be"):
        cluster_spec("kubernetes")
    with pytest.raises(ValueError, match="must not be negative"):
        cluster_spec(RayCluster(resources={"fastgen": -1}))
    # GPUs named for this host mean nothing on another node: refused before anything starts
    with pytest.raises(ValueError, match="on Ray a replica uses its actor's"):
        fastgen.serve(llama_path, cluster="ray", device_map=[0])
    with pytest.raises(ValueError, match="on Ray a replica uses its actor's"):
        fastgen.serve(llama_path, cluster="ray", device_ids=[0])
    assert cli.main(["serve", llama_path, "--ray-address", "auto", "--port", "0"]) == 1
    assert "--ray-address and --ray-router-port need --ray" in capsys.readouterr().err


# -- the placement's pieces, with a stand-in for Ray ---------------------------------------------------


class FakeActorDiedError(Exception):
    """Stands for ray.exceptions.RayActorError."""


class FakeRayError(Exception):
    """Stands for ray.exceptions.RayError."""


class FakeActor:
    """A `ReplicaHost` actor as `RayReplicaUnit` sees it: each ``method.remote()`` returns an
    awaitable; ``process`` resolves to the replica process's (exit code, log tail)."""

    def __init__(self, placed: bool = True):
        loop = asyncio.get_running_loop()
        self.process: asyncio.Future = loop.create_future()
        self.placed = loop.create_future()
        if placed:
            self.placed.set_result(None)
        self.killed = False
        self.stopped = False
        for name in ("start", "wait", "stop", "ping"):
            method = getattr(self, f"_{name}")
            setattr(self, name, SimpleNamespace(remote=lambda *a, m=method: asyncio.ensure_future(m(*a))))

    async def _start(self, name, module, payload, log_path):
        await self.placed
        return {"pid": 4242, "node_id": "node-b", "node_ip": "10.0.0.2", "log_path": log_path}

    async def _wait(self):
        return await self.process

    async def _stop(self):
        self.stopped = True
        self.process.set_result((-signal.SIGTERM, "terminated"))

    async def _ping(self):
        if self.killed:
            raise FakeActorDiedError("dead")


def fake_ray() -> SimpleNamespace:
    def kill(actor: FakeActor, no_restart: bool = True) -> None:
        actor.killed = True
        for future in (actor.process, actor.placed):
            if not future.done():
                future.set_exception(
                    FakeActorDiedError("The actor died unexpectedly before finishing this task.")
                )

    return SimpleNamespace(
        kill=kill, exceptions=SimpleNamespace(RayActorError=FakeActorDiedError, RayError=FakeRayError)
    )


def unit_of(actor: FakeActor) -> RayReplicaUnit:
    launch = Launch(
        name="replica 1", module="fastgen.serving.replica", payload=b"{}", log_path="/logs/replica-1.log"
    )
    return RayReplicaUnit(launch, actor, fake_ray(), {"CPU": 1.0, "GPU": 2.0})


def test_a_replica_process_exit_is_its_units_exit_and_frees_the_actor():
    async def main():
        actor = FakeActor()
        unit = unit_of(actor)
        await asyncio.sleep(0)  # the actor reports where it runs
        assert (unit.pid, unit.node_ip, unit.node_id, unit.exit_code) == (4242, "10.0.0.2", "node-b", None)
        actor.process.set_result((-signal.SIGKILL, "last line of the log"))
        code = await asyncio.wait_for(unit.wait_exit(), 5)
        await asyncio.sleep(0.01)  # the release that follows the report
        return unit, actor, code

    unit, actor, code = asyncio.run(main())
    assert code == unit.exit_code == -signal.SIGKILL
    assert unit.exit_summary() == "exited with code -9 (SIGKILL)"
    assert "replica 1 (pid 4242 on 10.0.0.2) exited with code -9" in unit.describe_exit()
    assert "last line of the log" in unit.describe_exit()
    assert actor.killed  # its bundle is free for the next start


def test_a_dead_actor_is_its_units_exit():
    async def main():
        actor = FakeActor()
        unit = unit_of(actor)
        await asyncio.sleep(0)
        fake_ray().kill(actor)
        return unit, await asyncio.wait_for(unit.wait_exit(), 5)

    unit, code = asyncio.run(main())
    assert code == unit.exit_code == ACTOR_DIED
    assert unit.exit_summary() == "lost its Ray actor"
    assert "before finishing this task" in unit.describe_exit()


def test_stop_asks_the_actor_then_kills_it_and_an_unplaced_actor_is_killed_at_once():
    async def main():
        actor = FakeActor()
        unit = unit_of(actor)
        await asyncio.sleep(0)
        stopped = await asyncio.wait_for(unit.stop(grace_s=0.01), 5)
        waiting = FakeActor(placed=False)
        pending = unit_of(waiting)
        await asyncio.sleep(0)
        tail = pending.output_tail()
        return actor, stopped, waiting, await asyncio.wait_for(pending.stop(grace_s=0.01), 5), tail

    actor, stopped, waiting, pending_code, tail = asyncio.run(main())
    assert actor.stopped and actor.killed and stopped == -signal.SIGTERM
    assert "waiting for Ray to place its actor" in tail and "'GPU': 2.0" in tail
    assert waiting.killed and not waiting.stopped and pending_code == ACTOR_DIED


def test_a_replica_takes_a_gpu_per_rank_on_a_gpu_cluster_and_a_cpu_otherwise():
    spec = RayCluster(num_cpus=2, resources={"fastgen": 1})
    tp2 = EngineConfig(tensor_parallel=2)
    assert replica_bundle(spec, tp2, cluster_gpus=8) == {"CPU": 2.0, "fastgen": 1.0, "GPU": 2.0}
    assert replica_bundle(spec, tp2, cluster_gpus=0) == {"CPU": 2.0, "fastgen": 1.0}
    assert "GPU" not in replica_bundle(spec, tp2.replace(device="cpu"), cluster_gpus=8)
    assert replica_bundle(RayCluster(), EngineConfig(device="cuda"), cluster_gpus=0) == {
        "CPU": 1.0,
        "GPU": 1.0,
    }


def test_a_replica_no_node_can_hold_is_refused_naming_the_nodes():
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 16.0, "GPU": 1.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 16.0, "GPU": 8.0}},
    ]
    check_fits({"CPU": 1.0, "GPU": 1.0}, nodes)
    with pytest.raises(DeploymentStartError) as info:
        check_fits({"CPU": 1.0, "GPU": 2.0}, nodes)
    assert "10.0.0.1: CPU=16, GPU=1" in str(info.value) and "10.0.0.9" not in str(info.value)
