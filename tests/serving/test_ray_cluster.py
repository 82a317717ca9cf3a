"""Replicas on a Ray cluster (issue 17): a local cluster of two simulated nodes (one CPU and one
``fastgen-test-node`` resource each, so one replica fits a node) serves a deployment of two
replicas, one per node, behind the router and gateway of a server on this host; then one
replica's actor is killed, then another replica's process, and the deployment heals each time.

Marked ``ray`` and deselected by default (it starts a Ray cluster: 45-90 s on two busy cores); run it
with ``python -m pytest -m ray tests/serving/test_ray_cluster.py`` after ``pip install ray``.
The tests share one deployment and run in file order: the kills come after the outputs check.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

import fastgen
from fastgen import EngineDeadError
from fastgen.serving.ray_placement import NAMESPACE, RayCluster, actor_name
from fastgen.supervisor import RestartPolicy
from tests.processes import gone

from .conftest import greedy_texts
from .helpers import metric
from .helpers import wait_for as poll_until

pytestmark = pytest.mark.ray  # Ray is imported by the fixtures: without it, collection still works

NAME = "toy-on-ray"
PROMPTS = ["the engine schedules", "a paged cache of blocks", "decodes run first", "the budget"]
NODE_RESOURCE = "fastgen-test-node"
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB; the deployment stores nothing there
SLACK_S = 120.0  # bounds on waits for a loaded two-core box, not figures
QUICK = RestartPolicy(first_delay_s=0.1, max_delay_s=1.0)


@pytest.fixture(scope="module")
def ray():
    return pytest.importorskip("ray", reason="needs Ray: pip install 'fastgen[ray]'")


@pytest.fixture(scope="module")
def cluster(ray):
    """A head node without CPUs (only the drivers connect to it) and two nodes that hold one
    replica each; this process joins it too, to find and kill actors."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=OBJECT_STORE_BYTES)
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def deployment(cluster, llama_path):
    client = fastgen.serve(
        llama_path,
        deployment_name=NAME,
        replica_num=2,
        enable_restful_api=True,
        restful_api_port=0,
        dtype="float32",
        cluster=RayCluster(address=cluster.address, resources={NODE_RESOURCE: 1}),
        restart_policy=QUICK,
        start_timeout_s=240,
    )
    yield client
    client.terminate_server()  # idempotent: the last test already did


@pytest.fixture(scope="module")
def reference(llama_path):
    return [text for text, _, _ in greedy_texts(llama_path, PROMPTS, 8)]


def run(coroutine, timeout_s: float = SLACK_S):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


def wait_for(condition, what: str, timeout_s: float = SLACK_S):
    return poll_until(condition, what, timeout_s)


def worker_node_ids(ray) -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node["Alive"] and node["Resources"].get(NODE_RESOURCE)}


def test_two_replicas_on_two_nodes_answer_as_the_engine_in_process(ray, deployment, reference):
    replicas = deployment.deployment_info().replicas
    nodes = [r.node_id for r in replicas]
    assert len(set(nodes)) == 2 and set(nodes) == worker_node_ids(ray)  # one replica per node
    assert all(r.node_ip and r.state == "serving" for r in replicas)
    assert deployment.info.secret not in repr(replicas)
    # the router reaches them over TCP on this node's IP (as a remote node would)
    responses = deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [r.generated_text for r in responses] == reference
    assert all(r.requests_routed == 2 for r in deployment.deployment_info().replicas)
    url = deployment.info.http_url
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert metric(text, "fastgen_replica_serving", 'replica="1"') == 1


def test_a_killed_actor_fails_only_its_requests_and_its_replica_comes_back(ray, deployment, reference):
    url = deployment.info.http_url
    before = deployment.deployment_info().replicas[1]

    async def main():
        streams = [
            deployment.astream(f"the engine {i}", max_new_tokens=400, ignore_eos=True) for i in range(4)
        ]
        await asyncio.gather(*(anext(s) for s in streams))  # all four run, two on each replica
        assert [r.in_flight for r in (await deployment.ainfo()).replicas] == [2, 2]
        ray.kill(ray.get_actor(actor_name(NAME, 1, 0)), no_restart=False)  # replica 1's first actor

        async def drain(stream):
            try:
                return [d async for d in stream][-1]
            except EngineDeadError as exc:
                return exc

        results = await asyncio.gather(*(drain(s) for s in streams))
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            down = await http.get("/health")
        return results, down

    results, down = run(main())
    failed = [r for r in results if isinstance(r, EngineDeadError)]
    assert len(failed) == 2 and all("replica 1 lost its Ray actor" in str(e) for e in failed)
    assert [r.finish_reason for r in results if not isinstance(r, Exception)] == ["length"] * 2
    assert down.status_code == 503
    (problem,) = down.json()["problems"]
    assert problem.startswith("replica 1 ") and problem.endswith("lost its Ray actor"), problem
    # the supervisor starts a new actor (Ray does not: max_restarts=0), on the node whose
    # resources its placement group holds
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, "/health answering 200")
    after = deployment.deployment_info().replicas
    assert [(r.state, r.restarts) for r in after] == [("serving", 0), ("serving", 1)]
    assert after[1].node_id == before.node_id and after[1].pid != before.pid
    assert actor_name(NAME, 1, 1) in ray.util.list_named_actors()  # its second actor
    assert wait_for(lambda: gone(before.pid), "the old replica process gone (it watches its actor)")
    responses = deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [r.generated_text for r in responses] == reference
    assert metric(httpx.get(f"{url}/metrics").text, "fastgen_replica_restarts_total", 'replica="1"') == 1


def test_a_killed_replica_process_is_restarted_through_a_new_actor(ray, deployment, reference):
    """The actor lives on and reports its process's exit; the next actor waits for its bundle."""
    url = deployment.info.http_url
    before = deployment.deployment_info().replicas[0]
    os.kill(before.pid, signal.SIGKILL)
    down = wait_for(lambda: (r := httpx.get(f"{url}/health", timeout=10)).status_code == 503 and r, "503")
    (problem,) = down.json()["problems"]
    assert problem.startswith("replica 0 ") and problem.endswith("exited with code -9 (SIGKILL)"), problem
    wait_for(lambda: httpx.get(f"{url}/health", timeout=10).status_code == 200, "/health answering 200")
    after = deployment.deployment_info().replicas
    assert [(r.state, r.restarts) for r in after] == [("serving", 1), ("serving", 1)]
    assert after[0].node_id == before.node_id and actor_name(NAME, 0, 1) in ray.util.list_named_actors()
    assert after[0].exit_code == -signal.SIGKILL
    responses = deployment.generate(PROMPTS, max_new_tokens=8, do_sample=False)
    assert [r.generated_text for r in responses] == reference


def test_terminate_stops_every_actor_and_replica_process(ray, deployment):
    replicas = deployment.deployment_info().replicas
    deployment.terminate_server()
    assert deployment._process.returncode == 0
    assert all(wait_for(lambda pid=r.pid: gone(pid), f"replica {r.replica_id} gone") for r in replicas)
    wait_for(
        lambda: not [name for name in ray.util.list_named_actors() if name.startswith(f"{NAME}/")],
        "every actor of the deployment gone",
    )
